"""Bounding what a pushed pack may make the server inflate: each object's declared size, read before dulwich inflates it."""

from __future__ import annotations

from typing import Optional

# the largest git object a push may hold (a blob, tree, commit, or a delta's result): GitHub refuses files over 100 MiB too
MAX_GIT_OBJECT = 100 << 20


class PackSizeGuard:
    """Follows a pack as it streams in and stops it at an object, or a delta's result, declared larger than ``limit``.

    dulwich inflates each object of a pushed pack in memory (to hash it), so
    a few MB of compressed zeros declaring a 100 GiB blob would take the
    server down. Each object's header declares its size, and a delta's data
    starts with its result's size: both are read here before dulwich inflates
    the object. Finding where each object ends means inflating it too, 64 KiB
    at a time and thrown away. Raises dulwich's ObjectFormatException, which
    dulwich reports to the client as a failed unpack; no ref moves.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()  # bytes of a header not complete yet
        self.left: Optional[int] = None  # objects still to come (None: before the pack header)
        self.z = None  # the current object's zlib stream
        self.delta: Optional[bytearray] = None  # the first inflated bytes of a delta (base size, result size)

    def feed(self, data: bytes) -> bytes:
        rest = bytes(data)
        while rest and self.left != 0:
            rest = self._inflate(rest) if self.z is not None else self._header(rest)
        return data

    def _too_large(self, size: int, what: str) -> None:
        from dulwich.errors import ObjectFormatException

        if size > self.limit:
            raise ObjectFormatException(f"the pack holds {what} {size} bytes; git objects on this server are at most "
                                        f"{self.limit} bytes (keep large files in Git LFS)")

    def _header(self, data: bytes) -> bytes:
        import zlib

        self.head += data
        if self.left is None:
            if len(self.head) < 12:
                return b""
            # not a pack: dulwich says so; nothing to follow
            self.left = int.from_bytes(self.head[8:12], "big") if self.head[:4] == b"PACK" else 0
            rest, self.head = bytes(self.head[12:]), bytearray()
            return rest
        parsed = _object_header(self.head)
        if parsed is None:
            if len(self.head) > 64:
                self._too_large(1 << 64, "an object header declaring over")  # no real header is this long
            return b""
        kind, size, used = parsed
        self._too_large(size, "a delta of" if kind in (6, 7) else "an object of")
        self.z, self.delta = zlib.decompressobj(), (bytearray() if kind in (6, 7) else None)
        rest, self.head = bytes(self.head[used:]), bytearray()
        return rest

    def _inflate(self, data: bytes) -> bytes:
        while data and not self.z.eof:
            out = self.z.decompress(data, 1 << 16)
            data = self.z.unconsumed_tail
            if self.delta is not None and len(self.delta) < 32:
                self.delta += out[:32]
                sizes = _varints(self.delta, 2)
                if sizes is not None:
                    self._too_large(sizes[1], "a delta whose result has")
                    self.delta = None
        if not self.z.eof:
            return b""
        rest, self.z, self.delta = self.z.unused_data, None, None
        self.left -= 1
        return rest


def _object_header(buf: bytearray) -> Optional[tuple[int, int, int]]:
    """(type, size, header length) of the pack object header at the start of ``buf``; None while incomplete."""
    if not buf:
        return None
    kind, size, shift, i = (buf[0] >> 4) & 7, buf[0] & 15, 4, 0
    while buf[i] & 0x80:
        i += 1
        if i >= len(buf):
            return None
        size |= (buf[i] & 0x7F) << shift
        shift += 7
    i += 1
    if kind == 6:  # ofs-delta: the base's offset, a varint
        while True:
            if i >= len(buf):
                return None
            i += 1
            if not buf[i - 1] & 0x80:
                break
    elif kind == 7:  # ref-delta: the base's id
        i += 20
        if i > len(buf):
            return None
    return kind, size, i


def _varints(buf: bytearray, n: int) -> Optional[list[int]]:
    """The first ``n`` little-endian base-128 varints of ``buf`` (a delta's base and result sizes); None while incomplete."""
    out, i = [], 0
    for _ in range(n):
        value, shift = 0, 0
        while True:
            if i >= len(buf):
                return None
            value |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not buf[i - 1] & 0x80:
                break
        out.append(value)
    return out
