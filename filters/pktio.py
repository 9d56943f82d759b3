"""git's pkt-line framing, and file-like views of a pkt-line stream: content sections of git's filter protocol.

A pkt-line is a 4-hex-digit length (counting those 4 digits) followed by the
payload; ``0000`` is a flush-pkt, which ends a list or a content section.
https://git-scm.com/docs/protocol-common#_pkt_line_format

Implemented here rather than taken from dulwich: it is a few lines, and git
starts the filter process once per command, so every import is paid often.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import BinaryIO, Callable, Iterator


MAX_PKT_PAYLOAD = 65516  # git's LARGE_PACKET_DATA_MAX
FLUSH_PKT = b"0000"


class Hangup(Exception):
    """The stream ended where a pkt-line should start (git closed its end)."""


class PktLineError(Exception):
    """The stream is not pkt-lines: a bad length prefix, or a pkt-line cut short."""


class PktLine:
    """Reads and writes pkt-lines through a ``read(n)`` that returns n bytes unless the stream ends, and a ``write``."""

    def __init__(self, read: Callable[[int], bytes], write: Callable[[bytes], object]) -> None:
        self._read = read
        self._write = write

    def read_pkt_line(self) -> bytes | None:
        """The next payload; None for a flush-pkt."""
        head = self._read(4)
        if not head:
            raise Hangup()
        try:
            size = int(head, 16) if len(head) == 4 else -1
        except ValueError:
            size = -1
        if size == 0:
            return None
        if size < 4:
            raise PktLineError(f"bad pkt-line length {head!r}")
        data = self._read(size - 4)
        if len(data) != size - 4:
            raise PktLineError(f"pkt-line cut short: {len(data) + 4:04x} bytes of {size:04x}")
        return data

    def read_pkt_seq(self) -> Iterator[bytes]:
        """Payloads up to the next flush-pkt."""
        while (pkt := self.read_pkt_line()) is not None:
            yield pkt

    def write_pkt_line(self, data: bytes | None) -> None:
        """One pkt-line (None: a flush-pkt)."""
        self._write(FLUSH_PKT if data is None else b"%04x" % (len(data) + 4) + data)


class PktReader:
    """Reads one content section (pkt-lines up to a flush-pkt) as a byte stream."""

    def __init__(self, proto: PktLine) -> None:
        self._proto = proto
        self._buf = b""
        self._pos = 0
        self.done = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, never more than one pkt-line's worth: a short read is not the end.

        Handing out whole packets as they are avoids copying gigabytes into
        bigger buffers; readers loop until they have what they need.
        """
        if n <= 0:
            return b""
        while self._pos >= len(self._buf):
            if self.done:
                return b""
            pkt = self._proto.read_pkt_line()
            if pkt is None:
                self.done = True
                return b""
            if not pkt:  # an empty pkt-line carries nothing; it is not the end
                continue
            if n >= len(pkt):
                return pkt
            self._buf, self._pos = pkt, 0
        take = self._buf[self._pos : self._pos + n]
        self._pos += len(take)
        return take

    def read_upto(self, n: int) -> bytes:
        """Up to ``n`` bytes of the section (fewer only at its end): never more than asked, whatever git sends."""
        parts, got = [], 0
        while got < n and (chunk := self.read(n - got)):
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def drain(self) -> None:
        """Consume the rest of the section so the next request starts in sync."""
        self._buf, self._pos = b"", 0
        while not self.done:
            if self._proto.read_pkt_line() is None:
                self.done = True


class PktWriter:
    """Writes bytes as pkt-lines of at most git's maximum payload.

    With ``out`` (the buffered stream the protocol writes to), payloads go
    straight to its file descriptor with ``os.writev``: one system call per
    pkt-line and no copy of the payload, which matters at gigabytes per file.
    """

    def __init__(self, proto: PktLine, out: BinaryIO | None = None) -> None:
        self._proto = proto
        self._out = out
        self._fd = _fileno(out)
        self.written = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._fd is None:
            for start in range(0, len(view), MAX_PKT_PAYLOAD):
                self._proto.write_pkt_line(bytes(view[start : start + MAX_PKT_PAYLOAD]))
        else:
            self._out.flush()  # keep order with pkt-lines written through the buffer
            for start in range(0, len(view), MAX_PKT_PAYLOAD):
                part = view[start : start + MAX_PKT_PAYLOAD]
                _writev_all(self._fd, b"%04x" % (len(part) + 4), part)
        self.written += len(view)
        return len(view)


def _fileno(out: BinaryIO | None) -> int | None:
    if out is None or not hasattr(os, "writev"):
        return None
    try:
        return out.fileno()
    except (AttributeError, OSError, ValueError):  # BytesIO and friends in tests
        return None


def _writev_all(fd: int, head: bytes, payload: memoryview) -> None:
    n = os.writev(fd, [head, payload])
    if n < len(head):  # a signal cut the write short: finish by hand
        _write_all(fd, memoryview(head)[n:])
        n = len(head)
    _write_all(fd, payload[n - len(head) :])


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
