"""Access policies end to end: real git, the smudge filter, `fmhub clean`, and a real LFS server behind `fmhub.lfs_policy`.

Who is who: alice@example.com holds role ``ml-core``; bob@example.com holds
none; a user git knows nothing about holds none either. The policy lives in
``.fmhub/policy.yaml`` (docs/policy.md).
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import fmhub, git, save_tensors, sha256_file
from lfs_server import running_lfs_server

from fmhub.interfaces import AccessRequest
from fmhub.lfs_policy import PolicyGate, Tokens, repo_of, token_of
from fmhub.manifest import Manifest
from fmhub.policy import PolicyError, parse_policy

ALICE, BOB = "alice@example.com", "bob@example.com"
SECRET_VALUE = 1234.5678  # a tensor value that must never show up in messages
SECRET_ROW = "carol@hidden.example"

POLICY = """\
version: 1
roles:
  ml-core: [alice@example.com]
  pii-readers: ["@ml-core"]
rules:
  - allow: [read]
    roles: [ml-core]
  - deny: [read]
    paths: ["secret/*"]
  - deny: [read]
    paths: ["public/*.safetensors"]
    tensors: ["lm_head.*"]
    placeholder: true
  - deny: [read]
    paths: ["data/*.jsonl"]
    columns: [email]
  - allow: [write]
    roles: [ml-core]
  - deny: [write]
    paths: ["secret/*"]
    tensors: ["lm_head.*"]
"""


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Each seed gives other shapes, so no two files share a header object (a shared object is as open as its most open file)."""
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(16, 8 + seed, generator=g), "lm_head.weight": torch.full((8, 8), SECRET_VALUE)}


def add_file(repo: Path, path: str, data: bytes | None = None, ts: dict | None = None) -> None:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    if ts is not None:
        save_tensors(repo / path, ts)
    else:
        (repo / path).write_bytes(data or b"")
    git(repo, "add", path)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Built once per module (git and fmhub runs cost seconds), with conftest's isolated git environment."""
    home = tmp_path_factory.mktemp("home")
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"HOME": str(home), "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"), "GIT_CONFIG_NOSYSTEM": "1",
                     "GIT_AUTHOR_NAME": "fmhub tests", "GIT_AUTHOR_EMAIL": "tests@fmhub.invalid",
                     "GIT_COMMITTER_NAME": "fmhub tests", "GIT_COMMITTER_EMAIL": "tests@fmhub.invalid"}.items():
            mp.setenv(k, v)
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


def audit_entries(repo: Path) -> list[dict]:
    log = repo / ".git" / "fmhub" / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


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


ROW_RULES = """\
  - allow: [read]
    roles: [pii-readers]
    rows: {column: tier, values: [restricted]}
  - deny: [read]
    paths: ["tickets/*"]
    rows: {column: tier, values: [restricted]}
"""


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

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import slice_data as sd

    from fmhub.evaluation import run_eval
    from fmhub.spec import load_spec

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


# -- (iii) the LFS server enforces the policy itself ------------------------------------------------------


TOKENS = {"alice-token": {"user": ALICE, "repos": ["test"]}, "bob-token": {"user": BOB, "repos": ["test"]},
          "other-token": {"user": ALICE, "repos": ["other"]}}


@pytest.fixture
def served(guarded, tmp_path, monkeypatch):
    """``guarded`` pushed (by alice) to a bare repo whose LFS server is behind a PolicyGate; yields (server, bare)."""
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(bare, "config", "fmhub.audit", "true")
    gate = PolicyGate({"test": str(bare)}, Tokens.from_mapping(TOKENS))
    with running_lfs_server(tmp_path / "lfs-store", policy_gate=gate) as server:
        git(guarded, "remote", "add", "origin", bare.as_uri())
        git(guarded, "config", "lfs.url", server.url)
        git(guarded, "config", "lfs.transfer.maxretries", "1")
        monkeypatch.setenv("FMHUB_LFS_AUTHORIZATION", "Bearer alice-token")
        git(guarded, "push", "-q", "origin", "main")
        monkeypatch.delenv("FMHUB_LFS_AUTHORIZATION")
        yield server, bare


