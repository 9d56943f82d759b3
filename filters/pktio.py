"""File-like views of a pkt-line stream: content sections of git's filter protocol."""

from __future__ import annotations

from dulwich.protocol import Protocol

MAX_PKT_PAYLOAD = 65516  # git's LARGE_PACKET_DATA_MAX


class PktReader:
    """Reads one content section (pkt-lines up to a flush-pkt) as a byte stream."""

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto
        self._buf = b""
        self._pos = 0
        self.done = False

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        want = n
        while want > 0:
            if self._pos < len(self._buf):
                take = self._buf[self._pos : self._pos + want]
                self._pos += len(take)
                want -= len(take)
                parts.append(take)
                continue
            if self.done:
                break
            pkt = self._proto.read_pkt_line()
            if pkt is None:
                self.done = True
                break
            if want >= len(pkt):  # whole packet: no slicing copy
                parts.append(pkt)
                want -= len(pkt)
            else:
                self._buf, self._pos = pkt, 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all(self) -> bytes:
        parts = []
        while chunk := self.read(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def drain(self) -> None:
        """Consume the rest of the section so the next request starts in sync."""
        self._buf, self._pos = b"", 0
        while not self.done:
            if self._proto.read_pkt_line() is None:
                self.done = True


class PktWriter:
    """Writes bytes as pkt-lines of at most git's maximum payload."""

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto
        self.written = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        for start in range(0, len(view), MAX_PKT_PAYLOAD):
            self._proto.write_pkt_line(bytes(view[start : start + MAX_PKT_PAYLOAD]))
        self.written += len(data)
        return len(data)
