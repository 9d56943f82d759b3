"""The audit log: real git recording filter runs, merges and pushes; tampering found and located; concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from tests.helpers import fmhub, git, save_tensors

from fmhub.governance import audit
from fmhub.governance import audit_query, audit_verify

FORGED = "mallory@evil.invalid"


def log_of(repo: Path) -> Path:
    return repo / ".git" / "fmhub" / "audit.log"


def entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def small_log(path: Path, n: int = 6, key: bytes | None = None) -> list[bytes]:
    log = audit.AuditLog(str(path), key)
    for i in range(n):
        log.append("clean", f"f{i}.safetensors", "ok", {"size": i}, who=f"user{i % 2}@example.com")
    return path.read_bytes().splitlines()


def forge(line: bytes, **changes) -> bytes:
    entry = json.loads(line)
    entry.update(changes)
    return audit.canonical(entry)


def rehash(line: bytes, prev: str, key: bytes | None = None) -> bytes:
    """What a forger who knows the format does: fix the entry's prev and hash."""
    entry = json.loads(line)
    entry["prev"] = prev
    entry.pop("alg", None)
    if key is not None:
        entry["alg"] = audit.KEYED
    entry["hash"] = audit.entry_hash(entry, key)
    return audit.canonical(entry)


# -- recording from git -----------------------------------------------------------


def test_commit_and_checkout_record_clean_and_smudge(repo, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table, unwrapped
    git(repo, "config", "user.email", "alice@example.com")
    save_tensors(repo / "model.safetensors", {"w": torch.ones(8, 8)})
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "v0")
    (repo / "model.safetensors").unlink()
    git(repo, "checkout", "--", "model.safetensors")

    log = entries(log_of(repo))
    blob = git(repo, "ls-files", "-s", "model.safetensors").stdout.split()[1].decode()
    clean = [e for e in log if e["what"] == "clean" and e["target"] == "model.safetensors"]
    smudge = [e for e in log if e["what"] == "smudge" and e["target"] == "model.safetensors"]
    assert clean and smudge
    for e in clean[:1] + smudge:
        assert e["decision"] == "ok" and e["who"] == "alice@example.com"
        assert e["details"] == {"format": "safetensors", "size": (repo / "model.safetensors").stat().st_size, "blob": blob}
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    assert log[0]["prev"] == audit.ZERO and all(b["prev"] == a["hash"] for a, b in zip(log, log[1:]))

    ok = fmhub(repo, "audit", "verify")
    assert ok.stdout.decode().startswith(f"audit log {log_of(repo)}: ok, {len(log)} entries")
    shown = json.loads(fmhub(repo, "audit", "log", "--what", "smudge", "--json").stdout)
    assert [e["seq"] for e in shown] == [e["seq"] for e in smudge]
    table = fmhub(repo, "audit", "log", "-n", "1").stdout.decode()
    assert "smudge" in table and "alice@example.com" in table

    # a smudge that fails (its objects are gone) is recorded as an error
    for obj in (repo / ".git" / "lfs" / "objects").rglob("*"):
        if obj.is_file():
            obj.unlink()
    (repo / "model.safetensors").unlink()
    assert git(repo, "checkout", "--", "model.safetensors", check=False).returncode != 0
    last = entries(log_of(repo))[-1]
    assert (last["what"], last["target"], last["decision"]) == ("smudge", "model.safetensors", "error")
    assert last["details"]["error"] == "MissingObject"


def test_merge_conflict_is_recorded_with_its_count(repo):
    save_tensors(repo / "model.safetensors", {"a": torch.zeros(4), "b": torch.zeros(4), "c": torch.zeros(4)})
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "base")
    for branch, value in (("x", 1.0), ("y", 2.0)):
        git(repo, "checkout", "-q", "-b", branch, "main")
        save_tensors(repo / "model.safetensors", {"a": torch.full((4,), value), "b": torch.full((4,), value), "c": torch.zeros(4)})
        git(repo, "commit", "-qam", branch)
    assert git(repo, "merge", "--no-edit", "x", check=False).returncode != 0
    merge = [e for e in entries(log_of(repo)) if e["what"] == "merge"]
    assert len(merge) == 1 and merge[0]["decision"] == "conflict" and merge[0]["target"] == "model.safetensors"
    assert merge[0]["details"]["conflicts"] == 2 and merge[0]["details"]["strategy"] is None
    ours = git(repo, "rev-parse", "y:model.safetensors").stdout.decode().strip()
    assert merge[0]["details"]["ours"] == ours


