"""JSON from untrusted sources, parsed within bounds: nesting depth, integer digits, non-finite numbers.

Python's `json` recurses once per nesting level (a line of 100,000 ``[`` raises
RecursionError, which is not a ValueError and escaped every ``except`` that
expected one) and parses integers of any length (thousands of digits cost
quadratic time; more than 4,300 raise a ValueError whose text names an
interpreter setting). `loads` checks the depth first, with one regular
expression pass over the text, and refuses integers longer than
`MAX_INT_DIGITS` and the non-standard ``NaN``/``Infinity`` as the parse goes,
so every way a document can be bad ends in one `ValueError` whose message is
a single line for the user.
"""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Any, Callable

MAX_DEPTH = 64  # no document fmhub reads nests deeper than a handful of levels
MAX_INT_DIGITS = 40  # 2^128 has 39 digits: room for any size, count or seed fmhub takes

# a string, or an unterminated one to the end of the text (so no quote is ever scanned twice)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


class JSONLimitError(ValueError):
    """A JSON document that is malformed or exceeds a bound; the message is one line for the user."""


def depth(text: str, limit: int = MAX_DEPTH) -> int:
    """The nesting of arrays and objects in ``text`` (brackets in strings don't count), or ``limit + 1`` if deeper.

    Peels innermost pairs with one regular-expression pass per level, so the
    cost is linear in the text for any document within the limit, with no
    Python loop over characters.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for level in range(limit + 1):
        peeled = _INNERMOST.sub("", brackets)
        if peeled == brackets:  # nothing left to peel: what remains never closes (json will say so), but
            # openers that never close still nest, and json recurses into them before it finds out
            return level + brackets.count("[") + brackets.count("{")
        brackets = peeled
    return limit + 1


def _int(text: str, max_digits: int = MAX_INT_DIGITS) -> int:
    if len(text.lstrip("-")) > max_digits:
        raise JSONLimitError(f"an integer of {len(text.lstrip('-'))} digits (at most {max_digits})")
    return int(text)


def _parse_int(max_digits: int) -> Callable[[str], int]:
    return _int if max_digits == MAX_INT_DIGITS else lambda text: _int(text, max_digits)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JSONLimitError(f"the number {text[:20]} is out of range")
    return value


def _constant(name: str) -> float:
    raise JSONLimitError(f"{name} is not a JSON number")


def _too_deep(text: str, max_depth: int) -> bool:
    # a document with no more openers than the limit cannot nest past it: most skip the regex passes
    return text.count("[") + text.count("{") > max_depth and depth(text, max_depth) > max_depth


_DECODERS: dict = {}


def _decoder(allow_nan: bool, max_int_digits: int) -> json.JSONDecoder:
    """One decoder per setting, kept: `json.loads` with these options builds a new one (and its scanner) per call,
    which cost a dataset reader as much as the parsing of a short row. Decoders keep no state between calls."""
    key = (allow_nan, max_int_digits)
    decoder = _DECODERS.get(key)
    if decoder is None:
        decoder = _DECODERS[key] = json.JSONDecoder(parse_int=_parse_int(max_int_digits), parse_float=float if allow_nan else _float,
                                                    parse_constant=float if allow_nan else _constant)
    return decoder


def loads(
    data: str | bytes,
    max_depth: int = MAX_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    *,
    allow_nan: bool = False,
    max_int_digits: int = MAX_INT_DIGITS,
) -> object:
    """Parse ``data`` as strict JSON within the bounds above; JSONLimitError (a ValueError) with a one-line reason.

    ``object_pairs_hook`` is `json.loads`'s; a ValueError it raises is reported like any other.
    ``allow_nan``: accept ``NaN``/``Infinity`` and out-of-range floats (as infinities), as `json.loads` does;
    for data written by others (Python's `json.dumps` writes ``NaN``), never for documents fmhub itself reads
    as instructions. ``max_int_digits``: the longest integer accepted (the cost of `int` grows with its square).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONLimitError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if _too_deep(data, max_depth):
        raise JSONLimitError(f"nested deeper than {max_depth} levels")
    try:
        if object_pairs_hook is None and not data.startswith("\ufeff"):  # json.loads refuses a BOM: below, in its words
            return _decoder(allow_nan, max_int_digits).decode(data)
        return json.loads(
            data, parse_int=_parse_int(max_int_digits), parse_float=float if allow_nan else _float,
            parse_constant=float if allow_nan else _constant, object_pairs_hook=object_pairs_hook,
        )
    except JSONLimitError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # the hook's refusals; RecursionError: belt and braces
        raise JSONLimitError(str(exc).splitlines()[0] if str(exc) else f"not valid JSON ({type(exc).__name__})") from None

