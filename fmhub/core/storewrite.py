"""Writing to an object store: objects made here (`ObjectWriter`), objects arriving under a known oid
(`IncomingObject`, `StoreWriting.adopt`), and the background writes that make them durable.

An object is written to ``<store>/tmp``, fsynced, then renamed into place, so
a visible object is always complete; a crash leaves at most a stray temp file
(`StoreWriting.remove_stale_temp`). Writes run on background threads so that
fsync overlaps with reading the next tensor, holding at most
`MAX_PENDING_BYTES` in memory; `StoreWriting.flush` waits for them.
`StoreWriting` is the part of `fmhub.core.store.ObjectStore` that does this.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

from fmhub.base.errors import CorruptObject
from fmhub.core.objectfiles import CHUNK, as_user_error, drop_temp, unlink_quiet, write_all

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from fmhub.core.store import ObjectStore

SPILL_BYTES = 16 << 20  # an object larger than this is streamed to a temp file instead of buffered
MAX_PENDING_BYTES = 128 << 20  # buffered bytes awaiting their background write, at most
SMALL_OBJECT = 1 << 20  # objects up to this size (dataset chunks) are fsynced several at a time
SMALL_WRITERS = 8  # fsync is latency-bound: with several in flight the file system commits them together


class StoreWriting:
    """Writing objects into an `fmhub.core.store.ObjectStore` (a part of that class, which it is mixed into).

    Uses the store's ``path``, ``_sha_path``, ``has`` and its ``_pending*`` and ``_pool`` attributes (set by
    ``ObjectStore.__init__``).
    """

    path: str
    _pool: ThreadPoolExecutor | None
    _small_pool: ThreadPoolExecutor | None
    _pending: deque[tuple[Future, int]]
    _pending_bytes: int
    _pending_oids: set[str]
    _pending_lock: threading.Lock

    def writer(self) -> ObjectWriter:
        return ObjectWriter(self)

    def write_bytes(self, data: bytes) -> str:
        return self.write_object((data,))

    def write_object(self, chunks) -> str:  # dulwich's API, kept streaming
        w = self.writer()
        try:
            for chunk in chunks:
                w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def tmp_dir(self) -> str:
        """Where writers and downloaders keep files in progress (same file system as the objects: renames are atomic)."""
        d = os.path.join(self.path, "tmp")
        os.makedirs(d, exist_ok=True)
        return d

    def _new_temp(self) -> tuple[int, str]:
        import tempfile

        return tempfile.mkstemp(dir=self.tmp_dir(), prefix="obj-")

    def _publish(self, tmp_path: str, oid: str) -> None:
        dest = self._sha_path(oid)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.chmod(tmp_path, 0o444)  # objects are immutable; a stray write fails loudly
        os.replace(tmp_path, dest)

    def adopt(self, path: str, oid: str, size: int) -> None:
        """Move a file downloaded into `tmp_dir` into the store as ``oid``, if its size and sha256 match.

        Otherwise the file is deleted and `IncomingMismatch` says why; nothing
        enters the store. A rename, not a copy: a downloader that wrote the
        whole file itself (huggingface_hub) costs one read to verify.
        """
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                os.fsync(f.fileno())
            got, actual = os.path.getsize(path), h.hexdigest()
            if got != size:
                raise IncomingMismatch(f"{got} bytes arrived, not {size}")
            if actual != oid:
                raise IncomingMismatch(f"the bytes hash to sha256:{actual}")
            if not os.path.isfile(self._sha_path(oid)):
                self._publish(path, oid)
        except OSError as exc:
            raise as_user_error(exc, self.path) from None
        finally:
            unlink_quiet(path)

    def _import(self, src: str, oid: str) -> None:
        with open(src, "rb") as inp:
            self.import_file(inp, oid, os.path.getsize(src), os.path.dirname(src))

    def import_file(self, inp, oid: str, size: int, where: str) -> None:
        """Copy an object's bytes from the readable ``inp`` into this store, verified (CorruptObject naming ``where`` if not)."""
        incoming = IncomingObject(self, oid, size)
        try:
            while chunk := inp.read(CHUNK):
                incoming.write(chunk)
            incoming.publish()
        except IncomingMismatch:
            raise CorruptObject(f"object sha256:{oid} in {where} is corrupt; it was not copied") from None
        finally:
            incoming.discard()

    def _submit(self, fn, nbytes: int, oid: str, size: int | None = None) -> None:
        """Run a write in the background so fsync overlaps with reading the next tensor.

        ``nbytes`` is what the write holds in memory, ``size`` the object's size (more, when it spilled to a file).
        Safe to call from several threads (the clean filter stores tensors two at a time).
        """
        from concurrent.futures import ThreadPoolExecutor

        with self._pending_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmhub-store")
                self._small_pool = ThreadPoolExecutor(max_workers=SMALL_WRITERS, thread_name_prefix="fmhub-store-small")
        while self._wait_oldest(lambda: self._pending_bytes + nbytes > MAX_PENDING_BYTES):
            pass
        with self._pending_lock:
            self._pending_oids.add(oid)
            # big objects (tensors) one at a time, as before; a run of small ones (a dataset's ~64 KiB chunks)
            # would otherwise wait on one fsync each, which costs more than chunking and hashing them
            small = (nbytes if size is None else size) <= SMALL_OBJECT
            pool = self._small_pool if small and self._small_pool is not None else self._pool
            self._pending.append((pool.submit(fn), nbytes))
            self._pending_bytes += nbytes

    def _wait_oldest(self, needed=lambda: True) -> bool:
        """Wait for the oldest pending write, if any and if ``needed()``; whether there was one to wait for."""
        with self._pending_lock:
            if not self._pending or not needed():
                return False
            fut, nbytes = self._pending.popleft()
            self._pending_bytes -= nbytes
        try:
            fut.result()
        except OSError as exc:
            raise as_user_error(exc, self.path) from None
        return True

    def flush(self) -> None:
        """Wait until every object written so far is durable and visible; re-raise a write's error."""
        error: BaseException | None = None
        while True:
            try:
                if not self._wait_oldest():
                    break
            except BaseException as exc:  # keep draining so no write is left running
                error = error or exc
        with self._pending_lock:
            self._pending_oids.clear()
        if error is not None:
            raise as_user_error(error, self.path)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._small_pool is not None:
                self._small_pool.shutdown(wait=True)
                self._small_pool = None

    def remove_stale_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove temp files left by killed writers; returns how many."""
        d = os.path.join(self.path, "tmp")
        if not os.path.isdir(d):
            return 0
        now, n = time.time(), 0
        for name in os.listdir(d):
            p = os.path.join(d, name)
            try:
                if now - os.stat(p).st_mtime >= older_than_s:
                    os.unlink(p)
                    n += 1
            except FileNotFoundError:
                pass
        return n


class IncomingMismatch(Exception):
    """The bytes of an `IncomingObject` are not the object announced (the reason is the message)."""


class IncomingObject:
    """An object arriving from elsewhere (an LFS server, another store) under an oid known in advance.

    Bytes go to a temp file while being hashed; `publish` makes the object
    visible only when exactly ``size`` bytes arrived and they hash to ``oid``,
    otherwise it raises `IncomingMismatch` and nothing enters the store.
    Memory stays at one chunk whatever the object's size.
    """

    def __init__(self, store: "ObjectStore", oid: str, size: int) -> None:
        self.store, self.oid, self.expected = store, oid, size
        try:
            self._fd, self._tmp = store._new_temp()
        except OSError as exc:
            raise as_user_error(exc, store.path) from None
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.expected:
            raise IncomingMismatch(f"more than the {self.expected} bytes announced arrived")
        self._hash.update(data)
        try:
            write_all(self._fd, data)
        except OSError as exc:
            raise as_user_error(exc, self.store.path) from None

    def publish(self) -> None:
        if self.size != self.expected:
            raise IncomingMismatch(f"{self.size} bytes arrived, not {self.expected}")
        actual = self._hash.hexdigest()
        if actual != self.oid:
            raise IncomingMismatch(f"the bytes hash to sha256:{actual}")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            if not os.path.isfile(self.store._sha_path(self.oid)):
                self.store._publish(self._tmp, self.oid)
                self._tmp = None
        except OSError as exc:
            raise as_user_error(exc, self.store.path) from None
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove what is left of a failed transfer (a no-op after publish)."""
        drop_temp(self)


