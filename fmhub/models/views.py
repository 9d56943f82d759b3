"""A checkpoint seen as tensors by name, wherever it lives: the input of diffs and merges.

A `CheckpointView` maps tensor names to `TensorRef`s whose bytes are read
lazily: whole (`TensorRef.read`, `TensorRef.load`) for merges, or streamed in
chunks from `TensorRef.open` for diffs, so neither ever holds a whole model.
Sources:

* an fmhub manifest plus the object store (each tensor's oid is known, so
  equal tensors are recognised without reading them),
* a checkpoint file on disk (header parsed by the format plugin, tensors read
  by offset; no oid); a work-tree file that still holds a manifest is read
  through the store, and one holding a Git LFS pointer through its LFS object,
* several shard files combined (`CheckpointView.combine`; names must be unique
  across shards, which is what lets a tensor move between shards),
* ``REV:PATH`` in the current git repository (a file or a directory of shards;
  tensors the access policy denies the user are withheld, `guard`),
* tensors computed on demand (a LoRA update applied to a base weight, a
  Fisher diagonal from a plugin): a ``reader`` instead of an ``opener``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

from fmhub.core import tensors
from fmhub.base.errors import CorruptCheckpoint, CorruptObject, FmhubError, MissingObject
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, TensorEntry, is_manifest
from fmhub.core.store import ObjectStore

Opener = Callable[[], "tuple[BinaryIO, int]"]  # -> (open file, offset of the tensor's first byte)


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a view: what it is, and how to get its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    oid: str | None  # sha256 of the bytes when known without reading them
    path: str | None  # the file, shard or REV:PATH it belongs to, for messages
    opener: Opener | None = field(default=None, repr=False, compare=False)
    reader: Callable[[], bytes | bytearray] | None = field(default=None, repr=False, compare=False)
    storage: tuple[tuple[str, int], ...] = field(default=(), repr=False, compare=False)  # store objects it needs, if from a store
    denied: Exception | None = field(default=None, repr=False, compare=False)  # why the access policy withholds its bytes (`guard`)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def open(self) -> tuple[BinaryIO, int]:
        """A file positioned anywhere, and the offset of this tensor's byte 0 in it."""
        if self.opener is not None:
            return self.opener()
        return io.BytesIO(bytes(self.read())), 0

    def read(self) -> bytes | bytearray:
        """All the tensor's bytes (a bytearray when read from a file or the store: tensors share it)."""
        if self.reader is not None:
            return self.reader()
        f, offset = self.open()
        with f:
            f.seek(offset)
            from fmhub.core.tensorio import allocate

            data = allocate(self.size, f"{self.path}: tensor {self.name!r}")
            got = 0
            while got < self.size:
                n = f.readinto(memoryview(data)[got:])
                if not n:
                    raise CorruptCheckpoint(f"{self.path}: tensor {self.name!r} is truncated (the file changed while being read?)")
                got += n
        if self.oid is not None and hashlib.sha256(data).hexdigest() != self.oid:
            raise CorruptObject(f"{self.path}: tensor {self.name!r}: object sha256:{self.oid} is corrupt; run `fmhub fsck`")
        return data

    def load(self) -> Any:
        """The tensor, built over the buffer `read` returns (no copy): do not modify it in place."""
        return tensors.from_bytes(self.read(), self.dtype, self.shape)

    def slice(self, start: int, stop: int) -> "TensorRef":
        """Flattened elements [start, stop) as a 1-D tensor, read straight from the file (no oid)."""
        item = self.size // self.numel if self.numel else 0
        opener = self.opener
        if opener is None or item * self.numel != self.size:
            raise ValueError(f"{self.name}: only whole-byte tensors read from a file can be sliced")

        def sliced() -> tuple[BinaryIO, int]:
            f, offset = opener()
            return f, offset + start * item

        return TensorRef(self.name, self.dtype, (stop - start,), (stop - start) * item, None, self.path, sliced)

    def withheld(self, why: Exception) -> "TensorRef":
        """This tensor with its bytes withheld: name, dtype, shape and oid stay, any read raises ``why``."""

        def refuse():
            raise why.with_traceback(None)

        return TensorRef(self.name, self.dtype, self.shape, self.size, self.oid, self.path, refuse, refuse, (), why)

    def computed(self, reader: Callable[[], bytes | bytearray], path: str | None = None, dtype: str | None = None) -> "TensorRef":
        """A tensor of this name and shape whose bytes come from ``reader`` (no oid)."""
        dtype = dtype or self.dtype
        size = self.size if dtype == self.dtype else self.numel * (tensors.itemsize(dtype))
        return TensorRef(self.name, dtype, self.shape, size, None, path or self.path, None, reader)


