"""Verifying the audit log's hash chain, and anchors: a verified head kept elsewhere (or under `REF`), so
that a log cut short or rewritten after it was taken fails too.

The log's format and how it is written: `fmhub.governance.audit`; docs/audit.md.
"""

from __future__ import annotations

import contextlib
import re
from collections import namedtuple

from fmhub.base import boundedjson
from fmhub.base.errors import printable
from fmhub.base.gitrun import GitError, run, start
from fmhub.governance.audit import (
    FIELDS,
    HEX64,
    KEY_ENV,
    KEYED,
    MAX_LINE,
    SEQ_DIGITS,
    VERSION,
    ZERO,
    AuditError,
    canonical,
    entry_hash,
    now_text,
)

TYPE_CHECKING = False  # the names below are for annotations only
if TYPE_CHECKING:
    from typing import Any, Iterator, Mapping, Optional

REF = "refs/fmhub/audit"  # where `fmhub audit anchor --save` keeps the anchor


# Named tuples and plain classes, not dataclasses: they are cheap to define.


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


def walk(path: str, key: Optional[bytes], result: VerifyResult, plain_until: int = 0) -> Iterator[dict]:
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
    for name, typ in FIELDS.items():
        value = entry.get(name)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            return f"field {name!r} is missing or not a {typ.__name__}"
    extra = set(entry) - set(FIELDS) - {"alg"}
    if extra:  # names, not values, and only a few, cut short: a forged key can be any length
        names = sorted(repr(k[:40]) for k in extra)
        return f"unknown field(s) {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
    if entry["v"] != VERSION:
        return f"version {entry['v']} (this fmhub reads version {VERSION})"
    if entry.get("alg", KEYED) != KEYED:
        return f"unknown alg (want {KEYED!r} or none)"
    if not HEX64.match(entry["prev"]) or not HEX64.match(entry["hash"]):
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
    for entry in walk(path, key, result, plain_until):
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
    if not HEX64.match(h) or (seq_s and not SEQ_DIGITS.fullmatch(seq_s)):
        raise AuditError("an anchor is 64 hex digits, or SEQ:HASH, as `fmhub audit anchor` prints it")
    return (int(seq_s) if seq_s else None), h


# -- anchors ---------------------------------------------------------------------


def save_anchor(result: VerifyResult, cwd: Optional[str] = None) -> str:
    """Keep ``SEQ:HASH`` of a verified log's head as a blob under `REF` (push it, or copy the line, to keep it elsewhere)."""
    text = f"fmhub audit anchor {VERSION}\nseq {result.head_seq}\nhash {result.head_hash}\ntime {now_text()}\n"
    blob = run(("hash-object", "-w", "--stdin"), input=text, cwd=cwd).stdout.strip()
    run(("update-ref", "-m", "fmhub audit anchor", REF, blob), cwd=cwd)
    return REF


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
        proc = start(("cat-file", "--batch"), cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except GitError:  # no git, or no such directory
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
