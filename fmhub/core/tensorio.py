"""A tensor's bytes read from the store frame by frame, in parallel: its root object, then each delta link.

A manifest entry (`fmhub.core.manifest.TensorEntry`) names either one whole object,
or a chain: a root (a whole object, or a ``planes`` object that needs no
base) and delta links applied in order (docs/manifest.md). Every built-in
encoding cuts a tensor into the same frames of `fmhub.core.planes.FRAME_BYTES`
bytes, and frame ``i`` of a version depends only on frame ``i`` of the
version before, so a chain is rebuilt frame by frame: memory stays at a few
frames whatever the tensor's size, frames decode on every core at once, and
the first bytes reach git while the rest is still being decoded.

A chain that holds a link of another codec (the older ``sparse`` and
``xor-zlib``, or a plugin's) is rebuilt whole in memory by the codec's own
``decode`` and then handed out in frames, as before.

Reads use ``os.pread`` on one descriptor per object, so decoding threads never
share a file position; nothing here trusts a length it read before checking
it against what the frame may hold.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque

from fmhub.core import planes
from fmhub.base.errors import CorruptObject, FmhubError, MissingObject
from fmhub.core.codecs import codecs
from fmhub.core.manifest import TensorEntry
from fmhub.core.parallel import SequentialHash, ordered
from fmhub.core.store import ObjectStore

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Callable, Iterator


FRAME = planes.FRAME_BYTES
FRAMED_LINKS = ("planes", "lowrank", "lowrank-fixed")  # link codecs decoded frame by frame; any other makes the chain whole
EARLY_FRAMES = 4  # frames after which an encode on course to miss its size limit is abandoned

Frame = object  # a bytes-like holding one frame's bytes: bytes, memoryview or a numpy array


def frames_of(size: int) -> list[tuple[int, int]]:
    """``(first byte, byte count)`` of each frame of a tensor of ``size`` bytes."""
    return [(at, min(FRAME, size - at)) for at in range(0, size, FRAME)]


def _read_ahead(fd: int) -> None:
    """Ask the kernel to read the whole object in now: frames are read out of order by several threads, which
    defeats its own read-ahead, and every byte of the object will be needed (a cold cache costs seeks otherwise)."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass  # not on this platform: only slower


def pread_exact(fd: int, n: int, at: int, what: str) -> bytes:
    """``n`` bytes at offset ``at``; CorruptObject naming ``what`` when the file ends first."""
    parts, got = [], 0
    while got < n:
        part = os.pread(fd, n - got, at + got)
        if not part:
            raise CorruptObject(f"{what} is corrupt: it is truncated")
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# -- the objects of a chain ---------------------------------------------------------------------


class _Object:
    """One object of a chain, open for positional reads; CorruptObject unless it holds the ``length`` bytes the
    manifest declares."""

    def __init__(self, store: ObjectStore, oid: str, what: str, length: int | None = None) -> None:
        self.what = f"{what} (object sha256:{oid})"
        try:
            self.file = store.open_object(oid, buffering=0)
        except KeyError:
            raise MissingObject(f"{what}: object sha256:{oid} is not in the store {store.path}; fetch it (`fmhub fsck` lists what is missing)") from None
        self.fd = self.file.fileno()
        self.length = os.fstat(self.fd).st_size
        _read_ahead(self.fd)
        if length is not None and self.length != length:
            self.close()
            raise CorruptObject(f"{self.what} is corrupt: it holds {self.length} bytes, not the {length} its manifest declares")

    def close(self) -> None:
        self.file.close()


class _RawRoot(_Object):
    """A whole object: the tensor's bytes as they are."""

    def __init__(self, store: ObjectStore, oid: str, size: int, what: str) -> None:
        super().__init__(store, oid, what, size)

    def frame_job(self, at: int, n: int, pos: int) -> tuple[Callable[[object | None], Frame], int]:
        return (lambda _base: pread_exact(self.fd, n, at, self.what)), pos

    def finish(self, pos: int) -> None:
        pass


