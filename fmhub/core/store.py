"""Content-addressed object store with Git LFS's on-disk layout.

Objects live at ``<store>/objects/OID[0:2]/OID[2:4]/OID`` (the layout of
``dulwich.lfs.LFSStore`` and of git-lfs itself), keyed by the sha256 of their
bytes. An object is written to ``<store>/tmp``, fsynced, then renamed into
place, so a visible object is always complete; a crash leaves at most a stray
temp file, which `ObjectStore.remove_stale_temp` clears.

`fmhub repack` may replace an old object by a *packed object*,
``<store>/packed/OID[0:2]/OID[2:4]/OID``: a delta against another object of
the store (spec: docs/manifest.md, "Packed objects"). Every read path here
rebuilds it and checks its sha256, so callers never see the difference;
`iter_oids` still lists whole objects only.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
import time
from collections import deque, namedtuple

from fmhub.base.errors import CorruptObject, FmhubError, MissingObject, MissingPackBase, StoreWriteError

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import BinaryIO, Iterator, Sequence


if TYPE_CHECKING:  # imported where used: git starts the filter for every command, and most need neither
    from concurrent.futures import Future, ThreadPoolExecutor

CHUNK = 1 << 20
SPILL_BYTES = 16 << 20  # an object larger than this is streamed to a temp file instead of buffered
MAX_PENDING_BYTES = 128 << 20  # buffered bytes awaiting their background write, at most
COPY_CHUNK = 4 << 20  # read size when copying objects out
COPY_DEPTH = 4  # buffers in flight between the reading thread and the writer
PACK_MAGIC = b"FPK1"
MAX_PACK_DEPTH = 64  # longest chain of packed objects a reader follows; deeper means damage (or a cycle)
_MAX_PACK_DTYPE = 64  # a dtype name longer than this in a packed header means the header is damaged
SMALL_OBJECT = 1 << 20  # objects up to this size (dataset chunks) are fsynced several at a time
SMALL_WRITERS = 8  # fsync is latency-bound: with several in flight the file system commits them together


class PackHeader(namedtuple("PackHeader", "codec base size dtype offset")):
    """The fixed part of a packed file: how to rebuild the object, and where its delta starts.

    A named tuple, not a dataclass: git's filter imports this module for every git command.
    """

    __slots__ = ()


def pack_header_bytes(codec: str, base: str, size: int, dtype: str) -> bytes:
    """``FPK1``, u8 + codec name, 64 hex of the base oid, u64 size, u32 + dtype name (all little-endian)."""
    name, dt = codec.encode("ascii"), dtype.encode("ascii")
    if not 0 < len(name) < 256 or len(base) != 64 or len(dt) > _MAX_PACK_DTYPE:
        raise ValueError(f"cannot write a packed header for codec {codec!r}, base {base!r}, dtype {dtype!r}")
    return PACK_MAGIC + struct.pack("<B", len(name)) + name + base.encode("ascii") + struct.pack("<QI", size, len(dt)) + dt


def parse_pack_header(f: BinaryIO) -> PackHeader:
    """Read a packed file's header from ``f`` (at offset 0); ValueError saying what is wrong with it."""
    head = f.read(5)
    if len(head) != 5 or head[:4] != PACK_MAGIC:
        raise ValueError("it does not start with FPK1")
    name = f.read(head[4])
    base = f.read(64)
    fixed = f.read(12)
    if len(name) != head[4] or len(base) != 64 or len(fixed) != 12:
        raise ValueError("its header is truncated")
    size, dtype_len = struct.unpack("<QI", fixed)
    if dtype_len > _MAX_PACK_DTYPE:
        raise ValueError(f"its dtype name is {dtype_len} bytes long")
    dtype = f.read(dtype_len)
    if len(dtype) != dtype_len:
        raise ValueError("its header is truncated")
    try:
        codec, base_oid, dt = name.decode("ascii"), base.decode("ascii"), dtype.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("its header is not ASCII") from None
    if not _is_oid(base_oid) or not codec:
        raise ValueError("its base is not a sha256 object id")
    return PackHeader(codec, base_oid, size, dt, 5 + len(name) + 64 + 12 + dtype_len)


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (an object's oid, were it stored), read in `CHUNK` blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _is_oid(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class ObjectStore:
    """An LFS-layout store (as ``dulwich.lfs.LFSStore`` and git-lfs lay it out) that writes atomically, streams,
    and can borrow from other stores."""

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

    def packed_path(self, oid: str) -> str:
        return os.path.join(self.path, "packed", oid[0:2], oid[2:4], oid)

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
        return _iter_named(os.path.join(self.path, "objects"))

    def iter_packed(self) -> Iterator[str]:
        """The objects stored packed (an object may be both, after a repack was interrupted)."""
        return _iter_named(os.path.join(self.path, "packed"))

    def packed_base(self, oid: str) -> str | None:
        """The object a packed object is a delta against; None if ``oid`` is not packed here."""
        header = self._pack_header(oid)
        return header.base if header is not None else None

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

    def check_packed(self, oid: str) -> None:
        """Rebuild a packed object from its packed file (even if it is also whole) and check it.

        Raises CorruptObject or `MissingPackBase` saying what is wrong, FmhubError
        when its codec is not installed.
        """
        with self._rebuild_lock:
            self._rebuild(oid, packed_first=True)

    # -- packed objects --------------------------------------------------------

    def _pack_header(self, oid: str) -> PackHeader | None:
        """The header of ``oid``'s packed file, None if there is none; CorruptObject if it is unreadable."""
        try:
            with open(self.packed_path(oid), "rb") as f:
                return parse_pack_header(f)
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: {exc}; {_PACK_ADVICE}") from None

    def _pack_chain(self, oid: str, packed_first: bool = False) -> tuple[str, list[tuple[str, PackHeader]]]:
        """The whole object a packed object rests on, and the packed links from ``oid`` down to it.

        Bases are read whole when they are (readers prefer whole objects); with
        ``packed_first`` ``oid`` itself is read from its packed file even if it is whole too.
        """
        links: list[tuple[str, PackHeader]] = []
        seen = {oid}
        cur = oid
        while (packed_first and cur == oid) or not os.path.isfile(self._sha_path(cur)):
            header = self._pack_header(cur)
            if header is None:
                if cur == oid:
                    raise KeyError(oid)
                raise MissingPackBase(
                    f"packed object sha256:{oid} in {self.path} is a delta against sha256:{cur}, which is not in the store; "
                    "fetch the object whole again (`fmhub fetch REMOTE REV` for a revision that uses it) or restore its base"
                )
            links.append((cur, header))
            if header.base in seen or len(links) > MAX_PACK_DEPTH:
                raise CorruptObject(
                    f"packed object sha256:{oid} in {self.path} is on a chain of packed objects that loops or is over "
                    f"{MAX_PACK_DEPTH} deep (at sha256:{cur}); {_PACK_ADVICE}"
                )
            seen.add(header.base)
            cur = header.base
        return cur, links

    def _packed_resolves(self, oid: str) -> bool:
        """Whether ``oid`` is packed here on a chain of readable headers that ends at a whole object (no rebuild)."""
        if not os.path.isfile(self.packed_path(oid)):
            return False
        try:
            self._pack_chain(oid)
        except (KeyError, CorruptObject):
            return False
        return True

    def _rebuild(self, oid: str, packed_first: bool = False) -> bytes | bytearray:
        """A packed object's bytes, applying each delta from the whole object at the end of its chain, each link checked.

        Callers hold ``_rebuild_lock``. At most a base, its delta and the next
        version are in memory at once, whatever the chain's length.
        """
        root, links = self._pack_chain(oid, packed_first)
        with open(self._sha_path(root), "rb") as f:
            data: bytes | bytearray = f.read()
        if hashlib.sha256(data).hexdigest() != root:
            raise CorruptObject(
                f"packed object sha256:{oid} in {self.path} cannot be rebuilt: the object it rests on, sha256:{root}, "
                "is corrupt; run `fmhub fsck` and restore that one"
            )
        for cur, _header in reversed(links):
            try:
                data = self._apply_packed(cur, data)
            except CorruptObject as exc:
                if cur == oid:
                    raise
                raise CorruptObject(f"packed object sha256:{oid} cannot be rebuilt: {exc}") from None
        return data

    def _apply_packed(self, oid: str, base: bytes | bytearray) -> bytes | bytearray:
        """Decode ``oid``'s packed file against its base's bytes; CorruptObject unless the result hashes to ``oid``."""
        from fmhub.core.deltas import codecs  # deltas imports this module

        with open(self.packed_path(oid), "rb") as f:
            try:
                header = parse_pack_header(f)
            except ValueError as exc:
                raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: {exc}; {_PACK_ADVICE}") from None
            delta = f.read()
        codec = codecs().get(header.codec)
        if codec is None:
            raise FmhubError(
                f"packed object sha256:{oid} in {self.path} is stored with the delta codec {header.codec!r}, "
                "which no installed plugin provides; install it"
            )
        try:
            out = codec.decode(base, delta, header.dtype)
        except Exception as exc:  # a damaged delta can break a codec in any way
            raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: its delta does not decode ({exc}); {_PACK_ADVICE}") from None
        if len(out) != header.size or hashlib.sha256(out).hexdigest() != oid:
            raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: it does not rebuild to its sha256; {_PACK_ADVICE}")
        return out

    def _open_rebuilt(self, oid: str, buffering: int) -> BinaryIO:
        """A packed object rebuilt into an anonymous file in tmp/ (no name: nothing to clean up), at offset 0."""
        with self._rebuild_lock:
            data = self._rebuild(oid)
            import tempfile

            try:
                f = tempfile.TemporaryFile(dir=self.tmp_dir(), prefix="unpacked-", buffering=buffering)
            except OSError as exc:
                raise _as_user_error(exc, self.path) from None
            try:
                _write_all(f.fileno(), data)
                f.seek(0)
            except BaseException as exc:
                f.close()
                raise _as_user_error(exc, self.path) from None
        return f

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
                self._import_file(_BytesReader(data), oid, len(data), alt)
                return True
        return False

    def pack(self, oid: str, base: str, base_data: bytes | bytearray, codec: str, dtype: str, delta: bytes) -> int:
        """Replace the whole object ``oid`` by a packed object: ``delta`` against ``base`` (whose bytes are ``base_data``).

        The packed file is written atomically (tmp/, fsync, rename), read back
        and decoded against ``base_data``; only when that gives ``oid``'s
        bytes is the whole object deleted. A crash in between leaves both, and
        readers prefer the whole one. Returns the packed file's size.
        """
        if oid == base or hashlib.sha256(base_data).hexdigest() != base:
            raise ValueError(f"cannot pack sha256:{oid} against sha256:{base} with these bytes")
        try:
            size = os.path.getsize(self._sha_path(oid))
        except FileNotFoundError:
            raise KeyError(oid) from None
        header = pack_header_bytes(codec, base, size, dtype)
        dest = self.packed_path(oid)
        self._write_file_atomically(dest, (header, delta))
        try:
            self._apply_packed(oid, base_data)
        except BaseException:
            _unlink_quiet(dest)  # never leave a packed file that does not rebuild
            raise
        _unlink_quiet(self._sha_path(oid))
        return len(header) + len(delta)

    def _write_file_atomically(self, dest: str, parts: Sequence[bytes]) -> None:
        """Write ``parts`` to a temp file in tmp/, fsync it, make it read-only and rename it to ``dest``."""
        try:
            fd, tmp = self._new_temp()
        except OSError as exc:
            raise _as_user_error(exc, self.path) from None
        try:
            try:
                for part in parts:
                    _write_all(fd, part)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except OSError as exc:
            _unlink_quiet(tmp)
            raise _as_user_error(exc, self.path) from None

    def unpack(self, oid: str) -> None:
        """Store a packed object whole again (rebuilt and checked), then delete its packed file."""
        if not os.path.isfile(self._sha_path(oid)):
            with self._rebuild_lock:
                data = self._rebuild(oid)
                self._import_file(_BytesReader(data), oid, len(data), self.path)
        self.remove_packed(oid)

    def remove_packed(self, oid: str) -> None:
        """Delete ``oid``'s packed file (its whole object, if any, stays)."""
        _unlink_quiet(self.packed_path(oid))

    # -- writing -------------------------------------------------------------

    def writer(self) -> "ObjectWriter":
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
            raise _as_user_error(exc, self.path) from None
        finally:
            _unlink_quiet(path)

    def _import(self, src: str, oid: str) -> None:
        with open(src, "rb") as inp:
            self._import_file(inp, oid, os.path.getsize(src), os.path.dirname(src))

    def _import_file(self, inp, oid: str, size: int, where: str) -> None:
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
            raise _as_user_error(exc, self.path) from None
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
            raise _as_user_error(error, self.path)

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
            raise _as_user_error(exc, store.path) from None
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.expected:
            raise IncomingMismatch(f"more than the {self.expected} bytes announced arrived")
        self._hash.update(data)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            raise _as_user_error(exc, self.store.path) from None

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
            raise _as_user_error(exc, self.store.path) from None
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove what is left of a failed transfer (a no-op after publish)."""
        _drop_temp(self)


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
                _write_all(self._fd, data)
        except OSError as exc:
            raise _as_user_error(exc, self.store.path) from None

    def _drain_to_file(self) -> None:
        for chunk in self._chunks:
            _write_all(self._fd, chunk)
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
                        _write_all(fd, chunk)
                os.fsync(fd)
                os.close(fd)
                fd = None
                if os.path.isfile(store._sha_path(oid)):
                    _unlink_quiet(tmp)
                else:
                    store._publish(tmp, oid)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                if tmp is not None:
                    _unlink_quiet(tmp)
                raise

        store._submit(finish, sum(len(c) for c in chunks), oid, self.size)
        return oid

    def abort(self) -> None:
        _drop_temp(self)
        self._chunks = []


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


_PACK_ADVICE = "run `fmhub fsck`, then delete that packed file and fetch the object again (`fmhub fetch REMOTE REV`)"


class _BytesReader:
    """``read(n)`` over a buffer without copying it whole (io.BytesIO would)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self._view, self._at = memoryview(data), 0

    def read(self, n: int) -> memoryview:
        part = self._view[self._at : self._at + n]
        self._at += len(part)
        return part


def _iter_named(root: str) -> Iterator[str]:
    """The object files under ``root`` laid out as OID[0:2]/OID[2:4]/OID."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if len(name) == 64 and dirpath.endswith(os.path.join(name[0:2], name[2:4])):
                yield name


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _drop_temp(owner) -> None:
    """Close and remove an unfinished object's temp file (``owner._fd``, ``owner._tmp``), once."""
    if owner._fd is not None:
        os.close(owner._fd)
        owner._fd = None
    if owner._tmp is not None:
        _unlink_quiet(owner._tmp)
        owner._tmp = None


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _as_user_error(exc: BaseException, where: str) -> BaseException:
    if isinstance(exc, OSError):
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return StoreWriteError(f"cannot write to the object store {where}: {exc.strerror}; free some space and run the command again")
        return StoreWriteError(f"cannot write to the object store {where}: {exc}")
    return exc


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
