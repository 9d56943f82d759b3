"""Reading the audit log: the entries of its intact chain that match who, what, target and a time range."""

from __future__ import annotations

import re

from fmhub.governance.audit import AuditError
from fmhub.governance.audit_verify import VerifyResult, walk

TYPE_CHECKING = False  # the names below are for annotations only
if TYPE_CHECKING:
    from datetime import datetime
    from typing import Any, Mapping, Optional


_AGE = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)\s*([smhdw])\Z")  # ASCII digits (\d also takes '٣'); 12 digits: any age a log holds


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: Optional[datetime] = None) -> datetime:
    """An ISO-8601 date or time (UTC unless it says otherwise), or an age such as ``30m``, ``2h``, ``3d``, ``1w``."""
    from datetime import datetime, timedelta, timezone

    m = _AGE.match(text.strip().lower())
    if m:
        try:
            return (now or datetime.now(timezone.utc)) - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:  # an age reaching before the year 1
            raise AuditError(f"{text!r} is further back than a time can be: give a smaller age or a date") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AuditError(f"{text!r} is not a time: give an ISO date or time (2024-05-01, 2024-05-01T12:00) or an age (30m, 2h, 3d, 1w)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _entry_time(entry: Mapping[str, Any]) -> Optional[datetime]:
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(entry["time"])
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _matches(pattern: Optional[str], value: str) -> bool:
    if pattern is None:
        return True
    import fnmatch

    return fnmatch.fnmatchcase(value, pattern)


def query(path: str, who: Optional[str] = None, what: Optional[str] = None, since: Optional[str | datetime] = None,
          until: Optional[str | datetime] = None, target: Optional[str] = None,
          key: Optional[bytes] = None) -> tuple[list[dict], VerifyResult]:
    """The entries matching every filter given (who/what/target: exact or shell patterns), oldest first.

    Only entries of the intact part of the chain are returned: the result
    says where it breaks, and nothing from there on is shown as if it were true.
    """
    lo = parse_time(since) if isinstance(since, str) else since
    hi = parse_time(until) if isinstance(until, str) else until
    result = VerifyResult(path)
    out = []
    for entry in walk(path, key, result):
        if not (_matches(who, entry["who"]) and _matches(what, entry["what"]) and _matches(target, entry["target"])):
            continue
        if lo is not None or hi is not None:
            when = _entry_time(entry)
            if when is None or (lo is not None and when < lo) or (hi is not None and when > hi):
                continue
        out.append(entry)
    return out, result
