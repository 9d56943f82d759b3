"""`fmhub hub push/clone` against a Hub-API server on 127.0.0.1 (tests/helpers/hub_server.py), with the real huggingface_hub client.

The server speaks the Hub's REST API and its LFS batch API and keeps each repo
as a real bare git repository; the client is told where it is by HF_ENDPOINT
and uploads through the LFS batch API (HF_HUB_DISABLE_XET: the server does not
speak Xet).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tests.helpers import fmhub, git, sha256_file
from tests.helpers.hub_server import running_hub_server, use_hub_server
from tests.helpers.lfs_server import closed_port_url

from fmhub.run.demo import build_tiny_llama
from fmhub.core.manifest import Manifest

REPO_ID = "alice/tiny-llama"
CKPT = "model.safetensors"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with running_hub_server(tmp_path / "hub-server") as server:
        # the environment for fmhub's subprocesses, and huggingface_hub.constants for this process's client,
        # which read the environment once, at import (an earlier test may have imported it)
        use_hub_server(monkeypatch, server, tmp_path / "hf-home")
        yield server


def api(server):
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.url)


def hub_head(server, repo_id: str = REPO_ID) -> str:
    return api(server).repo_info(repo_id).sha


def object_puts(server) -> set[str]:
    """oids of the objects PUT to the server's LFS storage since the log was cleared."""
    return {r.path.rstrip("/").rsplit("/", 1)[1] for r in server.requests if r.method == "PUT"}


def object_gets(server) -> list[str]:
    """The objects downloaded through the resolve endpoint since the log was cleared."""
    return [r.path.rsplit("/", 1)[1] for r in server.requests if r.method == "GET" and "/resolve/" in r.path and "/.fmhub/objects/" in r.path]


def edit(state: dict, names: list[str], delta: float) -> dict:
    out = dict(state)
    for n in names:
        out[n] = out[n] + delta
    return out


