"""OpenAI response shapes: completions and chat completions, whole or as server-sent events, and errors.

A `Completion` turns the events of a request's engine requests (one per
prompt and choice, ``("token", id, logprob)`` … then ``("done", reason)`` or
``("error", ServeError)``) into OpenAI's answer: one JSON document with every
choice and the token usage (`Completion.whole`), or server-sent events
(`Completion.stream`, framed by `sse_event`): for chat a first chunk with the
role, then a chunk whenever a choice has new text (with the token ids and
log-probabilities it took), a last chunk per choice with its
``finish_reason``, with ``stream_options.include_usage`` a chunk with no
choices and the usage, then ``data: [DONE]``. Choices stream one after
another. Text is cut at stop strings by `fmhub.serving.stops.StopText`, which
holds back text that could still become a stop. `error_doc` is OpenAI's
``{"error": {"message", "type", "param", "code"}}``.

Usage counts each prompt once, however many choices (``n``) it has, and the
tokens each choice consumed, up to and including the one that completed a
stop string.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

from fmhub.serving.engine import Request
from fmhub.serving.stops import StopText

# the OpenAI error code of a status, where it has one
ERROR_CODES = {404: "model_not_found", 401: "invalid_api_key", 507: "insufficient_storage"}


def error_doc(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """An error in OpenAI's shape: ``kind`` is its ``type`` (``invalid_request_error``, ``server_error``, …)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse_event(doc: Any) -> bytes:
    """One server-sent event: ``data: <doc as JSON>`` (bytes as they are, e.g. ``[DONE]``) and a blank line."""
    return b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"