def test_push_records_remote_objects_and_bytes(repo, lfs_server, tmp_path):
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(repo, "remote", "add", "origin", bare.as_uri())
    git(repo, "config", "lfs.url", lfs_server.url)
    save_tensors(repo / "model.safetensors", {"w": torch.ones(64, 64), "v": torch.zeros(16)})
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "v0")
    git(repo, "push", "-q", "origin", "main")
    push = [e for e in entries(log_of(repo)) if e["what"] == "push"]
    assert len(push) == 1 and push[0]["target"] == "origin" and push[0]["decision"] == "ok"
    d = push[0]["details"]
    on_server = lfs_server.objects()
    assert d["refs"] == ["refs/heads/main"] and d["objects"] == len(on_server) == 3  # header + 2 tensors
    assert d["bytes"] == sum(on_server.values()) and d["destination"] == lfs_server.url
    fmhub(repo, "fetch")
    fetch = entries(log_of(repo))[-1]
    assert (fetch["what"], fetch["target"], fetch["decision"]) == ("fetch", "origin", "ok")
    assert fetch["details"]["revs"] == ["HEAD"] and fetch["details"]["objects"] == 0  # all local already


def test_pipeline_runs_and_fmhub_merge_are_recorded(repo, monkeypatch):
    from fmhub.data.clean import pipeline as clean
    from fmhub.data.label import pipeline as labelling
    from fmhub.models import merge
    from fmhub.project.spec import load_spec

    rows = [{"id": i, "text": t} for i, t in enumerate(["a great day", "terrible", "great great value here", "meh"])]
    (repo / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "fmhub.yaml").write_text(
        "clean:\n  short:\n    input: data.jsonl\n    output: clean.jsonl\n    steps: [{length: {min_words: 2}}]\n"
        "label:\n  mood:\n    input: data.jsonl\n    output: labelled.jsonl\n    classes: [neg, pos]\n    lfs:\n"
        "      - keyword: {words: [great], label: pos}\n      - keyword: {words: [terrible], label: neg}\n")
    loaded = load_spec(str(repo / "fmhub.yaml"))
    clean.run(loaded, backend="serial")
    labelling.run(loaded, backend="serial")
    monkeypatch.chdir(repo)
    for name, value in (("a", 1.0), ("b", 3.0)):
        save_tensors(repo / f"{name}.safetensors", {"w": torch.full((4,), value)})
    recipe = merge.Recipe.from_dict({"models": ["a.safetensors", "b.safetensors"], "strategy": "linear"}, "test")
    merge.run_recipe(recipe, str(repo / "ab.safetensors"))

    got = {e["what"]: e for e in entries(log_of(repo))}
    c = got["clean-pipeline"]
    assert (c["target"], c["decision"]) == ("short", "ok")
    assert c["details"]["input_sha256"] == audit.file_sha256(str(repo / "data.jsonl"))
    assert c["details"]["output_sha256"] == audit.file_sha256(str(repo / "clean.jsonl"))
    assert (c["details"]["rows_read"], c["details"]["rows_out"], c["details"]["dropped"]) == (4, 2, 2)
    lab = got["label-pipeline"]
    assert lab["target"] == "mood" and lab["details"]["rows"] == 4 and lab["details"]["unlabelled"] == 1
    assert lab["details"]["output_sha256"] == audit.file_sha256(str(repo / "labelled.jsonl"))
    m = got["merge"]
    assert (m["target"], m["decision"]) == (str(repo / "ab.safetensors"), "ok")
    assert m["details"]["models"] == ["a.safetensors", "b.safetensors"] and m["details"]["strategy"] == "linear"
    assert m["details"]["tensors"] == 1 and m["details"]["conflicts"] == 0

    proc = fmhub(repo, "clean", "nosuch", check=False)  # a run that stops is recorded by the CLI
    assert proc.returncode == 1
    last = entries(log_of(repo))[-1]
    assert (last["what"], last["target"], last["decision"]) == ("clean-pipeline", "nosuch", "error")
    assert audit_verify.verify(str(log_of(repo))).ok


