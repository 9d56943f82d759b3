"""OpenAI request bodies read and checked: what ``/v1/completions``, ``/v1/chat/completions`` and the admin API take.

`Api` turns a completion or chat body into engine requests (sampling
parameters by range, prompts as text or token ids, ``"model": "auto"`` routed
by `fmhub.serving.router`), lists the served models, and turns an admin
deploy body into adapter specs; `admin_source` bounds what an admin token may
point the server at. Every refusal is a `ServeError` with the status and the
``param`` OpenAI's clients expect; nothing is queued before a whole request is
checked.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import time
from typing import Any

from fmhub.base.errors import FmhubError, ServeError
from fmhub.models import lora
from fmhub.serving.engine import Engine, GenParams, Request
from fmhub.serving.sources import AdapterSpec, Source, check_name

MAX_WAITING = 1024  # generations queued in the engine; more are answered 503
MAX_MODEL_NAME = 256
MAX_DEPLOY_ITEMS = 1024
MAX_ADAPTER_FILES = 64
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
MAX_TOKENS_LIMIT = (1 << 31) - 1
_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


def field(body: dict, name: str, kind: type | tuple, default: Any = None, check=None, what: str = "") -> Any:
    """``body[name]`` (``default`` when absent or null), refused (400, naming ``param``) unless it is a ``kind``
    (an int passes for a float, a bool never for a number) that ``check`` accepts; ``what`` says what it must be."""
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
    """Turns request bodies into engine requests (`fmhub.serving.openai_responses` shapes the answers)."""

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
        max_tokens = field(body, "max_tokens", int, self.engine.config.max_tokens_default, counts, "a whole number ≥ 1")
        max_tokens = field(body, "max_completion_tokens", int, max_tokens, counts, "a whole number ≥ 1")
        temperature = field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")  # OpenAI's default
        top_p = field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        # torch.Generator.manual_seed raises (not a ValueError) past 64 bits
        seed = field(body, "seed", int, None, lambda v: SEED_MIN <= v <= SEED_MAX, "a whole number that fits in 64 bits")
        n = field(body, "n", int, 1, lambda v: 1 <= v <= 16, "a whole number in 1..16")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ServeError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        for unsupported, harmless in (("logprobs", (None, False, 0)), ("echo", (None, False)), ("best_of", (None, 1)),
                                      ("suffix", (None, "")), ("tools", (None, []))):
            if body.get(unsupported) not in harmless:
                raise ServeError(400, f"'{unsupported}' is not supported by this server", param=unsupported)
        ignore_eos = field(body, "ignore_eos", bool, False)
        return GenParams(max_tokens, temperature, top_p, seed, ignore_eos), n, stops

    def prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [self.tok.encode(checked_text(prompt, "prompt"))]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and len(prompt) <= 64:
            out = []
            for p in prompt:
                if isinstance(p, str):
                    out.append(self.tok.encode(checked_text(p, "prompt")))
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
            clean.append({"role": m["role"], "content": checked_text(m["content"], f"messages[{i}]")})
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
        name, confidence = self.router.route(checked_text(text, "messages" if chat else "prompt"))
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

    def deploy(self, body: dict) -> dict:
        """``POST /fmhub/adapters``: the adapters a deploy body names, all checked readable before any is served; the
        engine's answer."""
        items = body.get("adapters")
        if not isinstance(items, list) or len(items) > MAX_DEPLOY_ITEMS:
            raise ServeError(400, f"'adapters' must be a list of up to {MAX_DEPLOY_ITEMS} {{name, source}}", param="adapters")
        replace = field(body, "replace", bool, True)
        specs = []
        try:
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("source"), dict):
                    raise ServeError(400, f"adapters[{i}] must be {{name, source: {{path, rev, repo}}}}", param=f"adapters[{i}]")
                check_name(item["name"])
                specs.append(AdapterSpec(item["name"], admin_source(item["source"], self.max_adapter_bytes)))
            for s in specs:
                s.source.version  # noqa: B018 - a source that cannot be read is refused before anything changes
        except ServeError:
            raise
        except (FmhubError, OSError) as exc:
            raise ServeError(400, f"cannot deploy: {exc}".splitlines()[0], param="adapters") from None
        return self.engine.set_adapters(specs, replace=replace)


def checked_text(value: str, param: str) -> str:
    """``value``, refused when JSON smuggled in a lone surrogate (``\\ud800``): no tokenizer can encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ServeError(400, f"'{param}' holds a lone UTF-16 surrogate, which is not text", param=param) from None
    return value


def token_ok(header: str, token: bytes) -> bool:
    """True when ``header`` is ``Bearer <token>``; compared in constant time, so timing tells nothing of the token."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token)


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
