"""The read policy in every local reader, not only checkout (issue 21, item 3): real git, real policies.

Checkout (tests/models/test_access.py) denies bob@example.com ``secret/*`` and, with a
placeholder, the ``lm_head.*`` tensors of ``public/*.safetensors``, and
``data/users.jsonl`` (its ``email`` column). Each test here is an input that
went past some other reader: `fmhub diff`, `git diff` and its textconv,
`fmhub extract REV:PATH`, `fmhub merge REV:PATH`, git's merge driver,
`fmhub filter-smudge` without a path, `fmhub.data.revision`, `fmhub hub push`. Each
must show no byte of a denied tensor and no number derived from its values,
and leave what bob may read exactly as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import FMHUB, fmhub, git, isolate_git, run, save_tensors
from tests.helpers.policy import ALICE, BOB, POLICY, SECRET_ROW, SECRET_VALUE, add_file, audit_entries

NEW_SECRET = 2 * SECRET_VALUE  # lm_head's value in the second commit


def weights(seed: int, head: float, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(16, 8 + seed, generator=g) + shift, "lm_head.weight": torch.full((8, 8), head)}


def users(tag: str) -> bytes:
    rows = [{"text": f"row {i}{tag}", "email": SECRET_ROW if i == 3 else f"u{i}@x.example"} for i in range(20)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Two commits of every guarded file (HEAD~1 -> HEAD changes each tensor), built once, by alice."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(mp, home)
        mp.setenv("FMHUB_USER", ALICE)
        repo = tmp_path_factory.mktemp("template") / "repo"
        repo.mkdir()
        git(repo, "init", "-q")
        fmhub(repo, "install")
        fmhub(repo, "track", "*.safetensors", "*.jsonl")
        git(repo, "add", ".gitattributes")
        add_file(repo, ".fmhub/policy.yaml", POLICY.encode())
        for version, (head, shift, tag) in enumerate([(SECRET_VALUE, 0.0, ""), (NEW_SECRET, 1.0, " v2")]):
            add_file(repo, "secret/w.safetensors", ts=weights(1, head, shift))
            add_file(repo, "public/model.safetensors", ts=weights(2, head, shift))
            add_file(repo, "public/open.safetensors", ts={"x": torch.ones(4) * (version + 1)})
            add_file(repo, "data/users.jsonl", users(tag))
            git(repo, "commit", "-qm", f"version {version}")
    return repo


@pytest.fixture
def guarded(template: Path, tmp_path, monkeypatch) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(template, dest, symlinks=True)
    monkeypatch.setenv("FMHUB_USER", BOB)
    return dest


def as_user(monkeypatch, user: str) -> None:
    monkeypatch.setenv("FMHUB_USER", user)


def fm(repo: Path, *args: str, check: bool = False):
    proc = fmhub(repo, *args, check=check)
    return proc, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def by_tensor(out: str) -> dict[tuple[str, str], dict]:
    return {(t["path"], t["name"]): t for t in json.loads(out)["tensors"]}


NUMBERS = ("delta_norm", "old_norm", "new_norm", "rel_change", "frac_changed", "n_changed", "max_abs")


def assert_no_secret(text: str) -> None:
    """No value of lm_head, no norm of it (8 × the value) nor of its change, no restricted row."""
    for value in (SECRET_VALUE, NEW_SECRET, 8 * SECRET_VALUE, 8 * NEW_SECRET):
        assert f"{value:.6g}" not in text and str(value) not in text, value
    assert SECRET_ROW not in text


def denies(repo: Path, via: str) -> list[dict]:
    return [e for e in audit_entries(repo) if e["what"] == "access" and e["decision"] == "deny" and e["details"].get("via") == via]


# -- fmhub diff -------------------------------------------------------------------------------------


def test_fmhub_diff_prints_no_number_of_a_denied_tensor(guarded, monkeypatch):
    as_user(monkeypatch, ALICE)
    _, out, _ = fm(guarded, "diff", "HEAD~1", "HEAD", "--json", check=True)
    alice = by_tensor(out)
    as_user(monkeypatch, BOB)
    _, out, _ = fm(guarded, "diff", "HEAD~1", "HEAD", "--json", check=True)
    bob = by_tensor(out)
    assert_no_secret(out)
    # the placeholder tensor and every tensor of the denied file: status from the manifests, no number, the rule
    for key in [("public/model.safetensors", "lm_head.weight"), ("secret/w.safetensors", "embed"), ("secret/w.safetensors", "lm_head.weight")]:
        t = bob[key]
        assert t["status"] == "changed" and t["withheld"] and all(t[k] is None for k in NUMBERS), t
        assert "values withheld by the access policy (.fmhub/policy.yaml:" in t["note"]
        assert alice[key]["delta_norm"] > 0 and not alice[key]["withheld"]  # alice holds ml-core: numbers
    # what bob may read is exactly what it was
    for key in [("public/model.safetensors", "embed"), ("public/open.safetensors", "x")]:
        assert bob[key] == alice[key] and bob[key]["delta_norm"] > 0
    data = {d["path"]: d for d in json.loads(out)["datasets"]}["data/users.jsonl"]
    assert data["new_rows"] is None and not data.get("samples") and any("rows withheld by the access policy" in n for n in data["notes"])
    denied = denies(guarded, "fmhub diff")
    assert {(e["target"], e["details"].get("tensor")) for e in denied} >= {
        ("public/model.safetensors", "lm_head.weight"), ("secret/w.safetensors", None), ("data/users.jsonl", None)}
    assert all(e["details"]["user"] == BOB for e in denied)
    # the table: the note, no number
    _, text, _ = fm(guarded, "diff", "HEAD~1", "HEAD", check=True)
    assert_no_secret(text)
    assert "withheld" in text


def test_fmhub_diff_against_the_work_tree_withholds_the_stored_side(guarded, monkeypatch):
    """A work-tree file is read from disk (bob's own bytes); the stored side it is compared with is not read."""
    committed = weights(2, NEW_SECRET, 1.0)
    save_tensors(guarded / "public/model.safetensors", {**committed, "lm_head.weight": torch.full((8, 8), 7.0)})
    _, out, _ = fm(guarded, "diff", "--json", "--", "public/model.safetensors", check=True)
    bob = by_tensor(out)
    head = bob[("public/model.safetensors", "lm_head.weight")]
    assert head["status"] == "changed" and head["withheld"] and all(head[k] is None for k in NUMBERS)
    assert bob[("public/model.safetensors", "embed")]["status"] == "unchanged"  # by its hash against the manifest's oid
    assert_no_secret(out)


# -- git diff, git log -p ----------------------------------------------------------------------------


def test_git_diff_driver_and_textconv_withhold_denied_tensors(guarded, monkeypatch):
    proc = git(guarded, "diff", "HEAD~1", "HEAD", "--", "public/")
    out = proc.stdout.decode()
    assert_no_secret(out)
    head = next(line for line in out.splitlines() if "lm_head.weight" in line)
    assert "values withheld by the access policy (.fmhub/policy.yaml:10)" in head and "delta_norm" not in head and "max_abs" not in head
    assert "delta_norm=" in next(line for line in out.splitlines() if line.startswith("changed") and " embed " in line)
    assert "delta_norm=2" in out  # public/open.safetensors: as before
    assert denies(guarded, "git diff")
    # the denied file: checkout's smudge refuses git's temp file, so git stops; nothing of it is printed
    proc = git(guarded, "diff", "HEAD~1", "HEAD", "--", "secret/", check=False)
    assert proc.returncode != 0 and "delta_norm" not in proc.stdout.decode()
    assert_no_secret(proc.stdout.decode() + proc.stderr.decode())
    # git log -p: the textconv gets the placeholder (the manifest) and no path: no statistics
    log = git(guarded, "-c", "diff.fmhub.cachetextconv=false", "log", "-p", "-1", "--", "public/model.safetensors").stdout.decode()
    assert "values withheld by the access policy" in log and "norm=" not in log and "mean=" not in log
    assert_no_secret(log)
    as_user(monkeypatch, ALICE)  # no statistics for her either: git's textconv cache is shared (see the test below)
    assert git(guarded, "-c", "diff.fmhub.cachetextconv=false", "log", "-p", "-1", "--", "public/model.safetensors").stdout.decode() == log


# -- fmhub extract, fmhub merge, git's merge driver ------------------------------------------------------


def test_extract_refuses_a_denied_tensor_and_writes_the_rest(guarded, monkeypatch, tmp_path):
    out = tmp_path / "x.safetensors"
    proc, _, err = fm(guarded, "extract", "HEAD:public/model.safetensors", "-t", "*", "-o", str(out))
    assert proc.returncode == 1 and not out.exists()
    assert "access denied: bob@example.com may not read tensor 'lm_head.weight' of public/model.safetensors" in err
    assert ".fmhub/policy.yaml:10" in err and "nothing was extracted" in err and len(err.strip().splitlines()) == 1
    assert_no_secret(err)
    proc, _, err = fm(guarded, "extract", "HEAD:secret/w.safetensors", "-t", "embed", "-o", str(out))
    assert proc.returncode == 1 and not out.exists() and "may not read secret/w.safetensors" in err
    assert denies(guarded, "HEAD:secret/w.safetensors")
    # the tensors bob may read: exactly the committed bytes
    fm(guarded, "extract", "HEAD:public/model.safetensors", "-t", "embed", "-o", str(out), check=True)
    from safetensors.torch import load_file

    got = load_file(str(out))
    assert list(got) == ["embed"] and torch.equal(got["embed"], weights(2, NEW_SECRET, 1.0)["embed"])
    as_user(monkeypatch, ALICE)
    fm(guarded, "extract", "HEAD:secret/w.safetensors", "-t", "*", "-o", str(out), check=True)
    assert torch.equal(load_file(str(out))["lm_head.weight"], weights(1, NEW_SECRET)["lm_head.weight"])


def test_merge_of_revisions_reads_no_denied_tensor(guarded, monkeypatch, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ("merge", "HEAD~1:public/model.safetensors", "HEAD:public/model.safetensors", "-s", "linear", "-o", str(out))
    proc, _, err = fm(guarded, *args)
    assert proc.returncode == 1 and not out.exists() and "may not read tensor 'lm_head.weight'" in err
    as_user(monkeypatch, ALICE)
    fm(guarded, *args, check=True)
    assert out.exists()


def test_merge_driver_does_not_mix_denied_values(guarded, monkeypatch):
    """A strategy reads both sides' values and stores a new tensor from them: a conflict for bob, a merge for alice."""
    as_user(monkeypatch, ALICE)  # who may write (and re-clean, after the copy) every file
    git(guarded, "config", "fmhub.merge.strategy", "linear")
    git(guarded, "checkout", "-q", "-b", "theirs")
    add_file(guarded, "public/open.safetensors", ts={"x": torch.ones(4) * 5})
    git(guarded, "commit", "-qm", "theirs")
    git(guarded, "checkout", "-q", "main")
    add_file(guarded, "public/open.safetensors", ts={"x": torch.ones(4) * 9})
    git(guarded, "commit", "-qm", "ours")
    policy = guarded / ".fmhub/policy.yaml"
    policy.write_text(policy.read_text().replace('paths: ["public/*.safetensors"]\n    tensors: ["lm_head.*"]',
                                                 'paths: ["public/*.safetensors"]\n    tensors: ["lm_head.*", "x"]'))
    as_user(monkeypatch, BOB)
    proc = git(guarded, "merge", "-q", "--no-edit", "theirs", check=False)
    err = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0 and "x: access denied: bob@example.com may not read tensor 'x' of public/open.safetensors" in err
    assert denies(guarded, "git merge")
    git(guarded, "merge", "--abort")
    as_user(monkeypatch, ALICE)
    git(guarded, "merge", "-q", "--no-edit", "theirs")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(guarded / "public/open.safetensors"))["x"], torch.ones(4) * 7)


