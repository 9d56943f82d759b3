"""Access policies end to end: real git, the smudge filter, `fmhub clean` and `fmhub label` (the server side: tests/git/test_server*.py).

Who is who: alice@example.com holds role ``ml-core``; bob@example.com holds
none; a user git knows nothing about holds none either. The policy lives in
``.fmhub/policy.yaml`` (docs/policy.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import BENCHMARKS, fmhub, git, isolate_git, save_tensors, sha256_file
from tests.helpers.policy import ALICE, BOB, POLICY, ROW_RULES, SECRET_ROW, SECRET_VALUE, add_file, audit_entries

from fmhub.plugin.interfaces import AccessRequest
from fmhub.core.manifest import Manifest
from fmhub.governance.policy import PolicyError, parse_policy


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Each seed gives other shapes, so no two files share a header object (a shared object is as open as its most open file)."""
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(16, 8 + seed, generator=g), "lm_head.weight": torch.full((8, 8), SECRET_VALUE)}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Built once per module (git and fmhub runs cost seconds), with conftest's isolated git environment."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(mp, home)
        mp.setenv("FMHUB_USER", ALICE)  # who may write secret/
        repo = tmp_path_factory.mktemp("template") / "repo"
        repo.mkdir()
        git(repo, "init", "-q")
        fmhub(repo, "install")
        fmhub(repo, "track", "*.safetensors")
        build_guarded(repo)
    return repo


@pytest.fixture
def guarded(template: Path, tmp_path) -> Path:
    """A repo with fmhub, a policy, a restricted checkpoint, a checkpoint with a placeholder tensor, a dataset."""
    dest = tmp_path / "repo"
    shutil.copytree(template, dest, symlinks=True)
    return dest


