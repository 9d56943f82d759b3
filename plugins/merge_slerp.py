"""Built-in plugin: the ``slerp`` merge strategy (spherical interpolation between exactly two sides).

Option ``t`` (default 0.5): 0 gives side 0, 1 gives side 1. See
`fmhub.models.merge_math.slerp` for the colinear fallback. torch is imported inside ``merge``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from fmhub import hookimpl
from fmhub.base.errors import MergeConflict


class Slerp:
    name = "slerp"
    needs_base = False
    elementwise = False  # the angle between the sides is a statistic of the whole tensor

    def merge(
        self, name: str, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int, options: Mapping[str, Any]
    ) -> Any:
        from fmhub.models import merge_math

        if sides != 2:
            raise MergeConflict(f"slerp interpolates between exactly 2 sides, got {sides}; use linear for more")
        t = options.get("t")
        return merge_math.slerp(load(0), load(1), 0.5 if t is None else t)


@hookimpl
def fmhub_merge_strategies() -> list[Any]:
    return [Slerp()]
