"""Packed objects: an object of the store kept as a delta against another one (`fmhub repack`).

A packed object lives at ``<store>/packed/OID[0:2]/OID[2:4]/OID``: a header
(`pack_header_bytes`, `parse_pack_header`) naming the delta codec, the base
object and the full size, then the delta (spec: docs/manifest.md, "Packed
objects"). `PackedObjects` is the part of `fmhub.core.store.ObjectStore`
that writes them, follows their chains down to a whole object and rebuilds
them, checking every link's sha256, so readers never see the difference.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import namedtuple

from fmhub.base.errors import CorruptObject, FmhubError, MissingPackBase
from fmhub.core.objectfiles import BytesReader, as_user_error, is_oid, iter_named, unlink_quiet, write_all

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    import threading
    from typing import BinaryIO, Iterator, Sequence

PACK_MAGIC = b"FPK1"
MAX_PACK_DEPTH = 64  # longest chain of packed objects a reader follows; deeper means damage (or a cycle)
_MAX_PACK_DTYPE = 64  # a dtype name longer than this in a packed header means the header is damaged
PACK_ADVICE = "run `fmhub fsck`, then delete that packed file and fetch the object again (`fmhub fetch REMOTE REV`)"


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
    if not is_oid(base_oid) or not codec:
        raise ValueError("its base is not a sha256 object id")
    return PackHeader(codec, base_oid, size, dt, 5 + len(name) + 64 + 12 + dtype_len)


class PackedObjects:
    """The packed objects of an `fmhub.core.store.ObjectStore` (a part of that class, which it is mixed into).

    Uses the store's ``path``, ``_sha_path`` (where a whole object is),
    ``_rebuild_lock``, ``tmp_dir`` and ``_new_temp``/``import_file`` (writing).
    """

    path: str
    _rebuild_lock: threading.Lock

    def packed_path(self, oid: str) -> str:
        return os.path.join(self.path, "packed", oid[0:2], oid[2:4], oid)

    def iter_packed(self) -> Iterator[str]:
        """The objects stored packed (an object may be both, after a repack was interrupted)."""
        return iter_named(os.path.join(self.path, "packed"))

    def packed_base(self, oid: str) -> str | None:
        """The object a packed object is a delta against; None if ``oid`` is not packed here."""
        header = self._pack_header(oid)
        return header.base if header is not None else None

    def check_packed(self, oid: str) -> None:
        """Rebuild a packed object from its packed file (even if it is also whole) and check it.

        Raises CorruptObject or `MissingPackBase` saying what is wrong, FmhubError
        when its codec is not installed.
        """
        with self._rebuild_lock:
            self._rebuild(oid, packed_first=True)

    def _pack_header(self, oid: str) -> PackHeader | None:
        """The header of ``oid``'s packed file, None if there is none; CorruptObject if it is unreadable."""
        try:
            with open(self.packed_path(oid), "rb") as f:
                return parse_pack_header(f)
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: {exc}; {PACK_ADVICE}") from None

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
                    f"{MAX_PACK_DEPTH} deep (at sha256:{cur}); {PACK_ADVICE}"
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
        from fmhub.core.codecs import codecs  # here: most reads are of whole objects

        with open(self.packed_path(oid), "rb") as f:
            try:
                header = parse_pack_header(f)
            except ValueError as exc:
                raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: {exc}; {PACK_ADVICE}") from None
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
            raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: its delta does not decode ({exc}); {PACK_ADVICE}") from None
        if len(out) != header.size or hashlib.sha256(out).hexdigest() != oid:
            raise CorruptObject(f"packed object sha256:{oid} in {self.path} is corrupt: it does not rebuild to its sha256; {PACK_ADVICE}")
        return out

    def _open_rebuilt(self, oid: str, buffering: int) -> BinaryIO:
        """A packed object rebuilt into an anonymous file in tmp/ (no name: nothing to clean up), at offset 0."""
        with self._rebuild_lock:
            data = self._rebuild(oid)
            import tempfile

            try:
                f = tempfile.TemporaryFile(dir=self.tmp_dir(), prefix="unpacked-", buffering=buffering)
            except OSError as exc:
                raise as_user_error(exc, self.path) from None
            try:
                write_all(f.fileno(), data)
                f.seek(0)
            except BaseException as exc:
                f.close()
                raise as_user_error(exc, self.path) from None
        return f

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
            unlink_quiet(dest)  # never leave a packed file that does not rebuild
            raise
        unlink_quiet(self._sha_path(oid))
        return len(header) + len(delta)

    def _write_file_atomically(self, dest: str, parts: Sequence[bytes]) -> None:
        """Write ``parts`` to a temp file in tmp/, fsync it, make it read-only and rename it to ``dest``."""
        try:
            fd, tmp = self._new_temp()
        except OSError as exc:
            raise as_user_error(exc, self.path) from None
        try:
            try:
                for part in parts:
                    write_all(fd, part)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        except OSError as exc:
            unlink_quiet(tmp)
            raise as_user_error(exc, self.path) from None

    def unpack(self, oid: str) -> None:
        """Store a packed object whole again (rebuilt and checked), then delete its packed file."""
        if not os.path.isfile(self._sha_path(oid)):
            with self._rebuild_lock:
                data = self._rebuild(oid)
                self.import_file(BytesReader(data), oid, len(data), self.path)
        self.remove_packed(oid)

    def remove_packed(self, oid: str) -> None:
        """Delete ``oid``'s packed file (its whole object, if any, stays)."""
        unlink_quiet(self.packed_path(oid))
