"""The audit log: every filter run, push, fetch, merge, pipeline run and access decision, hash-chained.

One JSON object per line (JSON Lines) at ``<git common dir>/fmhub/audit.log``
(``git config fmhub.audit.path`` moves it). Each entry holds the hash of the
one before it, so editing, inserting, removing or reordering an entry breaks
the chain where it happened, and `fmhub.governance.audit_verify.verify` names
that line (`fmhub.governance.audit_query.query` reads it). The format and what
it does and does not protect against: docs/audit.md.

Appends are safe with concurrent writers (git's filter process and the CLI
often run at once): an exclusive ``flock`` on the log, the tail read to find
the previous entry, one write, fdatasync, unlock. Only the tail is read, so an
append costs the same on a log of any length.

`record` is what the rest of fmhub calls. It never raises and prints nothing
on success: a log that cannot be written costs one warning on stderr per
process, never the operation it was recording.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections import namedtuple

from fmhub.base import boundedjson
from fmhub.base.errors import FmhubError, MergeConflict

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Any, Iterator, Mapping, Optional


# datetime, hmac, fnmatch and urllib are imported where used: `record` runs in git's filter
# process, once per git command, and needs none of them.

VERSION = 1
ZERO = "0" * 64
KEYED = "hmac-sha256"  # the "alg" of entries hashed with FMHUB_AUDIT_KEY; absent means plain sha256
KEY_ENV = "FMHUB_AUDIT_KEY"
USER_ENV = "FMHUB_USER"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

# Longest line read, in bytes without its newline. Entries are a few hundred bytes; a longer line is
# unreadable (verify names it) and is never read whole: a multi-GB line without a newline costs one buffer.
MAX_LINE = 1 << 20
MAX_TEXT = 4096  # who, what, target and decision are cut to this many characters (a path is at most 4096 bytes)
_CHUNK = 1 << 16  # read back from the end of the log in steps of at most this

FIELDS = {"v": int, "seq": int, "time": str, "who": str, "what": str, "target": str,
           "decision": str, "details": dict, "prev": str, "hash": str}
HEX64 = re.compile(r"[0-9a-f]{64}\Z")
SEQ_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII digits: '²'.isdigit() is True, int('²') raises


class AuditError(FmhubError):
    """The audit log cannot be read as asked (a bad --since, an anchor that is not one, an unreadable file)."""


# -- the format -------------------------------------------------------------------


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry is hashed (and stored) as: sorted keys, no spaces, UTF-8."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any], key: Optional[bytes] = None) -> str:
    """The "hash" of an entry: sha256 (or HMAC-SHA256 with ``key``) of its canonical bytes without "hash"."""
    body = canonical({k: v for k, v in entry.items() if k != "hash"})
    if key is not None:
        import hmac

        return hmac.new(key, body, hashlib.sha256).hexdigest()
    return hashlib.sha256(body).hexdigest()


def env_key() -> Optional[bytes]:
    value = os.environ.get(KEY_ENV)
    return value.encode("utf-8") if value else None


def now_text() -> str:
    """The time as `TIME_FORMAT` gives it (UTC, microseconds), without importing datetime."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + ".%06dZ" % (ns // 1000 % 1_000_000)


def _plain(details: Optional[Mapping[str, Any]]) -> dict:
    """Details as the JSON values they will read back as, so the hash survives a round trip.

    Tuples become lists and other objects str; NaN and infinities their names (the reader
    refuses them as numbers); a lone surrogate (a path that is not UTF-8) ``?`` (UTF-8 cannot hold it).
    """
    text = json.dumps(dict(details or {}), default=str, ensure_ascii=False)
    return json.loads(text.encode("utf-8", "replace"), parse_constant=str)


def _text(value: object) -> str:
    """A string field as the log holds it: UTF-8 encodable, at most `MAX_TEXT` characters."""
    return str(value)[:MAX_TEXT].encode("utf-8", "replace").decode("utf-8")


def _readable(line: bytes) -> bool:
    """Whether `verify` can read ``line`` back (within `MAX_LINE` and `boundedjson`'s bounds)."""
    if len(line) > MAX_LINE:
        return False
    try:
        boundedjson.loads(line)
    except ValueError:
        return False
    return True


# -- appending ----------------------------------------------------------------------


