"""Data files (datasets: jsonl, parquet) as content-defined chunks: clean, smudge, and reading them back.

A data file is stored as a version-3 manifest (docs/manifest.md, "Data
files"): the whole file's sha256 and its chunks, each one object, cut by the
format's chunker (`fmhub.core.chunking`). Editing a few rows changes a few chunks,
so a new version stores a few new objects; unchanged chunks are shared with
every other version and file.

Clean streams: one pass, one block (1 MiB) in memory plus the object writer's
bounded queue, whatever the file size; chunk objects are hashed and written in
the store's worker thread while the next block is chunked. Smudge copies the
chunks out in order, each verified against its oid, and checks the whole
file's sha256 at the end.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable

from fmhub.core.chunking import Chunking, chunk_stream
from fmhub.base.errors import CorruptObject, FmhubError, MissingObject, StoreWriteError
from fmhub.core.formats import SNIFF_BYTES, data_format_for, data_format_named, sniff_format
from fmhub.core.manifest import CHUNK_DTYPE, Manifest, TensorEntry
from fmhub.core.store import ObjectStore
from fmhub.core.streams import ObjectStream, copy_objects

if TYPE_CHECKING:
    from fmhub.plugin.interfaces import DataFormat


def clean_data(read: Callable[[int], bytes], fmt: DataFormat, store: ObjectStore, path: str, previous: Manifest | None = None) -> Manifest:
    """Store a data file as chunk objects and return its manifest.

    A file that was stored before (``previous``, git's staged version, in the
    same format) is cut with that version's chunking, not today's default: a
    re-clean of unchanged bytes then gives back the same manifest (`git
    status` stays clean) and an edit dedupes against the old chunks even
    after fmhub's defaults change.
    """
    chunking: Chunking = fmt.chunking
    if previous is not None and previous.is_data and previous.format == fmt.name:
        chunking = previous.chunking
    whole = hashlib.sha256()
    sizes: list[int] = []
    stream = ObjectStream(store)
    try:
        try:
            open_size = 0
            for piece, ends in chunk_stream(read, chunking):
                if open_size == 0:
                    stream.begin()
                stream.write(piece)
                whole.update(piece)
                open_size += len(piece)
                if ends:
                    stream.end_object()
                    sizes.append(open_size)
                    open_size = 0
            oids = stream.close()
        except BaseException:
            stream.abort()
            raise
        finally:
            store.flush()
    except StoreWriteError as exc:  # a full disk, say: name the file it struck
        raise StoreWriteError(f"{path}: {exc}") from None
    chunks = [TensorEntry(f"chunk {i}", CHUNK_DTYPE, (n,), n, oid) for i, (n, oid) in enumerate(zip(sizes, oids))]
    return Manifest(fmt.name, sum(sizes), None, 0, chunks, None, chunking, whole.hexdigest())


class _HashingWriter:
    """Passes writes on to ``out`` while hashing them: smudge checks the rebuilt file's sha256."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.hash, self.size = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


def smudge_data(manifest: Manifest, store: ObjectStore, out: BinaryIO, path: str, on_start: Callable[[], None] | None = None) -> None:
    """Write a data file's bytes from its chunks (whose presence the caller has checked), verifying each chunk and the whole."""
    if on_start:
        on_start()
    w = _HashingWriter(out)
    offsets = _offsets(manifest)
    labels = [f"chunk {i} (bytes {offsets[i]}-{offsets[i + 1]})" for i in range(len(manifest.tensors))]
    copy_objects(store, [t.oid for t in manifest.tensors], w, labels=labels)
    if w.size != manifest.size or w.hash.hexdigest() != manifest.sha256:
        raise CorruptObject(
            f"its chunks rebuild {w.size} bytes with sha256:{w.hash.hexdigest()}, not the {manifest.size} bytes with "
            f"sha256:{manifest.sha256} its manifest names; the manifest was edited or is corrupt"
        )


