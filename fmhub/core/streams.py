"""Many objects into or out of a store at once, on a background thread: `ObjectStream` writes a run of
objects (a data file's chunks) while the caller reads the next bytes; `copy_objects` copies objects out (to git,
on a pipe) while the next ones are read and hashed. Both keep memory bounded whatever the objects' sizes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading

from fmhub.base.errors import CorruptObject, MissingObject
from fmhub.core.objectfiles import CHUNK

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import BinaryIO, Iterator, Sequence

    from fmhub.core.store import ObjectStore
    from fmhub.core.storewrite import ObjectWriter

COPY_CHUNK = 4 << 20  # read size when copying objects out
COPY_DEPTH = 4  # buffers in flight between the reading thread and the writer


class ObjectStream:
    """Writes a run of objects from a background thread, in order.

    The caller starts each object with `begin` (optionally naming a stored
    object it probably equals), feeds its bytes with `write` and ends it with
    `end_object`. Hashing, buffering and comparing run in a worker thread
    (sha256, reads and memcmp release the GIL), overlapping with the caller's
    reads. An object fed with exactly the bytes of its candidate is recognised
    by comparison, several times cheaper than hashing. `close` waits and
    returns the oids in order. At most ``depth`` batches of about ``batch``
    bytes wait in the queue, so memory stays bounded whatever the object sizes.
    """

    _END = object()

    def __init__(self, store: ObjectStore, batch: int = CHUNK, depth: int = 8) -> None:
        self.store = store
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_limit = batch
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._oids: list[str] = []
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="fmhub-hash", daemon=True)
        self._worker.start()

    def begin(self, candidate: str | None = None) -> None:
        self._put(("begin", candidate))

    def write(self, data: bytes) -> None:
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= self._batch_limit:
            self._put_batch()

    def end_object(self) -> None:
        self._put_batch()
        self._put(self._END)

    def close(self) -> list[str]:
        """Wait for the worker; the oids of every ended object, in order. Re-raises a write's error."""
        self._put(None)
        self._worker.join()
        if self._error is not None:
            raise self._error
        return self._oids

    def abort(self) -> None:
        """Stop the worker and drop the object in progress (finished ones stay stored)."""
        self._batch, self._batch_bytes = [], 0
        while self._worker.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:  # the worker died or is slow: make room
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._worker.join()

    def _put_batch(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._put(batch)

    def _put(self, item) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        w: ObjectWriter | None = None
        same: _SameAs | None = None
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, tuple):  # ("begin", candidate)
                    w = self.store.writer()
                    same = _SameAs.open(self.store, item[1]) if item[1] else None
                elif item is self._END:
                    if same is not None and same.at_end():
                        self._oids.append(same.oid)
                        w.abort()
                    else:
                        if same is not None:  # a prefix of the candidate only: hash what matched
                            for part in same.prefix():
                                w.write(part)
                        self._oids.append(w.commit())
                    if same is not None:
                        same.close()
                    w = same = None
                else:
                    for data in item:
                        if same is not None:
                            if same.continues_with(data):
                                continue
                            for part in same.prefix():  # it differs here: hash what matched, then go on
                                w.write(part)
                            same.close()
                            same = None
                        w.write(data)
        except BaseException as exc:  # surfaced to the feeding thread
            self._error = exc
            while self._queue.get() is not None:  # keep the feeder from blocking until it stops
                pass
        finally:
            if w is not None:
                w.abort()
            if same is not None:
                same.close()


class _SameAs:
    """Checks, chunk by chunk, that incoming bytes are those of a stored object."""

    def __init__(self, f: BinaryIO, oid: str) -> None:
        self._f, self.oid, self.matched = f, oid, 0

    @classmethod
    def open(cls, store: ObjectStore, oid: str) -> "_SameAs | None":
        if not os.path.isfile(store.object_path(oid)):  # only local objects: no import from alternates
            return None
        try:
            return cls(open(store.object_path(oid), "rb", buffering=0), oid)
        except OSError:
            return None

    def continues_with(self, chunk: bytes) -> bool:
        if self._f.read(len(chunk)) != chunk:
            return False
        self.matched += len(chunk)
        return True

    def at_end(self) -> bool:
        return self._f.read(1) == b""

    def prefix(self) -> Iterator[bytes]:
        """The bytes matched so far, read back from the object."""
        self._f.seek(0)
        left = self.matched
        while left:
            part = self._f.read(min(CHUNK, left))
            if not part:
                raise CorruptObject(f"object sha256:{self.oid} in the store changed while it was being read; run `fmhub fsck`")
            left -= len(part)
            yield part

    def close(self) -> None:
        self._f.close()


def copy_object(store: ObjectStore, oid: str, out: BinaryIO) -> None:
    """Copy an object's bytes to ``out``, verifying its hash; raises MissingObject / CorruptObject."""
    copy_objects(store, [oid], out)


def copy_objects(store: ObjectStore, oids: Sequence[str], out: BinaryIO, labels: Sequence[str] | None = None) -> None:
    """Copy objects' bytes to ``out`` one after another, verifying each one's hash.

    Reading and hashing run in a background thread, a few buffers ahead of the
    writes to ``out``, so disk reads, sha256 and the consumer (git, on a pipe)
    overlap; both release the GIL. A missing object raises MissingObject before
    any of its bytes are written; a corrupt one raises CorruptObject after its
    bytes were written (the caller must report the output as failed). With
    ``labels``, errors name ``labels[i]`` instead of the bare oid.
    """
    free: queue.Queue[bytearray | None] = queue.Queue()
    for _ in range(COPY_DEPTH):
        free.put(bytearray(COPY_CHUNK))
    full: queue.Queue = queue.Queue()

    def where(i: int) -> str:
        return f"{labels[i]}: " if labels is not None else ""

    def produce() -> None:
        try:
            for i, oid in enumerate(oids):
                try:
                    f = store.open_object(oid, buffering=0)
                except KeyError:
                    full.put(MissingObject(f"{where(i)}object sha256:{oid} is not in {store.path}"))
                    return
                h = hashlib.sha256()
                with f:
                    while True:
                        buf = free.get()
                        if buf is None:  # the consumer gave up
                            return
                        n = f.readinto(buf)
                        if not n:
                            free.put(buf)
                            break
                        h.update(memoryview(buf)[:n])
                        full.put((buf, n))
                if h.hexdigest() != oid:
                    full.put(CorruptObject(f"{where(i)}object sha256:{oid} in {store.path} is corrupt"))
                    return
            full.put(None)
        except BaseException as exc:  # surfaced in the consumer's thread
            full.put(exc)

    worker = threading.Thread(target=produce, name="fmhub-copy", daemon=True)
    worker.start()
    try:
        while (item := full.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            out.write(memoryview(buf)[:n])
            free.put(buf)
    finally:
        free.put(None)
        worker.join()
