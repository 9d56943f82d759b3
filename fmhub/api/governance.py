"""The governance commands: ``audit verify|log|anchor``, ``lineage``, ``unlearn`` (`fmhub.governance`), and
``plugins`` (`fmhub.plugin.host`), as functions.

A break in the audit chain that `audit_verify`, `audit_log` or `audit_anchor` finds is itself recorded in the
audit log (what ``audit``, decision ``deny``: where and what kind, never the entry), unless it only says that a key
is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from fmhub.base.errors import FmhubError

if TYPE_CHECKING:
    from fmhub.plugin.report import Description


def plugins() -> "Description":
    """Every installed plugin, what each provides, clashes, disabled plugins and failures (`fmhub.plugin.report`)."""
    from fmhub.plugin.report import describe

    return describe()


# -- the audit log ---------------------------------------------------------------------------------------------


def audit_path(path: Optional[str] = None) -> str:
    """``path``, or this repository's audit log."""
    from fmhub.governance import audit

    return path or audit.log_path()


def record_break(result: Any, command: str) -> None:
    """Record that ``command`` found the chain broken (line, seq, kind), unless the problem is only a missing key."""
    from fmhub.governance import audit

    p = result.problem
    if p is not None and p.kind != "key needed":  # not tampering; and an unkeyed entry after keyed ones would itself fail later checks
        audit.record("audit", command, "deny", {"line": p.line, "seq": p.seq, "kind": p.kind})


@dataclass
class Verified:
    """What `audit_verify` found: `fmhub.governance.audit_verify.VerifyResult`, the log's path, and whether it exists."""

    result: Any
    path: str
    exists: bool


def audit_verify(anchor: Optional[str] = None, path: Optional[str] = None, plain_until: int = 0) -> Verified:
    """Walk the whole chain of the audit log (this repository's, or ``path``): ``result.ok`` is False, and
    ``result.problem`` names the first entry edited, inserted, removed, reordered or cut. ``anchor`` (HASH, SEQ:HASH or
    a ref holding one) must still be in the log. A break is recorded."""
    from fmhub.governance import audit
    from fmhub.governance.audit_verify import resolve_anchor, verify

    log = audit_path(path)
    res = verify(log, audit.env_key(), resolve_anchor(anchor) if anchor else None, plain_until)
    if not res.ok:
        record_break(res, "verify")
    return Verified(res, log, os.path.exists(log))


def audit_log(who: Optional[str] = None, what: Optional[str] = None, since: Optional[str] = None, until: Optional[str] = None,
              target: Optional[str] = None, last: Optional[int] = None, path: Optional[str] = None) -> tuple[list[dict], Any]:
    """The entries of the audit log that match, oldest first (the ``last`` N only), and the chain's
    `fmhub.governance.audit_verify.VerifyResult`: entries past a break are not returned, and the break is recorded."""
    from fmhub.governance import audit
    from fmhub.governance.audit_query import query

    entries, res = query(audit_path(path), who, what, since, until, target, audit.env_key())
    if last is not None:
        entries = entries[-last:]
    if not res.ok:
        record_break(res, "log")
    return entries, res


class AuditBroken(FmhubError):
    """An audit command found the chain broken: ``result`` (a `fmhub.governance.audit_verify.VerifyResult`) says where."""

    def __init__(self, result: Any) -> None:
        super().__init__(str(result))
        self.result = result


def audit_anchor(save: bool = False, path: Optional[str] = None) -> tuple[Any, Optional[str]]:
    """SEQ:HASH of the verified log's head (as ``result.head_seq``, ``result.head_hash``) and, with ``save``, the ref
    it was also saved as (refs/fmhub/audit).

    :raises AuditBroken: the chain is broken (recorded); :raises AuditError: the log is empty.
    """
    from fmhub.governance import audit
    from fmhub.governance.audit_verify import save_anchor, verify

    res = verify(audit_path(path), audit.env_key())
    if not res.ok:
        record_break(res, "anchor")
        raise AuditBroken(res)
    if res.entries == 0:
        raise audit.AuditError("the audit log is empty: nothing to anchor yet")
    return res, (save_anchor(res) if save else None)


# -- lineage ---------------------------------------------------------------------------------------------------


def lineage(target: str):
    """Which datasets, models and pipeline steps produced ``target`` (PATH, or PATH@REV for the records committed
    there): `fmhub.governance.lineage.Graph`."""
    from fmhub.governance import lineage as lg

    path, _, rev = target.rpartition("@") if "@" in target else (target, "", "")
    return lg.walk(path, rev or None)


def unlearn(source: str, rev: Optional[str] = None, remove: bool = False) -> tuple[list[dict[str, Any]], Optional[str]]:
    """Every committed model version trained (directly, through a pipeline or a merge) on ``source``, and, with
    ``remove``, where ``source`` was excluded from future pipeline runs."""
    from fmhub.governance import lineage as lg

    hits = lg.trained_on(source, rev)
    return hits, (lg.exclude(source) if remove else None)
