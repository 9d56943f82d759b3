"""Helpers for cleaner and labeler plugins: typed options, a row's text, and the error for a bad option.

One way for every plugin that reads options from ``fmhub.yaml`` (a cleaning
step's, a labelling function's):

* declare the options as a pydantic model derived from `Options` (unknown keys
  are refused: a typo must not be ignored) and read them with
  `parse_options`, which raises `OptionError` naming the option, with one
  line: ``length: option 'min_word': unknown option (a typo?); length takes:
  min_chars, ...``. fmhub adds the file, line and path of the entry
  (``fmhub.yaml:9: clean.web.steps[1].length.min_word: ...``);
* a class name of a labelling pipeline is a `ClassName` field (checked against
  ``context.classes``, passed as ``parse_options(..., context=context)``), or
  checked with `check_class`;
* `text_of` gives the text a step or function looks at, under one rule.

`OptionError` is also what a plugin raises for a bad option it checks itself,
or (labelers) for a function that cannot run; the clean and label pipelines catch it.
"""

from __future__ import annotations

from typing import Annotated, Any, Mapping, Sequence, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo

from fmhub.base.errors import FmhubError
from fmhub.plugin.interfaces import Drop, LabelContext

M = TypeVar("M", bound=BaseModel)


class OptionError(FmhubError):
    """A plugin's entry in ``fmhub.yaml`` is misconfigured (or, for a labelling function, cannot run).

    ``option`` names the offending option, when one is at fault: fmhub then points at its line.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class Options(BaseModel):
    """Base for a plugin's options model: unknown keys are refused, values are frozen (configs travel to workers)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def parse_options(kind: str, model: type[M], options: Mapping[str, Any], context: Any = None) -> M:
    """``options`` validated by ``model``; the first problem raises `OptionError` naming the option.

    ``context`` (a `CleanContext` or `LabelContext`) is handed to the model's validators
    (``info.context``); `ClassName` fields need a `LabelContext`. For a cleaner, the message
    for an unknown option lists ``columns`` among the options taken: fmhub reads it for every step.
    """
    try:
        return model.model_validate(dict(options), context={"context": context})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            raise OptionError(f"{kind} needs the option '{where}'", option=loc[0]) from None
        if err["type"] == "extra_forbidden":
            takes = list(model.model_fields)
            if not isinstance(context, LabelContext) and "columns" not in takes:
                takes.append("columns")
            msg = f"unknown option (a typo?); {kind} takes: {', '.join(takes)}"
        raise OptionError(f"{kind}: option '{where}': {msg}" if where else f"{kind}: {msg}", option=loc[0] if loc else None) from None


def check_class(value: str, context: LabelContext, what: str) -> str:
    """``value`` when it is one of the pipeline's classes; else `OptionError` (``what``: where it was given)."""
    if value not in context.classes:
        raise OptionError(f"{what}: {value!r} is not one of the pipeline's classes ({', '.join(context.classes)})")
    return value


def _class_name(value: str, info: ValidationInfo) -> str:
    context = (info.context or {}).get("context")
    if isinstance(context, LabelContext) and value not in context.classes:
        raise ValueError(f"{value!r} is not one of the pipeline's classes ({', '.join(context.classes)})")
    return value


ClassName = Annotated[str, AfterValidator(_class_name)]
"""A field holding one of a labelling pipeline's class names (checked when parsed with its `LabelContext`)."""


def _words(value: Any) -> Any:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) and v for v in items):
        raise ValueError("must be a word or a list of words")
    return tuple(items)


Words = Annotated[tuple[str, ...], BeforeValidator(_words)]
"""A field holding a word or a non-empty list of words (given as a string or a list)."""


# -- a row's text -----------------------------------------------------------------------------

_MISSING = object()


def text_of(row: Mapping[str, Any], columns: str | Sequence[str]) -> str | Drop:
    """The text of ``columns`` joined by newlines, or a `Drop` saying why the row has none.

    The one rule for every plugin: a null value counts as empty text; a missing
    column or a value that is not text is no text at all (the `Drop` says which
    column), rather than passing silently: a misspelt ``columns:`` would
    otherwise make every text empty. A cleaner returns the `Drop` as its
    verdict; a labelling function that cannot drop a row uses `row_text`.
    """
    if isinstance(columns, str):
        columns = (columns,)
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


def row_text(row: Mapping[str, Any], columns: str | Sequence[str]) -> str:
    """`text_of` for a labelling function: the text (empty: nothing to vote on), or `OptionError` saying why there is none.

    fmhub records the error against the row's position and counts the row as an abstain.
    """
    text = text_of(row, columns)
    if not isinstance(text, Drop):
        return text
    column = (text.detail or {}).get("column")
    if "type" in (text.detail or {}):
        raise OptionError(f"row's column {column!r} holds {text.detail['type']}, not text")
    raise OptionError(f"row has no column {column!r} (it has: {', '.join(map(str, row)) or 'no columns'})")


def _no_text(column: str, value: Any) -> Drop:
    if value is _MISSING:
        return Drop(f"no column {column!r}", {"column": column})
    return Drop(f"column {column!r} holds {type(value).__name__}, not text", {"column": column, "type": type(value).__name__})
