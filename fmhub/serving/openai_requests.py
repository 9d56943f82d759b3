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

import dataclasses
import hmac
import json
import os
import re
import time
from typing import Any

from fmhub.base.errors import FmhubError, ServeError
from fmhub.models import lora
from fmhub.serving import sampling
from fmhub.serving.engine import Engine, GenParams, Request
from fmhub.serving.sources import AdapterSpec, Source, check_name
from fmhub.serving.stops import MAX_STOP_CHARS

MAX_WAITING = 1024  # generations queued in the engine; more are answered 503
MAX_MODEL_NAME = 256
MAX_DEPLOY_ITEMS = 1024
MAX_ADAPTER_FILES = 64
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
MAX_TOKENS_LIMIT = (1 << 31) - 1
_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
_TOKEN_ID = re.compile(r"[0-9]{1,10}")
ROLES = ("system", "user", "assistant", "tool", "developer")
# Fields this server does not implement, with the values that ask for nothing (what a client sends by default). Any
# other value is a 400, never ignored: a client asking for JSON output (response_format) or vLLM's top_k would
# otherwise get an answer that silently is not what it asked for.
UNSUPPORTED = (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, "")), ("tools", (None, [])),
               ("tool_choice", (None, "none", "auto")), ("functions", (None, [])), ("function_call", (None, "none", "auto")),
               ("response_format", (None, {"type": "text"})),
               # vLLM's sampling extensions (fmhub's vLLM backend takes them; this one does not)
               ("top_k", (None, -1, 0)), ("min_p", (None, 0)), ("repetition_penalty", (None, 1)), ("min_tokens", (None, 0)),
               ("stop_token_ids", (None, [])), ("include_stop_str_in_output", (None, False)), ("guided_json", (None,)),
               ("guided_regex", (None,)), ("guided_choice", (None,)), ("guided_grammar", (None,)), ("structured_outputs", (None,)))


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

    def model(self, name: str) -> dict:
        """``GET /v1/models/{name}``: one served model, or 404 as OpenAI answers for an unknown one."""
        found = next((m for m in self.models()["data"] if m["id"] == name), None)
        if found is None:
            raise ServeError(404, f"The model {name[:200]!r} does not exist; GET /v1/models lists the served ones", param="model")
        return found

    def params(self, body: dict, chat: bool = False) -> Asked:
        """The sampling parameters, ``n``, stops and streaming options of a body, each checked."""
        counts = lambda v: 1 <= v <= MAX_TOKENS_LIMIT  # noqa: E731
        # OpenAI's defaults: 16 for (legacy) completions, the context left for chat (set per prompt in `submit`)
        max_tokens = field(body, "max_tokens", int, None if chat else self.engine.config.max_tokens_default, counts, "a whole number ≥ 1")
        max_tokens = field(body, "max_completion_tokens", int, max_tokens, counts, "a whole number ≥ 1")
        temperature = field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")  # OpenAI's default
        top_p = field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        # torch.Generator.manual_seed raises (not a ValueError) past 64 bits
        seed = field(body, "seed", int, None, lambda v: SEED_MIN <= v <= SEED_MAX, "a whole number that fits in 64 bits")
        n = field(body, "n", int, 1, lambda v: 1 <= v <= 16, "a whole number in 1..16")
        for unsupported, harmless in UNSUPPORTED:
            value = body.get(unsupported)
            if value not in harmless or isinstance(value, bool) and not any(h is value for h in harmless):
                raise ServeError(400, f"'{unsupported}' is not supported by this server", param=unsupported)
        params = GenParams(max_tokens or 1, temperature, top_p, seed, field(body, "ignore_eos", bool, False),
                           presence_penalty=_penalty(body, "presence_penalty"), frequency_penalty=_penalty(body, "frequency_penalty"),
                           logit_bias=self._logit_bias(body), logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body))
        stream, include_usage = _stream_options(body)
        return Asked(params, n, _stops(body), max_tokens is not None, stream, include_usage)

    def _logit_bias(self, body: dict) -> tuple[tuple[int, float], ...]:
        """``logit_bias``: ``{"token id": bias}``, at most `MAX_LOGIT_BIAS` entries, ids in the vocabulary, bias in -100..100."""
        bias = body.get("logit_bias")
        if bias is None:
            return ()
        if not isinstance(bias, dict) or len(bias) > sampling.MAX_LOGIT_BIAS:
            raise ServeError(400, f"'logit_bias' must be an object of at most {sampling.MAX_LOGIT_BIAS} token ids to biases",
                             param="logit_bias")
        out = []
        for key, value in bias.items():
            if not _TOKEN_ID.fullmatch(key) or int(key) >= self.engine.vocab:
                raise ServeError(400, f"'logit_bias' key {key[:40]!r} is not a token id of this model (0..{self.engine.vocab - 1})",
                                 param="logit_bias")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -sampling.BIAS_LIMIT <= value <= sampling.BIAS_LIMIT:
                raise ServeError(400, f"'logit_bias' of token {key} must be a number in -100..100, not {json.dumps(value)[:40]}",
                                 param="logit_bias")
            out.append((int(key), float(value)))
        return tuple(out)

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
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ServeError(400, f"messages[{i}] must be an object with a role (system, user, assistant) and a content",
                                 param=f"messages[{i}]")
            clean.append({"role": m["role"], "content": checked_text(message_text(m.get("content"), i), f"messages[{i}]")})
        from jinja2 import TemplateError  # what transformers' chat templates raise; jinja2 comes with transformers

        try:
            return self.tok.chat_ids(clean)
        except TemplateError as exc:  # raise_exception("roles must alternate"), messages[1] of one message: the request's fault
            raise ServeError(400, f"the model's chat template refuses these messages: {exc}".splitlines()[0][:500],
                             param="messages") from None

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
            messages = [(m.get("role"), _text_or_none(m.get("content"))) for m in body.get("messages") or [] if isinstance(m, dict)]
            messages = [(role, text) for role, text in messages if text is not None]
            users = [text for role, text in messages if role == "user"]
            text = users[-1] if users else "\n".join(text for _, text in messages)
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

    def submit(self, body: dict, chat: bool) -> tuple[list[Request], Asked, int]:
        """The engine requests of a body (one per prompt and choice, in OpenAI's choice order), what it asked for, and
        its prompt tokens (each prompt counted once, whatever ``n``)."""
        model = body.get("model")
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_NAME:
            raise ServeError(400, "'model' must name an adapter (or the base model); see GET /v1/models", param="model")
        asked = self.params(body, chat)
        prompts = [self.chat_prompt(body)] if chat else self.prompts(body)
        jobs = [(p, self._choice_params(asked, p, k * asked.n + i)) for k, p in enumerate(prompts) for i in range(asked.n)]
        # refuse the whole request before queueing any of it
        for p, params in jobs:
            self.engine.check_prompt(p, params.max_tokens)
        if len(self.engine.waiting) + len(jobs) > MAX_WAITING:
            raise ServeError(503, f"the server is busy: over {MAX_WAITING} generations are queued; retry shortly", "server_error")
        requests = []
        try:
            for p, params in jobs:
                requests.append(self.engine.submit(p, params, model))
        except ServeError:
            for r in requests:
                r.cancel()
            raise
        return requests, asked, sum(len(p) for p in prompts)

    def _choice_params(self, asked: Asked, prompt: list[int], index: int) -> GenParams:
        """Choice ``index``'s parameters: its own seed (``seed + index``), so the choices of one seeded body are
        different samples, each reproducible; without ``max_tokens``, the context the prompt leaves (at least 1, so
        an over-long prompt is refused by its length)."""
        p = asked.params
        seed = p.seed if p.seed is None or index == 0 else (p.seed + index) % (1 << 64)
        max_tokens = p.max_tokens if asked.max_given else max(1, self.engine.loaded.max_len - len(prompt))
        return dataclasses.replace(p, seed=seed, max_tokens=max_tokens)

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


