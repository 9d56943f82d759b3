"""waitress, held to what a hostile client can make it spend.

waitress reads a request's whole body (to a temp file past 512 KiB) before
the application sees the request, keeps a connection as long as bytes
trickle in, and stops accepting at its connection limit. So, here:

* **Admission before the body.** When a request's headers are in and it
  declares a body, ``gatekeeper.admit(method, path, headers)`` (the app's
  token and route check, run on the I/O thread: no disk writes) says whether
  it will be refused and how large a body its route takes. A refused request,
  or one whose Content-Length (or chunked body, as it arrives) is over the
  route's limit, is completed with no body: the app answers it (with its own
  one-line error, audited) from ``environ["fmhub.refused"]``, and the body
  still on the wire is read and dropped for ``linger`` seconds after the
  answer (a lingering close: closing with unread bytes resets the
  connection, and the client's kernel drops the answer it had not read).
* **Deadlines per phase, not per recv.** Checked once a second: a request's
  head must be in within ``header_timeout`` seconds; a body, and a response
  the client reads, must move at ``min_rate`` bytes per second on average
  after ``grace`` seconds. (Numbers: `fmhub.server.serve.Limits`.)
* **Eviction at the connection limit.** When every connection is taken and
  another waits, the one that has waited longest on its client for a head
  (or idles between requests) is closed to make room; connections being
  served are never closed for it. A thousand idle half-sent requests no
  longer keep an honest client out.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

if TYPE_CHECKING:
    from fmhub.server.serve import Limits

log = logging.getLogger("fmhub.server")


class Gatekeeper(Protocol):
    def admit(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[Optional[Exception], int]:
        """(the refusal the request will get before its body is read, or None; the most body bytes its route takes)."""

    def too_large(self, path: str, limit: int) -> Exception:
        """The refusal of a body over ``limit`` bytes."""


class _Parser(HTTPRequestParser):
    """waitress's request parser, which asks the gatekeeper about a request with a body before reading the body."""

    refusal: Optional[Exception] = None
    limit: Optional[int] = None

    def __init__(self, adj: Adjustments, channel: "GatedChannel") -> None:
        super().__init__(adj)
        self.channel = channel

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.content_length > 0 or self.chunked:
            self._admit()

    def _admit(self) -> None:
        gatekeeper = self.channel.server.gatekeeper
        path = "/" + self.path.lstrip("/")  # what waitress makes PATH_INFO of it
        try:
            refusal, self.limit = gatekeeper.admit(self.command, path, self.headers)
        except Exception:  # a bug: the app decides, reading the body as before (and answers the same bug with a 500)
            log.exception("fmhub server: the admission check of %s %s failed", self.command, path[:200])
            return
        if refusal is None and not self.chunked and self.content_length > self.limit:
            refusal = gatekeeper.too_large(path, self.limit)
        if refusal is not None:
            self._refuse(refusal)

    def _refuse(self, refusal: Exception) -> None:
        """Complete the request without its body; the connection closes after the answer (what follows is the body)."""
        self.refusal = refusal
        if self.body_rcv is not None:
            self.body_rcv.getbuf().close()  # what a chunked body left in its buffer (maybe a temp file)
        self.body_rcv, self.chunked, self.content_length = None, False, 0
        self.expect_continue = False  # never ask for a body that will not be read
        self.headers["CONTENT_LENGTH"] = "0"
        self.headers["CONNECTION"] = "close"
        self.completed = True
        self.channel.discarding = True

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.refusal is None and self.chunked and self.limit is not None and self.body_rcv is not None \
                and self.body_rcv.__len__() > self.limit:  # __len__: the buffer's len() overflows on 32-bit builds
            self._refuse(self.channel.server.gatekeeper.too_large("/" + self.path.lstrip("/"), self.limit))
        if self.refusal is not None:
            return len(data)  # the rest is the refused body: dropped, never parsed as another request
        return consumed


class _Task(WSGITask):
    def get_environment(self) -> dict:
        environ = super().get_environment()
        refusal = getattr(self.request, "refusal", None)
        if refusal is not None:
            environ["fmhub.refused"] = refusal
        return environ


