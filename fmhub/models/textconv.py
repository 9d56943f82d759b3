"""git's textconv for fmhub files: one line per tensor, for ``git log -p`` and ``git show``.

`textconv` describes one checkpoint (a file, or a manifest read through the
store) as a summary line, its ``__metadata__``, then per tensor ``tensor NAME
DTYPE [SHAPE] sha256:<12 hex> norm=.. mean=.. std=..``, streaming its bytes.
Where an access policy governs the repository every statistic is withheld
for every user alike (`textconv_withheld`: git caches this output per blob).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Iterator, Mapping

from fmhub.base.errors import CorruptCheckpoint, FmhubError
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest
from fmhub.core.store import ObjectStore, file_sha256
from fmhub.models.difftext import number_text, shape_text
from fmhub.models.tensorstats import CHUNK_ELEMS, READ_CHUNK, Codec, Reader, chunk_elems_for, codec, sumsq
from fmhub.models.views import CheckpointView


class _Moments:
    """Running count, sum and sum of squares (Chan's parallel update for the variance)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.sq = 0.0

    def add(self, x) -> None:
        import numpy as np

        if x.size == 0:
            return
        if np.iscomplexobj(x):
            x = np.abs(x)
        self.sq += sumsq(x)
        k = x.size
        mean = float(x.mean())
        m2 = float(np.dot(x - mean, x - mean))
        delta = mean - self.mean
        tot = self.n + k
        self.mean += delta * k / tot
        self.m2 += m2 + delta * delta * self.n * k / tot
        self.n = tot

    def stats(self) -> str:
        if self.n == 0:
            return "norm=0 mean=- std=-"
        std = math.sqrt(self.m2 / self.n) if self.m2 >= 0 else math.nan
        return f"norm={number_text(math.sqrt(self.sq), 6)} mean={number_text(self.mean, 6)} std={number_text(std, 6)}"


def _tensor_line(name: str, dtype: str, shape: tuple[int, ...], oid: str | None, stats: str) -> str:
    sha = f"sha256:{oid[:12]}" if oid else "sha256:?"
    return f"tensor {json.dumps(name, ensure_ascii=False)} {dtype} {shape_text(shape)} {sha} {stats}".rstrip()


def _summary_lines(fmt: str, size: int, count: int, metadata: Mapping[str, str] | None) -> list[str]:
    from fmhub.base.units import human_bytes

    lines = [f"fmhub {fmt} checkpoint: {count} tensors, {human_bytes(size)}"]
    if metadata is not None:
        lines.append("metadata " + json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False, separators=(",", ":")))
    return lines


def textconv(filename: str, store_opener: Callable[[], ObjectStore] | None = None, chunk_elems: int = CHUNK_ELEMS) -> Iterator[str]:
    """Lines describing a checkpoint file (or a manifest, read through the store): one per tensor,
    ``tensor NAME DTYPE [SHAPE] sha256:<12 hex> norm=.. mean=.. std=..``, streaming the file.

    Where an access policy governs, no statistic, for anyone (`textconv_withheld`).
    """
    from fmhub.core.checkpoint import file_layout
    from fmhub.core.formats import SNIFF_BYTES, sniff_format

    withheld = textconv_withheld()
    with open(filename, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if not head:
            return
        if is_manifest(head):
            m = Manifest.from_bytes(head + f.read(MAX_MANIFEST_BYTES), filename)
            yield from _summary_lines(m.format, m.size, len(m.tensors), m.metadata)
            store = store_opener() if store_opener and not withheld else None
            view = CheckpointView.from_manifest(m, store, filename) if store is not None else None
            for t in m.tensors:
                stats = withheld or "norm=? mean=? std=?"
                if view is not None:
                    mom = _Moments()
                    c = codec(t.dtype)
                    try:
                        if c.decodable:
                            with Reader(view.tensors[t.name]) as r:
                                _stream(r.read, t.size, c, chunk_elems, None, mom)
                            stats = mom.stats()
                        else:
                            stats = ""
                    except (FmhubError, OSError):
                        pass  # object not here: name and hash only
                yield _tensor_line(t.name, t.dtype, t.shape, t.oid, stats)
            return
        if head.startswith(b"version https:/"):  # a Git LFS pointer: described by its object, as the file it stands for
            from fmhub.models.views import LFS_POINTER_MAX, lfs_object, lfs_pointer_in

            pointer = lfs_pointer_in(head + f.read(LFS_POINTER_MAX))
            if pointer is not None:
                try:
                    where = lfs_object(pointer, store_opener() if store_opener else None, filename)
                except FmhubError:
                    yield f"git-lfs object sha256:{pointer.oid[:12]} ({pointer.size} bytes) is not local; `git lfs fetch` to read it"
                    return
                yield from textconv(where, store_opener, chunk_elems)
                return
        if sniff_format(head) is None:
            yield f"not a checkpoint fmhub can read ({os.path.getsize(filename)} bytes, sha256:{file_sha256(filename)[:12]})"
            return
        fmt, layout = file_layout(f, filename)
        size = os.path.getsize(filename)
        yield from _summary_lines(fmt.name, size, len(layout.tensors), layout.metadata)
        for t in layout.tensors:
            c = codec(t.dtype)
            h = hashlib.sha256()
            mom = _Moments() if c.decodable and not withheld else None

            def read(n: int) -> bytes:
                data = f.read(n)
                if len(data) != n:
                    raise CorruptCheckpoint(f"{filename}: tensor {t.name!r} is truncated; the file is incomplete")
                return data

            _stream(read, t.size, c, chunk_elems, h, mom)
            yield _tensor_line(t.name, t.dtype, t.shape, h.hexdigest(), withheld or (mom.stats() if mom else ""))


def textconv_withheld(what: str = "values") -> str | None:
    """What git's textconv shows instead of every statistic (``what``: values, rows) where an access policy
    governs the repository, for every user alike; None where none does.

    git caches textconv output per blob for every user of the clone (``diff.fmhub.cachetextconv``, which
    makes ``git log -p`` cheap: each side is otherwise smudged and read in full on every run), and it gives
    no path to decide by. So the output must not depend on who made it: only what the manifest says
    (names, dtypes, shapes, hashes), the same from the checkpoint a permitted user gets and from the
    placeholder another gets. `fmhub diff` and ``git diff`` show each user what they may read.
    """
    from fmhub.governance.access import governs

    return f"({what} withheld by the access policy for every user: git caches this output; see `fmhub diff`)" if governs() else None


def _stream(read: Callable[[int], bytes], size: int, c: Codec, chunk_elems: int, h, mom: _Moments | None) -> None:
    step = c.nbytes(chunk_elems_for(c, chunk_elems)) if c.bits else READ_CHUNK
    left = size
    while left:
        k = min(step, left)
        data = read(k)
        if h is not None:
            h.update(data)
        if mom is not None:
            mom.add(c.values(data))
        left -= k