@dataclasses.dataclass
class Asked:
    """What a completion body asked for besides its prompts."""

    params: GenParams
    n: int
    stops: list[str]
    max_given: bool  # False: max_tokens is the context each prompt leaves
    stream: bool
    include_usage: bool


def _penalty(body: dict, name: str) -> float:
    return field(body, name, float, 0.0, lambda v: -sampling.PENALTY_LIMIT <= v <= sampling.PENALTY_LIMIT, "a number in [-2, 2]")


def _completion_logprobs(body: dict) -> int | None:
    """Completions' ``logprobs``: how many most likely tokens to list with each token's own (0..5), or none."""
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    return field(body, "logprobs", int, None, lambda v: 0 <= v <= sampling.MAX_COMPLETION_LOGPROBS, "a whole number in 0..5")


def _chat_logprobs(body: dict) -> int | None:
    """Chat's ``logprobs`` (true or false) and ``top_logprobs`` (0..20, only with logprobs): as for completions."""
    wanted = field(body, "logprobs", bool, False)
    top = field(body, "top_logprobs", int, None, lambda v: 0 <= v <= sampling.MAX_TOP_LOGPROBS, "a whole number in 0..20")
    if top is not None and not wanted:
        raise ServeError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ServeError(400, f"'stop' must be a string or a list of up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters",
                         param="stop")
    return [checked_text(s, "stop") for s in stops]


def _stream_options(body: dict) -> tuple[bool, bool]:
    """``stream``, and ``stream_options.include_usage`` (a last chunk with the usage); stream_options only with stream."""
    stream = field(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ServeError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"} \
            or not isinstance(options.get("include_usage", False), (bool, type(None))):
        raise ServeError(400, "'stream_options' must be an object with 'include_usage' (true or false)", param="stream_options")
    return stream, bool(options.get("include_usage"))


def message_text(content: Any, i: int) -> str:
    """A message's content as text: a string, or a list of text parts (``{"type": "text", "text": ...}``) joined with
    newlines as vLLM does; any other part (an image, audio, a file) is refused, as this server reads only text."""
    text = _text_or_none(content)
    if text is not None:
        return text
    if isinstance(content, list) and content:
        kind = next((p.get("type") for p in content if isinstance(p, dict) and p.get("type") != "text"), None)
        if isinstance(kind, str):
            raise ServeError(400, f"messages[{i}]: content parts of type {kind[:40]!r} are not supported; this server reads text only",
                             param=f"messages[{i}].content")
    raise ServeError(400, f"messages[{i}].content must be a string or a non-empty list of {{\"type\": \"text\", \"text\": ...}} parts",
                     param=f"messages[{i}].content")


def _text_or_none(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                                     for p in content):
        return "\n".join(p["text"] for p in content)
    return None


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
