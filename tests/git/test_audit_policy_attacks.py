"""Hostile input against the audit log and the access policy (issue 21): bounded, checked, one-line errors.

Each test feeds the input that would get past a check: a JSON line nested
100,000 deep, a line longer than any read, a "billion laughs" policy, ``1²``
where a number goes. The log must name the line and go on recording; the
policy must deny, in one line naming the file. Hypothesis then throws
arbitrary lines and documents at both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import BILLION_LAUGHS, fmhub, git, isolate_git, save_tensors

from fmhub.governance import audit
from fmhub.governance import audit_query, audit_verify
from fmhub.governance.access import MAX_READ, work_tree_reader
from fmhub.base.errors import FmhubError
from fmhub.governance.policy import MAX_POLICY_BYTES, PolicyError, parse_policy, parse_policy_bytes
from fmhub.plugin.records import AccessRequest
from plugins.policy_roles import RolePolicy

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DEEP = 100_000
HOSTILE_LINES = {
    "nested arrays": b"[" * DEEP + b"]" * DEEP,
    "unclosed arrays": b"[" * DEEP,
    "nested objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "a 5000-digit integer": b'{"seq":' + b"9" * 5000 + b"}",
    "NaN": b'{"seq":NaN}',
    "not UTF-8": b'{"who":"\xff\xfe"}',
    "superscript digit": '{"seq":1²}'.encode(),
}


def small_log(path: Path, n: int = 3) -> list[bytes]:
    log = audit.AuditLog(str(path))
    for i in range(n):
        log.append("clean", f"f{i}.safetensors", "ok", {"size": i}, who="user@example.com")
    return path.read_bytes().splitlines()


def one_line_error(proc) -> str:
    """The error of a failed command: no traceback, one line (besides the audit writer's warning, if any)."""
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("fmhub: warning:")]
    assert len(lines) == 1, err
    return lines[0]


def lone_surrogate_entry(prev: str) -> bytes:
    """A well-shaped entry whose `who` is a lone surrogate escape: json reads it, UTF-8 cannot write it back."""
    entry = {"v": 1, "seq": 4, "time": "2025-01-01T00:00:00.000000Z", "who": "\ud800", "what": "x", "target": "t",
             "decision": "ok", "details": {}, "prev": prev, "hash": "0" * 64}
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


# -- the audit log: an unreadable line is named, and never stops later writes -----------------------


@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_an_unreadable_line_is_named_and_later_writes_still_land(tmp_path, name):
    path = tmp_path / "audit.log"
    small_log(path)
    bad = HOSTILE_LINES[name]
    with open(path, "ab") as f:
        f.write(bad + b"\n")
    res = audit_verify.verify(str(path))
    assert (res.problem.line, res.problem.kind, res.entries) == (4, "malformed", 3)
    assert "\n" not in str(res)
    found, qres = audit_query.query(str(path))
    assert [e["seq"] for e in found] == [1, 2, 3] and qres.problem.line == 4

    # the next writer chains to the raw bytes of the bad line and goes on
    entry = audit.AuditLog(str(path)).append("push", "origin", "ok", who="w")
    last = path.read_bytes().splitlines()[-1]
    assert json.loads(last) == entry
    assert entry["seq"] == 1 and entry["prev"] == hashlib.sha256(bad).hexdigest()
    assert audit.AuditLog(str(path)).append("push", "origin", "ok", who="w")["prev"] == entry["hash"]
    assert audit_verify.verify(str(path)).problem.line == 4  # the break is still reported where it is