def batch(server, token: str | None, oids: list[tuple[str, int]], url: str | None = None):
    body = json.dumps({"operation": "download", "transfers": ["basic"], "objects": [{"oid": o, "size": s} for o, s in oids]}).encode()
    req = urllib.request.Request((url or server.url) + "/objects/batch", data=body, method="POST",
                                 headers={"Content-Type": "application/vnd.git-lfs+json", "Accept": "application/vnd.git-lfs+json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def get(url: str, token: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_server_denies_restricted_objects_per_object(served, guarded):
    server, bare = served
    secret = Manifest.from_bytes(git(guarded, "show", "HEAD:secret/w.safetensors").stdout)
    open_ = Manifest.from_bytes(git(guarded, "show", "HEAD:public/open.safetensors").stdout)
    secret_oids, open_oids = dict(secret.oids()), dict(open_.oids())
    status, answer = batch(server, "bob-token", [*secret_oids.items(), *open_oids.items()])
    assert status == 200
    by_oid = {o["oid"]: o for o in answer["objects"]}
    for oid in secret_oids:
        assert by_oid[oid]["error"]["code"] == 403 and "actions" not in by_oid[oid]
        msg = by_oid[oid]["error"]["message"]
        assert "'ml-core'" in msg and ALICE not in msg and "secret/" not in msg
    for oid in open_oids:
        assert "download" in by_oid[oid]["actions"]
    # a direct GET of a denied object is refused too; alice gets it
    oid = next(iter(secret_oids))
    assert get(f"{server.base_url}/objects/{oid}", "bob-token")[0] == 403
    status, data = get(f"{server.base_url}/objects/{oid}", "alice-token")
    assert status == 200 and len(data) == secret_oids[oid]
    status, answer = batch(server, "alice-token", list(secret_oids.items()))
    assert all("download" in o["actions"] for o in answer["objects"])
    # the placeholder tensor is restricted on the server too (the server never sends placeholders)
    pub = Manifest.from_bytes(git(guarded, "show", "HEAD:public/model.safetensors").stdout)
    lm = next(t.oid for t in pub.tensors if t.name == "lm_head.weight")
    _, answer = batch(server, "bob-token", [(lm, 256)])
    assert answer["objects"][0]["error"]["code"] == 403
    # recorded in the server repo's audit log
    log = [json.loads(line) for line in (bare / "fmhub" / "audit.log").read_text().splitlines()]
    assert any(e["what"] == "access" and e["decision"] == "deny" and e["details"]["user"] == BOB for e in log)


def upload(server, token: str, oids: list[tuple[str, int]]):
    body = json.dumps({"operation": "upload", "transfers": ["basic"], "objects": [{"oid": o, "size": s} for o, s in oids]}).encode()
    req = urllib.request.Request(server.url + "/objects/batch", data=body, method="POST", headers={
        "Content-Type": "application/vnd.git-lfs+json", "Accept": "application/vnd.git-lfs+json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {o["oid"]: o for o in json.loads(resp.read())["objects"]}


def test_server_checks_write_rules_on_upload_per_object(served, guarded, monkeypatch):
    server, bare = served
    secret = dict(Manifest.from_bytes(git(guarded, "show", "HEAD:secret/w.safetensors").stdout).oids())
    head = secret  # lm_head's bytes are also public/model's lm_head (bob may write there): one denied place is enough
    new = ("ab" * 32, 7)  # an object no manifest names yet: its path is unknown to the server
    # indexed under a tensor bob may not write (secret/* lm_head.*): 403 for it alone; a new object: decided by the repo (allowed)
    answer = upload(server, "bob-token", [*head.items(), new])
    lm_head = [o for o in head if answer[o].get("error")]
    assert lm_head and all(answer[o]["error"]["code"] == 403 and "actions" not in answer[o] for o in lm_head)
    assert "error" not in answer[new[0]]
    assert all("error" not in o for o in upload(server, "alice-token", [*head.items(), new]).values())
    # a policy that denies writing every path to non-members: bob's token is read-only, per object
    policy = guarded / ".fmhub/policy.yaml"
    policy.write_text(policy.read_text() + "  - deny: [write]\n    paths: [\"**\"]\n")
    monkeypatch.setenv("FMHUB_USER", ALICE)  # the clean filter checks alice's write rules on commit
    git(guarded, "add", ".fmhub/policy.yaml")
    git(guarded, "commit", "-qm", "read-only for non-members")
    monkeypatch.setenv("FMHUB_LFS_AUTHORIZATION", "Bearer alice-token")
    git(guarded, "push", "-q", "origin", "main")
    answer = upload(server, "bob-token", [new, *secret.items()])
    assert all(o["error"]["code"] == 403 and "may not write" in o["error"]["message"] for o in answer.values())
    assert SECRET_ROW not in json.dumps(answer)
    assert all("error" not in o and "actions" in o for o in upload(server, "alice-token", [new]).values())
    put = urllib.request.Request(f"{server.url}/objects/{new[0]}", data=b"x" * 7, method="PUT", headers={"Authorization": "Bearer bob-token"})
    with pytest.raises(urllib.error.HTTPError) as info:  # skipping the batch API: the same check
        urllib.request.urlopen(put, timeout=10)
    assert info.value.code == 403 and b"may not write object" in info.value.read()


def test_server_refuses_bad_tokens_whole(served, guarded):
    server, _bare = served
    oids = list(Manifest.from_bytes(git(guarded, "show", "HEAD:public/open.safetensors").stdout).oids())
    status, answer = batch(server, "other-token", oids)
    assert status == 403 and "repository 'test'" in answer["message"]
    assert batch(server, "nope", oids)[0] == 401
    assert batch(server, None, oids)[0] == 401
    assert get(f"{server.base_url}/objects/{oids[0][0]}", "nope")[0] == 401


def test_clone_with_unprivileged_token_cannot_download_even_if_client_lies(served, tmp_path, monkeypatch):
    server, bare = served
    fmhub(tmp_path, "install", "--global")
    monkeypatch.setenv("FMHUB_USER", ALICE)  # the client claims to be alice: local checks pass
    monkeypatch.setenv("FMHUB_LFS_AUTHORIZATION", "Bearer bob-token")  # but the server knows bob's token
    dest = tmp_path / "bob-clone"
    proc = git(tmp_path, "clone", "-q", "-c", f"lfs.url={server.url}", "-c", "lfs.transfer.maxretries=1", bare.as_uri(), str(dest), check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "access denied: bob@example.com may not read object" in err and "'ml-core'" in err and ALICE not in err
    for path in ("secret/w.safetensors", "public/model.safetensors"):
        f = dest / path
        assert not f.exists() or f.stat().st_size == 0
    # alice's token: everything, exact bytes
    monkeypatch.setenv("FMHUB_LFS_AUTHORIZATION", "Bearer alice-token")
    dest = tmp_path / "alice-clone"
    git(tmp_path, "clone", "-q", "-c", f"lfs.url={server.url}", bare.as_uri(), str(dest))
    assert sha256_file(dest / "secret/w.safetensors") == sha256_file(tmp_path / "repo" / "secret/w.safetensors")


def test_token_for_another_repo_cannot_reach_its_objects_through_a_shared_store(served, guarded, tmp_path):
    server, bare = served
    empty = tmp_path / "other.git"
    git(tmp_path, "init", "-q", "--bare", str(empty))
    gate = server._server.policy_gate
    gate.repos = {**gate.repos, "other": str(empty)}  # one LFS store for two repositories
    oid = next(iter(dict(Manifest.from_bytes(git(guarded, "show", "HEAD:secret/w.safetensors").stdout).oids())))
    status, answer = batch(server, "other-token", [(oid, 1)], url=server.base_url + "/other.git/info/lfs")
    assert status == 200 and answer["objects"][0]["error"]["code"] == 403
    assert get(f"{server.base_url}/objects/{oid}", "other-token")[0] == 403


def test_server_fails_closed_on_a_broken_policy(tmp_path):
    bare = tmp_path / "b.git"
    work = tmp_path / "w"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(tmp_path, "init", "-q", str(work))
    (work / ".fmhub").mkdir()
    (work / ".fmhub/policy.yaml").write_text("rules: [\n")
    git(work, "add", ".")
    git(work, "commit", "-qm", "broken")
    git(work, "push", "-q", bare.as_uri(), "HEAD:main")
    gate = PolicyGate({"b": str(bare)}, Tokens.from_mapping({"t": {"user": ALICE, "repos": ["b"]}}), record=False)
    reason = gate.check_object(gate.authenticate("Bearer t"), ["b"], "a" * 64)
    assert reason is not None and ".fmhub/policy.yaml:2: not valid YAML" in reason


def test_helpers():
    import base64

    assert token_of("Bearer abc") == "abc" and token_of(None) is None and token_of("Digest x") is None
    assert token_of("Basic " + base64.b64encode(b"bob:tok").decode()) == "tok"
    assert repo_of("/models.git/info/lfs/objects/batch") == "models" and repo_of("/objects/" + "a" * 64) is None
    import hashlib

    hashed = Tokens.from_mapping({"sha256:" + hashlib.sha256(b"tok").hexdigest(): {"user": BOB, "repos": ["r"]}})
    assert hashed.lookup("tok").user == BOB and hashed.lookup("tok2") is None
    assert AccessRequest(BOB, "read", "r", "p").read_file("x") is None
