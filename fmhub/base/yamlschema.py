"""YAML files validated by a pydantic model, every error naming ``file:LINE: key.path``.

`validate_yaml` is the loader of every YAML file fmhub reads against a schema
(``fmhub.yaml`` in `fmhub.project.spec`, ``.fmhub/policy.yaml`` in
`fmhub.governance.policy`), each from a repository that may be hostile: the
text is first checked within `fmhub.base.boundedyaml.YamlLimits`, then
composed and built into plain Python while the line of every key and list
item is recorded (a `Loc` is the path to it: keys and list indices), then
validated by the model. Duplicate keys are refused; a bare ``on:``/``yes:``
key stays the name it is written as. Any problem is one line of the caller's
error class, naming the file, the line and the key path (`format_loc`).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fmhub.base.boundedyaml import YamlLimits, at_line, check_bounds, one_line, yaml_error
from fmhub.base.errors import FmhubError

Loc = tuple  # a path into the document: keys and list indices


class _DocumentError(Exception):
    """A problem found while building the document; ``{path}`` in its message stands for the file."""


def format_loc(loc: Loc) -> str:
    """``a.b[2].c``: a key path as the messages write it (empty for the top level)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _construct(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> Any:
    """A YAML node to plain Python, recording the line where each key and list item starts."""
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = _scalar(knode)
            if isinstance(key, bool) and isinstance(knode, yaml.ScalarNode) and not knode.style:
                key = knode.value  # YAML 1.1 reads a bare `on:`/`yes:` key as a boolean; a key is a name as written
            if key in out:
                raise _DocumentError(f"{{path}}:{knode.start_mark.line + 1}: {format_loc(loc + (key,))}: duplicate key")
            lines[loc + (key,)] = knode.start_mark.line + 1
            out[key] = _construct(vnode, loc + (key,), lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, loc + (i,), lines) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def validate_yaml(text: str, path: str, model: type[BaseModel], error: type[FmhubError], shape: str,
                  limits: YamlLimits) -> tuple[Any, dict[Loc, int]]:
    """YAML text validated by a pydantic ``model``; one ``error`` line naming ``path:LINE: key.path`` on any problem.

    Shared by every YAML file fmhub reads (``fmhub.yaml``, ``.fmhub/policy.yaml``),
    each from a repository that may be hostile: the text is first checked within
    ``limits`` (`fmhub.base.boundedyaml.check_bounds`), so no alias bomb, deep nesting,
    bad date, unknown tag or list key gets past as a traceback. ``shape`` says
    what the top level must be, for the error when it is not a mapping.
    Returns the model instance and the line of each key, for later errors.
    """
    try:
        return _validate_yaml(text, path, model, error, shape, limits)
    except error as exc:  # keys and values are quoted as written: escape their control characters
        raise error(one_line(str(exc))) from None


def _validate_yaml(text: str, path: str, model: type[BaseModel], error: type[FmhubError], shape: str,
                   limits: YamlLimits) -> tuple[Any, dict[Loc, int]]:
    check_bounds(text, path, limits, error)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:  # what the events cannot show: an undefined or duplicate anchor
        raise yaml_error(path, exc, error) from None
    lines: dict[Loc, int] = {}
    try:
        data = _construct(node, (), lines) if node is not None else {}
    except _DocumentError as exc:
        raise error(str(exc).replace("{path}", path)) from None
    if not isinstance(data, dict):
        raise error(f"{at_line(path, 1)}: {shape}")
    try:
        return model.model_validate(data), lines
    except ValidationError as exc:
        raise error(_problems(exc, path, lines)) from None


def _problems(exc: ValidationError, path: str, lines: dict[Loc, int]) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        # pydantic appends the validator's name for union members; keep the document path only
        while loc and loc not in lines and len(loc) > 1:
            loc = loc[:-1]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo?)"
        where = at_line(path, lines.get(tuple(err["loc"])) or lines.get(loc))
        problems.append(f"{where}: {format_loc(tuple(err['loc'])) or 'top level'}: {msg}")
    return "; ".join(problems)
