"""Clean and smudge: a checkpoint file to a manifest plus objects, and back, byte for byte.

Both directions stream: clean reads its input once, front to back, holding at
most one tensor (or `fmhub.core.storewrite.SPILL_BYTES` of it) in memory; smudge copies
objects out in 1 MiB chunks. Neither knows about git: `fmhub_filters.process`
feeds them from git's filter protocol, the CLI from files.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading

from fmhub.core.deltas import PLAIN, DeltaPolicy, store_tensor
from fmhub.base.errors import CorruptCheckpoint, CorruptObject, FmhubError, ManifestError, MissingObject, StoreWriteError
from fmhub.core.formats import SNIFF_BYTES, checkpoint_formats, data_format_for, data_formats, diagnose, format_named, sniff_format
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, TensorEntry, is_manifest
from fmhub.core.objectfiles import CHUNK
from fmhub.core.store import ObjectStore
from fmhub.core.streams import copy_objects

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import BinaryIO, Callable, Iterator, Protocol

    from fmhub.plugin.interfaces import CheckpointFormat, Layout

    class Readable(Protocol):
        def read(self, n: int) -> bytes: ...

    Fetcher = Callable[[list[tuple[str, int]]], None]
    # (path, tensor names, root, action) -> True when the file is to be a placeholder; raises to refuse.
    # The storage layer knows no policy: git's filter passes `fmhub.governance.access.check_smudge`.
    AccessCheck = Callable[..., bool]
    """Downloads ``(oid, size)`` objects into the store, verified; raises FmhubError saying why it could not."""


MAX_BUFFERED = 128 << 20  # tensors read ahead of the one being stored, at most (or one tensor, if bigger)
SINK_THREADS = 2  # tensors stored at the same time
POOL_HASH_BYTES = 1 << 20  # tensors this big are hashed on a pool thread as soon as they are read


class _Input:
    """A forward-only reader with a little look-ahead for sniffing."""

    def __init__(self, src: Readable) -> None:
        self._src = src
        self._ahead = b""
        self.pos = 0

    def peek(self, n: int) -> bytes:
        while len(self._ahead) < n:
            more = self._src.read(n - len(self._ahead))
            if not more:
                break
            self._ahead += more
        return self._ahead[:n]

    def read(self, n: int) -> bytes:
        if self._ahead:
            out, self._ahead = self._ahead[:n], self._ahead[n:]
        else:
            out = self._src.read(n)
        self.pos += len(out)
        return out

    def read_upto(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = self.read(min(CHUNK, n - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)


def file_layout(f: BinaryIO, label: str) -> tuple[CheckpointFormat, Layout]:
    """The format and layout of the checkpoint file ``f`` (read from its start); CorruptCheckpoint if it is not one."""
    f.seek(0)
    head = f.read(SNIFF_BYTES)
    fmt = sniff_format(head)
    if fmt is None:
        why = diagnose(head)
        raise CorruptCheckpoint(f"{label}: {why}; the file is corrupt" if why else f"{label}: not a checkpoint fmhub can read")
    f.seek(0)
    return fmt, fmt.read_layout(_exact_reader(f, label, "truncated inside the header; the file is incomplete"), label)


def clean(src: Readable, store: ObjectStore, path: str, previous: Manifest | None = None, deltas: DeltaPolicy | None = None,
          access: AccessCheck | None = None) -> bytes:
    """Store a checkpoint's header and tensors as objects; return the manifest git should keep.

    An empty input and an input that already is a manifest come back unchanged,
    so cleaning is idempotent (git re-cleans files when it checks their status).

    ``previous`` is the manifest of the version this one probably replaces (the
    one in git's index). A tensor whose bytes equal its namesake's stored object
    is recognised by comparing bytes, which is several times faster than
    hashing them; that is what makes re-adding a lightly changed model cheap.
    Without ``deltas`` the result is the same with or without ``previous``.
    With a `fmhub.core.deltas.DeltaPolicy`, a tensor that changed from its namesake
    in ``previous`` may be stored as a delta against it (`fmhub.core.deltas`).
    ``access`` (``action="write"``) may refuse the file: git then gets no manifest.
    """
    inp = _Input(src)
    head = inp.peek(SNIFF_BYTES)
    if not head:
        return b""
    if is_manifest(head):
        data = inp.read_upto(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: looks like an fmhub manifest but is over {MAX_MANIFEST_BYTES} bytes")
        Manifest.from_bytes(data, path)
        return data
    fmt = sniff_format(head)
    if fmt is None:
        from fmhub.core.datafile import clean_data

        data_fmt = data_format_for(path, head)
        if data_fmt is not None:  # a dataset: content-defined chunks, whatever its bytes
            result = clean_data(inp.read, data_fmt, store, path, previous).to_bytes()
            if access is not None:
                access(path, (), action="write")
            return result
        why = diagnose(head)
        if why:
            raise CorruptCheckpoint(f"{path}: {why}; the file is corrupt or not a checkpoint")
        names = ", ".join(f.name for f in checkpoint_formats()) or "none loaded: see FMHUB_DISABLE_PLUGINS and `fmhub plugins`"
        data_names = ", ".join(f"{f.name} ({' '.join('*' + e for e in f.extensions)})" for f in data_formats())
        raise CorruptCheckpoint(
            f"{path}: not a checkpoint fmhub can store (formats: {names}; data files by name: {data_names}); "
            "if it should not be tracked, narrow the pattern with `fmhub untrack`"
        )
    try:
        try:
            manifest = _clean_checkpoint(inp, fmt, store, path, previous, deltas)
        finally:
            store.flush()
    except StoreWriteError as exc:  # a full disk, say: name the file it struck
        raise StoreWriteError(f"{path}: {exc}") from None
    if access is not None:  # the policy's ``write`` rules: git gets no manifest for a file the user may not write
        access(path, [t.name for t in manifest.tensors], action="write")
    return manifest.to_bytes()


def _clean_checkpoint(
    inp: _Input, fmt: CheckpointFormat, store: ObjectStore, path: str, previous: Manifest | None, deltas: DeltaPolicy | None = None
) -> Manifest:
    def read_exact(n: int) -> bytes:
        data = inp.read_upto(n)
        if len(data) != n:
            raise CorruptCheckpoint(f"{path}: truncated inside the header ({inp.pos} bytes in all); the file is incomplete")
        return data

    layout: Layout = fmt.read_layout(read_exact, path)
    header_oid = store.write_bytes(layout.header)
    before = {t.name: t for t in previous.tensors} if previous is not None else {}
    sink = TensorSink(store, deltas or PLAIN, path)
    try:
        for t in layout.tensors:
            sink.submit(t, _read_tensor(inp, t, path, sink.buffer(t.size)), before.get(t.name))
        entries = sink.finish()
    except BaseException:
        sink.abort()
        raise
    if inp.peek(1):
        extra = len(inp.read_upto(1 << 30))
        raise CorruptCheckpoint(f"{path}: {extra} bytes follow the last tensor that the header does not describe; the file is corrupt")
    size = len(layout.header) + sum(e.size for e in entries)
    metadata = dict(layout.metadata) if layout.metadata is not None else None
    return Manifest(fmt.name, size, header_oid, len(layout.header), entries, metadata)


def _read_tensor(inp: _Input, t, path: str, buf: bytearray) -> bytearray:
    """Fill ``buf`` with the tensor's bytes from the input; CorruptCheckpoint when the file ends first."""
    view, got = memoryview(buf), 0
    while got < t.size:
        chunk = inp.read(min(CHUNK, t.size - got))
        if not chunk:
            raise CorruptCheckpoint(
                f"{path}: truncated: tensor {t.name!r} needs {t.size} bytes but the file ends after "
                f"{got}; the file is incomplete (an interrupted download or save?)"
            )
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return buf


class TensorSink:
    """Stores the tensors of one file on background threads while the caller reads the next ones.

    Each tensor is hashed, compared with its namesake in the previous version
    and stored (`fmhub.core.deltas.store_tensor`: whole, compressed, or as a delta,
    its frames encoded on every core). Two tensors are stored at a time, so the
    pool never idles while one tensor's own steps run (opening its chain, its
    probe, committing its objects). Tensors waiting for their turn hold at
    most `MAX_BUFFERED` bytes (or one tensor, if it is bigger), so memory stays
    near the largest tensor whatever the file's size.
    """

    def __init__(self, store: ObjectStore, policy: DeltaPolicy, path: str) -> None:
        self.store, self.policy, self.path = store, policy, path
        self._todo: queue.Queue = queue.Queue()
        self._entries: dict[int, TensorEntry] = {}
        self._count = 0
        self._error: BaseException | None = None
        self._held = 0
        self._room = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name="fmhub-clean", daemon=True) for _ in range(SINK_THREADS)]
        for thread in self._threads:
            thread.start()

    def buffer(self, size: int) -> bytearray:
        """A buffer for the next tensor, once the tensors still waiting leave room for it."""
        with self._room:
            while self._held and self._held + size > MAX_BUFFERED and self._error is None:
                self._room.wait()
            self._raise()
            self._held += size
        return bytearray(size)

    def submit(self, t, data: bytearray, old: TensorEntry | None) -> None:
        """Queue a tensor; a big one's hashing starts at once on a pool thread, ahead of its turn to be stored."""
        self._raise()
        if len(data) >= POOL_HASH_BYTES:
            from fmhub.core.parallel import pool

            hashing = pool().submit(_sha256, data).result
        else:  # a small tensor is hashed in its turn: the pool would cost more than it saves (and its start-up)
            hashing = lambda: _sha256(data)  # noqa: E731
        self._todo.put((self._count, t, data, old, hashing))
        self._count += 1

    def finish(self) -> list[TensorEntry]:
        """Wait until every tensor is stored; their entries, in file order."""
        self._stop()
        self._raise()
        return [self._entries[i] for i in range(self._count)]

    def abort(self) -> None:
        self._error = self._error or _Stopped()
        with self._room:
            self._room.notify_all()
        self._stop()

    def _stop(self) -> None:
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.join()

    def _raise(self) -> None:
        if self._error is not None and not isinstance(self._error, _Stopped):
            raise self._error

    def _run(self) -> None:
        try:
            while (item := self._todo.get()) is not None:
                i, t, data, old, hashing = item
                if self._error is None:
                    self._entries[i] = self._store(t, data, old, hashing)
                self._release(len(data))
                item = data = None  # drop the buffer now, not when the next tensor arrives
        except BaseException as exc:  # surfaced in the reading thread
            self._error = self._error or exc
            with self._room:
                self._room.notify_all()
            while (item := self._todo.get()) is not None:  # let the reader finish its call and see the error
                self._release(len(item[2]))

    def _store(self, t, data: bytearray, old: TensorEntry | None, hashing) -> TensorEntry:
        oid = hashing()
        try:
            return store_tensor(self.store, data, oid, old, t.name, t.dtype, tuple(t.shape), self.policy)
        except (CorruptObject, MissingObject) as exc:
            raise type(exc)(f"{self.path}: tensor {t.name!r}: {exc}") from None

    def _release(self, size: int) -> None:
        with self._room:
            self._held -= size
            self._room.notify_all()