def test_an_unwritable_log_warns_once_and_git_add_still_works(repo):
    if os.geteuid() == 0:  # root writes through chmod 000: a log path that is a directory fails for anyone
        git(repo, "config", "fmhub.audit.path", "objects")
    else:
        log_of(repo).parent.mkdir()
        log_of(repo).parent.chmod(0)
    try:
        for i in range(2):
            save_tensors(repo / f"m{i}.safetensors", {"w": torch.full((4,), float(i))})
        proc = git(repo, "add", "m0.safetensors", "m1.safetensors")
        err = proc.stderr.decode()
        assert err.count("cannot write the audit log") == 1, err
        assert "going on without it" in err
        assert len(git(repo, "ls-files", "-s").stdout.splitlines()) == 3
    finally:
        if os.geteuid() != 0:
            log_of(repo).parent.chmod(0o755)
    # opted out: nothing written, nothing said
    git(repo, "config", "--unset", "fmhub.audit.path", check=False)
    git(repo, "config", "fmhub.audit", "false")
    save_tensors(repo / "m2.safetensors", {"w": torch.ones(4)})
    assert git(repo, "add", "m2.safetensors").stderr == b""
    assert not log_of(repo).exists() or log_of(repo).stat().st_size == 0


# -- tampering --------------------------------------------------------------------


def test_intact_log_verifies(tmp_path):
    path = tmp_path / "audit.log"
    small_log(path)
    res = audit_verify.verify(str(path))
    assert res.ok and res.entries == 6 and res.head_seq == 6
    assert res.head_hash == json.loads(path.read_bytes().splitlines()[-1])["hash"]
    assert audit_verify.verify(str(tmp_path / "none.log")).ok  # nothing recorded yet


