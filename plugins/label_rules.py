"""Built-in plugin: rule labelers ``keyword``, ``regex`` and ``lookup``.

``keyword``  ``{words: [great, love], label: positive, mode: any|all, column: text}``
    votes ``label`` when any (or all) of the words occur in the text as whole
    words (case-insensitive; a word may be a phrase), else abstains.
``regex``    ``{pattern: "refund|money back", label: negative, ignore_case: false}``
    votes ``label`` when the pattern matches anywhere in the text (``re.search``).
``lookup``   ``{column: source, map: {spam-trap: spam, newsletter: ham}}``
    votes the class a column's value maps to; other values abstain.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

from fmhub import hookimpl
from fmhub.plugin.interfaces import LabelContext
from fmhub.plugin.options import ClassName, OptionError, Options, Words, check_class, parse_options, row_text


class _Match:
    """Votes ``label`` for rows whose text ``matches``; abstains otherwise (and on null text)."""

    def __init__(self, name: str, column: str, label: str, matches) -> None:
        self.name, self.column, self.label, self._matches = name, column, label, matches

    def vote(self, rows: Sequence[Mapping[str, Any]]) -> list[str | None]:
        out: list[str | None] = []
        for row in rows:
            text = row_text(row, self.column)
            out.append(self.label if text and self._matches(text) else None)
        return out


class KeywordOptions(Options):
    words: Words
    label: ClassName
    mode: str = "any"
    case_sensitive: bool = False
    column: Optional[str] = None


class Keyword:
    name = "keyword"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _Match:
        o = parse_options(self.name, KeywordOptions, options, context)
        words, label, column, case = o.words, o.label, o.column or context.column, o.case_sensitive
        if o.mode not in ("any", "all"):
            raise OptionError(f"keyword: option 'mode' must be 'any' or 'all', not {o.mode!r}", "mode")
        mode = o.mode
        # \w-boundaries rather than \b so a word that starts or ends with punctuation ("a+", ":)") still matches whole
        flags = 0 if case else re.IGNORECASE
        if mode == "any":  # one alternation, one scan of the text, rather than a search per word
            one = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", flags)
            return _Match(f"keyword:{','.join(words)}", column, label, lambda text: one.search(text) is not None)
        pats = [re.compile(r"(?<!\w)" + re.escape(w) + r"(?!\w)", flags) for w in words]
        return _Match(f"keyword:{','.join(words)}", column, label, lambda text: all(p.search(text) for p in pats))


class RegexOptions(Options):
    pattern: str
    label: ClassName
    ignore_case: bool = False
    column: Optional[str] = None


class Regex:
    name = "regex"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _Match:
        o = parse_options(self.name, RegexOptions, options, context)
        pattern, label, column = o.pattern, o.label, o.column or context.column
        try:
            rx = re.compile(pattern, re.IGNORECASE if o.ignore_case else 0)
        except re.error as exc:
            raise OptionError(f"regex: pattern {pattern!r} is not a valid regular expression ({exc})", "pattern") from None
        short = pattern if len(pattern) <= 40 else pattern[:37] + "..."
        return _Match(f"regex:{short}", column, label, lambda text: rx.search(text) is not None)


class _Lookup:
    def __init__(self, name: str, column: str, table: Mapping[Any, str], default: str | None) -> None:
        self.name, self.column, self.table, self.default = name, column, table, default

    def vote(self, rows: Sequence[Mapping[str, Any]]) -> list[str | None]:
        out: list[str | None] = []
        for row in rows:
            if self.column not in row:
                raise OptionError(f"row has no column {self.column!r} (it has: {', '.join(map(str, row))})")
            value = row[self.column]
            # compared as text: YAML keys and the data's values disagree on types (5 vs "5") more often than not
            out.append(self.default if value is None else self.table.get(str(value), self.default))
        return out


class LookupOptions(Options):
    column: Optional[str] = None
    map: dict
    default: Optional[ClassName] = None


class Lookup:
    name = "lookup"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _Lookup:
        o = parse_options(self.name, LookupOptions, options, context)
        column, table, default = o.column or context.column, o.map, o.default
        if not table:
            raise OptionError("lookup: option 'map' is empty; map column values to classes", "map")
        for value, cls in table.items():
            if not isinstance(cls, str):
                raise OptionError(f"lookup: map[{value!r}] must be a class name, not {cls!r}", "map")
            check_class(cls, context, f"lookup: map[{value!r}]")
        return _Lookup(f"lookup:{column}", column, {str(k): v for k, v in table.items()}, default)


@hookimpl
def fmhub_labelers():
    return [Keyword(), Regex(), Lookup()]
