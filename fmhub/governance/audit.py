"""The audit log: every filter run, push, fetch, merge, pipeline run and access decision, hash-chained.

One JSON object per line (JSON Lines) at ``<git common dir>/fmhub/audit.log``
(``git config fmhub.audit.path`` moves it). Each entry holds the hash of the
one before it, so editing, inserting, removing or reordering an entry breaks
the chain where it happened, and `verify` names that line. The format and
what it does and does not protect against: docs/audit.md.

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
from fmhub.base.errors import FmhubError, MergeConflict, printable

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from datetime import datetime
    from typing import Any, Iterator, Mapping, Optional


# datetime, hmac, fnmatch and urllib are imported where used: `record` runs in git's filter
# process, once per git command, and needs none of them.

VERSION = 1
ZERO = "0" * 64
KEYED = "hmac-sha256"  # the "alg" of entries hashed with FMHUB_AUDIT_KEY; absent means plain sha256
KEY_ENV = "FMHUB_AUDIT_KEY"
USER_ENV = "FMHUB_USER"
REF = "refs/fmhub/audit"  # where `fmhub audit anchor --save` keeps the anchor
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

# Longest line read, in bytes without its newline. Entries are a few hundred bytes; a longer line is
# unreadable (verify names it) and is never read whole: a multi-GB line without a newline costs one buffer.
MAX_LINE = 1 << 20
MAX_TEXT = 4096  # who, what, target and decision are cut to this many characters (a path is at most 4096 bytes)
_CHUNK = 1 << 16  # read back from the end of the log in steps of at most this

_FIELDS = {"v": int, "seq": int, "time": str, "who": str, "what": str, "target": str,
           "decision": str, "details": dict, "prev": str, "hash": str}
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


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


def _now() -> str:
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
        entry = {"v": VERSION, "seq": seq, "time": _now(), "who": _text(who if who is not None else identity()),
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
            if type(seq) is int and 0 <= seq < 1 << 63 and isinstance(h, str) and _HEX64.match(h):
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


# -- reading and verifying ---------------------------------------------------------


# Named tuples and plain classes, not dataclasses: git's filter imports this module on every git command.


class Problem(namedtuple("Problem", "line seq kind detail")):
    """Where the chain breaks: a line number, the entry's seq when it has one, what kind of break (malformed,
    edited, prev mismatch, seq gap, truncated, key needed, unkeyed, anchor missing) and the detail."""

    __slots__ = ()

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "anchor"
        if self.seq is not None:
            where += f" (seq {self.seq})"
        return f"{where}: {self.kind}: {self.detail}"


class VerifyResult:
    """What `verify` found: the log, how many entries (how many keyed), its head, and the first problem if any."""

    def __init__(self, path: str, entries: int = 0, head_seq: int = 0, head_hash: str = ZERO, keyed: int = 0,
                 problem: Optional[Problem] = None) -> None:
        self.path, self.entries, self.head_seq, self.head_hash, self.keyed, self.problem = path, entries, head_seq, head_hash, keyed, problem

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return "VerifyResult(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        if self.problem is not None:
            return f"audit log {self.path}: {self.problem}"
        keyed = f", {self.keyed} keyed" if self.keyed else ""
        return f"audit log {self.path}: ok, {self.entries} entries{keyed}, head seq {self.head_seq} {self.head_hash}"


def _walk(path: str, key: Optional[bytes], result: VerifyResult, plain_until: int = 0) -> Iterator[dict]:
    """Yield the entries of a valid chain, in order; at the first break, set ``result.problem`` and stop.

    With a key, every entry must be keyed, except those up to seq
    ``plain_until`` (a log begun before the key was set): otherwise a forger
    could replace the whole log by plain entries re-chained from the start.

    Messages name the line, the seq and the kind of break, never an entry's
    contents: a forged entry's text is not repeated anywhere.
    """
    prev, seq, keyed_seen = ZERO, 0, False
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AuditError(f"audit log {path}: cannot read it ({exc.strerror})") from None
    with f:
        for lineno, raw in enumerate(_lines(f, path), 1):
            def fail(kind: str, detail: str, at: Optional[int] = None) -> None:
                result.problem = Problem(lineno, at, kind, detail)

            entry, kind, why = _read_line(raw)
            if kind is not None:
                return fail(kind, why)
            bad = _shape_error(entry)
            if bad:
                at = entry.get("seq") if isinstance(entry, dict) and isinstance(entry.get("seq"), int) else None
                return fail("malformed", bad, at)
            at = entry["seq"]
            alg = entry.get("alg")
            if alg is not None and key is None:
                return fail("key needed", f"the entry is keyed ({KEYED}); set {KEY_ENV} to verify it", at)
            if not _is_canonical(entry, raw[:-1]) or entry_hash(entry, key if alg else None) != entry["hash"]:
                hint = " (or the key is wrong)" if alg else ""
                return fail("edited", f"the entry does not match its hash{hint}", at)
            if entry["prev"] != prev:
                return fail("prev mismatch", "the entry does not follow the one before it (an entry was inserted, removed or reordered)", at)
            if at != seq + 1:
                return fail("seq gap", f"expected seq {seq + 1}", at)
            if alg:
                keyed_seen = True
                result.keyed += 1
            elif key is not None and (keyed_seen or at > plain_until):
                return fail("unkeyed", "an entry without the key (written without it, or forged); a log begun before the key "
                            "was set names its last plain entry with --plain-until SEQ", at)
            prev, seq = entry["hash"], at
            result.entries, result.head_seq, result.head_hash = result.entries + 1, seq, prev
            yield entry


def _lines(f: Any, path: str) -> Iterator[bytes]:
    """The file's lines; one longer than `MAX_LINE` comes back cut there, without its newline, and ends the walk."""
    while True:
        try:
            raw = f.readline(MAX_LINE + 2)  # the line, its newline, and one byte more to tell "too long" from "cut"
        except OSError as exc:
            raise AuditError(f"audit log {path}: cannot read it ({exc.strerror})") from None
        if not raw:
            return
        yield raw
        if not raw.endswith(b"\n"):
            return


