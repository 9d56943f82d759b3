"""Helpers for cleaner plugins: typed options, a row's text, and the error for a bad option.

A cleaner declares its options as a pydantic model and reads them with
`parse_options`, which refuses unknown keys and wrong types with one-line
messages that name the option; fmhub then points at its line in
``fmhub.yaml``. `text_of` gives the text a step looks at, or the `Drop` for
a row that has none.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fmhub.base.errors import FmhubError
from fmhub.plugin.interfaces import Drop

M = TypeVar("M", bound=BaseModel)


class CleanerError(FmhubError):
    """A cleaning step is misconfigured; ``option`` names the offending option, when one is at fault."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class StepOptions(BaseModel):
    """Base for a cleaner's options model: unknown keys are refused (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def parse_options(cleaner: str, model: type[M], options: Mapping[str, Any]) -> M:
    """``options`` validated by ``model``; the first problem raises `CleanerError` naming the option."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            # every step also takes ``columns`` (fmhub reads it before the cleaner does)
            takes = ", ".join(list(model.model_fields) + ["columns"] * ("columns" not in model.model_fields))
            msg = f"unknown option (a typo?); {cleaner} takes: {takes}"
        where = ".".join(loc)
        raise CleanerError(f"{cleaner}: option '{where}': {msg}" if where else f"{cleaner}: {msg}", option=loc[0] if loc else None) from None


def text_of(row: Mapping[str, Any], columns: Sequence[str]) -> str | Drop:
    """The text of ``columns`` joined by newlines (null counts as empty), or a `Drop` saying why there is none.

    A missing column or a non-text value drops the row rather than passing
    silently: a misspelt ``columns:`` would otherwise make every text empty.
    """
    if len(columns) == 1:  # the common case, without building a list
        value = row.get(columns[0], _MISSING)
        if isinstance(value, str):
            return value
        return "" if value is None else _no_text(columns[0], value)
    parts = []
    for col in columns:
        value = row.get(col, _MISSING)
        if value is None:
            continue
        if not isinstance(value, str):
            return _no_text(col, value)
        parts.append(value)
    return "\n".join(parts)


_MISSING = object()


def _no_text(column: str, value: Any) -> Drop:
    if value is _MISSING:
        return Drop(f"no column {column!r}", {"column": column})
    return Drop(f"column {column!r} holds {type(value).__name__}, not text", {"column": column, "type": type(value).__name__})
