"""OpenAI response shapes: completions and chat completions, whole or as server-sent events, and errors.

A `Completion` turns the events of a request's engine requests (one per
prompt and choice, ``("token", id)`` … then ``("done", reason)`` or
``("error", ServeError)``) into OpenAI's answer: one JSON document with every
choice and the token usage (`Completion.whole`), or one ``data:`` event per
token, then ``data: [DONE]`` (`Completion.stream`, framed by `sse_event`).
`Decoder` turns token ids into text as they arrive, holding back an
incomplete character and cutting at stop strings. `error_doc` is OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

from fmhub.serving.engine import Request

# the OpenAI error code of a status, where it has one
ERROR_CODES = {404: "model_not_found", 401: "invalid_api_key", 507: "insufficient_storage"}


def error_doc(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """An error in OpenAI's shape: ``kind`` is its ``type`` (``invalid_request_error``, ``server_error``, …)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse_event(doc: Any) -> bytes:
    """One server-sent event: ``data: <doc as JSON>`` (bytes as they are, e.g. ``[DONE]``) and a blank line."""
    return b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"


class Decoder:
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


Events = Callable[[Request], Iterator[tuple]]  # a request's events, as the server waits for them


class Completion:
    """The answer to one completion (``chat`` False) or chat completion body, id ``rid``, for ``model``; ``routed``
    (``{routed_to, confidence}`` for ``"model": "auto"``) is added to it as ``fmhub``."""

    def __init__(self, rid: str, model: str, chat: bool, routed: dict | None = None) -> None:
        self.rid, self.model, self.chat, self.routed = rid, model, chat, routed
        self.kind = "chat.completion" if chat else "text_completion"

    def whole(self, requests: list[Request], events: Events, tok: Any, stops: list[str], prompt_tokens: int) -> dict:
        """The whole answer once every request has finished; an error event raises its `ServeError`."""
        choices, completion = [], 0
        for i, r in enumerate(requests):
            dec = Decoder(tok, stops)
            text, reason = "", None
            for event in events(r):
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
            choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
            choices.append(choice)
        return {"id": self.rid, "object": self.kind, "created": int(time.time()), "model": self.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}, **({"fmhub": self.routed} if self.routed else {})}

    def stream(self, requests: list[Request], events: Events, tok: Any, stops: list[str], send: Callable[[Any], None]) -> None:
        """The answer as it is generated: ``send`` gets each event's document (`sse_event` frames it); an error event
        is sent as an error and ends the stream."""
        chat = self.chat
        chunk_kind = self.kind + ".chunk" if chat else self.kind

        def chunk(i: int, text: str | None, reason: str | None, token: int | None = None) -> dict:
            if chat:
                choice = {"index": i, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
            if token is not None:
                choice["token_ids"] = [token]
            return {"id": self.rid, "object": chunk_kind, "created": int(time.time()), "model": self.model, "choices": [choice],
                    **({"fmhub": self.routed} if self.routed else {})}

        # choices stream one after another; n > 1 and prompt lists are rare with streaming
        for i, r in enumerate(requests):
            dec = Decoder(tok, stops)
            if chat:
                send({**chunk(i, None, None), "choices": [{"index": i, "delta": {"role": "assistant"}, "finish_reason": None}]})
            reason = None
            for event in events(r):
                if event[0] == "token":
                    delta = dec.push(event[1])
                    send(chunk(i, delta, None, event[1]))
                    if dec.stopped:
                        r.cancel()
                        reason = "stop"
                elif event[0] == "error":
                    err = event[1]
                    send(error_doc(str(err), err.kind, err.param))
                    return
                else:
                    reason = reason or ("stop" if event[1] == "cancelled" else event[1])
            tail = dec.flush()
            send(chunk(i, tail if tail else ("" if not chat else None), reason))
        send(b"[DONE]")