class Choice:
    """One choice as it is generated: its text, the tokens it consumed, and their log-probabilities (when asked)."""

    def __init__(self, tok: Any, stops: list[str], chat: bool) -> None:
        self.tok, self.chat = tok, chat
        self.text = StopText(tok, stops)
        self.reason: str | None = None
        self.logprobs: list[tuple[int, float, list, int]] = []  # (token, logprob, top, text offset)
        self.sent_tokens = 0  # tokens (and logprobs) already sent in stream chunks

    def push(self, event: tuple) -> str:
        """A token event: the text now safe to send. Tokens after a stop (the engine has not seen the cancel yet) are dropped."""
        if self.text.stopped:
            return ""
        token, lp = event[1], event[2] if len(event) > 2 else None
        delta = self.text.push(token)
        if lp is not None:
            self.logprobs.append((token, lp[0], lp[1], self.text.offset))
        if self.text.stopped:
            self.reason = "stop"
        return delta

    def done(self, reason: str) -> str:
        """The engine's finish reason: the text held back until now."""
        self.reason = self.reason or ("stop" if reason == "cancelled" else reason)
        return self.text.flush()

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    def logprobs_doc(self, start: int = 0, asked: bool = False) -> dict | None:
        """OpenAI's ``logprobs`` of the tokens from ``start`` on: chat's ``{"content": [...]}``, completions'
        ``{tokens, token_logprobs, top_logprobs, text_offset}``; None when none were asked for."""
        if not asked:
            return None
        items = self.logprobs[start:]
        if self.chat:
            return {"content": [dict(self._entry(t, lp), top_logprobs=[self._entry(i, v) for i, v in top])
                                for t, lp, top, _ in items]}
        return {"tokens": [self._piece(t) for t, _, _, _ in items], "token_logprobs": [lp for _, lp, _, _ in items],
                "top_logprobs": [self._top(t, lp, top) for t, lp, top, _ in items], "text_offset": [o for _, _, _, o in items]}

    def _piece(self, token: int) -> str:
        return self.tok.decode([token])

    def _entry(self, token: int, logprob: float) -> dict:
        piece = self._piece(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    def _top(self, token: int, logprob: float, top: list) -> dict:
        """Completions' top_logprobs: the most likely tokens, and always the chosen one (as OpenAI's API does)."""
        out = {self._piece(i): v for i, v in top}
        out.setdefault(self._piece(token), logprob)
        return out


Events = Callable[[Request], Iterator[tuple]]  # a request's events, as the server waits for them


class Completion:
    """The answer to one completion (``chat`` False) or chat completion body, id ``rid``, for ``model``; ``routed``
    (``{routed_to, confidence}`` for ``"model": "auto"``) is added to it as ``fmhub``; ``logprobs``: whether the
    body asked for log-probabilities."""

    def __init__(self, rid: str, model: str, chat: bool, routed: dict | None = None, logprobs: bool = False) -> None:
        self.rid, self.model, self.chat, self.routed, self.logprobs = rid, model, chat, routed, logprobs
        self.kind = "chat.completion" if chat else "text_completion"

    def _head(self, kind: str) -> dict:
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model}

    def _tail(self) -> dict:
        return {"fmhub": self.routed} if self.routed else {}

    def whole(self, requests: list[Request], events: Events, tok: Any, stops: list[str], prompt_tokens: int) -> dict:
        """The whole answer once every request has finished; an error event raises its `ServeError`."""
        choices, completion = [], 0
        for i, r in enumerate(requests):
            c, text = Choice(tok, stops, self.chat), ""
            for event in events(r):
                if event[0] == "token":
                    text += c.push(event)
                    if c.text.stopped:
                        r.cancel()
                elif event[0] == "error":
                    raise event[1]
                else:
                    text += c.done(event[1])
            completion += len(c.ids)
            choice = {"index": i, "finish_reason": c.reason, "logprobs": c.logprobs_doc(asked=self.logprobs), "token_ids": list(c.ids)}
            choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
            choices.append(choice)
        return {**self._head(self.kind), "choices": choices, "usage": usage(prompt_tokens, completion), **self._tail()}

    def stream(self, requests: list[Request], events: Events, tok: Any, stops: list[str], send: Callable[[Any], None],
               prompt_tokens: int = 0, include_usage: bool = False) -> None:
        """The answer as it is generated: ``send`` gets each event's document (`sse_event` frames it); an error event
        is sent as an error and ends the stream."""
        extra = {"usage": None} if include_usage else {}
        completion = 0
        for i, r in enumerate(requests):
            c = Choice(tok, stops, self.chat)
            if self.chat:
                send({**self._head("chat.completion.chunk"), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                                          "logprobs": None, "finish_reason": None}],
                      **extra, **self._tail()})
            for event in events(r):
                if event[0] == "token":
                    delta = c.push(event)
                    if c.text.stopped:
                        r.cancel()
                    if delta:  # with a stop too: the token that completed it may also spell text before it
                        send({**self._chunk(c, i, delta, None), **extra})
                elif event[0] == "error":
                    err = event[1]
                    send(error_doc(str(err), err.kind, err.param))
                    return
                else:
                    tail = c.done(event[1])
                    send({**self._chunk(c, i, tail, c.reason), **extra})
            completion += len(c.ids)
        if include_usage:
            send({**self._head(self.kind + ".chunk" if self.chat else self.kind), "choices": [],
                  "usage": usage(prompt_tokens, completion), **self._tail()})
        send(b"[DONE]")

    def _chunk(self, c: Choice, i: int, text: str, reason: str | None) -> dict:
        """One choice's chunk: its new text and the tokens (ids, log-probabilities) consumed since its last chunk."""
        tokens, start = c.ids[c.sent_tokens:], c.sent_tokens
        c.sent_tokens = len(c.ids)
        logprobs = c.logprobs_doc(start, self.logprobs) if tokens else None
        if self.chat:
            choice = {"index": i, "delta": {"content": text} if text or reason is None else {}, "logprobs": logprobs,
                      "finish_reason": reason}
            kind = self.kind + ".chunk"
        else:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
            kind = self.kind
        if tokens:
            choice["token_ids"] = tokens
        return {**self._head(kind), "choices": [choice], **self._tail()}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
