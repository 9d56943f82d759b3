"""The built-in backend's HTTP API: OpenAI-compatible completions and chat, health, metrics, adapter admin.

``POST /v1/completions`` and ``/v1/chat/completions`` take OpenAI's request
bodies; ``model`` names the adapter (``base`` for the bare model). With
``"stream": true`` the answer is server-sent events, one chunk per token,
then ``data: [DONE]``. ``GET /v1/models`` lists the base and the adapters,
``GET /health`` the engine's state, ``GET /metrics`` Prometheus text.
``GET``/``POST /fmhub/adapters`` read and replace the served adapters (what
``fmhub deploy`` calls; bearer token when the server has one).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
with a status that says what happened: 400 malformed request or over-long
prompt, 401 admin token, 404 unknown adapter, 409 adapter for another base,
413 body too large, 507 an adapter larger than a cache tier. A client that
hangs up has its request cancelled at the next decode step; everyone else
keeps being served.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from fmhub.errors import FmhubError
from fmhub.errors import ServeError
from fmhub.serving.engine import Engine, GenParams, Request
from fmhub.serving.sources import AdapterSpec, Source, check_name

MAX_BODY = 8 << 20
POLL = 0.25  # seconds between checks that the client is still there


class _Gone(Exception):
    """The client hung up."""


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

    def __init__(self, engine: Engine, admin_token: str | None = None) -> None:
        self.engine = engine
        self.tok = engine.loaded.tokenizer
        self.admin_token = admin_token
        self.created = int(time.time())
        # composition of experts (fmhub.router): with a router, "model": "auto" picks the adapter per request
        router_path = engine.config.backend_options.get("router")
        if router_path:
            from fmhub.router import Router

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
        max_tokens = _field(body, "max_tokens", int, self.engine.config.max_tokens_default, lambda v: v >= 1, "a whole number ≥ 1")
        max_tokens = _field(body, "max_completion_tokens", int, max_tokens, lambda v: v >= 1, "a whole number ≥ 1")
        temperature = _field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")  # OpenAI's default
        top_p = _field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        seed = _field(body, "seed", int, None)
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
            return [self.tok.encode(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and len(prompt) <= 64:
            out = []
            for p in prompt:
                if isinstance(p, str):
                    out.append(self.tok.encode(p))
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
            clean.append({"role": m["role"], "content": m["content"]})
        return self.tok.encode(self.tok.chat_prompt(clean))

    # -- "model": "auto": composition of experts (fmhub.router) ---------------------------------------
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
                                  "train one (fmhub.router.Router.fit, then .save(PATH)) and serve with backend_options: "
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
        name, confidence = self.router.route(text)
        self.engine.metrics.inc("fmhub_routed_requests_total", "Requests for model 'auto', by the adapter routed to.", adapter=name)
        return {**body, "model": name}, {"routed_to": name, "confidence": round(confidence, 6)}
    # -- end of "model": "auto" ----------------------------------------------------------------------

    def submit(self, body: dict, chat: bool) -> tuple[list[Request], list[str], int]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ServeError(400, "'model' must name an adapter (or the base model); see GET /v1/models", param="model")
        params, n, stops = self.params(body)
        prompts = [self.chat_prompt(body)] if chat else self.prompts(body)
        # refuse the whole request before queueing any of it
        for p in prompts:
            self.engine.check_prompt(p, params.max_tokens)
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

    # -- plumbing -----------------------------------------------------------------------
    def _send_json(self, status: int, doc: Any, headers: dict | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: ServeError) -> None:
        code = {404: "model_not_found", 401: "invalid_api_key", 507: "insufficient_storage"}.get(err.status)
        self.api.engine.metrics.inc("fmhub_http_errors_total", "Requests answered with an error, by status.", status=str(err.status))
        self._send_json(err.status, {"error": {"message": str(err), "type": err.kind, "param": err.param, "code": code}})

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ServeError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise ServeError(413, f"request body of {length} bytes is over the {MAX_BODY} byte limit")
        raw = self.rfile.read(length) if length else b""
        try:
            doc = json.loads(raw or b"null")
        except ValueError as exc:
            raise ServeError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ServeError(400, "the request body must be a JSON object")
        return doc

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
        try:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._send_json(200, self.api.engine.health())
            elif path == "/metrics":
                body = self.api.engine.metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/v1/models":
                self._send_json(200, self.api.models())
            elif path == "/fmhub/adapters":
                self._admin()
                self._send_json(200, {"base": self.api.engine.config.base.label, "adapters": self.api.engine.adapters()})
            else:
                raise ServeError(404, f"no such endpoint: GET {path}")
        except ServeError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            body = self._body()
            if path in ("/v1/completions", "/v1/chat/completions"):
                self._generate(body, chat=path == "/v1/chat/completions")
            elif path == "/fmhub/adapters":
                self._admin()
                self._deploy(body)
            else:
                raise ServeError(404, f"no such endpoint: POST {path}")
        except ServeError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError, _Gone):
            self.close_connection = True

    def _admin(self) -> None:
        token = self.api.admin_token
        if token and self.headers.get("Authorization", "") != f"Bearer {token}":
            raise ServeError(401, "the admin API needs the server's admin token (Authorization: Bearer ...)", "authentication_error")

    def _deploy(self, body: dict) -> None:
        items = body.get("adapters")
        if not isinstance(items, list):
            raise ServeError(400, "'adapters' must be a list of {name, source}", param="adapters")
        specs = []
        try:
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("source"), dict):
                    raise ServeError(400, f"adapters[{i}] must be {{name, source: {{path, rev, repo}}}}", param=f"adapters[{i}]")
                check_name(item["name"])
                specs.append(AdapterSpec(item["name"], Source.from_json(item["source"])))
            for s in specs:
                s.source.version  # noqa: B018 - a source that cannot be read is refused before anything changes
        except (FmhubError, KeyError, TypeError) as exc:
            if isinstance(exc, ServeError):
                raise
            raise ServeError(400, f"cannot deploy: {exc}", param="adapters") from None
        report = self.api.engine.set_adapters(specs, replace=bool(body.get("replace", True)))
        self._send_json(200, report)

    def _generate(self, body: dict, chat: bool) -> None:
        api = self.api
        stream = _field(body, "stream", bool, False)
        body, routed = api.route(body, chat)  # "model": "auto" → the router's adapter (fmhub.router)
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


class HttpServer:
    """The engine behind an HTTP server on ``host:port`` (port 0: any free one), served from a background thread."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, admin_token: str | None = None) -> None:
        self.engine = engine
        handler = type("BoundHandler", (Handler,), {"api": Api(engine, admin_token)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise FmhubError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
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
