"""The answers of a Git LFS batch API (``POST <url>/objects/batch``), parsed and checked.

A batch answer is untrusted: every field is checked for type and range, and anything off ends in one
TransferError naming it (int("lots"), [].items() and float("inf") sizes used to end in tracebacks). Spec:
https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

from fmhub.base.errors import RemoteMissingObject, TransferError
from fmhub.git.lfshttp import MESSAGE_CHARS, one_line, show

LFS_JSON = "application/vnd.git-lfs+json"
EXPIRY_MARGIN_S = 10.0  # re-ask for an href that expires sooner than this
MAX_SIZE = 1 << 63  # object sizes are below 2^63, as git-lfs's int64
MAX_HREF = 64 << 10  # pre-signed URLs run to a few KiB
MAX_HEADER = 64 << 10  # bytes of one action header's value (tokens run to a few KiB)
MAX_EXPIRES_IN = 10 * 365 * 86400.0  # an href valid longer than 10 years is as good as one that never expires

Obj = tuple[str, int]  # (oid, size)

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters (a tab is allowed)
_OID = re.compile(r"[0-9a-f]{64}")
_URL_BAD = re.compile(r"[\x00-\x20\x7f]")  # urllib3 would refuse them, or send them on as another header


@dataclass
class Action:
    """One step the server asks for: a request to ``href`` with ``header``, valid until ``expires_at``."""

    href: str
    header: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None  # a time.time() value

    def expired(self) -> bool:
        return self.expires_at is not None and time.time() > self.expires_at - EXPIRY_MARGIN_S


@dataclass
class BatchItem:
    """The server's answer for one object: its actions (none: nothing to do) or an error."""

    oid: str
    size: int
    actions: dict[str, Action] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    authenticated: bool = False


class Malformed(Exception):
    """A field of a batch answer that is not what the batch API says; the message names it."""


def malformed(url: str, reason: str) -> TransferError:
    return TransferError(f"the LFS server at {url} sent a malformed batch answer ({reason})")


def parse_batch(answer: Any, asked: Sequence[Obj], url: str) -> dict[str, BatchItem]:
    """Per-object actions and errors from a batch answer; objects it does not mention become errors.

    Only TransferError escapes, whatever JSON value ``answer`` is.
    """
    try:
        received = _parse_answer(answer, time.time(), url)
    except Malformed as exc:
        raise malformed(url, str(exc)) from None
    out = {}
    for oid, size in asked:  # the size asked about is the one verified against, whatever the server echoes
        item = received.get(oid) or BatchItem(oid, size, error={"code": 0, "message": "missing from the server's answer"})
        item.size = size
        out[oid] = item
    return out


def _parse_answer(answer: Any, now: float, url: str) -> dict[str, BatchItem]:
    if not isinstance(answer, dict):
        raise Malformed(f"{_kind(answer)}, not an object")
    transfer = _field(answer, "transfer", str, "the answer") or "basic"
    if transfer != "basic":
        raise TransferError(f"the LFS server at {url} chose the {show(transfer)} transfer; fmhub speaks only 'basic'")
    algo = _field(answer, "hash_algo", str, "the answer")
    if algo not in (None, "sha256"):
        raise TransferError(f"the LFS server at {url} names objects by {show(algo)}; fmhub speaks only sha256")
    received = {}
    for i, obj in enumerate(_field(answer, "objects", list, "the answer") or []):
        if not isinstance(obj, dict):
            raise Malformed(f"objects[{i}] is {_kind(obj)}, not an object")
        oid = obj.get("oid")
        if not isinstance(oid, str):
            raise Malformed(f"objects[{i}].oid is {_kind(oid)}, not a string")
        received[oid] = _parse_item(obj, oid, now)
    return received