# -- filter-smudge without a path, data-at, hub push ------------------------------------------------------


def test_filter_smudge_without_a_path_fails_closed(guarded, monkeypatch):
    manifest = git(guarded, "show", "HEAD:public/open.safetensors").stdout
    for user in (BOB, ALICE):  # no path, no rule can be matched: refused whoever asks
        as_user(monkeypatch, user)
        proc = run([*FMHUB, "filter-smudge"], guarded, check=False, input=manifest)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and proc.stdout == b"" and "names none" in err and "fmhub filter-smudge PATH" in err
    assert denies(guarded, "filter-smudge")
    as_user(monkeypatch, BOB)
    proc = run([*FMHUB, "filter-smudge", "public/open.safetensors"], guarded, input=manifest)
    assert proc.stdout == (guarded / "public/open.safetensors").read_bytes()  # with its path: checkout's rule, as git runs it
    proc = run([*FMHUB, "filter-smudge", "secret/w.safetensors"], guarded, check=False, input=git(guarded, "show", "HEAD:secret/w.safetensors").stdout)
    assert proc.returncode == 1 and proc.stdout == b"" and "may not read secret/w.safetensors" in proc.stderr.decode()
    # without a policy nothing changes: no path needed
    git(guarded, "rm", "-q", "--cached", ".fmhub/policy.yaml")
    (guarded / ".fmhub/policy.yaml").unlink()
    proc = run([*FMHUB, "filter-smudge"], guarded, input=manifest)
    assert proc.stdout == (guarded / "public/open.safetensors").read_bytes()


