"""Built-in plugin: the ``ours`` and ``theirs`` merge strategies (keep one side's tensor as is)."""

from __future__ import annotations

from fmhub import hookimpl


class KeepSide:
    needs_base = False
    elementwise = False  # keeps a whole side without reading it

    def __init__(self, name: str, side: int) -> None:
        self.name = name
        self.side = side

    def merge(self, name, base, load, sides, options):
        return self.side if self.side >= 0 else sides + self.side


@hookimpl
def fmhub_merge_strategies():
    return [KeepSide("ours", 0), KeepSide("theirs", -1)]
