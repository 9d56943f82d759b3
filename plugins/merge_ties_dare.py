"""Built-in plugin: the ``ties``, ``dare-linear`` and ``dare-ties`` merge strategies.

All three work on task vectors (side − base), so they need a merge base.
Options: ``density`` (required, in (0, 1]), ``weights`` (default all 1),
``scale`` (default 1), ``majority_sign`` ("total" or "frequency", default
"total"), and for DARE ``seed`` (default 0; each tensor's drop mask is seeded
from (seed, tensor name), see `fmhub.models.merge_math.seed_for`).
torch is imported inside ``merge`` (the git filter loads plugins at start-up).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from fmhub import hookimpl
from fmhub.base.errors import MergeConflict


def _get(options: Mapping[str, Any], key: str, default: Any) -> Any:
    value = options.get(key)
    return default if value is None else value


class _TaskVectorStrategy:
    needs_base = True
    elementwise = False  # TIES trims by a per-tensor magnitude rank; DARE draws one mask stream per tensor

    def __init__(self, name: str) -> None:
        self.name = name

    def _inputs(self, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int, options: Mapping[str, Any]):
        if base is None:
            raise MergeConflict(f"{self.name} needs a merge base (it works on each side's change from the base)")
        if options.get("density") is None:
            raise MergeConflict(f"{self.name} needs `density` (the fraction of each task vector to keep, in (0, 1])")
        return base(), [load(i) for i in range(sides)]


class Ties(_TaskVectorStrategy):
    """TIES-merging: trim each task vector to its largest ``density`` fraction, elect signs, disjoint mean."""

    def merge(
        self, name: str, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int, options: Mapping[str, Any]
    ) -> Any:
        from fmhub.models import merge_math

        b, ts = self._inputs(base, load, sides, options)
        return merge_math.ties(
            b, ts, options.get("weights"), options["density"],
            scale=_get(options, "scale", 1.0), majority_sign=_get(options, "majority_sign", "total"),
        )


class Dare(_TaskVectorStrategy):
    """DARE: drop task-vector entries at random (keep ``density``), rescale by 1/density, then combine."""

    def __init__(self, name: str, combine: str) -> None:
        super().__init__(name)
        self.combine = combine

    def merge(
        self, name: str, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int, options: Mapping[str, Any]
    ) -> Any:
        from fmhub.models import merge_math

        b, ts = self._inputs(base, load, sides, options)
        return merge_math.dare(
            b, ts, options.get("weights"), options["density"], int(_get(options, "seed", 0)),
            combine=self.combine, scale=_get(options, "scale", 1.0), name=name,
            majority_sign=_get(options, "majority_sign", "total"),
        )


@hookimpl
def fmhub_merge_strategies() -> list[Any]:
    return [Ties("ties"), Dare("dare-linear", "linear"), Dare("dare-ties", "ties")]
