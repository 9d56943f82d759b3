"""The ``caps`` cleaner: drops rows whose text is mostly capital letters (shouting, spam).

``- caps: {max_ratio: 0.6, min_letters: 10, columns: [title, body]}`` drops a row when more
than ``max_ratio`` of its letters are capitals; texts with fewer than ``min_letters`` letters
are kept (an acronym is not shouting).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pydantic import Field

from fmhub.plugin.interfaces import CleanContext, Drop
from fmhub.plugin.options import Options, parse_options, text_of


class CapsOptions(Options):
    max_ratio: float = Field(0.5, ge=0, le=1)
    min_letters: int = Field(10, ge=1)
    columns: tuple[str, ...] = ()


class Caps:
    name = "caps"
    scope = "row"  # judges each row alone: runs in the data backend's workers

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> CapsOptions:
        # the config travels to the workers with every batch: a frozen pydantic model pickles
        return parse_options(self.name, CapsOptions, {**options, "columns": context.columns})

    def clean(self, rows: Sequence[Mapping[str, Any]], config: CapsOptions) -> list:
        out: list = []
        for row in rows:
            text = text_of(row, config.columns)
            if isinstance(text, Drop):  # no such column, or not text: say so rather than pass it silently
                out.append(text)
                continue
            letters = [c for c in text if c.isalpha()]
            upper = sum(c.isupper() for c in letters)
            if len(letters) >= config.min_letters and upper > config.max_ratio * len(letters):
                out.append(Drop(f"{upper} of {len(letters)} letters are capitals > max_ratio {config.max_ratio}",
                                {"capitals": upper, "letters": len(letters)}))
            else:
                out.append(None)
        return out