class _PlanesObject(_Object):
    """A ``planes`` object, walked frame record by frame record (headers only: payloads are read by the jobs)."""

    def __init__(self, store: ObjectStore, oid: str, size: int, what: str, root: bool, length: int | None = None) -> None:
        super().__init__(store, oid, what, length)
        self.root = root
        try:
            self.layout = planes.parse_header(pread_exact(self.fd, planes.HEADER_SIZE, 0, self.what), size)
        except planes.PlanesError as exc:
            self.close()
            raise CorruptObject(f"{self.what} is corrupt: {exc}") from None

    def frame_job(self, at: int, n: int, pos: int) -> tuple[Callable[[object | None], Frame], int]:
        """The job decoding the frame whose record starts at ``pos``, and where the next record starts.

        Positions belong to the caller, so several walks of one object (a probe beside an encode) never meet.
        """
        kind, length = self._record_at(pos, n)
        offset, layout, what, fd = pos + planes.RECORD_SIZE, self.layout, self.what, self.fd
        if self.root and kind not in planes.BASELESS:
            raise CorruptObject(f"{what} is corrupt: a root object holds a {planes.KIND_NAMES[kind]} frame, which needs a previous version")

        def job(base: object | None) -> Frame:
            payload = pread_exact(fd, length, offset, what) if length else b""
            try:
                return planes.decode_frame(kind, payload, base, layout, n)
            except planes.PlanesError as exc:
                raise CorruptObject(f"{what} is corrupt: frame at byte {at}: {exc}") from None

        return job, offset + length

    def _record_at(self, pos: int, n: int) -> tuple[int, int]:
        try:
            kind, length = planes.parse_record(pread_exact(self.fd, planes.RECORD_SIZE, pos, self.what))
        except planes.PlanesError as exc:
            raise CorruptObject(f"{self.what} is corrupt: {exc}") from None
        if length > planes.max_payload(n) or pos + planes.RECORD_SIZE + length > self.length:
            raise CorruptObject(f"{self.what} is corrupt: a frame record claims {length} bytes, more than its frame or the object holds")
        return kind, length

    def finish(self, pos: int) -> None:
        if pos != self.length:
            raise CorruptObject(f"{self.what} is corrupt: it has {self.length - pos} bytes after its last frame")


class _LowRankLink(_Object):
    """A ``lowrank`` or ``lowrank-fixed`` delta, read whole (its factors are small) and applied to any range of elements."""

    def __init__(self, store: ObjectStore, oid: str, entry: TensorEntry, what: str, codec: str, length: int | None = None) -> None:
        from fmhub.core.lowrank import RangeDecoder
        from fmhub.core.lowrank_fixed import Decoder

        super().__init__(store, oid, what, length)
        try:
            data = pread_exact(self.fd, self.length, 0, self.what)
        finally:
            self.close()
        if hashlib.sha256(data).hexdigest() != oid:
            raise CorruptObject(f"{self.what} is corrupt (its bytes do not hash to its name); run `fmhub fsck`")
        try:
            self.decoder = (Decoder if codec == "lowrank-fixed" else RangeDecoder)(data, entry.dtype, entry.shape)
        except ValueError as exc:
            raise CorruptObject(f"{self.what} is corrupt: {exc}") from None

    def frame_job(self, at: int, n: int, pos: int) -> tuple[Callable[[object | None], Frame], int]:
        """The job applying the delta to frame [at, at + n); a frame that does not decode is a CorruptObject, not a
        traceback (the codecs raise ValueError, PlanesError included, for whatever their bytes do not allow)."""
        decoder, what = self.decoder, self.what

        def job(base: object | None) -> Frame:
            try:
                return decoder.apply(base, at, n)
            except ValueError as exc:
                raise CorruptObject(f"{what} is corrupt: frame at byte {at}: {exc}") from None

        return job, pos

    def finish(self, pos: int) -> None:
        pass