def entry_ref(entry: TensorEntry, store: ObjectStore, path: str | None) -> TensorRef:
    """A manifest entry whose bytes come from the store."""

    def opener() -> tuple[BinaryIO, int]:
        where = f"{path}: " if path else ""
        try:
            f = store.open_object(entry.oid, buffering=0)
        except KeyError:
            raise MissingObject(
                f"{where}tensor {entry.name!r}: object sha256:{entry.oid} is not in the store {store.path}; "
                "fetch it (`fmhub fsck` lists what is missing)"
            ) from None
        actual = os.fstat(f.fileno()).st_size
        if actual != entry.size:  # before a reader allocates the size the manifest declares
            f.close()
            raise CorruptObject(f"{where}tensor {entry.name!r}: object sha256:{entry.oid} holds {actual} bytes, "
                                f"the manifest declares {entry.size}; run `fmhub fsck`")
        return f, 0

    from fmhub.core.tensorio import TensorFile, needs_rebuild, read_tensor

    if needs_rebuild(entry, store):
        label = f"{path}: " if path else ""
        # a chain or a compressed tensor: streamed by TensorFile, or rebuilt whole; both checked against entry.oid
        return TensorRef(entry.name, entry.dtype, entry.shape, entry.size, entry.oid, path, lambda: (TensorFile(store, entry, label), 0),
                         lambda: read_tensor(store, entry, label), tuple(entry.storage()))
    return TensorRef(entry.name, entry.dtype, entry.shape, entry.size, entry.oid, path, opener, storage=tuple(entry.storage()))


@dataclass
class CheckpointView:
    """A checkpoint as tensors by name, in file order (shards: in the order they were combined)."""

    tensors: dict[str, TensorRef] = field(default_factory=dict)
    metadata: Mapping[str, str] | None = None
    path: str | None = None

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def label(self) -> str:
        return self.path or "checkpoint"

    @classmethod
    def empty(cls, path: str | None = None) -> "CheckpointView":
        return cls({}, None, path)

    @classmethod
    def from_manifest(cls, manifest: Manifest, store: ObjectStore, path: str | None = None) -> "CheckpointView":
        """The tensors a manifest lists, read from ``store``; a manifest that disagrees with its own header object
        (when the store has it: diffs also work on manifests whose objects were never fetched) is refused, as
        checkout refuses it, so no reader writes or computes with a dtype or shape the file does not have."""
        if manifest.header_oid is not None and store.ensure(manifest.header_oid):
            from fmhub.core.checkpoint import checked_header

            checked_header(manifest, store, path or "<manifest>")
        refs = {t.name: entry_ref(t, store, path) for t in manifest.tensors}
        return cls(refs, dict(manifest.metadata) if manifest.metadata is not None else None, path)

    @classmethod
    def from_file(cls, filename: str, path: str | None = None, store: ObjectStore | None = None) -> "CheckpointView":
        """A checkpoint file on disk; a file that still holds a manifest is read through ``store``."""
        from fmhub.core.checkpoint import file_layout
        from fmhub.core.formats import SNIFF_BYTES

        label = path or filename
        with open(filename, "rb") as f:
            head = f.read(SNIFF_BYTES)
            if not head:
                return cls.empty(label)
            if is_manifest(head):
                data = head + f.read(MAX_MANIFEST_BYTES)
                if store is None:
                    raise FmhubError(f"{label}: holds an fmhub manifest but no object store was given to read it")
                return cls.from_manifest(Manifest.from_bytes(data, label), store, label)
            pointer = lfs_pointer_in(head + f.read(LFS_POINTER_MAX)) if head.startswith(b"version https:/") else None
            if pointer is not None:  # a Git LFS pointer (committed before `fmhub track` replaced filter=lfs)
                return cls.from_file(lfs_object(pointer, store, label), label)
            _fmt, layout = file_layout(f, label)
        end = len(layout.header) + sum(t.size for t in layout.tensors)
        actual = os.path.getsize(filename)
        if actual != end:
            raise CorruptCheckpoint(f"{label}: is {actual} bytes but its header describes {end}; the file is truncated or corrupt")

        def opener_at(offset: int) -> Opener:
            return lambda: (open(filename, "rb", buffering=0), offset)

        refs, offset = {}, len(layout.header)
        for t in layout.tensors:
            refs[t.name] = TensorRef(t.name, t.dtype, t.shape, t.size, None, label, opener_at(offset))
            offset += t.size
        return cls(refs, dict(layout.metadata) if layout.metadata is not None else None, label)

    @classmethod
    def combine(cls, views: Sequence["CheckpointView"], path: str | None = None) -> "CheckpointView":
        """One view over several shards: tensors matched by name, whichever file holds them.

        The metadata is the first shard's (shards written by one save share it)."""
        out = cls({}, views[0].metadata if views else None, path)
        for v in views:
            for name, ref in v.tensors.items():
                if name in out.tensors:
                    raise CorruptCheckpoint(
                        f"{path or 'checkpoint'}: tensor {name!r} is in both {out.tensors[name].path} and {ref.path}; "
                        "shards of one checkpoint must not repeat a tensor"
                    )
                out.tensors[name] = ref
        return out