def _read_line(raw: bytes) -> tuple[Any, Optional[str], str]:
    """(the JSON value of one line, None, ""), or (None, the kind of break, why): never the line's contents."""
    complete = raw.endswith(b"\n")
    if len(raw) - complete > MAX_LINE:
        return None, "malformed", f"a line longer than {MAX_LINE} bytes (not an entry fmhub writes)"
    if not complete:
        return None, "truncated", "the last line is incomplete (a write cut short, or the file was cut)"
    try:
        return boundedjson.loads(raw[:-1]), None, ""
    except ValueError as exc:  # boundedjson.JSONLimitError: deep nesting, huge integers, NaN, not UTF-8
        return None, "malformed", f"not a JSON line ({exc})"


def _is_canonical(entry: Mapping[str, Any], body: bytes) -> bool:
    try:
        return canonical(entry) == body
    except UnicodeEncodeError:  # a lone surrogate escape (\udXXX) in a string: never written by fmhub
        return False


def _shape_error(entry: Any) -> Optional[str]:
    if not isinstance(entry, dict):
        return "not a JSON object"
    for name, typ in _FIELDS.items():
        value = entry.get(name)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            return f"field {name!r} is missing or not a {typ.__name__}"
    extra = set(entry) - set(_FIELDS) - {"alg"}
    if extra:  # names, not values, and only a few, cut short: a forged key can be any length
        names = sorted(repr(k[:40]) for k in extra)
        return f"unknown field(s) {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
    if entry["v"] != VERSION:
        return f"version {entry['v']} (this fmhub reads version {VERSION})"
    if entry.get("alg", KEYED) != KEYED:
        return f"unknown alg (want {KEYED!r} or none)"
    if not _HEX64.match(entry["prev"]) or not _HEX64.match(entry["hash"]):
        return "prev or hash is not 64 hex digits"
    return None


def verify(path: str, key: Optional[bytes] = None, anchor: Optional[str] = None, plain_until: int = 0) -> VerifyResult:
    """Walk the whole chain; ``result.problem`` names the first bad line (None: the log is intact).

    ``anchor`` (``HASH`` or ``SEQ:HASH``, from `fmhub audit anchor`) must be
    an entry of the chain: that catches a log cut short or rewritten after the
    anchor was taken, which the chain alone cannot show.
    """
    want_seq, want_hash = parse_anchor(anchor) if anchor else (None, None)
    result = VerifyResult(path)
    found = False
    for entry in _walk(path, key, result, plain_until):
        if entry["hash"] == want_hash and want_seq in (None, entry["seq"]):
            found = True
    if result.problem is None and want_hash is not None and not found:
        result.problem = Problem(None, want_seq, "anchor missing",
                                 "no entry has the anchored hash: the log was cut short or rewritten after the anchor was taken")
    return result