def test_data_at_checks_before_its_cache(guarded, monkeypatch):
    from fmhub.governance.access import AccessDenied
    from fmhub.data.revision import materialize

    monkeypatch.chdir(guarded)
    as_user(monkeypatch, ALICE)
    path = materialize("data/users.jsonl", "HEAD", cwd=str(guarded))  # fills the cache
    assert SECRET_ROW.encode() in Path(path).read_bytes()
    as_user(monkeypatch, BOB)
    with pytest.raises(AccessDenied) as info:
        materialize("data/users.jsonl", "HEAD", cwd=str(guarded))
    assert "may not read data/users.jsonl" in str(info.value) and "it was not read" in str(info.value)
    assert_no_secret(str(info.value))
    with pytest.raises(AccessDenied):  # a placeholder is no dataset: refused, never cached
        materialize("public/model.safetensors", "HEAD", cwd=str(guarded))
    assert Path(materialize("public/open.safetensors", "HEAD", cwd=str(guarded))).read_bytes() == (guarded / "public/open.safetensors").read_bytes()


def test_hub_push_refuses_before_anything_is_sent(guarded, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from fmhub.git import hub
    from fmhub.governance.access import AccessDenied

    def no_network(*_a, **_k):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(hub, "_api", no_network)
    with pytest.raises(AccessDenied) as info:
        hub.push("me/model", cwd=str(guarded))
    assert "nothing was pushed" in str(info.value) and "bob@example.com may not read" in str(info.value)


# -- the diff of withheld tensors, without git ------------------------------------------------------------


def test_withheld_tensors_keep_their_status_and_lose_every_number(tmp_path):
    from fmhub.governance.access import AccessDenied
    from fmhub.models.adapters import _update_norm
    from fmhub.models.diff import diff_views
    from fmhub.models.difftext import format_text
    from fmhub.plugin.records import Decision
    from fmhub.models.views import CheckpointView

    why = AccessDenied("access denied: bob may not read it", Decision(False, "restricted", ("ml-core",), False, ".fmhub/policy.yaml:3", "roles"))
    save_tensors(tmp_path / "old.safetensors", {"a": torch.ones(4), "b": torch.ones(2, 2), "gone": torch.ones(3)})
    save_tensors(tmp_path / "new.safetensors", {"a": torch.ones(4) * SECRET_VALUE, "b": torch.ones(4), "new": torch.ones(3)})

    def withheld(name: str) -> CheckpointView:
        v = CheckpointView.from_file(str(tmp_path / name))
        return CheckpointView({n: t.withheld(why) for n, t in v.tensors.items()}, v.metadata, v.path)

    changes = {c.name: c for c in diff_views(withheld("old.safetensors"), withheld("new.safetensors"))}
    assert {n: c.status for n, c in changes.items()} == {"a": "changed", "b": "shape", "new": "added", "gone": "removed"}
    for c in changes.values():
        assert c.withheld and all(getattr(c, k) is None for k in NUMBERS)
    text = format_text(list(changes.values()))
    assert text.count("(values withheld by the access policy (.fmhub/policy.yaml:3))") == 4 and "norm" not in text
    assert_no_secret(text)
    a = withheld("new.safetensors").tensors["a"]
    with pytest.raises(AccessDenied):
        a.read()
    assert _update_norm([(1.0, a, a)]) is None  # an adapter's ‖ΔW‖ from withheld factors: none


# -- serving and eval: PATH@REV materialized, and the caches of it --------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_materialize_refuses_a_placeholder_and_writes_nothing(guarded, monkeypatch, tmp_path):
    """`fmhub serve`/`fmhub eval` turn PATH@REV into a model directory: a placeholder is no model, so it is refused."""
    from fmhub.governance.access import AccessDenied
    from fmhub.serving.sources import materialize, parse_source

    monkeypatch.chdir(guarded)  # where smudge looks for a policy: it would write the manifest text
    src, dest = parse_source("public@HEAD", str(guarded)), tmp_path / "out" / "model"
    with pytest.raises(AccessDenied) as info:
        materialize(src, str(dest))
    msg = str(info.value)
    assert "bob@example.com may not read tensor 'lm_head.weight' of public/model.safetensors" in msg
    assert ".fmhub/policy.yaml:10" in msg and "nothing was materialized" in msg and "\n" not in msg
    assert_no_secret(msg)
    assert leftovers(tmp_path / "out") == []  # no directory, no temp directory
    assert denies(guarded, "materialize public@HEAD")
    as_user(monkeypatch, ALICE)
    materialize(src, str(dest))
    for name in ("model.safetensors", "open.safetensors"):
        assert (dest / name).read_bytes() == (guarded / "public" / name).read_bytes()


def test_eval_and_serve_caches_check_the_policy_on_every_reuse(guarded, monkeypatch, tmp_path):
    """A directory alice materialized (eval-models, the serve cache, a vLLM export) is not handed to bob."""
    from fmhub.governance.access import AccessDenied
    from fmhub.ml.evaluation import local_dir
    from fmhub.serving.cache import DiskTier
    from fmhub.serving.export import place
    from fmhub.serving.model import load_base
    from fmhub.serving.sources import parse_source

    as_user(monkeypatch, ALICE)
    eval_dirs = {spec: local_dir(spec, str(guarded)).dir for spec in ("secret@HEAD", "public@HEAD")}
    assert all(Path(d, "w.safetensors" if "secret" in s else "model.safetensors").exists() for s, d in eval_dirs.items())
    src = parse_source("secret@HEAD", str(guarded))
    disk = DiskTier(str(tmp_path / "serve-cache"), 1 << 30, "lru")
    alices, hit = disk.path_for(src, src.version, "secret", set())
    assert not hit and Path(alices, "w.safetensors").exists()
    exported = tmp_path / "vllm" / "base"
    assert place(src, str(exported)) and not place(src, str(exported))  # `fmhub serve --backend vllm`: once, then kept
    as_user(monkeypatch, BOB)
    for spec in eval_dirs:
        with pytest.raises(AccessDenied, match="nothing was materialized"):
            local_dir(spec, str(guarded))
    with pytest.raises(AccessDenied, match="may not read secret/w.safetensors"):
        disk.path_for(src, src.version, "secret", set())  # held in memory
    with pytest.raises(AccessDenied, match="may not read secret/w.safetensors"):  # found on disk by a restart
        DiskTier(str(tmp_path / "serve-cache"), 1 << 30, "lru").path_for(src, src.version, "secret", set())
    with pytest.raises(AccessDenied, match="may not read secret/w.safetensors"):
        place(src, str(exported))
    base_dir = tmp_path / "base-cache"
    (base_dir / f"base-{src.version}").mkdir(parents=True)  # as if alice's server had materialized it
    with pytest.raises(AccessDenied, match="may not read secret/w.safetensors"):
        load_base(src, str(base_dir))
    assert_no_secret(str(denies(guarded, "materialize secret@HEAD")))


# -- fmhub hub clone / fmhub checkout: the policy of the repository being written -------------------------


def manifests_in_work_tree(repo: Path, paths: list[str]) -> None:
    """Work-tree files holding their manifests, as `fmhub hub clone` leaves them before it materializes."""
    for p in paths:
        (repo / p).write_bytes(git(repo, "show", f"HEAD:{p}").stdout)


def test_worktree_materialize_applies_the_policy_of_that_repository(guarded, monkeypatch, tmp_path):
    from fmhub.git import worktree
    from fmhub.governance.access import AccessDenied
    from fmhub.core.manifest import is_manifest

    paths = ["public/model.safetensors", "public/open.safetensors", "secret/w.safetensors"]
    want = {p: (guarded / p).read_bytes() for p in paths}
    manifests_in_work_tree(guarded, paths)
    elsewhere = tmp_path / "elsewhere"  # no repository, no policy: the clone's own policy must decide
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(AccessDenied) as info:
        worktree.materialize(["secret/w.safetensors"], cwd=str(guarded))
    assert "may not read secret/w.safetensors" in str(info.value) and "\n" not in str(info.value)
    assert is_manifest((guarded / "secret/w.safetensors").read_bytes())
    # a placeholder stays the manifest text, as checkout writes it; what bob may read is written
    assert worktree.materialize(paths[:2], cwd=str(guarded)) == ["public/open.safetensors"]
    assert is_manifest((guarded / paths[0]).read_bytes()) and (guarded / paths[1]).read_bytes() == want[paths[1]]
    assert any(e["target"] == "secret/w.safetensors" and e["decision"] == "deny" for e in audit_entries(guarded))  # the clone's log
    as_user(monkeypatch, ALICE)
    (guarded / ".fmhub/policy.yaml").write_text("version: [\n")  # the clone's policy is broken: fail closed
    with pytest.raises(AccessDenied, match="the access policy is broken"):
        worktree.materialize([paths[0]], cwd=str(guarded))
    git(guarded, "checkout", "-q", "HEAD", "--", ".fmhub/policy.yaml")
    assert sorted(worktree.materialize(None, cwd=str(guarded))) == [paths[0], paths[2]]
    assert all((guarded / p).read_bytes() == want[p] for p in paths)


def test_hub_clone_applies_the_policy_the_clone_holds(guarded, monkeypatch, tmp_path):
    """A Hub repo holding `.fmhub/policy.yaml` (uploaded by hand: `fmhub hub push` leaves `.fmhub/` out), cloned
    from a directory with no policy: the clone's policy decides what is materialized, and the clone fails closed."""
    pytest.importorskip("huggingface_hub")
    from tests.helpers.hub_server import running_hub_server, use_hub_server
    from huggingface_hub import HfApi

    from fmhub.git import hub
    from fmhub.governance.access import AccessDenied

    read_rules = POLICY.split("  - allow: [write]")[0]  # no write rule: nothing but the read rules can stop bob's clone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running_hub_server(tmp_path / "hub-server") as server:
        use_hub_server(monkeypatch, server, tmp_path / "hf-home")
        as_user(monkeypatch, ALICE)  # who may read (and so push) it all
        hub.push("alice/guarded", cwd=str(guarded))
        HfApi(endpoint=server.url).upload_file(path_or_fileobj=read_rules.encode(), path_in_repo=".fmhub/policy.yaml",
                                              repo_id="alice/guarded")
        monkeypatch.chdir(elsewhere)
        as_user(monkeypatch, BOB)
        with pytest.raises(AccessDenied) as info:
            hub.clone("alice/guarded", str(tmp_path / "bob"))
        assert "bob@example.com may not read" in str(info.value) and "the file was not checked out" in str(info.value)
        assert not (tmp_path / "bob").exists()  # the clone is removed, nothing of it left
        as_user(monkeypatch, ALICE)
        hub.clone("alice/guarded", str(tmp_path / "alice"))
    for p in ("secret/w.safetensors", "public/model.safetensors", "data/users.jsonl"):
        assert (tmp_path / "alice" / p).read_bytes() == (guarded / p).read_bytes()


# -- filter-clean without a path ----------------------------------------------------------------------


def test_filter_clean_without_a_path_fails_closed(guarded, monkeypatch, tmp_path):
    """Write rules match paths: `fmhub filter-clean` with no path must not store what `git add` would refuse."""
    checkpoint = tmp_path / "w.safetensors"
    save_tensors(checkpoint, weights(1, 5.0))
    before = sorted(p.name for p in (guarded / ".git/lfs/objects").rglob("*") if p.is_file())
    for user in (BOB, ALICE):  # bob may not write secret/'s lm_head; alice may write anything, but no path, no rule
        as_user(monkeypatch, user)
        proc = run([*FMHUB, "filter-clean"], guarded, check=False, input=checkpoint.read_bytes())
        err = proc.stderr.decode()
        assert proc.returncode == 1 and proc.stdout == b"" and "may not write" in err and "fmhub filter-clean PATH" in err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (guarded / ".git/lfs/objects").rglob("*") if p.is_file()) == before  # nothing stored
    assert [e["details"]["action"] for e in denies(guarded, "filter-clean")] == ["write", "write"]
    as_user(monkeypatch, BOB)
    proc = run([*FMHUB, "filter-clean", "secret/w.safetensors"], guarded, check=False, input=checkpoint.read_bytes())
    assert proc.returncode == 1 and "may not write tensor 'lm_head.weight' of secret/w.safetensors" in proc.stderr.decode()
    proc = run([*FMHUB, "filter-clean", "public/w.safetensors"], guarded, input=checkpoint.read_bytes())
    assert proc.stdout.startswith(b"fmhub manifest")
    git(guarded, "rm", "-q", "--cached", ".fmhub/policy.yaml")  # without a policy nothing changes: no path needed
    (guarded / ".fmhub/policy.yaml").unlink()
    assert run([*FMHUB, "filter-clean"], guarded, input=checkpoint.read_bytes()).stdout.startswith(b"fmhub manifest")


