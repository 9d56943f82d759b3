"""The built-in backend's HTTP API: OpenAI-compatible completions and chat, health, metrics, adapter admin.

``POST /v1/completions`` and ``/v1/chat/completions`` take OpenAI's request
bodies; ``model`` names the adapter (``base`` for the bare model). With
``"stream": true`` the answer is server-sent events, a chunk whenever a
choice has new text, then ``data: [DONE]``; its status line waits for every
choice's first token, so an error before it (an adapter that fails to load)
is a real HTTP error, while one after it (a failed decode step) can only be
an error event that ends the stream. ``GET /v1/models`` lists the base and
the adapters, ``GET /v1/models/{id}`` gives one, ``GET /health`` the
engine's state, ``GET /metrics`` Prometheus text.
``GET``/``POST /fmhub/adapters`` read and replace the served adapters (what
``fmhub deploy`` calls), always behind a bearer token: the one given, or one
made up at start (`HttpServer.generated_token`, which ``fmhub serve`` prints).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
with a status that says what happened: 400 malformed request or over-long
prompt, 401 admin token, 404 unknown adapter, 409 adapter for another base,
408 a body too slow, 411 no Content-Length, 413 body too large, 503 busy (with ``Retry-After``),
507 an adapter larger than a cache tier. A client that hangs up has its
request cancelled at the next decode step; everyone else keeps being served.

Hostile input is bounded before it costs anything: bodies by Content-Length
(parsed by `fmhub.base.boundedjson`), numbers by range, connections by
`MAX_CONNECTIONS` threads plus `SPARE_THREADS` that only answer 503, with a
listen backlog of `BACKLOG` so a burst waits rather than being reset, and an
accept loop that answers 503 itself when every thread is taken. Time is
bounded per phase, across all its recvs or sends: a request's head
(`HEADER_TIMEOUT`), its body (`BODY_TIMEOUT` plus its size at `BODY_RATE`), a
keep-alive's wait for the next request (`IDLE_TIMEOUT`), and a response's
wait for its reader (`SEND_TIMEOUT`), so a client dribbling bytes holds a
thread for seconds, not for ever.

This module holds the server and its request handler; request bodies are read
and checked by `fmhub.serving.openai_requests`, answers shaped by
`fmhub.serving.openai_responses`, and connections held to their deadlines by
`fmhub.serving.connections` (where the limits above live).
"""

from __future__ import annotations

import io
import itertools
import json
import queue
import re
import secrets
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import unquote

from fmhub.base import boundedjson
from fmhub.base.errors import FmhubError, ServeError
from fmhub.serving import connections
from fmhub.serving.config import check_exposure
from fmhub.serving.connections import ClientGone, Closer, Input, Output, linger
from fmhub.serving.engine import Engine, Request
from fmhub.serving.openai_requests import Api, Asked, field, token_ok
from fmhub.serving.openai_responses import ERROR_CODES, Completion, error_doc, sse_event

