"""Content-addressed object store with Git LFS's on-disk layout.

Objects live at ``<store>/objects/OID[0:2]/OID[2:4]/OID`` (the layout of
``dulwich.lfs.LFSStore`` and of git-lfs itself), keyed by the sha256 of their
bytes. This module finds and reads them; the store's other parts are in their
own modules: writing (`fmhub.core.storewrite`: atomic, fsynced, in the
background), packed objects (`fmhub.core.packfile`), many objects at once on a
thread (`fmhub.core.streams`), and the file helpers they share
(`fmhub.core.objectfiles`).

`fmhub repack` may replace an old object by a *packed object*: a delta
against another object of the store. Every read path here rebuilds it and
checks its sha256, so callers never see the difference; `iter_oids` still
lists whole objects only.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque

from fmhub.base.errors import CorruptObject, FmhubError, MissingObject, MissingPackBase
from fmhub.core.objectfiles import CHUNK, BytesReader, iter_named
from fmhub.core.packfile import PackedObjects
from fmhub.core.storewrite import StoreWriting

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor
    from typing import BinaryIO, Iterator, Sequence


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (an object's oid, were it stored), read in `CHUNK` blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class ObjectStore(PackedObjects, StoreWriting):
    """An LFS-layout store (as ``dulwich.lfs.LFSStore`` and git-lfs lay it out) that writes atomically, streams,
    and can borrow from other stores. Reading is here; writing is `StoreWriting`'s, packed objects `PackedObjects`'."""

    def __init__(self, path: str, alternates: Sequence[str] = ()) -> None:
        self.path = path
        self.alternates = [a for a in alternates if os.path.abspath(a) != os.path.abspath(path)]
        self._pool: ThreadPoolExecutor | None = None
        self._small_pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future, int]] = deque()
        self._pending_bytes = 0
        self._pending_oids: set[str] = set()
        self._pending_lock = threading.Lock()
        # one packed object rebuilt at a time: a rebuild holds a few copies of a tensor (up to 2 GiB) in memory
        self._rebuild_lock = threading.Lock()

    @classmethod
    def create(cls, lfs_dir: str, alternates: Sequence[str] = ()) -> "ObjectStore":
        os.makedirs(os.path.join(lfs_dir, "objects"), exist_ok=True)
        os.makedirs(os.path.join(lfs_dir, "tmp"), exist_ok=True)
        return cls(lfs_dir, alternates)

    # -- reading -------------------------------------------------------------

    def _sha_path(self, oid: str) -> str:
        return os.path.join(self.path, "objects", oid[0:2], oid[2:4], oid)

    def object_path(self, oid: str) -> str:
        """Where the whole object is (it may instead be packed: read through `open_object`)."""
        return self._sha_path(oid)

    def has(self, oid: str) -> bool:
        """The object is here: whole, being written, or packed on a chain that ends at a whole object here."""
        return oid in self._pending_oids or os.path.isfile(self._sha_path(oid)) or self._packed_resolves(oid)

    def open_object(self, oid: str, buffering: int = -1) -> BinaryIO:
        """Open an object for reading, importing it from an alternate store if only that has it.

        A packed object is rebuilt, checked, and returned as an anonymous temp
        file (gone once closed). KeyError when no store has it; `MissingPackBase`
        (a KeyError too) when it is packed here on a base that is not.
        """
        try:
            return open(self._sha_path(oid), "rb", buffering=buffering)
        except FileNotFoundError:
            pass
        local_error: FmhubError | None = None
        if os.path.isfile(self.packed_path(oid)):
            try:
                return self._open_rebuilt(oid, buffering)
            except (MissingPackBase, CorruptObject) as exc:
                local_error = exc  # an alternate store may still have a good copy
        if self._import_from_alternates(oid):
            return open(self._sha_path(oid), "rb", buffering=buffering)
        if local_error is not None:
            raise local_error
        raise KeyError(oid)

    def ensure(self, oid: str) -> bool:
        """True if the object is here or could be imported from an alternate store."""
        return self.has(oid) or self._import_from_alternates(oid)

    def read_bytes(self, oid: str) -> bytes:
        """An object's bytes, hash verified."""
        if not os.path.isfile(self._sha_path(oid)) and os.path.isfile(self.packed_path(oid)):
            try:
                with self._rebuild_lock:
                    return bytes(self._rebuild(oid))  # checked against oid while rebuilding
            except (MissingPackBase, CorruptObject):
                if not self._import_from_alternates(oid):
                    raise
        with self.open_object(oid) as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != oid:
            raise CorruptObject(f"object sha256:{oid} in {self.path} is corrupt; run `fmhub fsck` and restore it")
        return data

    def size_of(self, oid: str) -> int:
        """An object's size in bytes, whole or packed (KeyError if neither is here)."""
        try:
            return os.path.getsize(self._sha_path(oid))
        except FileNotFoundError:
            pass
        header = self._pack_header(oid)
        if header is None:
            raise KeyError(oid)
        return header.size

    def iter_oids(self) -> Iterator[str]:
        """The objects stored whole (the files gc and fsck look at); packed ones: `iter_packed`."""
        return iter_named(os.path.join(self.path, "objects"))

    def verify(self, oid: str) -> bool:
        """Re-hash an object; False if its bytes do not match its name (a packed one is rebuilt)."""
        if not os.path.isfile(self._sha_path(oid)) and os.path.isfile(self.packed_path(oid)):
            try:
                self.check_packed(oid)
            except CorruptObject:
                return False
            return True
        h = hashlib.sha256()
        with open(self._sha_path(oid), "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest() == oid

    def _import_from_alternates(self, oid: str) -> bool:
        """Copy ``oid`` here, whole, from the first alternate store that has it whole or packed; False if none does."""
        for alt in self.alternates:
            src = os.path.join(alt, "objects", oid[0:2], oid[2:4], oid)
            if os.path.isfile(src):
                self._import(src, oid)
                return True
            other = ObjectStore(alt)
            if os.path.isfile(other.packed_path(oid)):
                try:
                    with other._rebuild_lock:
                        data = other._rebuild(oid)
                except (KeyError, MissingObject):
                    continue  # that store lost its base: maybe another one has it
                self.import_file(BytesReader(data), oid, len(data), alt)
                return True
        return False
