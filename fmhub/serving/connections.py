"""The built-in server's connections: bytes in and out held to deadlines, and closes that keep the answer.

Deadlines hold across every recv and send of a phase (a per-call timeout let
a client sending one byte a second keep its thread for ever): `Input` waits
only for what is left of the phase's deadline, `Output` lets a response wait
`SEND_TIMEOUT` seconds in all for its reader. `linger` and `Closer` close a
connection whose request was answered before its body was read by reading
and dropping what the client still sends, so the close does not reset the
answer away. The limits are module attributes, read when used, so tests can
shorten them; `fmhub.serving.http` holds each phase to them.
"""

from __future__ import annotations

import io
import queue
import selectors
import socket
import threading
import time
from typing import Any

MAX_BODY = 8 << 20  # bytes of request body read at most
HEADER_TIMEOUT = 10.0  # seconds for a request line and headers, in all: from the accept, or from a keep-alive's first byte
IDLE_TIMEOUT = 10.0  # seconds a keep-alive connection may wait for its next request
BODY_TIMEOUT = 10.0  # seconds a body may take, at least; plus its declared size at BODY_RATE
BODY_RATE = 64 << 10  # bytes per second a body is read at, at the slowest
SEND_TIMEOUT = 30.0  # seconds a response may wait, in all, for the client to read it (a slow SSE reader frees its thread)
BUSY_TIMEOUT = 2.0  # seconds a 503 answer waits for the request it refuses, in all
# unread body drained after an early answer (a 401 before the body is read), so closing does not reset the answer
# away: any body within the limit, and its headers (a client sends a body under the limit before reading the answer)
LINGER_BYTES = MAX_BODY + (64 << 10)
MAX_LINGERING = 1024  # turned-away connections drained at once by the accept loop's closer; beyond, closed at once


class ClientGone(Exception):
    """The client hung up."""


class Input(io.RawIOBase):
    """A connection's bytes in: each recv waits only for what is left of the current phase's ``deadline``."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client is sending too slowly")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class Output(io.BufferedIOBase):
    """A connection's bytes out: a response may wait ``left`` seconds in all for the client to take them.

    A per-send timeout let a client that reads a byte now and then hold its
    thread for as long as a stream lasts; blocked time adds up here instead.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = SEND_TIMEOUT

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.left <= 0:
            raise TimeoutError("the client stopped reading the response")
        started = time.monotonic()
        self.sock.settimeout(self.left)
        try:
            self.sock.sendall(data)
        finally:
            self.left -= time.monotonic() - started
        return len(data)



def linger(sock: socket.socket) -> None:
    """Half-close, then read what the client still sends (a body answered before it was read), so the answer is not
    lost: closing a socket with unread data resets the connection, and the client's kernel drops what it had not read."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    try:
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < LINGER_BYTES and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(1 << 16)
            if not data:
                return
            drained += len(data)
    except OSError:
        pass



class Closer:
    """Closes connections the accept loop answered itself, without resetting the answer away.

    Each is half-closed already; what its client still sends is read and
    dropped until it hangs up, for BUSY_TIMEOUT at most, by one thread
    watching them all. Beyond `MAX_LINGERING` at once, one is closed at once.
    """

    def __init__(self) -> None:
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="fmhub-http-closer", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> None:
        if len(self._selector.get_map()) + self._incoming.qsize() >= MAX_LINGERING:
            sock.close()
        else:
            self._incoming.put((sock, time.monotonic() + BUSY_TIMEOUT))

    def stop(self) -> None:
        self._incoming.put((None, 0.0))

    def _run(self) -> None:
        while self._take(block=not self._selector.get_map()):
            for key, _ in self._selector.select(timeout=0.1):
                self._drain(key.fileobj)
            now = time.monotonic()
            for key in list(self._selector.get_map().values()):
                if key.data <= now:
                    self._close(key.fileobj)
        for key in list(self._selector.get_map().values()):
            self._close(key.fileobj)

    def _take(self, block: bool) -> bool:
        """Watch what the accept loop handed over (waiting for it when nothing is watched); False once told to stop."""
        try:
            while True:
                sock, deadline = self._incoming.get(block=block)
                block = False
                if sock is None:
                    return False
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ, deadline)
        except queue.Empty:
            return True

    def _drain(self, sock: Any) -> None:
        try:
            if sock.recv(1 << 16):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(sock)

    def _close(self, sock: Any) -> None:
        self._selector.unregister(sock)
        sock.close()