def test_an_edited_entry_is_found_and_named_without_its_contents(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    lines[2] = forge(lines[2], who=FORGED)
    write_lines(path, lines)
    res = audit_verify.verify(str(path))
    assert (res.problem.line, res.problem.seq, res.problem.kind) == (3, 3, "edited")

    proc = fmhub(tmp_path, "audit", "verify", "--path", str(path), check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 1 and "line 3 (seq 3): edited" in out
    assert FORGED not in out and "user0@example.com" not in out and "f2.safetensors" not in out


def test_a_reformatted_line_counts_as_edited(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None).encode()  # same values, other bytes
    write_lines(path, lines)
    assert audit_verify.verify(str(path)).problem.kind == "edited"


def test_a_forger_who_fixes_the_hash_is_caught_at_the_next_line(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    lines[2] = rehash(forge(lines[2], who=FORGED), json.loads(lines[1])["hash"])
    write_lines(path, lines)
    p = audit_verify.verify(str(path)).problem
    assert (p.line, p.seq, p.kind) == (4, 4, "prev mismatch")


def test_a_deleted_middle_line_is_a_prev_mismatch_at_the_next(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    write_lines(path, lines[:2] + lines[3:])
    p = audit_verify.verify(str(path)).problem
    assert (p.line, p.seq, p.kind) == (3, 4, "prev mismatch")


def test_reordered_lines_are_found(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(path, lines)
    p = audit_verify.verify(str(path)).problem
    assert (p.line, p.kind) == (3, "prev mismatch")


def test_an_inserted_forged_line_is_found(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    fake = rehash(forge(lines[1], who=FORGED, seq=3), json.loads(lines[1])["hash"])
    write_lines(path, lines[:2] + [fake] + lines[2:])
    p = audit_verify.verify(str(path)).problem
    assert (p.line, p.kind) == (4, "prev mismatch")


def test_malformed_and_truncated_lines(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    write_lines(path, lines[:3] + [b'{"not": "an entry"'] + lines[3:])
    assert (audit_verify.verify(str(path)).problem.line, audit_verify.verify(str(path)).problem.kind) == (4, "malformed")
    write_lines(path, lines[:3] + [forge(lines[3], extra=1)] + lines[4:])
    assert audit_verify.verify(str(path)).problem.kind == "malformed"

    path.write_bytes(b"".join(line + b"\n" for line in lines[:5]) + lines[5][:40])  # the last write cut short
    p = audit_verify.verify(str(path)).problem
    assert (p.line, p.kind) == (6, "truncated")
    # the next writer cuts the fragment off and says so in the chain
    audit.AuditLog(str(path)).append("clean", "x", "ok", who="w")
    after = entries(path)
    assert audit_verify.verify(str(path)).ok and len(after) == 7
    assert after[5]["what"] == "audit" and after[5]["details"]["bytes"] == 40


def test_an_anchor_catches_a_cut_or_rewritten_tail(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path, 8)
    res = audit_verify.verify(str(path))
    anchor = f"{res.head_seq}:{res.head_hash}"
    audit.AuditLog(str(path)).append("push", "origin", "ok", who="w")
    assert audit_verify.verify(str(path), anchor=anchor).ok

    write_lines(path, lines[:5])  # the tail removed: a consistent chain, but the anchor is gone
    assert audit_verify.verify(str(path)).ok
    p = audit_verify.verify(str(path), anchor=anchor).problem
    assert (p.kind, p.seq) == ("anchor missing", 8)

    # a tail rewritten with fresh hashes
    rewritten, prev = lines[:4], json.loads(lines[3])["hash"]
    for line in lines[4:]:
        rewritten.append(rehash(forge(line, who=FORGED), prev))
        prev = json.loads(rewritten[-1])["hash"]
    write_lines(path, rewritten)
    assert audit_verify.verify(str(path)).ok
    assert audit_verify.verify(str(path), anchor=anchor).problem.kind == "anchor missing"
    assert audit_verify.verify(str(tmp_path / "gone.log"), anchor=anchor).problem.kind == "anchor missing"
    with pytest.raises(audit.AuditError):
        audit_verify.verify(str(path), anchor="not-a-hash")


def test_anchor_saved_as_a_ref_in_the_repository(repo):
    save_tensors(repo / "model.safetensors", {"w": torch.ones(4)})
    git(repo, "add", "model.safetensors")
    printed = fmhub(repo, "audit", "anchor", "--save").stdout.decode().strip()
    seq, h = printed.split(":")
    assert int(seq) == entries(log_of(repo))[-1]["seq"] and len(h) == 64
    assert git(repo, "cat-file", "-t", audit_verify.REF).stdout.strip() == b"blob"
    assert fmhub(repo, "audit", "verify", "--anchor", audit_verify.REF).returncode == 0
    assert fmhub(repo, "audit", "verify", "--anchor", printed).returncode == 0
    lines = log_of(repo).read_bytes().splitlines()
    write_lines(log_of(repo), lines[:-1])
    proc = fmhub(repo, "audit", "verify", "--anchor", audit_verify.REF, check=False)
    assert proc.returncode == 1 and "anchor missing" in proc.stderr.decode()
    # the finding is itself recorded
    last = entries(log_of(repo))[-1]
    assert (last["what"], last["target"], last["decision"]) == ("audit", "verify", "deny")
    assert last["details"]["kind"] == "anchor missing"


def test_keyed_entries(tmp_path):
    key = b"s3cret"
    path = tmp_path / "audit.log"
    lines = small_log(path, 5, key)
    assert all(json.loads(line)["alg"] == audit.KEYED for line in lines)
    assert audit_verify.verify(str(path), key).ok and audit_verify.verify(str(path), key).keyed == 5
    assert audit_verify.verify(str(path)).problem.kind == "key needed"
    p = audit_verify.verify(str(path), b"wrong").problem
    assert (p.line, p.kind) == (1, "edited")
    # a forger without the key rebuilds the tail with plain hashes: a downgrade
    forged, prev = lines[:2], json.loads(lines[1])["hash"]
    for line in lines[2:]:
        forged.append(rehash(forge(line, who=FORGED), prev))
        prev = json.loads(forged[-1])["hash"]
    write_lines(path, forged)
    p = audit_verify.verify(str(path), key).problem
    assert (p.line, p.kind) == (3, "unkeyed")


# -- concurrency ------------------------------------------------------------------


def _writer(path: str, who: str, n: int) -> None:
    log = audit.AuditLog(path)
    for i in range(n):
        log.append("clean", f"{who}/{i}", "ok", {"i": i}, who=who)


def test_concurrent_appends_keep_one_valid_chain(tmp_path):
    path = str(tmp_path / "audit.log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, f"w{k}", 50)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    res = audit_verify.verify(path)
    assert res.ok and res.entries == 200
    got = entries(Path(path))
    for k in range(4):
        assert [e["details"]["i"] for e in got if e["who"] == f"w{k}"] == list(range(50))


# -- queries ----------------------------------------------------------------------


def test_query_filters_by_who_what_target_and_time(tmp_path, monkeypatch):
    path = tmp_path / "audit.log"
    now = datetime.now(timezone.utc)
    log = audit.AuditLog(str(path))
    for age, who, what, target in [(timedelta(days=3), "alice@x.org", "push", "origin"),
                                   (timedelta(hours=1), "bob@y.org", "clean", "models/a.safetensors"),
                                   (timedelta(0), "alice@x.org", "smudge", "models/b.safetensors")]:
        monkeypatch.setattr(audit, "now_text", lambda t=now - age: t.strftime(audit.TIME_FORMAT))
        log.append(what, target, "ok", who=who)

    def seqs(**kw) -> list[int]:
        found, res = audit_query.query(str(path), **kw)
        assert res.ok
        return [e["seq"] for e in found]

    assert seqs() == [1, 2, 3]
    assert seqs(who="alice@x.org") == [1, 3]
    assert seqs(who="*@y.org") == [2]
    assert seqs(what="push") == [1]
    assert seqs(target="models/*") == [2, 3]
    assert seqs(since="2h") == [2, 3]
    assert seqs(since="30m") == [3]
    assert seqs(since="2d", who="alice@x.org") == [3]
    assert seqs(since=(now - timedelta(days=4)).date().isoformat(), until="2d") == [1]
    assert seqs(until="1w") == []
    with pytest.raises(audit.AuditError, match="not a time"):
        audit_query.query(str(path), since="yesterday")

    shown = json.loads(fmhub(tmp_path, "audit", "log", "--path", str(path), "--who", "alice@x.org", "--since", "2d", "--json").stdout)
    assert [e["what"] for e in shown] == ["smudge"]


def test_query_shows_nothing_past_a_break(tmp_path):
    path = tmp_path / "audit.log"
    lines = small_log(path)
    lines[3] = forge(lines[3], who=FORGED)
    write_lines(path, lines)
    found, res = audit_query.query(str(path))
    assert [e["seq"] for e in found] == [1, 2, 3] and res.problem.line == 4
    proc = fmhub(tmp_path, "audit", "log", "--path", str(path), "--json", check=False)
    assert proc.returncode == 1 and FORGED not in proc.stdout.decode() + proc.stderr.decode()
    assert "line 4 (seq 4): edited" in proc.stderr.decode()


def test_a_key_refuses_a_log_wholly_rewritten_as_plain_entries(tmp_path):
    """Attack D: with FMHUB_AUDIT_KEY set, a forger replaces every entry by plain ones, re-chained from the first."""
    key = b"s3cret"
    path = tmp_path / "audit.log"
    lines = small_log(path, 4, key)
    forged, prev = [], audit.ZERO
    for line in lines:
        forged.append(rehash(forge(line, who=FORGED), prev))
        prev = json.loads(forged[-1])["hash"]
    write_lines(path, forged)
    assert audit_verify.verify(str(path)).ok  # without the key nothing can tell
    p = audit_verify.verify(str(path), key).problem
    assert (p.line, p.kind) == (1, "unkeyed")
    # a log begun before the key was set: its plain prefix passes when named, a plain entry after it does not
    path.unlink()
    small_log(path, 2)
    log = audit.AuditLog(str(path), key)
    log.append("clean", "x", "ok")
    assert audit_verify.verify(str(path), key).problem.kind == "unkeyed"
    assert audit_verify.verify(str(path), key, plain_until=2).ok
    audit.AuditLog(str(path)).append("clean", "y", "ok")
    assert audit_verify.verify(str(path), key, plain_until=2).problem.kind == "unkeyed"