def _offsets(manifest: Manifest) -> list[int]:
    out = [0]
    for t in manifest.tensors:
        out.append(out[-1] + t.size)
    return out


class ChunkedFile(io.RawIOBase):
    """A data file read from its chunk objects, seekable (pyarrow reads parquet footers first), one object open at a time.

    Objects are not re-hashed here (readers for diffs); smudge is what verifies.
    """

    def __init__(self, manifest: Manifest, store: ObjectStore, path: str) -> None:
        super().__init__()
        self._manifest, self._store, self._path = manifest, store, path
        self._offsets = _offsets(manifest)
        self._pos = 0
        self._open: tuple[int, BinaryIO] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._manifest.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buf) -> int:
        if self._pos >= self._manifest.size:
            return 0
        i = bisect.bisect_right(self._offsets, self._pos) - 1
        f = self._object(i)
        f.seek(self._pos - self._offsets[i])
        want = min(len(buf), self._offsets[i + 1] - self._pos)
        n = f.readinto(memoryview(buf)[:want]) or 0
        if n == 0:
            raise CorruptObject(f"{self._path}: chunk {i} (sha256:{self._manifest.tensors[i].oid}) is shorter than its manifest says; run `fmhub fsck`")
        self._pos += n
        return n

    def _object(self, i: int) -> BinaryIO:
        if self._open is not None and self._open[0] == i:
            return self._open[1]
        if self._open is not None:
            self._open[1].close()
            self._open = None
        oid = self._manifest.tensors[i].oid
        try:
            f = self._store.open_object(oid, buffering=0)
        except KeyError:
            raise MissingObject(
                f"{self._path}: chunk {i}: object sha256:{oid} is not in the store {self._store.path}; fetch it (`fmhub fetch`)"
            ) from None
        self._open = (i, f)
        return f

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None
        super().close()


@dataclass
class DataSide:
    """One version of a data file for diffs: its format, size, sha256 (when known without reading) and a way to open it."""

    path: str
    format: DataFormat
    size: int
    sha256: str | None
    opener: Callable[[], BinaryIO]
    chunk_oids: tuple[str, ...] = ()  # from a manifest: equal lists mean equal files, nothing read

    def open(self) -> BinaryIO:
        return self.opener()

    @classmethod
    def from_manifest(cls, manifest: Manifest, store: ObjectStore | None, path: str) -> "DataSide":
        fmt = data_format_named(manifest.format)

        def opener() -> BinaryIO:
            if store is None:
                raise FmhubError(f"{path}: no object store to read its chunks from")
            return io.BufferedReader(ChunkedFile(manifest, store, path), buffer_size=1 << 20)

        return cls(path, fmt, manifest.size, manifest.sha256, opener, tuple(t.oid for t in manifest.tensors))

    @classmethod
    def from_file(cls, filename: str, path: str, fmt: DataFormat) -> "DataSide":
        return cls(path, fmt, os.path.getsize(filename), None, lambda: open(filename, "rb", buffering=1 << 20))


def side_from_file(filename: str, path: str, store_opener: Callable[[], ObjectStore | None]) -> DataSide | None:
    """A file on disk as a dataset side: a data file, or a file still holding a data-file manifest (read through
    the store); None when it is neither (a checkpoint, or a file no data format claims)."""
    from fmhub.core.manifest import MAX_MANIFEST_BYTES, is_manifest

    with open(filename, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if is_manifest(head):
            m = Manifest.from_bytes(head + f.read(MAX_MANIFEST_BYTES), path)
            return DataSide.from_manifest(m, store_opener(), path) if m.is_data else None
    fmt = file_data_format(filename, path)
    return DataSide.from_file(filename, path, fmt) if fmt is not None else None


def file_data_format(filename: str, path: str) -> DataFormat | None:
    """The data format of a file on disk (not a manifest), from its first bytes or ``path``'s ending."""
    with open(filename, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if sniff_format(head) is not None:
        return None  # a checkpoint, whatever its name
    return data_format_for(path, head)
