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

MAX_STOP_CHARS = 512  # per stop string


class StopText:
    """One choice's text: ``push`` each token id, get the text that is safe to send; ``stopped`` once a stop is seen.

    ``ids`` are the tokens consumed, up to and including the one that
    completed a stop; ``offset`` is where the last pushed token's text begins
    in the choice's text.

    Decoding is incremental, as vLLM's detokenizer does it: each push decodes
    only the tokens since the last settled point plus a few before them for
    context (how a tokenizer spells a token can depend on the one before), and
    each new character advances one automaton per stop string (`_Matcher`),
    so a long completion, or a long stop string, costs the same per token as a
    short one.
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
        self._matchers = [_Matcher(x) for x in stops]

    def push(self, token: int) -> str:
        """The new text that can be sent now ("" while it is held back)."""
        self.ids.append(token)
        self.offset = len(self.text)
        new = self._decode_new()
        if new is None:
            return ""  # an incomplete character: wait for the rest of its bytes
        at = self._first_stop(new)
        self.text += new
        if at is not None:
            self.stopped = True
            self.text = self.text[:at]
            safe = len(self.text)
        else:  # hold back the longest end of the text that begins some stop string
            safe = len(self.text) - max((m.matched for m in self._matchers), default=0)
        return self._hand_out(max(safe, self.sent))

    def flush(self) -> str:
        """Generation ended without a stop: whatever was held back (an unfinished character as U+FFFD)."""
        if self.stopped:
            return ""
        prefix = self.tok.decode(self.ids[self._prefix:self._read])
        full = self.tok.decode(self.ids[self._prefix:])
        self.text += full[len(prefix):]  # re-spelled context or not, never drop the end (vLLM takes it by length too)
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

    def _first_stop(self, new: str) -> int | None:
        """Where in the text the earliest stop that ``new`` (about to be appended) completes begins, if any."""
        found = None
        for j, ch in enumerate(new, len(self.text) + 1):
            for m in self._matchers:
                if m.feed(ch):
                    at = j - len(m.stop)
                    found = at if found is None else min(found, at)
        return found


class _Matcher:
    """One stop string as a Knuth-Morris-Pratt automaton: ``matched`` is the length of its longest beginning that the
    text ends with, updated in amortized constant time per character. (Testing each of a stop's beginnings against the
    end of the text costs its length squared per token: 4 stops of 512 characters held the GIL ~0.1 ms per token of
    each choice, slowing the engine thread for every client.)"""

    def __init__(self, stop: str) -> None:
        self.stop, self.matched = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: the longest proper beginning of stop[:i + 1] that is also its end
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, ch: str) -> bool:
        """Take the text's next character; True when it completes the stop."""
        x, m = self.stop, self.matched
        if m == len(x):
            m = self.fail[m - 1]
        while m and x[m] != ch:
            m = self.fail[m - 1]
        if x[m] == ch:
            m += 1
        self.matched = m
        return m == len(x)
