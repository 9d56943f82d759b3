"""The built-in backend's HTTP API: OpenAI-compatible completions and chat, health, metrics, adapter admin.

``POST /v1/completions`` and ``/v1/chat/completions`` take OpenAI's request
bodies; ``model`` names the adapter (``base`` for the bare model). With
``"stream": true`` the answer is server-sent events, one chunk per token,
then ``data: [DONE]``. ``GET /v1/models`` lists the base and the adapters,
``GET /health`` the engine's state, ``GET /metrics`` Prometheus text.
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
"""

from __future__ import annotations

import hmac
import io
import json
import os
import queue
import re
import secrets
import select
import selectors
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from fmhub.base import boundedjson
from fmhub.models import lora
from fmhub.base.errors import FmhubError
from fmhub.base.errors import ServeError
from fmhub.serving.config import check_exposure
from fmhub.serving.engine import Engine, GenParams, Request
from fmhub.serving.sources import AdapterSpec, Source, check_name

MAX_BODY = 8 << 20
POLL = 0.25  # seconds between checks that the client is still there
BACKLOG = 256  # connections the kernel holds while every thread is busy; socketserver's 5 reset bursts of clients
MAX_CONNECTIONS = 64  # connections served at once, one thread each (backend option max_connections)
SPARE_THREADS = 16  # threads that only answer 503 while every serving thread is busy; beyond them, the backlog waits
# Deadlines hold across every recv and send of a phase: a per-call timeout let a client sending one byte a second keep
# its thread forever. Module attributes, read when used, so tests can shorten them.
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
MAX_WAITING = 1024  # generations queued in the engine; more are answered 503
RETRY_AFTER_S = 1
MAX_MODEL_NAME = 256
MAX_DEPLOY_ITEMS = 1024
MAX_ADAPTER_FILES = 64
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
MAX_TOKENS_LIMIT = (1 << 31) - 1
_LENGTH = re.compile(r"[0-9]{1,19}")
_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


class _Gone(Exception):
    """The client hung up."""


class _Input(io.RawIOBase):
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


class _Output(io.BufferedIOBase):
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


