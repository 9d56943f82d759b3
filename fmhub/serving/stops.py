"""Token ids to text as they arrive, cut at stop strings that never leak, even when they span tokens.

A stop string may be spelled by several tokens (``"{i"`` as ``"{"`` then
``"i"``), so text is only handed out once it can no longer turn into a stop:
the longest end of the text that is the beginning of some stop string is held
back until the next tokens either complete the stop (the text is cut where
the stop begins, and neither it nor anything after it is returned) or show it
was not one (the held text goes out with them). An incomplete UTF-8 character
is held back too. When generation ends without a stop, `StopText.flush` hands
out whatever was held. OpenAI's API and vLLM behave the same way.
"""

from __future__ import annotations

from typing import Any

MAX_STOP_CHARS = 512  # per stop string: the hold-back check costs up to its length squared per token


class StopText:
    """One choice's text: ``push`` each token id, get the text that is safe to send; ``stopped`` once a stop is seen.

    ``ids`` are the tokens consumed, up to and including the one that
    completed a stop; ``offset`` is where the last pushed token's text begins
    in the choice's text.

    Decoding is incremental, as vLLM's detokenizer does it: each push decodes
    only the tokens since the last settled point plus a few before them for
    context (how a tokenizer spells a token can depend on the one before), and
    stop strings are searched for only where new text could complete one, so
    a long completion costs the same per token as a short one.
    """

    def __init__(self, tok: Any, stops: list[str]) -> None:
        self.tok, self.stops = tok, stops
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far, whole characters only
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False
        self.offset = 0
        self._prefix = 0  # ids[_prefix:_read] spell the end of ``text``: the context the next tokens are decoded with
        self._read = 0
        self._longest = max((len(x) for x in stops), default=0)

    def push(self, token: int) -> str:
        """The new text that can be sent now ("" while it is held back)."""
        self.ids.append(token)
        self.offset = len(self.text)
        new = self._decode_new()
        if new is None:
            return ""  # an incomplete character: wait for the rest of its bytes
        searched_from = max(0, len(self.text) - self._longest + 1)
        self.text += new
        at = self._first_stop(searched_from)
        if at is not None:
            self.stopped = True
            self.text = self.text[:at]
            safe = len(self.text)
        else:
            safe = len(self.text) - self._held()
        return self._hand_out(max(safe, self.sent))

    def flush(self) -> str:
        """Generation ended without a stop: whatever was held back (an unfinished character as U+FFFD)."""
        if self.stopped:
            return ""
        prefix = self.tok.decode(self.ids[self._prefix:self._read])
        full = self.tok.decode(self.ids[self._prefix:])
        self.text += full[len(prefix):] if full.startswith(prefix) else ""
        self._prefix = self._read = len(self.ids)
        return self._hand_out(len(self.text))

    def _decode_new(self) -> str | None:
        """The text the tokens since the last settled point add; None while it ends in an incomplete character."""
        prefix = self.tok.decode(self.ids[self._prefix:self._read])
        full = self.tok.decode(self.ids[self._prefix:])
        if full.endswith("\ufffd") or len(full) < len(prefix) or not full.startswith(prefix):
            return None  # unfinished bytes, or the tokenizer re-spelled the context: wait for more tokens
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(prefix):]

    def _hand_out(self, upto: int) -> str:
        delta = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return delta

    def _first_stop(self, start: int) -> int | None:
        found = [at for at in (self.text.find(x, start) for x in self.stops) if at >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        """How many characters at the end of the text could be the beginning of a stop string."""
        best = 0
        for x in self.stops:
            for k in range(min(len(x) - 1, len(self.text)), best, -1):
                if self.text.endswith(x[:k]):
                    best = k
                    break
        return best