# -- git's textconv cache (diff.fmhub.cachetextconv, set by `fmhub install`) ---------------------------------


def test_cached_textconv_shows_no_user_anything_another_may_not_see(guarded, monkeypatch):
    """git caches `git log -p`'s textconv output per blob for the whole clone: it must not depend on the user."""
    assert git(guarded, "config", "diff.fmhub.cachetextconv").stdout.strip() == b"true"
    paths = ["public/", "secret/", "data/"]
    as_user(monkeypatch, ALICE)  # the first to run it fills the cache with what she gets
    alice = git(guarded, "log", "-p", "--", *paths).stdout.decode()
    assert git(guarded, "notes", "--ref", "textconv/fmhub", "list", check=False).stdout.strip()  # cached
    as_user(monkeypatch, BOB)
    bob = git(guarded, "log", "-p", "--", *paths, check=False).stdout.decode()
    for log in (alice, bob):
        assert_no_secret(log)
        assert "norm=" not in log and "mean=" not in log and "row 3" not in log
        assert "values withheld by the access policy for every user" in log and "rows withheld by the access policy" in log
    assert bob == alice
    # without the cache each computes it: the same for both (the placeholder bob gets, the file alice gets)
    uncached = {}
    for user in (ALICE, BOB):
        as_user(monkeypatch, user)
        uncached[user] = git(guarded, "-c", "diff.fmhub.cachetextconv=false", "log", "-p", "--", "public/").stdout.decode()
    assert uncached[ALICE] == uncached[BOB] and 'tensor "lm_head.weight" F32 [8,8] sha256:' in uncached[BOB]
