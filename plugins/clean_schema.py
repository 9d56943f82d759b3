"""Built-in plugin: ``schema``, normalization of a row's columns.

In this order: ``rename`` columns, fill ``defaults`` (for missing or null
values), ``cast`` to ``str``/``int``/``float``/``bool``, check ``require``d
columns are present and not null, and with ``drop_unknown`` remove columns
the step does not name. A row whose value cannot be cast is dropped, with
the column and the value's type (never the value) in the reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from pydantic import Field, model_validator

from fmhub import hookimpl
from fmhub.plugin.options import Options, parse_options
from fmhub.plugin.interfaces import CleanContext, Drop, Edit

TypeName = Literal["str", "int", "float", "bool"]


class SchemaOptions(Options):
    rename: dict[str, str] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)
    cast: dict[str, TypeName] = Field(default_factory=dict)
    require: list[str] = Field(default_factory=list)
    drop_unknown: bool = False
    known: list[str] = Field(default_factory=list, description="more columns to keep with drop_unknown")

    @model_validator(mode="after")
    def _something(self) -> "SchemaOptions":
        if not (self.rename or self.defaults or self.cast or self.require or self.drop_unknown):
            raise ValueError("give at least one of rename, defaults, cast, require, drop_unknown")
        targets = list(self.rename.values())
        if len(set(targets)) != len(targets):
            raise ValueError("rename maps two columns to one name")
        if self.known and not self.drop_unknown:
            raise ValueError("known only matters with drop_unknown: true")
        return self


@dataclass(frozen=True)
class SchemaConfig:
    rename: Mapping[str, str]
    defaults: Mapping[str, Any]
    cast: Mapping[str, str]
    require: tuple[str, ...]
    keep: frozenset[str] | None  # None: keep every column


class Schema:
    """Renames, fills, casts, requires and prunes columns; rows that cannot be cast are dropped."""

    name = "schema"
    scope = "row"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> SchemaConfig:
        o = parse_options(self.name, SchemaOptions, options)
        keep = None
        if o.drop_unknown:
            keep = frozenset(o.rename.values()) | set(o.defaults) | set(o.cast) | set(o.require) | set(o.known)
            if not keep:
                from fmhub.plugin.options import OptionError

                raise OptionError("schema: drop_unknown would drop every column; name the columns to keep in known", "drop_unknown")
        return SchemaConfig(dict(o.rename), dict(o.defaults), dict(o.cast), tuple(o.require), keep)

    def clean(self, rows: Sequence[Mapping[str, Any]], config: SchemaConfig) -> list:
        return [normalize(row, config) for row in rows]


def normalize(row: Mapping[str, Any], c: SchemaConfig) -> Drop | Edit | None:
    """One row's verdict under ``c``."""
    new = dict(row)
    done: list[str] = []
    for old, name in c.rename.items():
        if old in new:
            if name in new:
                return Drop(f"cannot rename {old!r} to {name!r}: the row has both", {"column": old})
            new[name] = new.pop(old)
            done.append(f"renamed {old}→{name}")
    filled = [col for col, value in c.defaults.items() if new.get(col) is None]
    for col in filled:
        new[col] = c.defaults[col]
    if filled:
        done.append(f"filled {', '.join(filled)}")
    casts = []
    for col, to in c.cast.items():
        value = new.get(col)
        if value is None:
            continue
        ok, cast = _cast(value, to)
        if not ok:
            return Drop(f"column {col!r}: cannot cast {type(value).__name__} to {to}", {"column": col, "type": type(value).__name__, "to": to})
        if type(cast) is not type(value) or cast != value:
            new[col] = cast
            casts.append(col)
    if casts:
        done.append(f"cast {', '.join(casts)}")
    missing = [col for col in c.require if new.get(col) is None]
    if missing:
        return Drop(f"required column {', '.join(map(repr, missing))} missing or null", {"columns": missing})
    if c.keep is not None:
        unknown = [col for col in new if col not in c.keep]
        for col in unknown:
            del new[col]
        if unknown:
            done.append(f"dropped column {', '.join(unknown)}")
    return Edit(new, "; ".join(done)) if done else None


_INT = re.compile(r"[+-]?[0-9]{1,4000}")  # ASCII digits (int() reads "٣"; over 4,300 digits it raises)
_TRUE, _FALSE = {"true", "yes", "1", "y", "t"}, {"false", "no", "0", "n", "f"}


def _cast(value: Any, to: str) -> tuple[bool, Any]:
    """(True, value as type ``to``), or (False, None) when that would lose or invent information."""
    if to == "str":
        if isinstance(value, str):
            return True, value
        if isinstance(value, bool):
            return True, "true" if value else "false"
        if isinstance(value, (int, float)):
            return True, str(value)
        if isinstance(value, (list, dict)):
            return True, json.dumps(value, ensure_ascii=False, sort_keys=True)
        return False, None
    if isinstance(value, bool):
        return (True, value) if to == "bool" else (False, None)
    if to == "int":
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return True, int(value.strip())
        return False, None
    if to == "float":
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                f = float(value.strip())
            except ValueError:
                return False, None
            return (True, f) if math.isfinite(f) else (False, None)
        return False, None
    # bool
    if isinstance(value, int) and value in (0, 1):
        return True, bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return True, value.strip().lower() in _TRUE
    return False, None


@hookimpl
def fmhub_cleaners():
    return [Schema()]