@pytest.fixture
def model_repo(repo) -> Path:
    model = build_tiny_llama(seed=1)
    model.save_pretrained(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v0")
    return repo


def save_version(repo: Path, names: list[str], delta: float, message: str) -> str:
    """Load the checkpoint, change ``names``, save it the way transformers does, commit; returns its sha256."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(repo)
    sd = model.state_dict()
    with torch.no_grad():
        for n in names:
            sd[n].add_(delta)
    model.save_pretrained(repo)
    git(repo, "commit", "-qam", message)
    return sha256_file(repo / CKPT)


def test_three_versions_push_then_clone_each_loads_with_transformers(hub, model_repo, tmp_path):
    from transformers import LlamaForCausalLM

    repo = model_repo
    versions = [(sha256_file(repo / CKPT), None)]
    out = fmhub(repo, "hub", "push", REPO_ID).stdout.decode()
    assert "already on the Hub" in out
    first = Manifest.from_bytes(git(repo, "show", f"HEAD:{CKPT}").stdout)
    heads = [hub_head(hub)]
    assert set(hub.lfs_objects()) >= {oid for oid, _ in first.oids()}

    changes = [["model.layers.0.self_attn.q_proj.weight"], ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]]
    for i, names in enumerate(changes, start=1):
        before = Manifest.from_bytes(git(repo, "show", f"HEAD:{CKPT}").stdout).by_name()
        want = save_version(repo, names, 0.5, f"v{i}")
        after = Manifest.from_bytes(git(repo, "show", f"HEAD:{CKPT}").stdout)
        changed = [e for e in after.tensors if before[e.name].oid != e.oid]
        assert sorted(e.name for e in changed) == sorted(names)
        fresh = {oid for e in changed for oid, size in e.storage() if (oid, size) not in before[e.name].storage()}
        hub.clear_log()
        fmhub(repo, "hub", "push")  # the repo id is remembered from the first push
        assert object_puts(hub) == fresh  # only what holds the changed tensors travels (a delta, or a small tensor)
        heads.append(hub_head(hub))
        versions.append((want, None))

    # a plain Hub user sees the manifest, the config as is, and a note on how to get the weights
    from huggingface_hub import hf_hub_download

    seen = Path(hf_hub_download(REPO_ID, CKPT, endpoint=hub.url, cache_dir=str(tmp_path / "plain")))
    assert seen.read_bytes().startswith(b"fmhub manifest ")
    note = Path(hf_hub_download(REPO_ID, ".fmhub/README.md", endpoint=hub.url, cache_dir=str(tmp_path / "plain")))
    assert "fmhub hub clone" in note.read_text()
    cfg = Path(hf_hub_download(REPO_ID, "config.json", endpoint=hub.url, cache_dir=str(tmp_path / "plain")))
    assert cfg.read_bytes() == (repo / "config.json").read_bytes()

    for i, ((want, _), head) in enumerate(zip(versions, heads)):
        dest = tmp_path / f"clone-v{i}"
        hub.clear_log()
        fmhub(tmp_path, "hub", "clone", REPO_ID, str(dest), "--revision", head)
        assert sha256_file(dest / CKPT) == want
        # only the objects of this version were downloaded
        m = Manifest.from_bytes(git(dest, "show", f"HEAD:{CKPT}").stdout)
        assert sorted(object_gets(hub)) == sorted({oid for oid, _ in m.oids()})
        assert git(dest, "status", "--porcelain").stdout == b""
        loaded = LlamaForCausalLM.from_pretrained(dest)
        assert isinstance(loaded, LlamaForCausalLM)
    latest = LlamaForCausalLM.from_pretrained(tmp_path / "clone-v2").state_dict()
    source = LlamaForCausalLM.from_pretrained(repo).state_dict()
    assert all(torch.equal(latest[k], source[k]) for k in source)


def test_clone_is_a_working_fmhub_repo_that_pushes_back(hub, model_repo, tmp_path):
    fmhub(model_repo, "hub", "push", REPO_ID)
    dest = tmp_path / "work"
    fmhub(tmp_path, "hub", "clone", REPO_ID, str(dest))
    want = save_version(dest, ["lm_head.weight"], 1.0, "tune the head")
    assert "lm_head.weight" in git(dest, "diff", "HEAD~1", "--", CKPT).stdout.decode()
    hub.clear_log()
    fmhub(dest, "hub", "push")  # the clone remembers its Hub repo
    assert len(object_puts(hub)) == 1
    again = tmp_path / "again"
    fmhub(tmp_path, "hub", "clone", REPO_ID, str(again))
    assert sha256_file(again / CKPT) == want


def test_push_deletes_what_it_pushed_before_and_keeps_other_files(hub, model_repo, tmp_path):
    (model_repo / "notes.txt").write_text("old notes\n")
    git(model_repo, "add", "notes.txt")
    git(model_repo, "commit", "-qm", "notes")
    fmhub(model_repo, "hub", "push", REPO_ID)
    api(hub).upload_file(path_or_fileobj=b"written on the Hub\n", path_in_repo="extra.md", repo_id=REPO_ID)
    git(model_repo, "rm", "-q", "notes.txt")
    git(model_repo, "commit", "-qm", "no notes")
    out = fmhub(model_repo, "hub", "push").stdout.decode()
    assert "removed notes.txt" in out
    files = set(api(hub).list_repo_files(REPO_ID))
    assert "notes.txt" not in files and "extra.md" in files and CKPT in files


def test_no_checkout_clone_then_extract_fetches_only_the_selected_tensors(hub, model_repo, tmp_path):
    from safetensors.torch import load_file

    fmhub(model_repo, "hub", "push", REPO_ID)
    dest = tmp_path / "lazy"
    fmhub(tmp_path, "hub", "clone", REPO_ID, str(dest), "--no-checkout")
    assert (dest / CKPT).read_bytes().startswith(b"fmhub manifest ")
    hub.clear_log()
    fmhub(dest, "extract", f"HEAD:{CKPT}", "-t", "model.embed_tokens.weight", "-o", str(tmp_path / "emb.safetensors"))
    got = load_file(str(tmp_path / "emb.safetensors"))
    want = load_file(str(model_repo / CKPT))["model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"], want)
    m = Manifest.from_bytes((dest / CKPT).read_bytes()).by_name()
    fetched = [r for r in hub.requests if r.method == "GET" and "/objects/" in r.path]
    assert [r.path.rsplit("/", 1)[1] for r in fetched] == [oid for oid, _ in m["model.embed_tokens.weight"].storage()]
    fmhub(dest, "checkout")  # the rest, lazily, through the Hub's LFS endpoint
    assert sha256_file(dest / CKPT) == sha256_file(model_repo / CKPT)


# -- bad input ---------------------------------------------------------------------


def test_hub_down_is_a_clear_error(model_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    proc = fmhub(model_repo, "hub", "push", REPO_ID, check=False)
    assert proc.returncode == 1
    assert "cannot reach" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    proc = fmhub(tmp_path, "hub", "clone", REPO_ID, str(tmp_path / "c"), check=False)
    assert proc.returncode == 1 and "cannot reach" in proc.stderr.decode()
    assert not (tmp_path / "c").exists()


def test_token_is_required_and_named(hub, model_repo, monkeypatch):
    hub.require_token("hf_secret")
    proc = fmhub(model_repo, "hub", "push", REPO_ID, check=False)
    assert proc.returncode == 1
    assert "HF_TOKEN" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fmhub(model_repo, "hub", "push", REPO_ID)
    assert CKPT in api(hub).list_repo_files(REPO_ID, token="hf_secret")


def test_push_with_an_object_missing_locally_commits_nothing(hub, model_repo):
    m = Manifest.from_bytes(git(model_repo, "show", f"HEAD:{CKPT}").stdout)
    victim = m.by_name()["model.norm.weight"].oid
    obj = model_repo / ".git" / "lfs" / "objects" / victim[:2] / victim[2:4] / victim
    obj.chmod(0o644)
    obj.unlink()
    proc = fmhub(model_repo, "hub", "push", REPO_ID, check=False)
    assert proc.returncode == 1
    assert "not in the local store" in proc.stderr.decode() and CKPT in proc.stderr.decode()
    assert CKPT not in api(hub).list_repo_files(REPO_ID)


def test_corrupt_object_from_the_hub_is_refused_and_the_clone_removed(hub, model_repo, tmp_path):
    fmhub(model_repo, "hub", "push", REPO_ID)
    m = Manifest.from_bytes(git(model_repo, "show", f"HEAD:{CKPT}").stdout)
    victim = m.by_name()["model.layers.0.mlp.down_proj.weight"].storage()[0][0]  # the object that holds it
    hub.corrupt(victim)
    dest = tmp_path / "bad"
    proc = fmhub(tmp_path, "hub", "clone", REPO_ID, str(dest), check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "discarded" in err and victim in err
    assert not dest.exists()


def test_clone_of_an_unknown_repo_or_revision(hub, model_repo, tmp_path):
    proc = fmhub(tmp_path, "hub", "clone", "alice/nope", str(tmp_path / "x"), check=False)
    assert proc.returncode == 1 and "was not found" in proc.stderr.decode()
    fmhub(model_repo, "hub", "push", REPO_ID)
    proc = fmhub(tmp_path, "hub", "clone", REPO_ID, str(tmp_path / "y"), "--revision", "no-such-branch", check=False)
    assert proc.returncode == 1 and "no such revision" in proc.stderr.decode()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_objects_are_stored_under_their_sha256(hub, model_repo):
    fmhub(model_repo, "hub", "push", REPO_ID)
    from fmhub.git.hub import object_path

    m = Manifest.from_bytes(git(model_repo, "show", f"HEAD:{CKPT}").stdout)
    files = set(api(hub).list_repo_files(REPO_ID))
    assert {object_path(oid) for oid, _ in m.oids()} <= files
    for oid, _ in m.oids()[:3]:
        assert hashlib.sha256(hub.lfs_object_bytes(oid)).hexdigest() == oid


def test_interrupted_upload_commits_nothing_and_the_retry_finishes(hub, model_repo, tmp_path):
    fmhub(model_repo, "hub", "push", REPO_ID)
    head = hub_head(hub)
    want = save_version(model_repo, ["model.layers.0.mlp.gate_proj.weight", "lm_head.weight"], 2.0, "v1")
    hub.fail_next(10, status=400, method="PUT")  # every object upload of this push is refused
    proc = fmhub(model_repo, "hub", "push", check=False)
    err = " ".join(proc.stderr.decode().split())
    assert proc.returncode == 1 and "Traceback" not in err
    assert "Error while uploading '.fmhub/objects/" in err and "run the push again" in err, err
    assert hub_head(hub) == head  # no manifest reached the Hub without its objects
    hub.fail_next(0)
    hub.clear_log()
    fmhub(model_repo, "hub", "push")
    assert len(object_puts(hub)) == 2
    dest = tmp_path / "after-retry"
    fmhub(tmp_path, "hub", "clone", REPO_ID, str(dest))
    assert sha256_file(dest / CKPT) == want


def test_clone_of_a_plain_hub_model_imports_it_and_pushes_in_fmhub_layout(hub, tmp_path):
    """A repo uploaded with plain huggingface_hub (real safetensors) clones into fmhub, then pushes as manifests + objects."""
    from transformers import LlamaForCausalLM

    plain = tmp_path / "plain"
    build_tiny_llama(seed=4).save_pretrained(plain)
    api(hub).create_repo("bob/plain")
    api(hub).upload_folder(folder_path=str(plain), repo_id="bob/plain")
    dest = tmp_path / "imported"
    out = fmhub(tmp_path, "hub", "clone", "bob/plain", str(dest)).stdout.decode()
    assert "imported 1 plain checkpoint(s)" in out
    assert sha256_file(dest / CKPT) == sha256_file(plain / CKPT)
    assert git(dest, "show", f"HEAD:{CKPT}").stdout.startswith(b"fmhub manifest ")
    assert git(dest, "status", "--porcelain").stdout == b""
    fmhub(dest, "hub", "push", "bob/fmhub-copy")
    again = tmp_path / "again"
    fmhub(tmp_path, "hub", "clone", "bob/fmhub-copy", str(again))
    assert sha256_file(again / CKPT) == sha256_file(plain / CKPT)
    assert isinstance(LlamaForCausalLM.from_pretrained(again), LlamaForCausalLM)


def test_push_of_an_old_revision_after_repack_uploads_rebuilt_objects(hub, model_repo, tmp_path):
    """`fmhub repack` leaves old tensors as deltas in the store; a Hub push of that revision sends them whole."""
    from safetensors.torch import load_file, save_file

    repo = model_repo
    git(repo, "config", "fmhub.deltas", "false")  # history as an older fmhub wrote it: whole tensors, for repack to pack
    git(repo, "config", "fmhub.compress", "false")
    git(repo, "rm", "-q", "--cached", CKPT)  # no previous version in the index: every tensor is stored afresh
    git(repo, "add", CKPT)
    git(repo, "commit", "-qm", "v0, whole")
    v0 = sha256_file(repo / CKPT)
    name = "model.layers.0.self_attn.q_proj.weight"
    sd = load_file(str(repo / CKPT))
    sd[name][0, :4] += 1.0  # a sparse change: repack can store v0's tensor as a small delta against v1's
    save_file(sd, str(repo / CKPT), metadata={"format": "pt"})
    git(repo, "commit", "-qam", "v1")
    old = Manifest.from_bytes(git(repo, "show", f"HEAD~1:{CKPT}").stdout).by_name()[name].oid
    fmhub(repo, "repack")
    lfs = repo / ".git" / "lfs"
    assert not (lfs / "objects" / old[:2] / old[2:4] / old).exists()
    assert (lfs / "packed" / old[:2] / old[2:4] / old).exists()

    fmhub(repo, "hub", "push", REPO_ID, "--rev", "HEAD~1")
    on_hub = hub.lfs_objects()
    assert old in on_hub
    assert hashlib.sha256(hub.lfs_object_path(old).read_bytes()).hexdigest() == old
    dest = tmp_path / "clone"
    fmhub(tmp_path, "hub", "clone", REPO_ID, str(dest))
    assert sha256_file(dest / CKPT) == v0