POLL = 0.25  # seconds between checks that the client is still there
BACKLOG = 256  # connections the kernel holds while every thread is busy; socketserver's 5 reset bursts of clients
MAX_CONNECTIONS = 64  # connections served at once, one thread each (backend option max_connections)
HANDOVER_S = 0.5  # how long a spare thread waits for a serving thread to come free before it answers 503
SPARE_THREADS = 16  # threads that only answer 503 while every serving thread is busy; beyond them, the backlog waits
RETRY_AFTER_S = 1
_LENGTH = re.compile(r"[0-9]{1,19}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fmhub"
    api: Api  # set on the subclass the server makes

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep stderr quiet; /metrics counts requests
        pass

    # -- deadlines ----------------------------------------------------------------------
    def _head_time(self) -> float:
        return connections.HEADER_TIMEOUT

    def _send_time(self) -> float:
        return connections.SEND_TIMEOUT

    def setup(self) -> None:
        """The connection's files, held to deadlines across recvs and sends (the first head's counts from the accept)."""
        self.connection = self.request
        self._in = Input(self.connection, self._head_time())
        self.rfile = io.BufferedReader(self._in)
        self.wfile = Output(self.connection)
        self._served = False

    def handle_one_request(self) -> None:
        """A keep-alive waits IDLE_TIMEOUT for its next request's first byte; the head then has HEADER_TIMEOUT in all."""
        if self._served and not self._next_request():
            self.close_connection = True
            return
        self._served = True
        self.wfile.left = self._send_time()
        super().handle_one_request()

    def _next_request(self) -> bool:
        self._in.deadline = time.monotonic() + connections.IDLE_TIMEOUT
        try:
            started = bool(self.rfile.peek(1))
        except OSError:  # a timeout included: an idle keep-alive ends without an answer
            return False
        self._in.deadline = time.monotonic() + self._head_time()
        return started

    # -- plumbing -----------------------------------------------------------------------
    def _begin(self) -> None:
        """Per request (a connection serves several): does a body wait unread on the socket?"""
        self._responded = False
        self._unread = bool(self.headers.get("Transfer-Encoding")) or (self.headers.get("Content-Length") or "0").strip() != "0"

    def _send_json(self, status: int, doc: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self._responded = True
        if getattr(self, "_unread", False):
            self.close_connection = True  # the rest of the request is still on the socket: nothing after it can be parsed
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: ServeError) -> None:
        headers = {503: {"Retry-After": str(RETRY_AFTER_S)}, 401: {"WWW-Authenticate": "Bearer"}}.get(err.status)
        self.api.engine.metrics.inc("fmhub_http_errors_total", "Requests answered with an error, by status.", status=str(err.status))
        self._send_json(err.status, error_doc(str(err), err.kind, err.param, ERROR_CODES.get(err.status)), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, headers too long, an unknown method) in OpenAI's shape."""
        if code == 501:  # "Unsupported method": the method is known to HTTP, just not served here
            code, message = 405, f"method {self.command} is not allowed; use GET or POST"
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # a request line too broken to name its version still gets a status line
        self.close_connection = True
        self._unread = False
        try:
            self._error(ServeError(code, message or "bad request"))
        except OSError:
            pass

    def handle_expect_100(self) -> bool:
        """Say 100 Continue only to a body this server would read: a refused one is never sent."""
        length = self.headers.get("Content-Length") or ""
        if _LENGTH.fullmatch(length.strip()) and int(length) <= connections.MAX_BODY and not self.headers.get("Transfer-Encoding"):
            return super().handle_expect_100()
        return True

    def _length(self) -> int:
        self._unread = True  # until the body is read, whatever follows the headers is not a request
        if self.headers.get("Transfer-Encoding"):
            raise ServeError(411, "chunked request bodies are not taken; send the body with a Content-Length")
        declared = self.headers.get_all("Content-Length") or []
        if not declared:
            raise ServeError(411, "a request body needs a Content-Length header")
        if len(set(v.strip() for v in declared)) != 1 or not _LENGTH.fullmatch(declared[0].strip()):
            raise ServeError(400, f"Content-Length {', '.join(declared)[:40]!r} is not one byte count")
        length = int(declared[0])
        if length > connections.MAX_BODY:
            raise ServeError(413, f"request body of {length} bytes is over the {connections.MAX_BODY} byte limit")
        return length

    def _read(self, length: int) -> bytes:
        """Exactly ``length`` bytes of body; 400 when the client stops short, 408 when it is too slow (BODY_TIMEOUT plus
        the length at BODY_RATE, in all)."""
        self._in.deadline = time.monotonic() + connections.BODY_TIMEOUT + length / connections.BODY_RATE
        parts, got = [], 0
        while got < length:
            try:
                part = self.rfile.read1(min(length - got, 1 << 16))
            except TimeoutError:
                self.close_connection = True
                raise ServeError(408, f"the request body came too slowly: {got} of its {length} bytes in time") from None
            except OSError:  # a reset: the body is as short as if the client had hung up
                part = b""
            if not part:
                self.close_connection = True
                raise ServeError(400, f"the request body ended after {got} of the {length} bytes its Content-Length declares")
            parts.append(part)
            got += len(part)
        self._unread = False
        return b"".join(parts)

    def _body(self) -> dict:
        raw = self._read(self._length())
        try:
            doc = boundedjson.loads(raw)
        except boundedjson.JSONLimitError as exc:
            raise ServeError(400, f"the request body is not JSON this server takes: {exc}") from None
        if not isinstance(doc, dict):
            raise ServeError(400, "the request body must be a JSON object")
        return doc

    def finish(self) -> None:
        super().finish()
        if getattr(self, "_unread", False):
            linger(self.connection)

    def _internal(self, exc: Exception) -> None:
        """A bug: one line on stderr for the operator, a 500 in OpenAI's shape for the client, never a dropped connection."""
        print(f"fmhub serve: internal error on {self.command} {self.path[:200]}: {type(exc).__name__}: {exc}".splitlines()[0],
              file=sys.stderr)
        self.close_connection = True
        if not self._responded:
            self._error(ServeError(500, f"internal error ({type(exc).__name__}); the server log has the details", "server_error"))

    def _client_gone(self) -> bool:
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, req: Request) -> Iterator[tuple]:
        """The request's events; cancels it (and stops) when the client hangs up while waiting."""
        while True:
            try:
                event = req.events.get(timeout=POLL)
            except queue.Empty:
                if self._client_gone():
                    req.cancel()
                    raise ClientGone() from None
                continue
            yield event
            if event[0] != "token":
                return

    # -- routes -------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        self._route(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._route(self._post)

    def _route(self, serve: Callable[[str], None]) -> None:
        """Every way a request can fail ends in an answer: a ServeError's, or a 500 for a bug; a gone client in silence."""
        self._begin()
        try:
            serve(self.path.split("?", 1)[0])
        except ServeError as err:
            self._error(err)
        except (ConnectionError, TimeoutError, ClientGone):  # the client hung up, reset, or stopped reading (SEND_TIMEOUT)
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - the last line of defence; the message names the bug
            self._internal(exc)

    def _get(self, path: str) -> None:
        if path == "/health":
            self._send_json(200, self.api.engine.health())
        elif path == "/metrics":
            self._send(200, self.api.engine.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/models":
            self._send_json(200, self.api.models())
        elif path.startswith("/v1/models/"):
            self._send_json(200, self.api.model(unquote(path[len("/v1/models/"):], errors="replace")))
        elif path == "/fmhub/adapters":
            self._admin()
            self._send_json(200, {"base": self.api.engine.config.base.label, "adapters": self.api.engine.adapters()})
        else:
            raise ServeError(404, f"no such endpoint: GET {path[:200]}")

    def _post(self, path: str) -> None:
        if path in ("/v1/completions", "/v1/chat/completions"):
            self._generate(self._body(), chat=path == "/v1/chat/completions")
        elif path == "/fmhub/adapters":
            self._admin()  # before the body: without the token, nothing is read or parsed
            self._deploy(self._body())
        else:
            raise ServeError(404, f"no such endpoint: POST {path[:200]}")

    def _admin(self) -> None:
        if not token_ok(self.headers.get("Authorization", ""), self.api.admin_token):
            raise ServeError(401, "the admin API needs the server's admin token (Authorization: Bearer ...)", "authentication_error")

    def _deploy(self, body: dict) -> None:
        self._send_json(200, self.api.deploy(body))

    def _generate(self, body: dict, chat: bool) -> None:
        api = self.api
        field(body, "stream", bool, False)  # a bad one is refused before routing costs anything
        body, routed = api.route(body, chat)  # "model": "auto" → the router's adapter (fmhub.serving.router)
        requests, asked, prompt_tokens = api.submit(body, chat)
        answer = Completion(requests[0].id, body["model"], chat, routed, asked.params.logprobs is not None)
        try:
            if asked.stream:
                self._stream(answer, requests, asked, prompt_tokens)
                return
            self._send_json(200, answer.whole(requests, self._events, api.tok, asked.stops, prompt_tokens))
        finally:
            for r in requests:
                r.cancel()  # a no-op for finished ones; frees the rows of a request whose client went away

    def _first_events(self, requests: list[Request]) -> Callable[[Request], Iterator[tuple]]:
        """Wait for every request's first event before answering, so an error before the first token (an adapter
        that fails to load, a shutdown) is a real HTTP error; the events, the first ones included, as `_events` gives
        them."""
        streams = {}
        for r in requests:
            events = self._events(r)
            first = next(events)
            if first[0] == "error":
                raise first[1]
            streams[id(r)] = itertools.chain([first], events)
        return lambda r: streams[id(r)]

    def _stream(self, answer: Completion, requests: list[Request], asked: Asked, prompt_tokens: int) -> None:
        events = self._first_events(requests)
        self._responded = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(doc: Any) -> None:
            self.wfile.write(sse_event(doc))
            self.wfile.flush()

        # an error from here on (a decode step that failed) is an error event: the 200 has been sent
        answer.stream(requests, events, self.api.tok, asked.stops, send, prompt_tokens, asked.include_usage)


class _Busy(Handler):
    """Every serving thread is busy: answer whatever was asked with 503 and Retry-After, reading the request first."""

    def _head_time(self) -> float:
        return connections.BUSY_TIMEOUT

    def _send_time(self) -> float:
        return connections.BUSY_TIMEOUT

    def _route(self, serve: Callable[[str], None]) -> None:
        self._begin()
        self.close_connection = True
        try:
            self._error(ServeError(503, "the server is busy: every connection is taken; retry shortly", "server_error"))
        except OSError:
            pass


def _busy_answer() -> bytes:
    """The whole 503 the accept loop sends when no thread is free, in OpenAI's shape."""
    body = json.dumps(error_doc("the server is busy: every connection is taken; retry shortly", "server_error")).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: fmhub\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Server(ThreadingHTTPServer):
    """A threading HTTP server with a deep backlog and a bounded number of threads, whose accept loop never waits.

    ``max_connections`` threads serve; when all are busy, up to
    `SPARE_THREADS` more read the request and answer 503; when those are busy
    too, the accept loop answers 503 itself (one non-blocking send, then
    `fmhub.serving.connections.Closer`). Every thread is held to deadlines, so a slow client costs
    one for seconds, and nothing is reset.
    """

    request_queue_size = BACKLOG
    daemon_threads = True

    def __init__(self, address: tuple, handler: type, busy: type, max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.busy_handler = busy
        self.serving = threading.BoundedSemaphore(max_connections)
        self.spare = threading.BoundedSemaphore(SPARE_THREADS)
        super().__init__(address, handler)
        self.closer = Closer()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.serving.acquire(blocking=False):
            self._spawn(self.process_request_thread, self.serving, request, client_address)
        elif self.spare.acquire(blocking=False):
            self._spawn(self._refuse, self.spare, request, client_address)
        else:
            self._turn_away(request)

    def _turn_away(self, sock: socket.socket) -> None:
        """No thread is free: 503 at once, from here; a fresh socket's send buffer takes the few hundred bytes whole."""
        self.busy_handler.api.engine.metrics.inc("fmhub_http_errors_total", "Requests answered with an error, by status.",
                                                 status="503")
        try:
            sock.setblocking(False)
            sock.send(_busy_answer())
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.closer.add(sock)

    def server_close(self) -> None:
        super().server_close()
        self.closer.stop()

    def _spawn(self, target: Callable, slot: threading.BoundedSemaphore, request: Any, client_address: Any) -> None:
        def run() -> None:
            try:
                target(request, client_address)
            finally:
                slot.release()

        try:
            threading.Thread(target=run, name="fmhub-http-conn", daemon=True).start()
        except RuntimeError:  # the system has no thread to give: close this one rather than stop serving
            slot.release()
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line on stderr, not socketserver's traceback; nothing at all for clients that hang up or stall."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):
            print(f"fmhub serve: error serving {client_address[0]}: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)

    def _refuse(self, request: Any, client_address: Any) -> None:
        # A client that closes one connection and opens the next at once can find its old thread not yet
        # released (it has still to read the end of the stream): wait a moment for a serving thread first.
        if self.serving.acquire(timeout=HANDOVER_S):
            try:
                self.process_request_thread(request, client_address)
            finally:
                self.serving.release()
            return
        try:
            self.busy_handler(request, client_address, self)
        except Exception:  # noqa: BLE001 - a refusal that failed is the client's loss alone
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class HttpServer:
    """The engine behind an HTTP server on ``host:port`` (port 0: any free one), served from a background thread.

    The admin API always wants a token: ``admin_token``, or one made up here
    (``generated_token``, for the caller to show). Listening beyond this
    machine needs a token of the caller's own.
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, admin_token: str | None = None,
                 max_connections: int | None = None) -> None:
        self.engine = engine
        try:
            check_exposure(host, admin_token)
            limit = _max_connections(max_connections, engine.config.backend_options)
        except FmhubError:
            engine.close()
            raise
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        self.generated_token = None if admin_token else self.admin_token
        api = Api(engine, self.admin_token)
        handler = type("BoundHandler", (Handler,), {"api": api})
        busy = type("BoundBusy", (_Busy,), {"api": api})
        try:
            self.httpd = _Server((host, port), handler, busy, limit)
        except OSError as exc:
            engine.close()
            raise FmhubError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fmhub-http", daemon=True)
        self._thread.start()
        self._stopped = threading.Event()

    def wait(self) -> None:
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.stop()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()


def _max_connections(given: int | None, options: dict) -> int:
    value = given if given is not None else options.get("max_connections", MAX_CONNECTIONS)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
        raise FmhubError(f"backend option max_connections must be a whole number in 1..4096, not {value!r}")
    return value