LFS_POINTER_MAX = 1024  # git-lfs pointers are at most this long


def lfs_pointer_in(data: bytes):
    """The Git LFS pointer ``data`` holds (`fmhub.git.history.lfs_pointer`), or None."""
    from fmhub.git.history import lfs_pointer

    return lfs_pointer(data) if len(data) <= LFS_POINTER_MAX else None


def lfs_object(pointer, store: ObjectStore | None, label: str) -> str:
    """The file holding a Git LFS pointer's object: git-lfs keeps it in .git/lfs/objects, fmhub's store; MissingObject
    (one line) when it is not local."""
    path = store.object_path(pointer.oid) if store is not None else None
    if path is None or not os.path.isfile(path) or os.path.getsize(path) != pointer.size:
        raise MissingObject(f"{label}: a Git LFS pointer whose object sha256:{pointer.oid} is not local; "
                            "run `git lfs fetch` (or `git lfs fetch --all`) to read it")
    return path


def guard(view: CheckpointView, path: str, root: str | None = None, via: str = "") -> CheckpointView:
    """``view`` of ``path`` with the stored tensors the read policy denies the user withheld (`fmhub.governance.access.read_denials`).

    What the manifest says stays (anyone with the repository has it); reading
    a withheld tensor raises its `fmhub.governance.access.AccessDenied`. Tensors read from
    a file on disk (no oid) are the user's already: checkout's rule governs
    what comes out of the store.
    """
    from fmhub.governance.access import read_denials

    stored = [t.name for t in view if t.oid is not None]
    denied = read_denials(path, stored, root, via) if stored else {}
    if not denied:
        return view
    refs = {n: (t.withheld(denied[n]) if n in denied else t) for n, t in view.tensors.items()}
    return CheckpointView(refs, view.metadata, view.path)


def checkpoint_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))


def from_path(path: str) -> CheckpointView:
    """A file, or every ``*.safetensors`` in a directory (shards, or a PEFT adapter directory)."""
    if os.path.isdir(path):
        files = checkpoint_files(path)
        if not files:
            raise FmhubError(f"{path}: no .safetensors files in this directory")
    elif os.path.isfile(path):
        return CheckpointView.from_file(path)
    else:
        raise FmhubError(f"{path}: no such file or directory")
    return CheckpointView.combine([CheckpointView.from_file(f) for f in files], path)


def from_revision(rev: str, path: str, store: ObjectStore, cwd: str | None = None) -> CheckpointView:
    """``REV:PATH`` in the repository: one stored file, or the stored ``*.safetensors`` under a directory.

    Tensors the read policy denies the user are withheld (`guard`), as checkout would deny them.
    """
    from fmhub.core.repo import blob_at, git

    path = path.strip("/")
    listing = git("ls-tree", "-r", "--name-only", rev, "--", path or ".", cwd=cwd, check=False).splitlines()
    files = [p for p in listing if p == path or p.endswith(".safetensors")]
    if not files:
        raise FmhubError(f"{rev}:{path}: no such file or no checkpoints there (check the revision and the path)")
    views = []
    for p in sorted(files):
        data = blob_at(rev, p, cwd)
        if not is_manifest(data):
            raise FmhubError(f"{rev}:{p}: is not stored by fmhub (committed before `fmhub track`?), so it cannot be read tensor by tensor")
        view = CheckpointView.from_manifest(Manifest.from_bytes(data, f"{rev}:{p}"), store, f"{rev}:{p}")
        views.append(guard(view, p, cwd, via=f"{rev}:{p}"))  # every REV:PATH reader: checkout's read rule
    return CheckpointView.combine(views, f"{rev}:{path}")


def open_view(spec: str, store_opener: Callable[[], ObjectStore] | None = None, cwd: str | None = None) -> CheckpointView:
    """A path on disk, or ``REV:PATH`` (when no such path exists) read from git."""
    if os.path.exists(spec) or ":" not in spec:
        return from_path(spec)
    rev, _, path = spec.partition(":")
    if store_opener is None:
        from fmhub.core.repo import open_store

        store_opener = lambda: open_store(cwd)  # noqa: E731
    return from_revision(rev, path, store_opener(), cwd)
