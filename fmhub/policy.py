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
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fmhub.errors import FmhubError
from fmhub.spec import at_line, validate_yaml

POLICY_FILE = ".fmhub/policy.yaml"
POLICY_VERSION = 1
ACTIONS = ("read", "write")

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
    """``licences:``: what data licences models here may be trained on (fmhub.licences)."""

    commercial: bool = False
    deny: list[str] = Field(default_factory=list)
    require_known: bool = False


class PolicyModel(_Strict):
    version: int = POLICY_VERSION
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
        held: set[str] = set()
        changed = True
        while changed:
            changed = False
            for role, members in self.model.roles.items():
                if role in held:
                    continue
                for m in members:
                    if (m.startswith("@") and m[1:] in held) or (not m.startswith("@") and fnmatch.fnmatchcase(principal, m)):
                        held.add(role)
                        changed = True
                        break
        return frozenset(held)

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
    """Parse and validate policy text; `PolicyError` naming ``file:line`` on any problem."""
    model, lines = validate_yaml(text, path, PolicyModel, PolicyError, "a policy is a mapping (version, default, roles, rules)")
    for i, rule in enumerate(model.rules):
        for role in rule.roles or []:
            if role not in model.roles:
                raise PolicyError(f"{at_line(path, lines.get(('rules', i, 'roles')))}: rules[{i}].roles: unknown role {role!r} (declare it under `roles:`)")
    for role, members in model.roles.items():
        for m in members:
            if m.startswith("@") and m[1:] not in model.roles:
                raise PolicyError(f"{at_line(path, lines.get(('roles', role)))}: roles.{role}: unknown role {m!r}")
    return Policy(model, path, lines)


@functools.lru_cache(maxsize=64)
def parse_policy_bytes(data: bytes, path: str = POLICY_FILE) -> Union[Policy, PolicyError]:
    """The policy in a file's bytes, or the `PolicyError` saying why not (returned, not raised: callers fail closed).

    Cached by content: the filter process, the CLI and the server ask for the
    same few policy files many times.
    """
    try:
        return parse_policy(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        return PolicyError(f"{path}: not UTF-8 text")
    except PolicyError as exc:
        return exc