def _parse_item(obj: dict[str, Any], oid: str, now: float) -> BatchItem:
    where = f"sha256:{oid}" if _OID.fullmatch(oid) else f"the object {show(oid)}"
    size = _field(obj, "size", int, where)
    if size is not None and not 0 <= size < MAX_SIZE:
        raise Malformed(f"{where}: size {show(size)} is out of range")
    actions = _field(obj, "actions", dict, where) or {}
    return BatchItem(
        oid, size or 0, {name: _parse_action(raw, f"{where} {show(name)} action", now) for name, raw in actions.items()},
        _parse_error(obj.get("error"), f"{where} error"), bool(_field(obj, "authenticated", bool, where)),
    )


def _parse_action(raw: Any, where: str, now: float) -> Action:
    if not isinstance(raw, dict):
        raise Malformed(f"{where} is {_kind(raw)}, not an object")
    return Action(_href(raw.get("href"), where), _header(raw, where), _expiry(raw, now, where))


def _href(href: Any, where: str) -> str:
    """An absolute http(s) URL that urllib3 can send as is (no spaces or control characters, a valid port)."""
    if not isinstance(href, str):
        raise Malformed(f"{where} has an href that is {_kind(href)}, not a string")
    try:
        parts = urlsplit(href)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number below 65536
    except ValueError:
        parts = None
    if (len(href) > MAX_HREF or _URL_BAD.search(href) or parts is None or parts.scheme not in ("http", "https")
            or not parts.hostname):
        raise Malformed(f"{where} has an invalid href {show(href)}")
    return href


def _header(raw: dict[str, Any], where: str) -> dict[str, str]:
    """The action's headers: names that are HTTP tokens, values without control characters (no header injection)."""
    header = _field(raw, "header", dict, where) or {}
    for name, value in header.items():
        if not isinstance(value, str):
            raise Malformed(f"{where} has header {show(name)} that is {_kind(value)}, not a string")
        if not _HEADER_NAME.fullmatch(name) or len(value) > MAX_HEADER or _HEADER_VALUE_BAD.search(value):
            raise Malformed(f"{where} has an invalid header {show(name)}")
    return dict(header)


def _expiry(action: dict[str, Any], now: float, where: str) -> float | None:
    """When the href stops working (a time.time() value), or None when the server does not say."""
    expires_in = _field(action, "expires_in", float, where)
    if expires_in is not None:
        if isinstance(expires_in, float) and not math.isfinite(expires_in):
            raise Malformed(f"{where} has expires_in {show(expires_in)}")
        if expires_in > 0:  # compared before float(): an integer of 400 digits does not fit one
            return now + float(min(expires_in, MAX_EXPIRES_IN))
    at = _field(action, "expires_at", str, where)
    if at and not at.startswith("0001-01-01"):  # Go's zero time: no expiry
        try:
            return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            return None  # RFC 3339 that Python does not parse (nanoseconds): as if the server did not say
    return None


def _parse_error(error: Any, where: str) -> dict[str, Any] | None:
    """An object's error as {"code": int | None, "message": one line}, or None when it has none."""
    if error is None:
        return None
    if not isinstance(error, dict):
        raise Malformed(f"{where} is {_kind(error)}, not an object")
    return {"code": _field(error, "code", int, where), "message": one_line(_field(error, "message", str, where) or "", MESSAGE_CHARS)}


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``obj[key]`` if it has type ``kind`` (float: any number; true/false is no number), None if absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind)) and (
        kind is bool or not isinstance(value, bool))
    if not ok:
        raise Malformed(f"{where}: {key} is {_kind(value)}, not {_kind(kind())}")
    return value


def _kind(value: Any) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    for kind, word in ((int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return word
    return type(value).__name__


def raise_item_errors(items: Iterable[BatchItem], operation: str, url: str) -> None:
    """Per-object errors as one message naming the objects (a 404 on download means the server lacks them)."""
    bad = [item for item in items if item.error is not None]
    if not bad:
        return
    first = bad[0]
    detail = f"sha256:{first.oid}: {first.error.get('message', '')} (code {first.error.get('code')})"
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    if operation == "download" and all(item.error.get("code") == 404 for item in bad):
        raise RemoteMissingObject(f"the LFS server at {url} does not have {detail}{more}; push them from a clone that has them")
    raise TransferError(f"the LFS server at {url} refused to {operation} {detail}{more}")
