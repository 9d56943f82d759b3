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
from typing import Any, Mapping, Sequence

from fmhub import hookimpl
from fmhub.plugin.interfaces import LabelContext
from fmhub.data.label.labelers import LabelerError, Options, check_class, text_of


class _Match:
    """Votes ``label`` for rows whose text ``matches``; abstains otherwise (and on null text)."""

    def __init__(self, name: str, column: str, label: str, matches) -> None:
        self.name, self.column, self.label, self._matches = name, column, label, matches

    def vote(self, rows: Sequence[Mapping[str, Any]]) -> list[str | None]:
        out: list[str | None] = []
        for row in rows:
            text = text_of(row, self.column)
            out.append(self.label if text is not None and self._matches(text) else None)
        return out


class Keyword:
    name = "keyword"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _Match:
        o = Options(self.name, options, context)
        words = o.strings("words")
        label, column = o.label(), o.column()
        mode = o.get("mode", str, "any")
        if mode not in ("any", "all"):
            raise LabelerError(f"keyword: option 'mode' must be 'any' or 'all', not {mode!r}")
        case = o.get("case_sensitive", bool, False)
        o.done()
        # \w-boundaries rather than \b so a word that starts or ends with punctuation ("a+", ":)") still matches whole
        flags = 0 if case else re.IGNORECASE
        pats = [re.compile(r"(?<!\w)" + re.escape(w) + r"(?!\w)", flags) for w in words]
        test = any if mode == "any" else all
        return _Match(f"keyword:{','.join(words)}", column, label, lambda text: test(p.search(text) for p in pats))


class Regex:
    name = "regex"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _Match:
        o = Options(self.name, options, context)
        pattern = o.get("pattern", str)
        label, column = o.label(), o.column()
        ignore_case = o.get("ignore_case", bool, False)
        o.done()
        try:
            rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise LabelerError(f"regex: pattern {pattern!r} is not a valid regular expression ({exc})") from None
        short = pattern if len(pattern) <= 40 else pattern[:37] + "..."
        return _Match(f"regex:{short}", column, label, lambda text: rx.search(text) is not None)


class _Lookup:
    def __init__(self, name: str, column: str, table: Mapping[Any, str], default: str | None) -> None:
        self.name, self.column, self.table, self.default = name, column, table, default

    def vote(self, rows: Sequence[Mapping[str, Any]]) -> list[str | None]:
        out: list[str | None] = []
        for row in rows:
            if self.column not in row:
                raise LabelerError(f"row has no column {self.column!r} (it has: {', '.join(map(str, row))})")
            value = row[self.column]
            # compared as text: YAML keys and the data's values disagree on types (5 vs "5") more often than not
            out.append(self.default if value is None else self.table.get(str(value), self.default))
        return out


class Lookup:
    name = "lookup"

    def configure(self, options: Mapping[str, Any], context: LabelContext) -> _Lookup:
        o = Options(self.name, options, context)
        column = o.column()
        table = o.get("map", dict)
        default = o.get("default", str, None)
        o.done()
        if not table:
            raise LabelerError("lookup: option 'map' is empty; map column values to classes")
        for value, cls in table.items():
            if not isinstance(cls, str):
                raise LabelerError(f"lookup: map[{value!r}] must be a class name, not {cls!r}")
            check_class(cls, context, f"lookup: map[{value!r}]")
        if default is not None:
            check_class(default, context, "lookup: option 'default'")
        return _Lookup(f"lookup:{column}", column, {str(k): v for k, v in table.items()}, default)


@hookimpl
def fmhub_labelers():
    return [Keyword(), Regex(), Lookup()]