class Chain:
    """The objects that hold one tensor, open; `jobs` gives one callable per frame that rebuilds it.

    MissingObject when an object is not in the store, CorruptObject when one
    does not parse; a job raises CorruptObject when its frame does not decode.
    The caller checks the rebuilt bytes against the entry's oid.
    """

    def __init__(self, store: ObjectStore, entry: TensorEntry, label: str = "") -> None:
        self.entry = entry
        self.what = f"{label}tensor {entry.name!r}"
        self.objects: list = []
        self.whole: bytes | bytearray | None = None
        try:
            self._open(store)
        except BaseException:
            self.close()
            raise

    def _open(self, store: ObjectStore) -> None:
        e, what = self.entry, self.what
        if e.root is None or store.ensure(e.oid):  # whole: the object itself (a chain's full bytes may be stored too)
            self.objects.append(_RawRoot(store, e.oid, e.size, what))
            return
        if e.root_codec not in ("", "planes"):
            raise FmhubError(f"{what} is stored with {e.root_codec!r} as its root codec, which this fmhub cannot read; upgrade fmhub")
        if any(d.codec not in FRAMED_LINKS for d in e.deltas):
            if e.root_codec:
                raise FmhubError(f"{what} is stored with the delta codec {_unframed(e)!r} after an encoded root, which this fmhub cannot read; "
                                 "upgrade fmhub or install the plugin that provides it")
            # another codec's chain: rebuilt whole by the codecs themselves
            self.whole = tensor_bytes(store, e, "")
            return
        root = f"{what} (root of its chain)"
        if e.root_codec == "planes":
            self.objects.append(_PlanesObject(store, e.root, e.size, root, root=True, length=e.root_size))
        else:
            self.objects.append(_RawRoot(store, e.root, e.size, root))
        for i, d in enumerate(e.deltas, start=1):
            label = f"{what} (delta {i} of {len(e.deltas)})"
            if d.codec == "planes":
                self.objects.append(_PlanesObject(store, d.oid, e.size, label, root=False, length=d.size))
            else:
                self.objects.append(_LowRankLink(store, d.oid, e, label, d.codec, d.size))

    def jobs(self) -> Iterator[Callable[[], Frame]]:
        """One job per frame, in order; each returns that frame's bytes (walking the objects' frame headers as it goes)."""
        if self.whole is not None:
            view = memoryview(self.whole)
            for at, n in frames_of(self.entry.size):
                yield (lambda a=at, m=n: view[a : a + m])
            return
        positions = [planes.HEADER_SIZE] * len(self.objects)  # each call walks the objects from their first frame
        for at, n in frames_of(self.entry.size):
            steps = []
            for i, obj in enumerate(self.objects):
                step, positions[i] = obj.frame_job(at, n, positions[i])
                steps.append(step)
            yield _chained(steps)
        for obj, pos in zip(self.objects, positions):
            obj.finish(pos)

    def close(self) -> None:
        for obj in self.objects:
            if not obj.file.closed:
                obj.close()
        self.objects = []


def _unframed(e: TensorEntry) -> str:
    return next(d.codec for d in e.deltas if d.codec not in FRAMED_LINKS)


def _chained(steps: list[Callable[[object | None], Frame]]) -> Callable[[], Frame]:
    def job() -> Frame:
        data = None
        for step in steps:
            data = step(data)
        return data

    return job


# -- whole tensors and streams --------------------------------------------------------------------


def allocate(size: int, what: str) -> bytearray:
    """A buffer for a whole tensor; a one-line error when it cannot be had (a size no machine holds)."""
    try:
        return bytearray(size)
    except (MemoryError, OverflowError):
        raise FmhubError(f"{what}: {size} bytes do not fit in memory") from None


def read_tensor(store: ObjectStore, entry: TensorEntry, label: str = "") -> bytearray:
    """A tensor's full bytes, rebuilt and checked against its oid (CorruptObject / MissingObject naming it).

    The buffer is allocated once the chain's objects are open and their sizes checked (`Chain`), so a manifest
    that lies about a size is refused before its size is allocated.
    """
    frames = stream_tensor(store, entry, label)
    out = view = None
    for at, data in frames:
        if out is None:
            try:
                out = allocate(entry.size, f"{label}tensor {entry.name!r}")
            except FmhubError:
                frames.close()
                raise
            view = memoryview(out)
        chunk = memoryview(data).cast("B")
        view[at : at + len(chunk)] = chunk
    return out if out is not None else bytearray()


def stream_tensor(store: ObjectStore, entry: TensorEntry, label: str = "") -> Iterator[tuple[int, Frame]]:
    """``(offset, frame bytes)`` of a tensor in order, decoded in parallel; CorruptObject after the last frame if the
    bytes do not hash to the entry's oid (the caller must then treat what it wrote as failed)."""
    chain = Chain(store, entry, label)
    h = SequentialHash()  # on its own thread, beside whatever the caller does with the frames
    try:
        at = 0
        for data in ordered(chain.jobs()):
            view = memoryview(data).cast("B")
            h.update(view)
            yield at, data
            at += len(view)
        if at != entry.size or h.hexdigest() != entry.oid:
            raise CorruptObject(f"{chain.what} is corrupt: its objects do not rebuild sha256:{entry.oid}; run `fmhub fsck`")
    finally:
        h.close()
        chain.close()


