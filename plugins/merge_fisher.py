"""Built-in plugin: the ``fisher`` merge strategy (Fisher-weighted averaging, Matena & Raffel).

Needs each side's diagonal Fisher information, given as ``options["fisher"]``
(a callable ``fisher(i)``), which fmhub fills from the recipe's ``fisher:``
files. ``weights`` default to all 1. torch is imported inside ``merge``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from fmhub import hookimpl
from fmhub.base.errors import MergeConflict


class Fisher:
    """Σ wᵢ Fᵢ θᵢ / Σ wᵢ Fᵢ elementwise (with a small floor on F; see `fmhub.models.merge_math.fisher_weighted`)."""

    name = "fisher"
    needs_base = False
    elementwise = True

    def merge(
        self, name: str, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int, options: Mapping[str, Any]
    ) -> Any:
        from fmhub.models import merge_math

        fisher = options.get("fisher")
        if fisher is None:
            raise MergeConflict(
                "the fisher strategy needs Fisher diagonals: give `fisher:` files in the recipe or "
                "choose another strategy (e.g. linear)"
            )
        return merge_math.fisher_weighted(
            [load(i) for i in range(sides)], [fisher(i) for i in range(sides)], options.get("weights")
        )


@hookimpl
def fmhub_merge_strategies() -> list[Any]:
    return [Fisher()]