def _sha256(data: bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class _Stopped(Exception):
    """The reading side gave up; the sink drops what is left."""


def _present(t: TensorEntry, store: ObjectStore) -> bool:
    """Whether the store can give a tensor's bytes: its own object, or every object of its delta chain."""
    return store.ensure(t.oid) or (t.root is not None and all(store.ensure(oid) for oid, _ in t.storage()))


def missing_objects(manifest: Manifest, store: ObjectStore) -> list[str]:
    """Names of the tensors (and ``<header>``) whose objects (or chain objects) are neither here nor in an alternate store."""
    missing = [t.name for t in manifest.tensors if not _present(t, store)]
    if manifest.header_oid is not None and not store.ensure(manifest.header_oid):
        missing.insert(0, "<header>")
    return missing


def check_objects(manifest: Manifest, store: ObjectStore, path: str, fetch_error: str | None = None) -> None:
    """Raise MissingObject naming every tensor whose object is missing (and why downloading them failed, if tried)."""
    missing = missing_objects(manifest, store)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        advice = "fetch them from the repository that committed this file (`fmhub fsck` lists what is missing)"
        if fetch_error is not None:
            advice = f"downloading them failed: {fetch_error}; {advice}, or retry with `fmhub fetch` once the server answers"
        raise MissingObject(f"{path}: {len(missing)} object(s) missing from the store {store.path}: {shown}; {advice}")


def ensure_objects(manifest: Manifest, store: ObjectStore, path: str, fetch: Fetcher | None = None) -> None:
    """Make sure every object of ``manifest`` is here, downloading just the missing ones with ``fetch`` if given.

    The fetcher is only called when something is missing, so a smudge whose
    objects are all local never imports the transfer layer.
    """
    if fetch is not None:
        want = [(oid, size) for oid, size in dict(manifest.oids()).items() if not store.ensure(oid)]
        if want:
            try:
                fetch(want)
            except FmhubError as exc:
                return check_objects(manifest, store, path, fetch_error=str(exc))
    check_objects(manifest, store, path)


MAX_HEADER_OBJECT = 128 << 20  # over any format's header limit (safetensors: 100 MB): read whole into memory


def _stored_size(store: ObjectStore, oid: str) -> int | None:
    try:
        return store.size_of(oid)
    except KeyError:  # only in an alternate store: its size is checked as it is read
        return None
    except FmhubError:  # a packed object whose header is damaged: reading it says so (fsck lists it on its own)
        return None


def size_mismatches(manifest: Manifest, store: ObjectStore) -> Iterator[tuple[str, str, int, int]]:
    """``(what, oid, bytes held, bytes declared)`` of every object here whose size is not the one the manifest declares:
    the header object, each tensor's own object, and each object of its chain (one only in an alternate store is
    checked as it is read).

    The objects hash to their names, but nothing ties a manifest's sizes to them:
    a hostile origin can pair a true object with a size (or a shape) that lies,
    and the file written would then disagree with its own header.
    """
    declared = [("its header", manifest.header_oid, manifest.header_size)] if manifest.header_oid is not None else []
    for t in manifest.tensors:
        declared += [(f"tensor {t.name!r}", oid, size) for oid, size in [(t.oid, t.size), *t.storage()]]
    seen = set()
    for what, oid, size in declared:
        if (oid, size) in seen:  # a tensor stored whole lists its object twice; equal tensors share one
            continue
        seen.add((oid, size))
        actual = _stored_size(store, oid)
        if actual is not None and actual != size:
            yield what, oid, actual, size


def check_sizes(manifest: Manifest, store: ObjectStore, path: str) -> None:
    """Refuse a manifest whose objects do not have the sizes it declares, before a byte is read or written."""
    for what, oid, actual, size in size_mismatches(manifest, store):
        raise CorruptObject(f"{path}: {what}: object sha256:{oid} is corrupt or the manifest lies: it holds {actual} bytes, "
                            f"the manifest declares {size}; run `fmhub fsck`")


def checked_header(manifest: Manifest, store: ObjectStore, path: str) -> bytes:
    """The header object, read once its declared size is within bounds and its stored size is that size, and checked
    against the manifest's tensor list (`check_header`)."""
    if manifest.header_size > MAX_HEADER_OBJECT:
        raise ManifestError(f"{path}: a header of {manifest.header_size} bytes is over the limit of {MAX_HEADER_OBJECT}; the manifest is corrupt")
    actual = _stored_size(store, manifest.header_oid)
    if actual is not None and actual != manifest.header_size:
        raise CorruptObject(f"{path}: its header: object sha256:{manifest.header_oid} is corrupt or the manifest lies: it holds "
                            f"{actual} bytes, the manifest declares {manifest.header_size}; run `fmhub fsck`")
    try:
        header = store.read_bytes(manifest.header_oid)
    except FmhubError as exc:
        raise type(exc)(f"{path}: header: {exc}") from None
    check_header(manifest, header, path)
    return header


def check_header(manifest: Manifest, header: bytes, path: str) -> None:
    """Refuse a manifest whose tensor list disagrees with its own header object."""
    layout = format_named(manifest.format).read_layout(_exact_reader(io.BytesIO(header), path), path)
    want = [(t.name, t.dtype, t.shape, t.size) for t in layout.tensors]
    have = [(t.name, t.dtype, t.shape, t.size) for t in manifest.tensors]
    if want != have or len(header) != manifest.header_size:
        raise ManifestError(f"{path}: the manifest's tensor list does not match its header object; the manifest was edited or is corrupt")


def smudge(
    data: bytes, store: ObjectStore, out: BinaryIO, path: str, on_start: Callable[[], None] | None = None,
    fetch: Fetcher | None = None, root: str | None = None, access: AccessCheck | None = None,
) -> bool:
    """Write the original file for a manifest to ``out``; anything that is not a manifest is written as is.

    ``access`` (git's filter passes the policy of the work tree at ``root``, default: the current directory)
    decides what may be read; True when it asked for a placeholder (the manifest text was written).

    Every check that can fail before output starts (parsing, missing objects,
    header agreement) is done first; ``on_start`` is called just before the
    first byte is written. Objects the store lacks are downloaded with
    ``fetch`` first, when one is given (the git filter passes one that asks
    the remote's LFS server). An object that turns out corrupt while streaming
    raises CorruptObject after partial output.
    """
    if not is_manifest(data):
        if on_start:
            on_start()
        out.write(data)
        return False
    manifest = Manifest.from_bytes(data, path)
    if access is not None and access(path, () if manifest.is_data else [t.name for t in manifest.tensors], root=root):
        if on_start:  # the policy asks for a placeholder: the manifest text, no weights, nothing fetched
            on_start()
        out.write(data)
        return True
    ensure_objects(manifest, store, path, fetch)
    check_sizes(manifest, store, path)
    if manifest.is_data:
        from fmhub.core.datafile import smudge_data

        try:
            smudge_data(manifest, store, out, path, on_start)
            return False
        except FmhubError as exc:
            raise _with_advice(exc, path) from None
    header = checked_header(manifest, store, path)
    if on_start:
        on_start()
    out.write(header)
    from fmhub.core.tensorio import copy_tensors, needs_rebuild

    try:
        if any(needs_rebuild(t, store) for t in manifest.tensors):
            copy_tensors(store, manifest.tensors, out)  # chains and compressed tensors, decoded on every core
        else:
            copy_objects(store, [t.oid for t in manifest.tensors], out, labels=[f"tensor {t.name!r}" for t in manifest.tensors])
    except FmhubError as exc:
        raise _with_advice(exc, path) from None
    return False


def _with_advice(exc: FmhubError, path: str) -> FmhubError:
    """``exc`` naming the file, and pointing at `fmhub fsck` once (the store's own messages may already)."""
    message = str(exc) if str(exc).startswith(f"{path}: ") else f"{path}: {exc}"
    return type(exc)(message if "fmhub fsck" in message else f"{message}; run `fmhub fsck`")


def _exact_reader(f: BinaryIO, path: str, what: str = "header object is truncated") -> Callable[[int], bytes]:
    def read_exact(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise CorruptCheckpoint(f"{path}: {what}")
        return data

    return read_exact


def staged_manifest(path: str, data: bytes | None) -> Manifest | None:
    """The manifest in ``data``, what git's index holds for ``path`` (`fmhub.core.repo.staged_blob`); None when it holds
    none, or a broken one: clean compares against it only to store less, so a bad one costs space, never an error."""
    if data is None or not is_manifest(data):
        return None
    try:
        return Manifest.from_bytes(data, path)
    except FmhubError:
        return None