def _field(body: dict, name: str, kind: type | tuple, default: Any = None, check=None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ServeError(400, f"'{name}' must be {what or getattr(kind, '__name__', kind)}, not {json.dumps(value)[:40]}", param=name)
    if check is not None and not check(value):
        raise ServeError(400, f"'{name}' must be {what}, not {value!r}", param=name)
    return value


class Api:
    """Turns request bodies into engine requests and engine events into OpenAI responses."""

    def __init__(self, engine: Engine, admin_token: str) -> None:
        self.engine = engine
        self.tok = engine.loaded.tokenizer
        self.admin_token = admin_token.encode()
        self.max_adapter_bytes = int(engine.config.cpu_cache_mb * (1 << 20))  # a larger adapter never fits the warm tier
        self.created = int(time.time())
        # composition of experts (fmhub.serving.router): with a router, "model": "auto" picks the adapter per request
        router_path = engine.config.backend_options.get("router")
        if router_path:
            from fmhub.serving.router import Router

            self.router: Any = Router.load(router_path)
        else:
            self.router = None

    def models(self) -> dict:
        base = self.engine.config.base_name
        data = [{"id": base, "object": "model", "created": self.created, "owned_by": "fmhub", "root": self.engine.config.base.label}]
        for a in self.engine.adapters():
            data.append({"id": a["name"], "object": "model", "created": self.created, "owned_by": "fmhub", "parent": base,
                         "root": a["source"], "fmhub": {"version": a["version"], "tier": a["tier"], "state": a["state"]}})
        return {"object": "list", "data": data}

    def params(self, body: dict) -> tuple[GenParams, int, list[str]]:
        counts = lambda v: 1 <= v <= MAX_TOKENS_LIMIT  # noqa: E731
        max_tokens = _field(body, "max_tokens", int, self.engine.config.max_tokens_default, counts, "a whole number ≥ 1")
        max_tokens = _field(body, "max_completion_tokens", int, max_tokens, counts, "a whole number ≥ 1")
        temperature = _field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")  # OpenAI's default
        top_p = _field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        # torch.Generator.manual_seed raises (not a ValueError) past 64 bits
        seed = _field(body, "seed", int, None, lambda v: SEED_MIN <= v <= SEED_MAX, "a whole number that fits in 64 bits")
        n = _field(body, "n", int, 1, lambda v: 1 <= v <= 16, "a whole number in 1..16")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ServeError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        for unsupported, harmless in (("logprobs", (None, False, 0)), ("echo", (None, False)), ("best_of", (None, 1)),
                                      ("suffix", (None, "")), ("tools", (None, []))):
            if body.get(unsupported) not in harmless:
                raise ServeError(400, f"'{unsupported}' is not supported by this server", param=unsupported)
        ignore_eos = _field(body, "ignore_eos", bool, False)
        return GenParams(max_tokens, temperature, top_p, seed, ignore_eos), n, stops

    def prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [self.tok.encode(_text(prompt, "prompt"))]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and len(prompt) <= 64:
            out = []
            for p in prompt:
                if isinstance(p, str):
                    out.append(self.tok.encode(_text(p, "prompt")))
                elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                    out.append(p)
                else:
                    break
            else:
                return out
        raise ServeError(400, "'prompt' must be a string, a list of token ids, or a list of up to 64 of those", param="prompt")

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ServeError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer") \
                    or not isinstance(m.get("content"), str):
                raise ServeError(400, f"messages[{i}] must be an object with a role (system, user, assistant) and a string content",
                                 param=f"messages[{i}]")
            clean.append({"role": m["role"], "content": _text(m["content"], f"messages[{i}]")})
        return self.tok.encode(self.tok.chat_prompt(clean))

    # -- "model": "auto": composition of experts (fmhub.serving.router) ---------------------------------------
    def route(self, body: dict, chat: bool) -> tuple[dict, dict | None]:
        """For ``"model": "auto"``: the body with the router's adapter as its model, and ``{routed_to, confidence}``.

        Routes on the prompt text (token ids decoded; a list of prompts joined),
        or for chat the last user message. Other models pass through unchanged.
        """
        if body.get("model") != "auto":
            return body, None
        if self.router is None:
            if "auto" in self.engine.cache.current:
                return body, None  # an adapter really named auto
            raise ServeError(404, "the model 'auto' routes each request to the best adapter, but this server has no router: "
                                  "train one (fmhub.serving.router.Router.fit, then .save(PATH)) and serve with backend_options: "
                                  "{router: PATH} in the serve: section of fmhub.yaml", param="model")
        if chat:
            messages = [m for m in body.get("messages") or [] if isinstance(m, dict) and isinstance(m.get("content"), str)]
            users = [m["content"] for m in messages if m.get("role") == "user"]
            text = users[-1] if users else "\n".join(m["content"] for m in messages)
        else:
            prompt = body.get("prompt")
            items = [prompt] if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)) \
                else prompt if isinstance(prompt, list) else []
            text = "\n".join(p if isinstance(p, str) else self.tok.decode([t for t in p if isinstance(t, int)])
                              for p in items if isinstance(p, (str, list)))
        name, confidence = self.router.route(_text(text, "messages" if chat else "prompt"))
        self.engine.metrics.inc("fmhub_routed_requests_total", "Requests for model 'auto', by the adapter routed to.", adapter=name)
        return {**body, "model": name}, {"routed_to": name, "confidence": round(confidence, 6)}
    # -- end of "model": "auto" ----------------------------------------------------------------------

    def submit(self, body: dict, chat: bool) -> tuple[list[Request], list[str], int]:
        model = body.get("model")
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_NAME:
            raise ServeError(400, "'model' must name an adapter (or the base model); see GET /v1/models", param="model")
        params, n, stops = self.params(body)
        prompts = [self.chat_prompt(body)] if chat else self.prompts(body)
        # refuse the whole request before queueing any of it
        for p in prompts:
            self.engine.check_prompt(p, params.max_tokens)
        if len(self.engine.waiting) + len(prompts) * n > MAX_WAITING:
            raise ServeError(503, f"the server is busy: over {MAX_WAITING} generations are queued; retry shortly", "server_error")
        requests = []
        try:
            for p in prompts:
                for _ in range(n):
                    requests.append(self.engine.submit(p, params, model))
        except ServeError:
            for r in requests:
                r.cancel()
            raise
        return requests, stops, sum(len(p) for p in prompts) * n


