"""``.fmhub/policy.yaml``: the repository's role-based access policy, parsed with line numbers.

The format (version 1) is documented in docs/policy.md. In short::

    version: 1
    default: allow            # decision when no rule matches (allow unless `deny`)
    roles:
      ml-core: [alice@example.com, "*@research.example.com", "@admins"]
      admins: [root@example.com]
    rules:                    # ordered: the first rule that matches decides
      - allow: [read]
        roles: [ml-core]
        paths: ["models/*.safetensors"]
      - deny: [read]
        paths: ["models/*.safetensors"]
        tensors: ["lm_head.*"]
        placeholder: true     # smudge writes the manifest text instead of failing

A rule matches a request when the action is listed, the principal holds one
of ``roles`` (absent: everyone), the path matches one of ``paths`` (absent:
any), the tensor one of ``tensors`` (absent: any; present: only requests
naming a tensor) and the column one of ``columns`` (likewise). Rules with
``rows: {column, values}`` govern single rows only (`Policy.row_filter`). Parsing
problems raise `PolicyError` naming ``file:line``; callers fail closed on it.

A policy comes from whoever can commit to the repository, so it is read within
bounds (`MAX_POLICY_BYTES`, `MAX_POLICY_DEPTH`, `MAX_POLICY_NODES`,
`MAX_VALUE_CHARS`, integers of at most 40 digits, no YAML aliases), checked on
the parser's event stream before any object is built (`POLICY_LIMITS`, walked by
`fmhub.base.boundedyaml.check_bounds`, the walk every YAML file fmhub reads gets):
a "billion laughs" of aliases, ``[[[[…`` nested 100,000 deep or a
100,000-digit integer is one `PolicyError`, never a traceback, an exhausted
memory or a stalled check.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fmhub.base.boundedyaml import YamlLimits, at_line, one_line
from fmhub.base.errors import FmhubError
from fmhub.base.yamlschema import validate_yaml

POLICY_FILE = ".fmhub/policy.yaml"
POLICY_VERSION = 1
ACTIONS = ("read", "write")

MAX_POLICY_BYTES = 256 << 10  # 9,000 members fit in 190 KiB; the pure-Python parser reads this much in ~0.3 s
MAX_POLICY_DEPTH = 16  # the deepest a valid policy goes is 5 (rules, a rule, rows, values, a value)
MAX_POLICY_NODES = 10_000  # keys, values and items: every request walks the rules, so they must stay few
MAX_VALUE_CHARS = 4096  # a path, glob, email or row value
POLICY_LIMITS = YamlLimits(
    max_bytes=MAX_POLICY_BYTES,
    max_depth=MAX_POLICY_DEPTH,
    max_nodes=MAX_POLICY_NODES,
    max_value_chars=MAX_VALUE_CHARS,
    aliases=False,  # tighter than a spec's: a policy has no use for them, and every check reads it
    finite=True,  # `rows: values:` compare by equality: NaN never matches, so a deny on it would deny nothing
    what="a policy",
    nodes_hint="; a policy is a short list of roles and rules",
    depth_hint="; a policy goes 5 deep",
)

Action = Literal["read", "write"]


class PolicyError(FmhubError):
    """The policy file cannot be read as a policy: access it governs is denied until it is fixed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RowMatch(_Strict):
    """``rows: {column: NAME, values: [...]}``: the rule governs the rows whose ``column`` holds one of ``values``."""

    column: str
    values: list[Union[str, int, float, bool, None]] = Field(min_length=1)


class Rule(_Strict):
    allow: Optional[list[Action]] = None
    deny: Optional[list[Action]] = None
    roles: Optional[list[str]] = None
    paths: Optional[list[str]] = None
    tensors: Optional[list[str]] = None
    columns: Optional[list[str]] = None
    rows: Optional[RowMatch] = None
    placeholder: bool = False

    @model_validator(mode="after")
    def _one_effect(self) -> "Rule":
        if (self.allow is None) == (self.deny is None):
            raise ValueError("a rule has exactly one of `allow: [actions]` or `deny: [actions]`")
        if not (self.allow or self.deny):
            raise ValueError("a rule must list at least one action (read, write)")
        return self

    @property
    def effect(self) -> str:
        return "allow" if self.allow is not None else "deny"

    @property
    def actions(self) -> list[str]:
        return list(self.allow if self.allow is not None else self.deny or [])


class LicencePolicy(_Strict):
    """``licences:``: what data licences models here may be trained on (fmhub.governance.licences)."""

    commercial: bool = False
    deny: list[str] = Field(default_factory=list)
    require_known: bool = False


