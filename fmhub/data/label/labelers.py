"""Helpers for labeler plugins: typed options, a row's text, and the error for a bad option.

A labeler's ``configure(options, context)`` (see `fmhub.plugin.interfaces.Labeler`)
reads its options through `Options`, which refuses unknown keys and wrong
types with one-line messages; fmhub adds the ``fmhub.yaml`` file and line.
"""

from __future__ import annotations

from typing import Any, Mapping

from fmhub.base.errors import FmhubError
from fmhub.plugin.interfaces import LabelContext

_MISSING = object()


class LabelerError(FmhubError):
    """A labelling function is misconfigured, or cannot run at all."""


class Options:
    """A labeler entry's options, read one by one; `done` refuses whatever was not read (a typo)."""

    def __init__(self, kind: str, options: Mapping[str, Any], context: LabelContext) -> None:
        self.kind, self.context = kind, context
        self._opts = dict(options)
        self._read: set[str] = set()

    def get(self, key: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        """The option's value, checked against ``types``; without a default it is required."""
        self._read.add(key)
        if key not in self._opts or self._opts[key] is None:
            if default is _MISSING:
                raise LabelerError(f"{self.kind} needs the option '{key}'")
            return default
        value = self._opts[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise LabelerError(f"{self.kind}: option '{key}' must be {_type_names(types)}, not {value!r}")
        if not isinstance(value, types):
            raise LabelerError(f"{self.kind}: option '{key}' must be {_type_names(types)}, not {value!r}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        """A string or a non-empty list of strings, as a list."""
        value = self.get(key, (str, list), default)
        if value is default and default is not _MISSING:
            return value
        items = [value] if isinstance(value, str) else value
        if not items or not all(isinstance(v, str) and v for v in items):
            raise LabelerError(f"{self.kind}: option '{key}' must be a word or a list of words")
        return list(items)

    def label(self, key: str = "label") -> str:
        """A class name of the pipeline (the label a rule votes)."""
        return check_class(self.get(key, str), self.context, f"{self.kind}: option '{key}'")

    def column(self) -> str:
        """The text column: the entry's ``column:`` option, else the pipeline's."""
        return self.get("column", str, self.context.column)

    def done(self) -> None:
        unknown = sorted(set(self._opts) - self._read)
        if unknown:
            takes = ", ".join(sorted(self._read)) or "none"
            raise LabelerError(f"{self.kind} has no option {', '.join(map(repr, unknown))} (it takes: {takes})")


def check_class(value: str, context: LabelContext, what: str) -> str:
    if value not in context.classes:
        raise LabelerError(f"{what}: {value!r} is not one of the pipeline's classes ({', '.join(context.classes)})")
    return value


def text_of(row: Mapping[str, Any], column: str) -> str | None:
    """The row's text in ``column`` (None, i.e. nothing to vote on, when the value is null); a missing column raises."""
    try:
        value = row[column]
    except KeyError:
        raise LabelerError(f"row has no column {column!r} (it has: {', '.join(map(str, row)) or 'no columns'})") from None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a mapping"}
    return " or ".join(names.get(t, t.__name__) for t in (types if isinstance(types, tuple) else (types,)))