def parse_anchor(text: str) -> tuple[Optional[int], str]:
    """``HASH`` or ``SEQ:HASH`` -> (seq or None, hash)."""
    seq_s, _, h = text.strip().rpartition(":")
    h = h.lower()
    # ASCII digits only: str.isdigit() also takes '²', which int() then refuses with a traceback
    if not _HEX64.match(h) or (seq_s and not _SEQ.fullmatch(seq_s)):
        raise AuditError("an anchor is 64 hex digits, or SEQ:HASH, as `fmhub audit anchor` prints it")
    return (int(seq_s) if seq_s else None), h


# -- querying ---------------------------------------------------------------------

_SEQ = re.compile(r"[0-9]{1,19}")
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
    for entry in _walk(path, key, result):
        if not (_matches(who, entry["who"]) and _matches(what, entry["what"]) and _matches(target, entry["target"])):
            continue
        if lo is not None or hi is not None:
            when = _entry_time(entry)
            if when is None or (lo is not None and when < lo) or (hi is not None and when > hi):
                continue
        out.append(entry)
    return out, result


# -- anchors ---------------------------------------------------------------------


def save_anchor(result: VerifyResult, cwd: Optional[str] = None) -> str:
    """Keep ``SEQ:HASH`` of a verified log's head as a blob under `REF` (push it, or copy the line, to keep it elsewhere)."""
    import subprocess

    text = f"fmhub audit anchor {VERSION}\nseq {result.head_seq}\nhash {result.head_hash}\ntime {_now()}\n"
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], input=text, cwd=cwd, capture_output=True, text=True)
    if blob.returncode != 0:
        raise AuditError(f"could not store the anchor: {blob.stderr.strip()}")
    ref = subprocess.run(["git", "update-ref", "-m", "fmhub audit anchor", REF, blob.stdout.strip()], cwd=cwd, capture_output=True, text=True)
    if ref.returncode != 0:
        raise AuditError(f"could not update {REF}: {ref.stderr.strip()}")
    return REF


# a ref or object name (HEAD, refs/fmhub/audit, an oid, refs/fmhub/audit@{1}): never an option such as
# `--batch-all-objects`, never REV:PATH or a range, nothing a terminal would act on when it is quoted back
_REV = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+/@{}~^-]{0,254}\Z")
MAX_ANCHOR_BLOB = 4096  # a saved anchor is ~150 bytes: a bigger blob is not one, and is not read


def resolve_anchor(text: str, cwd: Optional[str] = None) -> str:
    """``HASH``, ``SEQ:HASH``, or a git ref/object holding a saved anchor (``refs/fmhub/audit``) -> ``SEQ:HASH``."""
    with contextlib.suppress(AuditError):
        parse_anchor(text)
        return text.strip()
    name = text.strip()
    blob = _anchor_blob(name, cwd) if _REV.match(name) and ".." not in name else None
    fields = dict(line.split(" ", 1) for line in (blob or b"").decode("utf-8", "replace").splitlines() if " " in line)
    anchor = f"{fields.get('seq')}:{fields.get('hash')}"
    try:
        parse_anchor(anchor)
    except AuditError:
        raise AuditError(f"--anchor {printable(text[:200])}: not an anchor: give HASH or SEQ:HASH (`fmhub audit anchor`) "
                         f"or a ref it was saved to ({REF})") from None
    return anchor


def _anchor_blob(name: str, cwd: Optional[str]) -> Optional[bytes]:
    """The blob ``name`` resolves to when it is one of at most `MAX_ANCHOR_BLOB` bytes; None otherwise (nothing more is read).

    Through ``git cat-file --batch``: the name goes in on stdin, so it is never
    taken as an option, and the size comes before the contents.
    """
    import subprocess

    try:
        proc = subprocess.Popen(["git", "cat-file", "--batch"], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    except OSError:  # no git, or no such directory
        return None
    try:
        proc.stdin.write(name.encode() + b"\n")
        proc.stdin.close()
        head = proc.stdout.readline(200).split()  # `<oid> blob <size>`, or `<name> missing`
        if len(head) != 3 or head[1] != b"blob" or not head[2].isdigit() or int(head[2]) > MAX_ANCHOR_BLOB:
            return None
        return proc.stdout.read(int(head[2]))
    except OSError:  # git quit early (not a repository)
        return None
    finally:
        proc.kill()
        proc.wait()


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
        elif key == "size" and _SEQ.fullmatch(value):  # ASCII digits: '²'.isdigit() is True, int('²') raises
            facts["size"] = int(value)
        elif key == "sha256":
            facts["sha256"] = value
    return facts
