"""Partial checkout: some tensors of a checkpoint into a file of their own, for inspection.

``fmhub extract main:model/ --tensors "model.layers.0.*" -o layer0.safetensors``
reads only the selected tensors' objects (downloading only those when the
store lacks them) and writes a valid safetensors file holding just them, with
the checkpoint's ``__metadata__``; ``safetensors.safe_open`` and torch load it
like any other. The work tree is not touched.

From ``REV:PATH`` it is a checkout of those tensors, so checkout's read rule
applies (`fmhub.models.views.guard`): a selected tensor the access policy denies the
user refuses the whole extraction, naming the tensor and the rule; nothing is
fetched or written. Select the tensors you may read instead.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Sequence

from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.plugin.interfaces import TensorInfo
from fmhub.models.views import CheckpointView, TensorRef


@dataclass
class Extracted:
    output: str
    tensors: list[str]
    bytes_written: int


def select(view: CheckpointView, patterns: Sequence[str]) -> list[TensorRef]:
    """The tensors whose names match any of ``patterns`` (shell-style), in checkpoint order."""
    chosen = [t for t in view if any(fnmatch.fnmatchcase(t.name, p) for p in patterns)]
    if not chosen:
        some = ", ".join(list(view.tensors)[:5])
        raise FmhubError(f"{view.label}: no tensor matches {' or '.join(patterns)} (tensors are named like: {some})")
    return chosen


def check_readable(chosen: Sequence[TensorRef]) -> None:
    """Refuse (one line, the first withheld tensor and its rule) before anything is fetched or written."""
    from fmhub.governance.access import AccessDenied

    why = next((t.denied for t in chosen if t.denied is not None), None)
    if why is not None:
        raise AccessDenied(f"{why}; nothing was extracted", getattr(why, "decision", None))


def extract(
    view: CheckpointView,
    patterns: Sequence[str],
    output: str,
    before_read: Callable[[list[TensorRef]], None] | None = None,
) -> Extracted:
    """Write the selected tensors of ``view`` to ``output`` (temp file, fsync, rename: all or nothing).

    ``before_read`` gets the selected tensors first, so a caller can fetch
    their objects from a remote in one batch.
    """
    from fmhub.core.formats import format_named

    chosen = select(view, patterns)
    check_readable(chosen)
    if before_read is not None:
        before_read(chosen)
    header = format_named("safetensors").build_header([TensorInfo(t.name, t.dtype, t.shape, t.size) for t in chosen], view.metadata)
    with atomic_write(output, prefix=".fmhub-extract-") as f:
        f.write(header)
        for t in chosen:
            f.write(t.read())
    return Extracted(output, [t.name for t in chosen], len(header) + sum(t.size for t in chosen))