class PolicyModel(_Strict):
    version: int = Field(POLICY_VERSION, strict=True, ge=1)  # an integer as written: not "1", not true
    licences: Optional[LicencePolicy] = None
    default: Literal["allow", "deny"] = "allow"
    roles: dict[str, list[str]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "PolicyModel":
        if self.version > POLICY_VERSION:
            raise ValueError(f"this fmhub reads policy version {POLICY_VERSION} and older; upgrade fmhub")
        return self


@dataclass(frozen=True)
class Verdict:
    """What the policy says about one request: ``allow``/``deny``, the deciding rule's line (None: the default)."""

    effect: str
    line: Optional[int]
    placeholder: bool = False
    roles_needed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    model: PolicyModel
    path: str
    lines: dict

    def where(self, line: Optional[int]) -> str:
        return at_line(self.path, line)

    def roles_of(self, principal: Optional[str]) -> frozenset[str]:
        """The roles ``principal`` holds (directly, by a glob like ``*@example.com``, or through ``@role``); none when unknown."""
        if not principal:
            return frozenset()
        memo = self._roles_memo
        held = memo.get(principal)
        if held is None:
            if len(memo) >= 1024:  # a server sees many users: keep the memo small
                memo.clear()
            held = memo[principal] = self._roles(principal)
        return held

    def _roles(self, principal: str) -> frozenset[str]:
        held = {role for role, members in self.model.roles.items()
                if any(not m.startswith("@") and fnmatch.fnmatchcase(principal, m) for m in members)}
        todo = list(held)
        while todo:  # once per role held: a long chain of @roles costs its length, not its square
            for outer in self._included_by.get(todo.pop(), ()):
                if outer not in held:
                    held.add(outer)
                    todo.append(outer)
        return frozenset(held)

    @functools.cached_property
    def _roles_memo(self) -> dict[str, frozenset[str]]:
        """principal -> roles: every tensor of a checkout asks again, and each ask globs every member."""
        return {}

    @functools.cached_property
    def _included_by(self) -> dict[str, list[str]]:
        """role -> the roles listing it as ``@role`` (whoever holds it holds them)."""
        out: dict[str, list[str]] = {}
        for role, members in self.model.roles.items():
            for m in members:
                if m.startswith("@"):
                    out.setdefault(m[1:], []).append(role)
        return out

    def _matches(self, rule: Rule, roles: frozenset[str], action: str, path: Optional[str], tensor: Optional[str],
                 column: Optional[str]) -> bool:
        if action not in rule.actions or rule.rows is not None:  # row rules govern rows (`row_filter`), never whole files
            return False
        if rule.roles is not None and not roles.intersection(rule.roles):
            return False
        if rule.paths is not None and (path is None or not any(fnmatch.fnmatchcase(path, g) for g in rule.paths)):
            # no path (a server's new object, not yet pushed under one): only rules over every path apply
            if not (path is None and any(g in ("*", "**") for g in rule.paths)):
                return False
        if rule.tensors is not None and (tensor is None or not any(fnmatch.fnmatchcase(tensor, g) for g in rule.tensors)):
            return False
        if rule.columns is not None and (column is None or column not in rule.columns):
            return False
        return True

    def decide_one(self, principal: Optional[str], action: str, path: Optional[str], tensor: Optional[str] = None,
                   column: Optional[str] = None) -> Verdict:
        roles = self.roles_of(principal)
        for i, rule in enumerate(self.model.rules):
            if self._matches(rule, roles, action, path, tensor, column):
                line = self.lines.get(("rules", i))
                if rule.effect == "allow":
                    return Verdict("allow", line)
                return Verdict("deny", line, rule.placeholder, self._roles_allowing(action, path, tensor, column))
        if self.model.default == "allow":
            return Verdict("allow", None)
        return Verdict("deny", self.lines.get(("default",)), False, self._roles_allowing(action, path, tensor, column))

    def _roles_allowing(self, action: str, path: Optional[str], tensor: Optional[str], column: Optional[str]) -> tuple[str, ...]:
        """Roles named by an allow rule for this request (what to ask for); role names only, never members."""
        everyone = frozenset(self.model.roles)
        for rule in self.model.rules:
            if rule.effect == "allow" and rule.roles and self._matches(rule, everyone, action, path, tensor, column):
                return tuple(rule.roles)
        return ()

    def reads_everything(self, principal: Optional[str]) -> bool:
        """Whether ``principal`` may read every path, tensor and column (a repository-wide reader).

        The first rule that could apply to one of the principal's reads
        decides: an allow over everything (no paths, tensors, columns, rows)
        says yes, any deny that could match says no; with none, the default.
        """
        roles = self.roles_of(principal)
        for rule in self.model.rules:
            if "read" not in rule.actions or (rule.roles is not None and not roles.intersection(rule.roles)):
                continue
            if rule.effect == "deny":
                return False
            if rule.paths is None and rule.tensors is None and rule.columns is None and rule.rows is None:
                return True
        return self.model.default == "allow"

    def row_filter(self, principal: Optional[str], path: Optional[str]) -> Optional[Callable[[dict], bool]]:
        """Which rows of ``path`` may ``principal`` read: a predicate (True: readable), None when no row rule could deny one.

        Row rules (those with ``rows:``) are tried in order, the first whose
        roles, paths and row values match decides; a row no row rule matches
        is governed by the file's verdict (already checked).
        """
        roles = self.roles_of(principal)
        tests: list[tuple[str, frozenset, bool]] = []
        allowed_before: dict[str, set] = {}
        for rule in self.model.rules:
            if rule.rows is None or "read" not in rule.actions or rule.tensors is not None or rule.columns is not None:
                continue
            if rule.roles is not None and not roles.intersection(rule.roles):
                continue
            if rule.paths is not None and (path is None or not any(fnmatch.fnmatchcase(path, g) for g in rule.paths)):
                continue
            values = frozenset(_hashable(v) for v in rule.rows.values)
            if rule.effect == "allow":
                allowed_before.setdefault(rule.rows.column, set()).update(values)
            else:  # values an earlier allow already let through never reach this deny
                values = values - allowed_before.get(rule.rows.column, set())
                if not values:
                    continue
            tests.append((rule.rows.column, values, rule.effect == "allow"))
        if not any(not allowed for _c, _v, allowed in tests):
            return None  # nothing here withholds a row: the normal path costs nothing

        def readable(row: dict) -> bool:
            for column, values, allowed in tests:
                if _hashable(row.get(column)) in values:
                    return allowed
            return True

        return readable

    def columns_for(self, path: Optional[str]) -> list[str]:
        """Columns named by rules that apply to ``path``: a whole data file holds all of them."""
        out: list[str] = []
        for rule in self.model.rules:
            if rule.columns and (rule.paths is None or (path is not None and any(fnmatch.fnmatchcase(path, g) for g in rule.paths))):
                out.extend(c for c in rule.columns if c not in out)
        return out

    def decide(self, principal: Optional[str], action: str, path: Optional[str], tensor: Optional[str] = None,
               column: Optional[str] = None) -> tuple[Verdict, Optional[str]]:
        """The verdict for a request, and the column that decided it when a whole data file was asked for.

        A request without a column reads every column of the file: it is
        denied when the file as such, or any column a rule names for it, is.
        """
        first = self.decide_one(principal, action, path, tensor, column)
        if first.effect == "deny" or column is not None or tensor is not None:
            return first, column
        for col in self.columns_for(path):
            v = self.decide_one(principal, action, path, None, col)
            if v.effect == "deny":
                return v, col
        return first, None


def _hashable(value: Any) -> Any:
    # True == 1 in a set: keep a tagged `true` from matching a row's 1 (and lists/dicts from raising)
    return (type(value).__name__, value) if isinstance(value, (str, int, float, bool, type(None))) else ("other", repr(value))


def parse_policy(text: str, path: str = POLICY_FILE) -> Policy:
    """Parse and validate policy text; `PolicyError` naming ``file:line`` on any problem, within the bounds above.

    The message is one line: a key or value quoted in it has its control characters escaped, and it is cut at 1,000 characters.
    """
    try:
        return _parse_policy(text, path)
    except PolicyError as exc:
        raise PolicyError(one_line(str(exc))) from None
    except Exception as exc:  # fail closed, in one line, on anything the checks above did not foresee
        raise PolicyError(f"{path}: cannot be read as a policy ({type(exc).__name__})") from None


def _parse_policy(text: str, path: str) -> Policy:
    model, lines = validate_yaml(text, path, PolicyModel, PolicyError, "a policy is a mapping (version, default, roles, rules)",
                                 POLICY_LIMITS)
    for i, rule in enumerate(model.rules):
        for role in rule.roles or []:
            if role not in model.roles:
                raise PolicyError(f"{at_line(path, lines.get(('rules', i, 'roles')))}: rules[{i}].roles: unknown role {role!r} (declare it under `roles:`)")
    for role, members in model.roles.items():
        for m in members:
            if m.startswith("@") and m[1:] not in model.roles:
                raise PolicyError(f"{at_line(path, lines.get(('roles', role)))}: roles.{role}: unknown role {m!r}")
    return Policy(model, path, lines)


def parse_policy_bytes(data: bytes, path: str = POLICY_FILE) -> Union[Policy, PolicyError]:
    """The policy in a file's bytes, or the `PolicyError` saying why not (returned, not raised: callers fail closed).

    Cached by content: the filter process, the CLI and the server ask for the
    same few policy files many times (an oversized file is refused before it is kept).
    """
    if len(data) > MAX_POLICY_BYTES:
        return PolicyError(f"{path}: {len(data)} bytes, more than a policy may hold ({MAX_POLICY_BYTES})")
    return _parse_policy_bytes(bytes(data), path)


@functools.lru_cache(maxsize=64)
def _parse_policy_bytes(data: bytes, path: str) -> Union[Policy, PolicyError]:
    try:
        return parse_policy(data.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        return PolicyError(f"{path}: not UTF-8 text (byte {exc.start})")
    except PolicyError as exc:
        return exc
