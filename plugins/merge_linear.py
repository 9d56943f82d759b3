"""Built-in plugin: the ``linear`` (weighted mean) and ``task-arithmetic`` merge strategies.

The maths lives in `fmhub.models.merge_math`; this module only reads options.
torch is imported inside ``merge`` (the git filter loads plugins at start-up).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from fmhub import hookimpl
from fmhub.base.errors import MergeConflict


class Linear:
    """Σ wᵢ θᵢ / Σ wᵢ over the sides (options: ``weights``, default all 1)."""

    name = "linear"
    needs_base = False
    elementwise = True

    def merge(
        self, name: str, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int, options: Mapping[str, Any]
    ) -> Any:
        from fmhub.models import merge_math

        return merge_math.linear([load(i) for i in range(sides)], options.get("weights"))


class TaskArithmetic:
    """base + scale · Σ wᵢ (θᵢ − base) (options: ``weights`` default all 1, ``scale`` default 1)."""

    name = "task-arithmetic"
    needs_base = True
    elementwise = True

    def merge(
        self, name: str, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int, options: Mapping[str, Any]
    ) -> Any:
        from fmhub.models import merge_math

        if base is None:
            raise MergeConflict("task-arithmetic needs a merge base (it adds each side's change from the base)")
        scale = options.get("scale")
        return merge_math.task_arithmetic(
            base(), [load(i) for i in range(sides)], options.get("weights"), 1.0 if scale is None else scale
        )


@hookimpl
def fmhub_merge_strategies() -> list[Any]:
    return [Linear(), TaskArithmetic()]