class AuditLog:
    """One log file; `append` adds an entry under an exclusive lock."""

    def __init__(self, path: str, key: Optional[bytes] = None) -> None:
        self.path = path
        self.key = key

    def append(self, what: str, target: str, decision: str, details: Optional[Mapping[str, Any]] = None,
               who: Optional[str] = None, sync: bool = True) -> dict:
        """Append one entry and return it; raises OSError when the log cannot be written.

        ``sync=False`` leaves the entry in the page cache (a crash of the
        process loses nothing; one of the machine may lose it) for hot paths
        that must not wait for the disk under the lock; the next synced
        append makes it durable with everything before it.
        """
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            size = os.fstat(fd).st_size
            last, torn = _tail(fd, size)
            seq, prev = _link(fd, last)
            out = []
            if torn:
                # a writer died mid-line (or someone cut the file): drop the fragment, and say so in the chain
                os.ftruncate(fd, size - torn)
                repair = self._entry(seq + 1, prev, "audit", os.path.basename(self.path), "error",
                                     {"repaired": "incomplete last line removed", "bytes": torn}, who)
                out.append(repair)
                seq, prev = repair["seq"], repair["hash"]
            entry = self._entry(seq + 1, prev, what, target, decision, details, who)
            out.append(entry)
            data = b"".join(canonical(e) + b"\n" for e in out)
            while data:
                data = data[os.write(fd, data):]
            if sync:
                getattr(os, "fdatasync", os.fsync)(fd)
        finally:
            os.close(fd)
        return entry

    def _entry(self, seq: int, prev: str, what: str, target: str, decision: str,
               details: Optional[Mapping[str, Any]], who: Optional[str]) -> dict:
        entry = {"v": VERSION, "seq": seq, "time": now_text(), "who": _text(who if who is not None else identity()),
                 "what": _text(what), "target": _text(target), "decision": _text(decision),
                 "details": _plain(details), "prev": prev}
        if self.key is not None:
            entry["alg"] = KEYED
        entry["hash"] = entry_hash(entry, self.key)
        line = canonical(entry)
        if not _readable(line):
            # never write a line the reader refuses (too long, too deep, a huge integer): keep the entry, not its details
            entry["details"] = {"omitted": "the details exceed the audit log's bounds", "bytes": len(line)}
            entry["hash"] = entry_hash(entry, self.key)
        return entry


def _tail(fd: int, size: int) -> tuple[Optional[tuple[int, int]], int]:
    """((start, end) of the last complete line without its newline, or None; bytes after it that no newline ends).

    Read back from the end in bounded steps: a line of any length costs one buffer of memory.
    """
    end = _after_newline(fd, size)  # where the torn fragment, if any, begins
    if end == 0:
        return None, size
    return (_after_newline(fd, end - 1), end - 1), size - end


def _after_newline(fd: int, end: int) -> int:
    """The offset just past the last newline before ``end`` (0 when there is none)."""
    window, pos = 4096, end
    while pos > 0:
        start = max(0, pos - window)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i != -1:
            return start + i + 1
        pos, window = start, min(window * 4, _CHUNK)
    return 0


def _link(fd: int, last: Optional[tuple[int, int]]) -> tuple[int, str]:
    """(seq, hash) of the entry the next one chains to; never raises on what the line holds.

    A last line that is not a readable entry (malformed, over `MAX_LINE`, nested too deep)
    is chained to by the sha256 of its bytes, with seq 0: `verify` still fails at that
    line, and recording goes on rather than stopping every later write.
    """
    if last is None:
        return 0, ZERO
    start, end = last
    if end - start <= MAX_LINE:
        try:
            entry = boundedjson.loads(os.pread(fd, end - start, start))
            seq, h = entry["seq"], entry["hash"]
            if type(seq) is int and 0 <= seq < 1 << 63 and isinstance(h, str) and HEX64.match(h):
                return seq, h
        except (ValueError, TypeError, KeyError):  # JSONLimitError is a ValueError; a list or str entry a TypeError
            pass
    _warn_once("the last entry of the audit log is unreadable; run `fmhub audit verify`", "damaged")
    return 0, _sha256_range(fd, start, end)


def _sha256_range(fd: int, start: int, end: int) -> str:
    h = hashlib.sha256()
    while start < end:
        chunk = os.pread(fd, min(_CHUNK, end - start), start)
        if not chunk:
            break
        h.update(chunk)
        start += len(chunk)
    return h.hexdigest()


# -- the repository's log ----------------------------------------------------------


class _Settings(namedtuple("_Settings", "path enabled who")):
    """Where this repository's audit log is (or would be), whether it is on, and who is acting."""

    __slots__ = ()


_settings_cache: dict[str, Optional[_Settings]] = {}
_warned: set[str] = set()  # kinds of warning already given: one of each per process


def _false(value: str) -> bool:
    return value.strip().lower() in ("false", "no", "off", "0")