class ObjectWriter:
    """Streams one object into the store: hash while buffering, spill big objects to a temp file."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._hash = hashlib.sha256()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None
        self._tmp: str | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        try:
            if self._fd is None:
                self._chunks.append(data)
                self._buffered += len(data)
                if self._buffered > SPILL_BYTES:
                    self._fd, self._tmp = self.store._new_temp()
                    self._drain_to_file()
            else:
                write_all(self._fd, data)
        except OSError as exc:
            raise as_user_error(exc, self.store.path) from None

    def _drain_to_file(self) -> None:
        for chunk in self._chunks:
            write_all(self._fd, chunk)
        self._chunks, self._buffered = [], 0

    def commit(self) -> str:
        """Make the object visible (soon: call `ObjectStore.flush` before relying on it); returns its oid."""
        oid = self._hash.hexdigest()
        store = self.store
        if store.has(oid):  # a packed copy counts: `git status` on an old checkout must not store it whole again
            self.abort()
            return oid
        chunks, fd, tmp = self._chunks, self._fd, self._tmp
        self._chunks, self._fd, self._tmp = [], None, None

        def finish() -> None:
            nonlocal fd, tmp
            try:
                if fd is None:
                    fd, tmp = store._new_temp()
                    for chunk in chunks:
                        write_all(fd, chunk)
                os.fsync(fd)
                os.close(fd)
                fd = None
                if os.path.isfile(store._sha_path(oid)):
                    unlink_quiet(tmp)
                else:
                    store._publish(tmp, oid)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                if tmp is not None:
                    unlink_quiet(tmp)
                raise

        store._submit(finish, sum(len(c) for c in chunks), oid, self.size)
        return oid

    def abort(self) -> None:
        drop_temp(self)
        self._chunks = []