class GatedChannel(HTTPChannel):
    """A waitress connection with admission, per-phase deadlines and a lingering close after a refusal."""

    task_class = _Task
    discarding = False  # a refused body is on the wire: linger after the answer
    lingering = 0.0  # while lingering: when to give up and close

    def __init__(self, server: "GatedServer", sock: socket.socket, addr: Any, adj: Adjustments, map: Any = None) -> None:  # noqa: A002
        super().__init__(server, sock, addr, adj, map)
        # waitress sends at most the socket's initial SO_SNDBUF (16 KiB on Linux) per send(): one I/O thread streaming
        # every download at that size spends ~65 000 Python-level loops per GiB. Not more: what a send does not take is
        # read from the file again. Setting SO_SNDBUF instead would switch the kernel's autotuning off.
        self.sendbuf_len = max(self.sendbuf_len, 256 << 10)
        self.parser_class = functools.partial(_Parser, channel=self)
        self.limits: Limits = server.limits
        self.phase, self.since, self.mark = "idle", time.time(), 0
        self.bytes_in = self.bytes_out = 0
        self.linger_left = 0

    # -- counting what moves --------------------------------------------------------------
    def received(self, data: bytes) -> bool:
        self.bytes_in += len(data)
        if self.discarding:
            return True
        return super().received(data)

    def send(self, data: bytes, do_close: bool = True) -> int:
        sent = super().send(data, do_close=do_close)
        self.bytes_out += sent or 0
        return sent

    # -- deadlines ------------------------------------------------------------------------
    def waiting_on_client(self) -> tuple[str, int]:
        """What this connection waits on its client for, and the byte count that measures its progress there."""
        if self.total_outbufs_len >= self.adj.send_bytes or (self.total_outbufs_len and not self.requests):
            return "response", self.bytes_out
        if self.requests:
            return "serving", 0
        if self.request is not None:
            return ("body", self.bytes_in) if self.request.headers_finished else ("head", 0)
        return "idle", 0

    def overdue(self, now: float) -> bool:
        """Whether the client is too slow for its phase; the clock of a phase starts when it is first seen here."""
        phase, count = self.waiting_on_client()
        if phase != self.phase:
            self.phase, self.since, self.mark = phase, now, count
        elapsed = now - self.since
        if phase == "head":
            return elapsed > self.limits.header_timeout
        if phase in ("body", "response"):
            return count - self.mark < self.limits.min_rate * (elapsed - self.limits.grace)
        return False

    def evictable(self) -> bool:
        """Idle, lingering, or still waiting for a head: closing it costs no work done."""
        if self.lingering:
            return True
        return not (self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed) \
            and (self.request is None or not self.request.headers_finished)

    # -- the lingering close --------------------------------------------------------------
    def handle_close(self) -> None:
        if self.discarding and not self.lingering and self._linger():
            return
        self.lingering = 0.0
        super().handle_close()

    def _linger(self) -> bool:
        """Half-close after the answer, then read and drop what the client still sends; False when that cannot be."""
        if not self.connected or self.total_outbufs_len or self.requests:
            return False
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        self.will_close = self.close_when_flushed = False
        self.lingering = time.time() + self.limits.linger
        self.linger_left = self.limits.linger_bytes
        return True

    def readable(self) -> bool:
        return True if self.lingering else super().readable()

    def writable(self) -> bool:
        if self.lingering:
            return time.time() >= self.lingering  # then handle_write closes it
        return super().writable()

    def handle_write(self) -> None:
        if self.lingering:
            self.handle_close()
        else:
            super().handle_write()

    def handle_read(self) -> None:
        if not self.lingering:
            super().handle_read()
            return
        try:
            data = self.socket.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.linger_left -= len(data)
        if not data or self.linger_left <= 0 or time.time() >= self.lingering:
            self.handle_close()


class GatedServer(TcpWSGIServer):
    """waitress's TCP server with `GatedChannel` connections, deadline checks and eviction at the connection limit."""

    channel_class = GatedChannel

    def __init__(self, *args: Any, gatekeeper: Gatekeeper, limits: Limits, **kwargs: Any) -> None:
        self.gatekeeper, self.limits = gatekeeper, limits
        super().__init__(*args, **kwargs)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        for channel in list(self.active_channels.values()):
            if channel.lingering and now >= channel.lingering:
                channel.handle_close()
            elif not channel.will_close and channel.overdue(now):
                channel.will_close = True  # closed by the loop's next write pass

    def readable(self) -> bool:
        accepting = super().readable()
        return accepting or (self.accepting and self._victim() is not None)

    def handle_accept(self) -> None:
        if len(self._map) >= self.adj.connection_limit:
            victim = self._victim()
            if victim is None:
                return
            victim.discarding = False  # closed now, not lingering
            victim.handle_close()
        super().handle_accept()

    def _victim(self) -> Optional[GatedChannel]:
        """The connection to close for a new one: the evictable one whose phase began longest ago."""
        return min((c for c in self.active_channels.values() if c.evictable()), key=lambda c: c.since, default=None)


def make_server(app: Any, gatekeeper: Gatekeeper, limits: Limits, **adjustments: Any) -> Any:
    """waitress's ``create_server``, with `GatedServer` for each address listened on."""
    adj = Adjustments(channel_timeout=limits.idle_timeout, connection_limit=limits.max_connections, cleanup_interval=1,
                      **adjustments)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    sockets: dict = {}
    servers = [GatedServer(app, sockets, dispatcher=dispatcher, adj=adj, sockinfo=info, gatekeeper=gatekeeper, limits=limits)
               for info in adj.listen]
    if len(servers) == 1:
        return servers[0]
    return MultiSocketServer(sockets, adj, [(s.effective_host, s.effective_port) for s in servers], dispatcher, servers[-1].log_info)