class TensorFile:
    """A read-only, forward-seeking file over a tensor rebuilt from the store (what diffs read in chunks)."""

    def __init__(self, store: ObjectStore, entry: TensorEntry, label: str = "") -> None:
        self._store, self._entry, self._label = store, entry, label
        self._frames: Iterator[tuple[int, Frame]] | None = None
        self._buf, self._buf_at, self._pos = memoryview(b""), 0, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self._pos + pos if whence == 1 else self._entry.size + pos
        if target < self._buf_at:
            self._restart()
        self._pos = max(0, min(target, self._entry.size))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._entry.size - self._pos
        parts = []
        while n > 0 and self._pos < self._entry.size:
            part = self._window(n)
            parts.append(bytes(part))
            self._pos += len(part)
            n -= len(part)
        return b"".join(parts)

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        got = 0
        while got < len(view) and self._pos < self._entry.size:
            part = self._window(len(view) - got)
            view[got : got + len(part)] = part
            got += len(part)
            self._pos += len(part)
        return got

    def _window(self, n: int) -> memoryview:
        while not self._buf_at <= self._pos < self._buf_at + len(self._buf):
            if self._frames is None:
                self._frames = stream_tensor(self._store, self._entry, self._label)
            try:
                at, data = next(self._frames)
            except StopIteration:
                raise CorruptObject(f"{self._label}tensor {self._entry.name!r} ended early") from None
            self._buf, self._buf_at = memoryview(data).cast("B"), at
        start = self._pos - self._buf_at
        return self._buf[start : start + n]

    def _restart(self) -> None:
        if self._frames is not None:
            self._frames.close()
        self._frames, self._buf, self._buf_at = None, memoryview(b""), 0

    def close(self) -> None:
        self._restart()

    @property
    def closed(self) -> bool:
        return False

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def needs_rebuild(entry: TensorEntry, store: ObjectStore) -> bool:
    """Whether a tensor's bytes must be decoded (a chain or a compressed root) rather than copied from one object."""
    return entry.root is not None and not store.ensure(entry.oid)


def read_object(store: ObjectStore, oid: str, what: str, size: int | None = None) -> bytes:
    """`ObjectStore.read_bytes` (hash verified), with MissingObject / CorruptObject naming ``what``; with ``size``,
    CorruptObject before reading when the object does not hold that many bytes (never a read the manifest did not
    declare)."""
    try:
        if size is not None and store.ensure(oid) and store.size_of(oid) != size:
            raise CorruptObject(f"{what}: object sha256:{oid} holds {store.size_of(oid)} bytes, not the {size} its manifest declares")
        return store.read_bytes(oid)
    except KeyError:
        raise MissingObject(f"{what}: object sha256:{oid} is not in the store {store.path}") from None
    except CorruptObject as exc:
        raise CorruptObject(f"{what}: {exc}") from None


def tensor_bytes(store: ObjectStore, entry: TensorEntry, label: str = "") -> bytearray:
    """A tensor's full bytes, rebuilt whole in memory by each codec's ``decode`` and checked (chains of any codec).

    Frame-coded chains are rebuilt faster and in bounded memory by `read_tensor`; this is the path for
    chains holding another codec's link (a version-2 ``sparse`` or ``xor-zlib`` chain, or a plugin's).
    """
    where = f"{label}tensor {entry.name!r}"
    if entry.root is None or store.ensure(entry.oid):
        return bytearray(read_object(store, entry.oid, where, entry.size))
    if entry.root_codec:
        return read_tensor(store, entry, label)  # frame-coded: tensorio reads it, or says why it cannot
    data = read_object(store, entry.root, f"{where} (root of its delta chain)", entry.size)
    available = codecs()
    for i, d in enumerate(entry.deltas, start=1):
        codec = available.get(d.codec)
        if codec is None:
            raise FmhubError(f"{where} is stored with the delta codec {d.codec!r}, which no installed plugin provides; install it")
        delta = read_object(store, d.oid, f"{where} (delta {i} of {len(entry.deltas)})", d.size)
        try:
            data = codec.decode(data, delta, entry.dtype)
        except Exception as exc:  # a damaged delta can break a codec in any way (struct.error, IndexError, ...)
            raise CorruptObject(f"{where} (delta {i} of {len(entry.deltas)}) does not decode ({exc}); run `fmhub fsck`") from None
        if len(data) != entry.size:  # a plugin's codec that grows the tensor: stop before the next link doubles it
            raise CorruptObject(f"{where} (delta {i} of {len(entry.deltas)}) decodes to {len(data)} bytes, not {entry.size}; run `fmhub fsck`")
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.oid:
        raise CorruptObject(f"{where}: its delta chain does not rebuild sha256:{entry.oid}; run `fmhub fsck`")
    return data if isinstance(data, bytearray) else bytearray(data)