def _text(value: str, param: str) -> str:
    """``value``, refused when JSON smuggled in a lone surrogate (``\\ud800``): no tokenizer can encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ServeError(400, f"'{param}' holds a lone UTF-16 surrogate, which is not text", param=param) from None
    return value


def _token_ok(header: str, token: bytes) -> bool:
    """True when ``header`` is ``Bearer <token>``; compared in constant time, so timing tells nothing of the token."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token)


class _Decoder:
    """Token ids to text as they arrive, holding back an incomplete character and cutting at stop strings."""

    def __init__(self, tok: Any, stops: list[str]) -> None:
        self.tok, self.stops = tok, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                text = text[:at]
        if not self.stopped and text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""  # an incomplete character, or the tokenizer re-spelled earlier text: wait for more tokens
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids)
        delta = text[len(self.sent):]
        self.sent = text
        return delta


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fmhub"
    api: Api  # set on the subclass the server makes

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep stderr quiet; /metrics counts requests
        pass

    # -- deadlines ----------------------------------------------------------------------
    def _head_time(self) -> float:
        return HEADER_TIMEOUT

    def _send_time(self) -> float:
        return SEND_TIMEOUT

    def setup(self) -> None:
        """The connection's files, held to deadlines across recvs and sends (the first head's counts from the accept)."""
        self.connection = self.request
        self._in = _Input(self.connection, self._head_time())
        self.rfile = io.BufferedReader(self._in)
        self.wfile = _Output(self.connection)
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
        self._in.deadline = time.monotonic() + IDLE_TIMEOUT
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
        code = {404: "model_not_found", 401: "invalid_api_key", 507: "insufficient_storage"}.get(err.status)
        headers = {503: {"Retry-After": str(RETRY_AFTER_S)}, 401: {"WWW-Authenticate": "Bearer"}}.get(err.status)
        self.api.engine.metrics.inc("fmhub_http_errors_total", "Requests answered with an error, by status.", status=str(err.status))
        self._send_json(err.status, {"error": {"message": str(err), "type": err.kind, "param": err.param, "code": code}}, headers)

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
        if _LENGTH.fullmatch(length.strip()) and int(length) <= MAX_BODY and not self.headers.get("Transfer-Encoding"):
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
        if length > MAX_BODY:
            raise ServeError(413, f"request body of {length} bytes is over the {MAX_BODY} byte limit")
        return length

    def _read(self, length: int) -> bytes:
        """Exactly ``length`` bytes of body; 400 when the client stops short, 408 when it is too slow (BODY_TIMEOUT plus
        the length at BODY_RATE, in all)."""
        self._in.deadline = time.monotonic() + BODY_TIMEOUT + length / BODY_RATE
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
            _linger(self.connection)

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
                    raise _Gone() from None
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
        except (ConnectionError, TimeoutError, _Gone):  # the client hung up, reset, or stopped reading (SEND_TIMEOUT)
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
        if not _token_ok(self.headers.get("Authorization", ""), self.api.admin_token):
            raise ServeError(401, "the admin API needs the server's admin token (Authorization: Bearer ...)", "authentication_error")

    def _deploy(self, body: dict) -> None:
        items = body.get("adapters")
        if not isinstance(items, list) or len(items) > MAX_DEPLOY_ITEMS:
            raise ServeError(400, f"'adapters' must be a list of up to {MAX_DEPLOY_ITEMS} {{name, source}}", param="adapters")
        replace = _field(body, "replace", bool, True)
        specs = []
        try:
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("source"), dict):
                    raise ServeError(400, f"adapters[{i}] must be {{name, source: {{path, rev, repo}}}}", param=f"adapters[{i}]")
                check_name(item["name"])
                specs.append(AdapterSpec(item["name"], admin_source(item["source"], self.api.max_adapter_bytes)))
            for s in specs:
                s.source.version  # noqa: B018 - a source that cannot be read is refused before anything changes
        except ServeError:
            raise
        except (FmhubError, OSError) as exc:
            raise ServeError(400, f"cannot deploy: {exc}".splitlines()[0], param="adapters") from None
        self._send_json(200, self.api.engine.set_adapters(specs, replace=replace))

    def _generate(self, body: dict, chat: bool) -> None:
        api = self.api
        stream = _field(body, "stream", bool, False)
        body, routed = api.route(body, chat)  # "model": "auto" → the router's adapter (fmhub.serving.router)
        requests, stops, prompt_tokens = api.submit(body, chat)
        rid = requests[0].id
        model = body["model"]
        kind = "chat.completion" if chat else "text_completion"
        try:
            if stream:
                self._stream(requests, stops, rid, model, kind, chat, routed)
                return
            choices, completion = [], 0
            for i, r in enumerate(requests):
                dec = _Decoder(api.tok, stops)
                text, reason = "", None
                for event in self._events(r):
                    if event[0] == "token":
                        text += dec.push(event[1])
                        if dec.stopped:
                            r.cancel()
                            reason = "stop"
                    elif event[0] == "error":
                        raise event[1]
                    else:
                        reason = reason or ("stop" if event[1] == "cancelled" else event[1])
                text += dec.flush()
                completion += len(r.tokens)
                choice = {"index": i, "finish_reason": reason, "logprobs": None, "token_ids": list(r.tokens)}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                choices.append(choice)
            self._send_json(200, {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
                                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                            "total_tokens": prompt_tokens + completion}, **({"fmhub": routed} if routed else {})})
        finally:
            for r in requests:
                r.cancel()  # a no-op for finished ones; frees the rows of a request whose client went away

    def _stream(self, requests: list[Request], stops: list[str], rid: str, model: str, kind: str, chat: bool,
                routed: dict | None = None) -> None:
        self._responded = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk_kind = kind + ".chunk" if chat else kind

        def send(doc: Any) -> None:
            self.wfile.write(b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n")
            self.wfile.flush()

        def chunk(i: int, text: str | None, reason: str | None, token: int | None = None) -> dict:
            if chat:
                choice = {"index": i, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
            if token is not None:
                choice["token_ids"] = [token]
            return {"id": rid, "object": chunk_kind, "created": int(time.time()), "model": model, "choices": [choice],
                    **({"fmhub": routed} if routed else {})}

        # choices stream one after another; n > 1 and prompt lists are rare with streaming
        for i, r in enumerate(requests):
            dec = _Decoder(self.api.tok, stops)
            if chat:
                send({**chunk(i, None, None), "choices": [{"index": i, "delta": {"role": "assistant"}, "finish_reason": None}]})
            reason = None
            for event in self._events(r):
                if event[0] == "token":
                    delta = dec.push(event[1])
                    send(chunk(i, delta, None, event[1]))
                    if dec.stopped:
                        r.cancel()
                        reason = "stop"
                elif event[0] == "error":
                    err = event[1]
                    send({"error": {"message": str(err), "type": err.kind, "param": err.param, "code": None}})
                    return
                else:
                    reason = reason or ("stop" if event[1] == "cancelled" else event[1])
            tail = dec.flush()
            send(chunk(i, tail if tail else ("" if not chat else None), reason))
        send(b"[DONE]")


def admin_source(doc: dict, max_bytes: int) -> Source:
    """An adapter source from the admin API, refused (400) unless it is a real adapter directory within bounds.

    A token holder may point the server at any directory it can read, so the
    source must look like what ``fmhub deploy`` sends: an absolute directory
    holding ``adapter_config.json`` and ``adapter_model.safetensors`` (at most
    `MAX_ADAPTER_FILES` files, ``max_bytes`` in all, so hashing it for its
    version is bounded), or a path at a commit id of a repository.
    """
    path, rev, repo, given = (doc.get(k) for k in ("path", "rev", "repo", "given"))
    if not isinstance(path, str) or not isinstance(given, (str, type(None))) or len(path) > 4096 or len(given or "") > 4096:
        raise ServeError(400, "a source is {path, rev, repo}: path a string", param="adapters")
    if rev is None:
        src = Source(path, given=given or "")
        _check_dir(src, max_bytes)
    else:
        if not isinstance(rev, str) or not _COMMIT.fullmatch(rev) or not isinstance(repo, str) or not os.path.isabs(repo) \
                or not os.path.isdir(repo) or os.path.isabs(path) or path.startswith("-") or ".." in path.split("/"):
            raise ServeError(400, f"source {path[:200]!r}: at a revision, rev is a commit id, repo an existing absolute "
                                  "directory and path relative to it", param="adapters")
        src = Source(path, rev, repo, given or "")
    names = src.files()
    if lora.CONFIG not in names or lora.WEIGHTS not in names:
        raise ServeError(400, f"{src.label[:200]} is not a PEFT LoRA adapter directory ({lora.CONFIG} and {lora.WEIGHTS})",
                         param="adapters")
    return src


def _check_dir(src: Source, max_bytes: int) -> None:
    if not os.path.isabs(src.path) or not os.path.isdir(src.path):
        raise ServeError(400, f"{src.path[:200]!r} is not an absolute path of a directory", param="adapters")
    names = src.files()
    size = sum(os.path.getsize(os.path.join(src.path, n)) for n in names[:MAX_ADAPTER_FILES + 1])
    if len(names) > MAX_ADAPTER_FILES or size > max_bytes:
        raise ServeError(400, f"{src.path[:200]} holds {len(names)} files of {size} bytes; an adapter directory holds at most "
                              f"{MAX_ADAPTER_FILES} files and {max_bytes} bytes (the warm tier, cpu_cache_mb)", param="adapters")


def _linger(sock: socket.socket) -> None:
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


class _Busy(Handler):
    """Every serving thread is busy: answer whatever was asked with 503 and Retry-After, reading the request first."""

    def _head_time(self) -> float:
        return BUSY_TIMEOUT

    def _send_time(self) -> float:
        return BUSY_TIMEOUT

    def _route(self, serve: Callable[[str], None]) -> None:
        self._begin()
        self.close_connection = True
        try:
            self._error(ServeError(503, "the server is busy: every connection is taken; retry shortly", "server_error"))
        except OSError:
            pass


class _Closer:
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


def _busy_answer() -> bytes:
    """The whole 503 the accept loop sends when no thread is free, in OpenAI's shape."""
    body = json.dumps({"error": {"message": "the server is busy: every connection is taken; retry shortly", "type": "server_error",
                                 "param": None, "code": None}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: fmhub\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Server(ThreadingHTTPServer):
    """A threading HTTP server with a deep backlog and a bounded number of threads, whose accept loop never waits.

    ``max_connections`` threads serve; when all are busy, up to
    `SPARE_THREADS` more read the request and answer 503; when those are busy
    too, the accept loop answers 503 itself (one non-blocking send, then
    `_Closer`). Every thread is held to deadlines, so a slow client costs
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
        self.closer = _Closer()

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