def _settings(cwd: Optional[str] = None) -> Optional[_Settings]:
    """The repository's log path, whether recording is on, and who we are; None outside a repository. Cached per process and directory."""
    where = os.path.abspath(cwd or os.getcwd())
    if where in _settings_cache:
        return _settings_cache[where]
    from fmhub.core.repo import common_dir, config_values

    try:
        gitdir = common_dir(where)
    except FmhubError:
        _settings_cache[where] = None
        return None
    # one read for everything: this runs in every filter process (from the process's config listing there)
    config = {k.lower(): v for k, v in config_values(r"^(fmhub\.audit(\.path)?|filter\.fmhub\.process|user\.(email|name))$", where).items()}
    path = config.get("fmhub.audit.path") or os.path.join("fmhub", "audit.log")
    path = os.path.join(gitdir, os.path.expanduser(path))
    switch = config.get("fmhub.audit")
    # on by default wherever fmhub is installed (its filter configured), off elsewhere unless asked for
    enabled = (not _false(switch)) if switch is not None else "filter.fmhub.process" in config
    who = os.environ.get(USER_ENV) or config.get("user.email") or config.get("user.name") or _os_user()
    settings = _Settings(path, enabled, who)
    _settings_cache[where] = settings
    return settings


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name and no USER variable (a bare container)
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def identity(cwd: Optional[str] = None) -> str:
    """Who is acting: ``FMHUB_USER``, else ``git config user.email``, else ``user.name``, else the OS user."""
    override = os.environ.get(USER_ENV)
    if override:
        return override
    settings = _settings(cwd)
    return settings.who if settings is not None else _os_user()


def log_path(cwd: Optional[str] = None) -> str:
    """Where this repository's audit log is (whether or not recording is on)."""
    settings = _settings(cwd)
    if settings is None:
        raise AuditError("not inside a git repository; run this in one, or give --path")
    return settings.path


def _warn_once(message: str, kind: str = "write") -> None:
    """Warn on stderr once per process for each ``kind`` (a damaged tail does not hide a later failure to write)."""
    if kind not in _warned:
        _warned.add(kind)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"fmhub: warning: {message}\n")
            sys.stderr.flush()


def record(what: str, target: str, decision: str, details: Optional[Mapping[str, Any]] = None,
           cwd: Optional[str] = None) -> Optional[dict]:
    """Append an entry to the repository's audit log when recording is on; the entry, or None.

    Never raises and prints nothing on success: when the log cannot be
    written, warns once per process on stderr and lets the caller go on.
    """
    settings = None
    try:
        settings = _settings(cwd)
        if settings is None or not settings.enabled:
            return None
        who = os.environ.get(USER_ENV) or settings.who
        return AuditLog(settings.path, env_key()).append(what, target, decision, details, who=who)
    except Exception as exc:
        where = settings.path if settings is not None else "the audit log"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _warn_once(f"cannot write the audit log {where} ({reason}); going on without it")
        return None


def enabled(cwd: Optional[str] = None) -> bool:
    """Whether `record` writes anything here (so callers can skip work that only the log needs)."""
    try:
        settings = _settings(cwd)
    except Exception:
        return False
    return settings is not None and settings.enabled


def pipeline_run(what: str, name: str, src: str, dst: str, counts: Mapping[str, Any], cwd: Optional[str] = None) -> Optional[dict]:
    """Record a finished data pipeline run: its input and output (paths and sha256) and its counts.

    The files are hashed only when recording is on: that is a full read of each.
    """
    if not enabled(cwd):
        return None
    details = {"input": src, "input_sha256": file_sha256(src), "output": dst, "output_sha256": file_sha256(dst), **counts}
    return record(what, name, "ok", details, cwd)


def failure(exc: BaseException) -> dict:
    """Details for an operation that failed: the error's kind and its first line."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    out: dict[str, Any] = {"error": type(exc).__name__, "message": message[:500]}
    if isinstance(exc, MergeConflict):
        out["conflicts"] = getattr(exc, "conflicts", 1)
    return out


@contextlib.contextmanager
def operation(what: str, target: str, details: Optional[Mapping[str, Any]] = None,
              cwd: Optional[str] = None) -> Iterator[dict]:
    """Record the block as one entry: "ok" with the details the block adds to the yielded dict, else "error"/"conflict"."""
    facts = dict(details or {})
    try:
        yield facts
    except BaseException as exc:
        decision = "conflict" if isinstance(exc, MergeConflict) else "error"
        record(what, target, decision, {**facts, **failure(exc)}, cwd)
        raise
    record(what, target, "ok", facts, cwd)


def redact_url(url: str) -> str:
    """A URL without user name and password: credentials never go into the log."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def file_sha256(path: str) -> Optional[str]:
    """sha256 of a file, for pipeline entries; None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def manifest_facts(data: bytes) -> dict:
    """What a clean or smudge entry says of a file: its format and size, and the git blob id of what git stores.

    Read from the manifest's first lines only: this runs once per file in the filter process.
    """
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    from fmhub.core.manifest import is_manifest

    if not is_manifest(data):
        return {"format": "raw", "size": len(data), "blob": blob}
    facts: dict[str, Any] = {"blob": blob}
    for line in data[:4096].split(b"\n")[1:6]:
        key, _, value = line.decode("utf-8", "replace").partition(" ")
        if key == "format":
            facts["format"] = value
        elif key == "size" and SEQ_DIGITS.fullmatch(value):  # ASCII digits: '²'.isdigit() is True, int('²') raises
            facts["size"] = int(value)
        elif key == "sha256":
            facts["sha256"] = value
    return facts