def build_guarded(repo: Path) -> Path:
    fmhub(repo, "track", "*.jsonl")
    git(repo, "add", ".gitattributes")
    add_file(repo, ".fmhub/policy.yaml", POLICY.encode())
    add_file(repo, "secret/w.safetensors", ts=tensors(1))
    add_file(repo, "public/model.safetensors", ts=tensors(2))
    add_file(repo, "public/open.safetensors", ts={"x": torch.ones(4)})
    rows = [{"text": f"row {i} is fine", "email": SECRET_ROW if i == 3 else f"u{i}@x.example"} for i in range(20)]
    add_file(repo, "data/users.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    git(repo, "commit", "-qm", "guarded files")
    return repo


def checkout(repo: Path, path: str, user: str | None, monkeypatch, check: bool = False):
    """Remove ``path`` and check it out again as ``user`` (None: no identity at all)."""
    (repo / path).unlink(missing_ok=True)
    if user is None:
        monkeypatch.delenv("FMHUB_USER", raising=False)
        git(repo, "config", "--unset", "user.email", check=False)
    else:
        monkeypatch.setenv("FMHUB_USER", user)
    return git(repo, "checkout", "HEAD", "--", path, check=check)


# -- (i) smudge -------------------------------------------------------------------------------


def test_smudge_denies_restricted_checkpoint_and_records_it(guarded, monkeypatch):
    want = sha256_file(guarded / "secret/w.safetensors")
    proc = checkout(guarded, "secret/w.safetensors", BOB, monkeypatch)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "access denied: bob@example.com may not read secret/w.safetensors" in err
    assert ".fmhub/policy.yaml:8" in err and "'ml-core'" in err and "not checked out" in err
    f = guarded / "secret/w.safetensors"
    assert not f.exists() or f.stat().st_size == 0  # nothing materialized
    # (v) nothing restricted in the message: no other user, no tensor values
    assert ALICE not in err and str(SECRET_VALUE) not in err and "1234" not in err
    denies = [e for e in audit_entries(guarded) if e["what"] == "access" and e["decision"] == "deny"]
    assert denies and denies[-1]["target"] == "secret/w.safetensors" and denies[-1]["details"]["user"] == BOB

    # alice holds the role: exact bytes
    proc = checkout(guarded, "secret/w.safetensors", ALICE, monkeypatch, check=True)
    assert sha256_file(guarded / "secret/w.safetensors") == want


def test_placeholder_rule_writes_the_manifest_text(guarded, monkeypatch):
    path = "public/model.safetensors"
    want = sha256_file(guarded / path)
    checkout(guarded, path, BOB, monkeypatch, check=True)
    text = (guarded / path).read_bytes()
    assert text == git(guarded, "show", f"HEAD:{path}").stdout  # the manifest: names and oids, no weights
    Manifest.from_bytes(text, path)
    assert sha256_file(guarded / "public/open.safetensors")  # untouched files still fine
    checkout(guarded, path, ALICE, monkeypatch, check=True)
    assert sha256_file(guarded / path) == want


def test_unknown_user_has_no_roles(guarded, monkeypatch):
    proc = checkout(guarded, "secret/w.safetensors", None, monkeypatch)
    assert proc.returncode != 0
    assert "an unknown user (set FMHUB_USER" in proc.stderr.decode()
    checkout(guarded, "public/open.safetensors", None, monkeypatch, check=True)  # ungoverned files: allowed


def test_write_rules_refuse_git_add(guarded, monkeypatch):
    monkeypatch.setenv("FMHUB_USER", BOB)
    save_tensors(guarded / "secret/w.safetensors", tensors(5))
    proc = git(guarded, "add", "secret/w.safetensors", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "access denied: bob@example.com may not write tensor 'lm_head.weight' of secret/w.safetensors" in err
    assert "git add refused" in err and ALICE not in err
    monkeypatch.setenv("FMHUB_USER", ALICE)
    git(guarded, "add", "secret/w.safetensors")


# -- (ii) datasets: smudge and pipelines -----------------------------------------------------------


def test_restricted_column_blocks_dataset_smudge_and_clean(guarded, monkeypatch):
    proc = checkout(guarded, "data/users.jsonl", BOB, monkeypatch)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "the file holds column 'email'" in err and SECRET_ROW not in err
    checkout(guarded, "data/users.jsonl", ALICE, monkeypatch, check=True)
    (guarded / "fmhub.yaml").write_text(
        "datasets:\n  users: {path: data/users.jsonl}\n"
        "clean:\n"
        "  web:\n"
        "    input: users\n"
        "    output: out/users.clean.jsonl\n"
        "    backend: serial\n"
        "    steps:\n"
        "      - pii: {columns: [text, email]}\n"
    )
    monkeypatch.setenv("FMHUB_USER", BOB)
    proc = fmhub(guarded, "clean", "web", check=False)
    err = proc.stderr.decode() + proc.stdout.decode()
    assert proc.returncode != 0
    assert "fmhub.yaml:5: clean.web: access denied: bob@example.com may not read column 'email' of data/users.jsonl" in err
    assert "no row was read" in err and SECRET_ROW not in err and ALICE not in err
    assert not (guarded / "out").exists()
    # a pipeline that names only 'text' still copies whole rows: refused too
    (guarded / "fmhub.yaml").write_text((guarded / "fmhub.yaml").read_text().replace("{columns: [text, email]}", "{}"))
    proc = fmhub(guarded, "clean", "web", check=False)
    assert proc.returncode != 0 and "the rows of data/users.jsonl" in proc.stderr.decode() + proc.stdout.decode()
    monkeypatch.setenv("FMHUB_USER", ALICE)
    fmhub(guarded, "clean", "web")
    assert (guarded / "out/users.clean.jsonl").exists()
    # fmhub label: the same check, before any vote
    (guarded / "fmhub.yaml").write_text(
        "label:\n  kind:\n    input: data/users.jsonl\n    output: out/l.jsonl\n    classes: [a, b]\n    column: email\n"
        "    lfs:\n      - keyword: {words: [fine], label: a}\n"
    )
    monkeypatch.setenv("FMHUB_USER", BOB)
    proc = fmhub(guarded, "label", "kind", check=False)
    err = proc.stderr.decode() + proc.stdout.decode()
    assert proc.returncode != 0 and "fmhub.yaml:3: label.kind: access denied" in err and "column 'email'" in err
    assert not (guarded / "out/l.jsonl").exists()




def test_rows_tagged_restricted_are_withheld_from_clean_and_label(guarded, monkeypatch):
    policy = guarded / ".fmhub/policy.yaml"
    policy.write_text(policy.read_text().replace("rules:\n", "rules:\n" + ROW_RULES, 1))
    rows = [{"text": f"SECRET-TICKET-{i} fine" if i % 4 == 1 else f"ticket {i} fine", "tier": "restricted" if i % 4 == 1 else "open"}
            for i in range(12)]
    (guarded / "tickets").mkdir()
    (guarded / "tickets/t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (guarded / "fmhub.yaml").write_text(
        "datasets:\n  tickets: {path: tickets/t.jsonl}\n"
        "clean:\n  web:\n    input: tickets\n    output: out/t.clean.jsonl\n    backend: serial\n    report: out/t.report.json\n"
        "    steps:\n      - pii: {}\n"
        "label:\n  kind:\n    input: tickets\n    output: out/t.labels.jsonl\n    classes: [a, b]\n    backend: serial\n"
        "    lfs:\n      - keyword: {words: [fine], label: a}\n"
    )
    monkeypatch.setenv("FMHUB_USER", BOB)
    proc = fmhub(guarded, "clean", "web")
    out = (guarded / "out/t.clean.jsonl").read_text()
    report = (guarded / "out/t.report.json").read_text()
    assert len(out.splitlines()) == 9 and "SECRET-TICKET" not in out and "restricted" not in out
    assert "SECRET-TICKET" not in report and json.loads(report)["withheld_by_policy"] == 3
    assert "3 row(s) withheld by policy" in proc.stdout.decode() + proc.stderr.decode()
    withheld = [e for e in audit_entries(guarded) if (e.get("details") or e).get("rows_withheld") or "rows_withheld" in json.dumps(e)]
    assert len(withheld) == 1 and "SECRET-TICKET" not in json.dumps(withheld)
    proc = fmhub(guarded, "label", "kind")
    labelled = (guarded / "out/t.labels.jsonl").read_text()
    assert len(labelled.splitlines()) == 9 and "SECRET-TICKET" not in labelled
    rep = json.loads((guarded / "out/t.labels.report.json").read_text())
    assert rep["withheld_by_policy"] == 3 and "SECRET-TICKET" not in json.dumps(rep)
    monkeypatch.setenv("FMHUB_USER", ALICE)  # pii-readers (through ml-core): every row
    fmhub(guarded, "clean", "web")
    assert len((guarded / "out/t.clean.jsonl").read_text().splitlines()) == 12
    assert json.loads((guarded / "out/t.report.json").read_text())["withheld_by_policy"] == 0
    fmhub(guarded, "label", "kind")
    assert len((guarded / "out/t.labels.jsonl").read_text().splitlines()) == 12
    # a checkout is unaffected: files are whole, path rules govern them
    p = parse_policy(policy.read_text())
    assert p.decide(BOB, "read", "tickets/t.jsonl")[0].effect == "allow"
    assert p.row_filter(ALICE, "tickets/t.jsonl") is None and p.row_filter(BOB, "other/t.jsonl") is None


def test_join_and_eval_pipelines_honour_the_policy(guarded, monkeypatch):
    """Monitoring pipelines read data too: restricted columns are refused before any row, tagged rows never reach an output."""
    import sys as _sys

    _sys.path.insert(0, str(BENCHMARKS))
    import slice_data as sd

    from fmhub.ml.evaluation import run_eval
    from fmhub.project.spec import load_spec

    policy = guarded / ".fmhub/policy.yaml"
    policy.write_text(policy.read_text().replace("rules:\n", "rules:\n" + ROW_RULES, 1))
    rows = [{"text": f"SECRET-TICKET-{i} acme great" if i % 4 == 1 else f"ticket {i} acme bad", "tier": "restricted" if i % 4 == 1 else "open",
             "label": "pos" if i % 4 == 1 else "neg"} for i in range(12)]
    (guarded / "tickets").mkdir()
    (guarded / "tickets/t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (guarded / "tickets/brands.csv").write_text("entity,kind\nacme,tools\n")
    sd.tiny_llama(str(guarded / "m"), hidden=32, layers=1)
    (guarded / "fmhub.yaml").write_text(
        "models:\n  m: {path: m}\n"
        "tasks:\n  t: {data: tickets/t.jsonl, metric: accuracy, classes: [neg, pos]}\n"
        "join:\n  j: {input: tickets/t.jsonl, table: tickets/brands.csv, mentions: text, output: out/j.jsonl}\n"
        "  bad: {input: data/users.jsonl, table: tickets/brands.csv, 'on': email, output: out/bad.jsonl}\n"
        "eval:\n  e: {task: t, data: tickets/t.jsonl}\n"
    )
    monkeypatch.setenv("FMHUB_USER", BOB)
    monkeypatch.chdir(guarded)
    proc = fmhub(guarded, "join", "bad", check=False)
    assert proc.returncode == 1 and "join.bad: access denied" in proc.stderr.decode() and "column 'email'" in proc.stderr.decode()
    assert not (guarded / "out/bad.jsonl").exists()
    fmhub(guarded, "join", "j")
    joined = (guarded / "out/j.jsonl").read_text()
    assert len(joined.splitlines()) == 9 and "SECRET-TICKET" not in joined and '"kind": ["tools"]' in joined
    rep = run_eval(load_spec(str(guarded / "fmhub.yaml")), "e", plots=False)
    preds = (guarded / "evals/e/predictions.jsonl").read_text()
    assert rep["rows"] == 9 and "SECRET-TICKET" not in preds
    monkeypatch.setenv("FMHUB_USER", ALICE)
    assert run_eval(load_spec(str(guarded / "fmhub.yaml")), "e", plots=False)["rows"] == 12



# -- (iv) a broken policy fails closed ---------------------------------------------------------------


def test_malformed_policy_fails_closed_with_file_and_line(guarded, monkeypatch):
    (guarded / ".fmhub/policy.yaml").write_text("version: 1\nroles:\n  ml-core: [alice@example.com\nrules: []\n")
    proc = checkout(guarded, "public/open.safetensors", ALICE, monkeypatch)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "the access policy is broken, so access is denied until it is fixed: .fmhub/policy.yaml:4: not valid YAML" in err


@pytest.mark.parametrize("text, where", [
    ("rules:\n  - allow: [read]\n    rolez: [x]\n", ".fmhub/policy.yaml:3: rules[0].rolez: unknown key"),
    ("rules:\n  - allow: [read]\n    roles: [ghosts]\n", ".fmhub/policy.yaml:3: rules[0].roles: unknown role 'ghosts'"),
    ("rules:\n  - allow: [read]\n    deny: [read]\n", ".fmhub/policy.yaml:2: rules[0]: a rule has exactly one of"),
    ("default: maybe\n", ".fmhub/policy.yaml:1: default:"),
    ("rules:\n  - allow: [delete]\n", ".fmhub/policy.yaml:2: rules[0].allow[0]:"),
    ("rules:\n  - deny: [read]\n    rows: {column: tier}\n", ".fmhub/policy.yaml:3: rules[0].rows.values:"),
])
def test_policy_errors_name_file_and_line(text, where):
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    assert str(info.value).startswith(where), str(info.value)


def test_rule_semantics():
    p = parse_policy(POLICY)
    assert p.roles_of(ALICE) == {"ml-core", "pii-readers"} and p.roles_of(BOB) == frozenset() and p.roles_of(None) == frozenset()
    assert p.decide(BOB, "read", "secret/a.safetensors")[0].effect == "deny"
    assert p.decide(ALICE, "read", "secret/a.safetensors")[0].effect == "allow"
    assert p.decide(BOB, "write", "secret/a.safetensors")[0].effect == "allow"  # read rules only
    assert p.decide(BOB, "read", "public/m.safetensors")[0].effect == "allow"
    v, _ = p.decide(BOB, "read", "public/m.safetensors", tensor="lm_head.weight")
    assert v.effect == "deny" and v.placeholder and v.roles_needed == ("ml-core",)
    assert p.decide(BOB, "read", "data/u.jsonl", column="text")[0].effect == "allow"
    assert p.decide(BOB, "read", "data/u.jsonl") == (p.decide_one(BOB, "read", "data/u.jsonl", column="email"), "email")
    strict = parse_policy("default: deny\nroles: {r: [a]}\nrules:\n  - allow: [read]\n    roles: [r]\n")
    assert strict.decide("a", "read", "x")[0].effect == "allow" and strict.decide("b", "read", "x")[0].effect == "deny"


# -- (iii) the server: tests/git/test_server.py and tests/git/test_server_attacks.py (fmhub server) --------------------------


def test_an_access_request_reads_no_file_by_default():
    assert AccessRequest(BOB, "read", "r", "p").read_file("x") is None