def test_a_lone_surrogate_in_an_entry_is_malformed_not_a_crash(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    with open(path, "ab") as f:
        f.write(lone_surrogate_entry(json.loads(lines[-1])["hash"]) + b"\n")
    p = audit_verify.verify(str(path)).problem
    assert (p.line, p.kind) == (4, "edited")


def test_cli_verify_and_log_name_the_nested_line_in_one_line_and_recording_goes_on(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "fmhub.audit", "true")
    path = repo / ".git" / "fmhub" / "audit.log"
    path.parent.mkdir()
    small_log(path)
    with open(path, "ab") as f:
        f.write(HOSTILE_LINES["nested arrays"] + b"\n")

    proc = fmhub(repo, "audit", "verify", check=False)
    err = one_line_error(proc)
    assert proc.returncode == 1 and "line 4: malformed: not a JSON line (nested deeper than 64 levels)" in err
    # the finding was recorded after the bad line (through audit.record, which used to give up here)
    after = path.read_bytes().splitlines()
    assert len(after) == 5 and json.loads(after[4])["what"] == "audit" and json.loads(after[4])["decision"] == "deny"

    proc = fmhub(repo, "audit", "log", "--json", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr.decode()
    assert [e["seq"] for e in json.loads(proc.stdout)] == [1, 2, 3]
    assert "line 4: malformed" in proc.stderr.decode()
    assert len(path.read_bytes().splitlines()) == 6  # and that finding too


def test_a_line_longer_than_the_limit_is_never_read_whole(tmp_path):
    path = tmp_path / "audit.log"
    small_log(path)
    huge = b'{"a":"' + b"x" * (32 << 20) + b'"}'  # 32 MiB, one line
    with open(path, "ab") as f:
        f.write(huge + b"\n")
    tracemalloc.start()
    try:
        res = audit_verify.verify(str(path))
        entry = audit.AuditLog(str(path)).append("push", "origin", "ok", who="w")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (res.problem.line, res.problem.kind) == (4, "malformed") and "longer than" in res.problem.detail
    assert peak < 8 << 20, peak  # a buffer, not the line
    assert entry["prev"] == hashlib.sha256(huge).hexdigest()
    assert json.loads(path.read_bytes().splitlines()[-1]) == entry


def test_a_long_torn_tail_is_cut_off_and_recorded(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    with open(path, "ab") as f:
        f.write(b"[" * (3 << 20))  # 3 MiB, no newline at all
    p = audit_verify.verify(str(path)).problem
    assert (p.line, p.kind) == (4, "malformed")
    audit.AuditLog(str(path)).append("push", "origin", "ok", who="w")
    res = audit_verify.verify(str(path))
    assert res.ok and res.entries == 5
    repair = json.loads(path.read_bytes().splitlines()[3])
    assert repair["details"]["bytes"] == 3 << 20 and repair["prev"] == json.loads(lines[-1])["hash"]


def test_a_log_of_only_one_long_line_without_newline(tmp_path):
    path = tmp_path / "audit.log"
    path.write_bytes(b"x" * ((1 << 20) + 10))
    assert audit_verify.verify(str(path)).problem.line == 1
    audit.AuditLog(str(path)).append("push", "origin", "ok", who="w")
    assert audit_verify.verify(str(path)).ok


def test_what_the_writer_is_given_never_makes_a_line_its_reader_refuses(tmp_path):
    path = tmp_path / "audit.log"
    log = audit.AuditLog(str(path))
    log.append("clean", "bad\udcff.safetensors", "ok", {"loss": float("nan"), "best": [float("inf")]}, who="w\udc80")
    log.append("clean", "x" * 10_000, "ok", {"huge": 10 ** 60}, who="w")
    log.append("clean", "y", "ok", {"deep": json.loads("[" * 80 + "]" * 80)}, who="w")
    log.append("clean", "z", "ok", {"blob": "b" * (2 << 20)}, who="w")
    res = audit_verify.verify(str(path))
    assert res.ok and res.entries == 4, res
    got = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert got[0]["target"] == "bad?.safetensors" and got[0]["details"] == {"loss": "NaN", "best": ["Infinity"]}
    assert len(got[1]["target"]) == audit.MAX_TEXT and "omitted" in got[1]["details"]
    assert "omitted" in got[2]["details"] and "omitted" in got[3]["details"]


def test_a_damaged_tail_warning_does_not_hide_a_later_write_failure(monkeypatch, capsys):
    monkeypatch.setattr(audit, "_warned", set())
    audit._warn_once("the last entry of the audit log is unreadable", "damaged")
    audit._warn_once("cannot write the audit log")
    audit._warn_once("cannot write the audit log")
    err = capsys.readouterr().err
    assert err.count("unreadable") == 1 and err.count("cannot write") == 1


@pytest.mark.parametrize("anchor", ["1²:" + "a" * 64, "١:" + "a" * 64, "9" * 5000 + ":" + "a" * 64])
def test_anchor_seq_takes_ascii_digits_only(anchor):
    with pytest.raises(audit.AuditError):
        audit_verify.parse_anchor(anchor)


def test_cli_verify_with_a_superscript_anchor_is_one_line(tmp_path):
    path = tmp_path / "audit.log"
    small_log(path)
    proc = fmhub(tmp_path, "audit", "verify", "--path", str(path), "--anchor", "1²:" + "a" * 64, check=False)
    assert "--anchor" in one_line_error(proc)


@pytest.mark.parametrize("text", ["٣d", "1²h", "999999999999w", "1" * 5000 + "s"])
def test_since_takes_ascii_digits_and_bounded_ages(text):
    with pytest.raises(audit.AuditError):
        audit_query.parse_time(text)


def test_manifest_facts_ignore_a_size_in_other_digits():
    from fmhub.core.manifest import MAGIC

    for size in ("1²", "٣", "9" * 5000):
        facts = audit.manifest_facts(MAGIC + f"\nformat safetensors\nsize {size}\n".encode())
        assert "size" not in facts and facts["format"] == "safetensors"


def test_audit_log_escapes_terminal_control_characters(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one row per entry, nothing folded
    path = tmp_path / "audit.log"
    audit.AuditLog(str(path)).append("clean", "evil\x1b[2J\u202e.safetensors", "ok", {"k": "\x9b31m"}, who="[bold]x\x1b]0;t\x07")
    proc = fmhub(tmp_path, "audit", "log", "--path", str(path))
    out = proc.stdout.decode()
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b" in out and "[bold]x" in out


# -- the audit log, fuzzed --------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_FIELDS = ["v", "seq", "time", "who", "what", "target", "decision", "details", "prev", "hash", "alg"]


@st.composite
def hostile_line(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "deep", "entry"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(_json), allow_nan=True).encode("utf-8", "surrogatepass")
    if kind == "deep":
        n = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * n + ("1" if opener != "[" else "") + closer * draw(st.integers(0, n))).encode()
    entry = {"v": 1, "seq": 4, "time": "t", "who": "w", "what": "x", "target": "t", "decision": "ok",
             "details": {}, "prev": "0" * 64, "hash": "0" * 64}
    entry[draw(st.sampled_from(_FIELDS))] = draw(_json)
    return json.dumps(entry, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(st.lists(hostile_line(), min_size=1, max_size=3), st.booleans())
def test_fuzz_any_lines_in_the_log(lines, newline_at_end):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.log"
        small_log(path, 2)
        with open(path, "ab") as f:
            f.write(b"\n".join(lines) + (b"\n" if newline_at_end else b""))
        for read in (lambda: audit_verify.verify(str(path)), lambda: audit_query.query(str(path))[1]):
            try:
                res = read()
            except FmhubError as exc:
                assert "\n" not in str(exc)
                continue
            assert res.entries >= 2 and "\n" not in str(res)
        entry = audit.AuditLog(str(path)).append("push", "origin", "ok", who="w")
        assert json.loads(path.read_bytes().splitlines()[-1]) == entry  # never stops a later write


# -- policies: bounded, one line naming the file, and a deny ------------------------------------------


HOSTILE_POLICIES = {
    "billion laughs": (BILLION_LAUGHS, ".fmhub/policy.yaml:3: YAML aliases"),
    "self-referencing alias": ("roles: &r {a: [*r]}\n", ".fmhub/policy.yaml:1: YAML aliases"),
    "merge key": ("base: &b {allow: [read]}\nrules:\n  - <<: *b\n", ".fmhub/policy.yaml:3: YAML merge keys"),
    "merge key without alias": ("rules:\n  - <<: {allow: [read]}\n", ".fmhub/policy.yaml:2: YAML merge keys"),
    "superscript version": ("version: 1²\n", ".fmhub/policy.yaml:1: version"),
    "arabic-indic version": ('version: "١"\n', ".fmhub/policy.yaml:1: version"),
    "quoted version": ('version: "1"\n', ".fmhub/policy.yaml:1: version"),
    "boolean version": ("version: true\n", ".fmhub/policy.yaml:1: version"),
    "nested flow": ("rules: " + "[" * DEEP + "]" * DEEP + "\n", ".fmhub/policy.yaml:1: nested deeper than 16"),
    "unclosed flow": ("[" * DEEP, ".fmhub/policy.yaml:1: nested deeper than 16"),
    "nested block": ("".join("  " * i + "- \n" for i in range(40)), ".fmhub/policy.yaml:"),
    "huge integer": ("version: " + "9" * 4000 + "\n", ".fmhub/policy.yaml:1: an integer of more than 40 digits"),
    "sexagesimal": ("rules: [{deny: [read], rows: {column: a, values: [1" + ":59" * 1000 + "]}}]\n",
                    ".fmhub/policy.yaml:1: an integer of more than 40 digits"),
    "infinite row value": ("rules: [{deny: [read], rows: {column: a, values: [.inf]}}]\n", ".fmhub/policy.yaml:1: .inf is not a finite"),
    "impossible date": ("version: 2024-13-45\n", ".fmhub/policy.yaml:1: not a valid !!timestamp value"),
    "bad binary": ("version: !!binary abc\n", ".fmhub/policy.yaml:1: not a valid !!binary value"),
    "python tag": ("version: !!python/object:os.system x\n", ".fmhub/policy.yaml:1: not a valid"),
    "complex key": ("? [a, b]\n: 1\n", ".fmhub/policy.yaml:1: a key must be a plain value"),
    "long value": ("roles: {r: [" + "x" * 5000 + "]}\n", ".fmhub/policy.yaml:1: a value of 5000 characters"),
    "many nodes": ("roles:\n  r: [" + ",".join(f"u{i}" for i in range(11_000)) + "]\n", ".fmhub/policy.yaml:2: more than 10000"),
    "control characters in a key": ('"a\\nb\\e[31m": 1\n', ".fmhub/policy.yaml:1: a\\nb\\x1b[31m: unknown key"),
    "NUL": ("version: 1\n\0", ".fmhub/policy.yaml: not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_POLICIES))
def test_a_hostile_policy_is_one_line_naming_the_file_and_denies(name):
    text, start = HOSTILE_POLICIES[name]
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message and len(message) <= 1001, message
    got = parse_policy_bytes(text.encode())
    assert isinstance(got, PolicyError) and str(got) == message
    d = RolePolicy().check(AccessRequest("alice@example.com", "read", "repo", "m.safetensors",
                                         read_file=lambda _p: text.encode()))
    assert not d.allowed and "the access policy is broken" in d.reason
    assert RolePolicy().row_filter(AccessRequest("a", "read", "repo", "d.jsonl", read_file=lambda _p: text.encode()))({}) is False


def test_an_oversized_or_non_utf8_policy_is_refused_before_parsing():
    big = b"version: 1\n" + b"#" * MAX_POLICY_BYTES
    assert "more than a policy may hold" in str(parse_policy_bytes(big))
    assert "more than a policy may hold" in str(pytest.raises(PolicyError, parse_policy, big.decode()).value)
    assert str(parse_policy_bytes(b"version: 1\n\xff")).startswith(".fmhub/policy.yaml: not UTF-8")


def test_a_legitimate_policy_still_parses_and_role_chains_are_linear():
    chain = "\n".join(f"  r{i}: ['@r{i + 1}']" for i in range(2000)) + "\n  r2000: [alice@example.com]"
    p = parse_policy(f"version: 1\nroles:\n{chain}\nrules:\n  - allow: [read]\n    roles: [r0]\n")
    assert len(p.roles_of("alice@example.com")) == 2001 and p.roles_of("bob@example.com") == frozenset()
    assert p.decide("alice@example.com", "read", "x")[0].effect == "allow"


def test_work_tree_reader_fails_closed_on_a_fifo_and_a_huge_file(tmp_path):
    (tmp_path / ".fmhub").mkdir()
    policy = tmp_path / ".fmhub" / "policy.yaml"
    os.mkfifo(policy)  # opened plainly, this would wait for a writer forever
    data = work_tree_reader(str(tmp_path))(".fmhub/policy.yaml")
    assert data.startswith(b"\0")
    policy.unlink()
    with open(policy, "wb") as f:
        f.truncate(MAX_READ + 1)  # sparse: no disk, but a read of it all would hold it all
    data = work_tree_reader(str(tmp_path))(".fmhub/policy.yaml")
    assert data.startswith(b"\0") and len(data) < 100
    d = RolePolicy().check(AccessRequest("a", "read", str(tmp_path), "m", read_file=lambda _p: data))
    assert not d.allowed


_TOKENS = ["[", "]", "{", "}", ": ", ", ", "- ", "\n", "  ", "? ", "&a ", "*a", "<<: ", "!!binary ", "!!int ", "!!float ",
           "!x ", '"', "'", "#", "version", "rules", "roles", "allow", "deny", "paths", "rows", "values", "column",
           "read", "@r", "r", "1", "1²", "٣", "0x1f", "1:2:3", "2024-13-45", ".inf", ".nan", "9" * 60, "~", "true",
           "\\", "\t", "\0", "\udcff", "é"]


@FUZZ
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join)))
def test_fuzz_any_policy_text_is_a_policy_or_one_policy_error(text):
    try:
        p = parse_policy(text)
    except PolicyError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(".fmhub/policy.yaml")
        return
    p.decide("alice@example.com", "read", "models/m.safetensors", "lm_head.weight")
    p.row_filter("alice@example.com", "d.jsonl")


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_any_policy_bytes_are_returned_not_raised(data):
    got = parse_policy_bytes(data)
    assert not isinstance(got, PolicyError) or "\n" not in str(got)


# -- a hostile policy in a real repository: checkout is refused, in one line ------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(mp, home)
        repo = tmp_path_factory.mktemp("tracked") / "repo"
        repo.mkdir()
        git(repo, "init", "-q")
        fmhub(repo, "install")
        fmhub(repo, "track", "*.safetensors")
        import torch

        save_tensors(repo / "m.safetensors", {"w": torch.ones(4)})
        git(repo, "add", ".gitattributes", "m.safetensors")
        git(repo, "commit", "-qm", "a model")
    return repo


@pytest.mark.parametrize("name", ["billion laughs", "superscript version", "nested flow"])
def test_checkout_under_a_hostile_policy_is_refused_in_one_line(tracked, tmp_path, monkeypatch, name):
    repo = tmp_path / "repo"
    shutil.copytree(tracked, repo, symlinks=True)
    (repo / ".fmhub").mkdir()
    (repo / ".fmhub" / "policy.yaml").write_text(HOSTILE_POLICIES[name][0])
    monkeypatch.setenv("FMHUB_USER", "alice@example.com")
    (repo / "m.safetensors").unlink()
    proc = git(repo, "checkout", "HEAD", "--", "m.safetensors", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    broken = [line for line in err.splitlines() if "the access policy is broken" in line]
    assert len(broken) == 1 and HOSTILE_POLICIES[name][1] in broken[0], err
    assert not (repo / "m.safetensors").exists()