# -- writing planes objects -----------------------------------------------------------------------


class Coded:
    """A planes object encoded into an open writer: commit it to the store, or abort it.

    ``frames`` and ``literal`` (how many frames need no base) tell the caller
    whether it is worth keeping as a link before anything becomes visible.
    """

    def __init__(self, writer, frames: int, literal: int) -> None:
        self._writer, self.frames, self.literal = writer, frames, literal
        self.size = writer.size

    def commit(self) -> str:
        return self._writer.commit()

    def abort(self) -> None:
        self._writer.abort()


def write_planes(store: ObjectStore, data: bytes | bytearray, dtype: str, base: Chain | None, limit: int | None = None) -> Coded | None:
    """Encode ``data`` as a planes object, frames in parallel, against ``base`` (the previous version's chain) or alone.

    None, and nothing stored, when the object would exceed ``limit`` bytes or
    the previous version's objects do not decode. The object is not visible
    until the caller commits it.

    The base is not checked against its own oid here: a link is made against
    the bytes the base's objects decode to, and decoding is deterministic, so
    the link rebuilds this version from those same objects whatever they
    hold; every checkout checks the result against this version's oid.
    """
    layout = planes.layout_for(dtype, len(data))
    view = memoryview(data).cast("B")
    base_jobs = base.jobs() if base is not None else None

    def jobs() -> Iterator[Callable[[], bytes]]:
        for at, n in frames_of(len(data)):
            yield _encode_job(view[at : at + n], next(base_jobs) if base_jobs is not None else None, layout)

    writer = store.writer()
    try:
        counts = _write_frames(writer, jobs(), layout, limit)
        if base_jobs is not None:
            next(base_jobs, None)  # lets the chain check that its objects end where their frames do
        if counts is None:
            writer.abort()
            return None
        return Coded(writer, *counts)
    except CorruptObject:  # the previous version's objects do not decode: store this one without them
        writer.abort()
        return None
    except BaseException:
        writer.abort()
        raise


def _write_frames(writer, jobs: Iterator, layout: planes.Layout, limit: int | None) -> tuple[int, int] | None:
    """Write the header and every frame record in order: (frames, frames needing no base); None as soon as the
    object passes ``limit`` bytes, or is on course to."""
    frames = literal = done = 0
    writer.write(layout.header())
    for record in ordered(jobs):
        writer.write(record)
        frames += 1
        literal += record[0] in planes.BASELESS
        done += layout.frame_bytes
        if limit is not None and (writer.size > limit or (frames >= EARLY_FRAMES and writer.size > limit * done / layout.size)):
            return None  # incompressible bytes are not encoded to the end
    return frames, literal


def _encode_job(new: memoryview, base_job: Callable[[], Frame] | None, layout: planes.Layout) -> Callable[[], bytes]:
    def job() -> bytes:
        return planes.encode_frame(new, base_job() if base_job is not None else None, layout)

    return job


def copy_tensors(store: ObjectStore, entries: list[TensorEntry], out, label: str = "") -> None:
    """Write the tensors' bytes to ``out`` one after another, every frame decoded in the pool ahead of the writes.

    Each tensor is checked against its oid as its last frame is written: a
    mismatch raises CorruptObject after partial output (the caller reports the
    output as failed). Objects are opened in order, a few frames ahead.
    """
    opened: deque[tuple[int, Chain]] = deque()

    def jobs() -> Iterator[Callable[[], Frame]]:
        for i, e in enumerate(entries):
            if e.size:
                chain = Chain(store, e, label)
                opened.append((i, chain))
                yield from chain.jobs()

    frames, h = ordered(jobs()), None
    try:
        for i, e in enumerate(entries):
            h, got = SequentialHash(), 0
            while got < e.size:  # the hash thread and git's pipe take each frame at the same time
                view = memoryview(next(frames)).cast("B")
                h.update(view)
                out.write(view)
                got += len(view)
            if got != e.size or h.hexdigest() != e.oid:
                raise CorruptObject(f"{label}tensor {e.name!r} is corrupt: its objects do not rebuild sha256:{e.oid}")
            while opened and opened[0][0] <= i:
                opened.popleft()[1].close()
    finally:
        if h is not None:
            h.close()  # a tensor that failed half way leaves its hash thread waiting
        frames.close()
        for _i, chain in opened:
            chain.close()
