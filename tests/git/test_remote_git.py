"""Remotes end to end: real git, a bare remote over file://, and a real LFS server (tests/helpers/lfs_server.py).

`git push` runs fmhub's pre-push hook, which uploads the tensor objects the
server lacks; a clone with a fresh store downloads, during checkout, just the
objects of the files it checks out; `fmhub fetch` prefetches a revision.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import fmhub, git, save_tensors, sha256_file, store_objects
from tests.helpers.lfs_server import closed_port_url

from fmhub.core.manifest import Manifest

CKPT = "model.safetensors"


def model(seed: int = 0, n: int = 6, dim: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(dim, dim, generator=g) for i in range(n)} | {
        "embed": torch.randn(50, dim, generator=g).bfloat16(),
        "scale": torch.tensor(1.5),
    }


@pytest.fixture
def remote(tmp_path) -> Path:
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    return bare


def connect(repo: Path, bare: Path, lfs_url: str) -> None:
    """origin = the bare repo (file://), objects to the LFS server; one retry keeps failure tests quick."""
    git(repo, "remote", "add", "origin", bare.as_uri())
    git(repo, "config", "lfs.url", lfs_url)
    git(repo, "config", "lfs.transfer.maxretries", "1")


def clone(tmp_path: Path, bare: Path, lfs_url: str, name: str = "B", *extra: str) -> Path:
    """A clone with its own, empty store: `fmhub install --global` first, so checkout runs the filter."""
    fmhub(tmp_path, "install", "--global")
    dest = tmp_path / name
    git(tmp_path, "clone", "-q", "-c", f"lfs.url={lfs_url}", "-c", "lfs.transfer.maxretries=1", *extra, bare.as_uri(), str(dest))
    return dest


def manifest(repo: Path, rev: str = "HEAD", path: str = CKPT) -> Manifest:
    return Manifest.from_bytes(git(repo, "show", f"{rev}:{path}").stdout)


def uploads(server) -> dict[str, int]:
    """oid -> bytes of every object PUT to the server (its request log), as counted by Content-Length."""
    return {r.path.rsplit("/", 1)[1]: int(r.headers.get("Content-Length")) for r in server.requests if r.method == "PUT"}


def downloads(server) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in server.requests if r.method == "GET"]


def commit(repo: Path, tensors: dict, message: str, path: str = CKPT) -> str:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    save_tensors(repo / path, tensors)
    git(repo, "add", path)
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD").stdout.decode().strip()


def test_three_versions_push_clone_and_check_out_each(repo, remote, lfs_server, tmp_path):
    connect(repo, remote, lfs_server.url)
    t = model()
    # v0 uploads everything; v1 changes 1 tensor; v2 changes 3 (one of them bf16, one a scalar)
    changes = [[], ["layers.1.weight"], ["layers.2.weight", "embed", "scale"]]
    versions = []
    for v, names in enumerate(changes):
        for name in names:
            t[name] = t[name] + 1
        sha = commit(repo, t, f"v{v}")
        versions.append((sha, sha256_file(repo / CKPT)))
        lfs_server.clear_log()
        git(repo, "push", "-q", "origin", "main")
        sent = uploads(lfs_server)
        new = manifest(repo)
        if v == 0:
            assert sent == dict(new.oids())
        else:
            old = manifest(repo, "HEAD~1").by_name()
            changed = [e for e in new.tensors if old[e.name].oid != e.oid]
            assert sorted(e.name for e in changed) == sorted(names)
            # exactly what holds the k changed tensors travels (a delta, or a small tensor whole), no more bytes than theirs
            fresh = {oid: size for e in changed for oid, size in e.storage() if (oid, size) not in old[e.name].storage()}
            assert sent == fresh
            assert sum(sent.values()) <= sum(t[n].numel() * t[n].element_size() for n in names)
    assert set(lfs_server.objects()) == set(store_objects(repo))

    lfs_server.clear_log()
    b = clone(tmp_path, remote, lfs_server.url)
    assert sha256_file(b / CKPT) == versions[-1][1]
    # the clone downloaded only what HEAD's file needs
    assert set(store_objects(b)) == {oid for oid, _ in manifest(b).oids()}
    assert sorted(downloads(lfs_server)) == sorted(store_objects(b))
    assert not (remote / "lfs").exists()  # objects went to the server, not into the bare repo
    for sha, want in versions:
        git(b, "checkout", "-q", sha)
        assert sha256_file(b / CKPT) == want
        assert git(b, "status", "--porcelain").stdout == b""
    assert set(store_objects(b)) == set(lfs_server.objects())


def test_second_push_of_the_same_objects_uploads_nothing(repo, remote, lfs_server):
    connect(repo, remote, lfs_server.url)
    t = model()
    commit(repo, t, "v0")
    git(repo, "push", "-q", "origin", "main")
    git(repo, "checkout", "-qb", "copy")
    (repo / "README").write_text("same weights, another branch\n")
    git(repo, "add", "README")
    git(repo, "commit", "-qm", "readme")
    lfs_server.clear_log()
    git(repo, "push", "origin", "copy")
    assert uploads(lfs_server) == {}
    assert [r.method for r in lfs_server.requests] == []  # the manifest was already pushed: nothing to ask


def test_server_down_during_push_fails_clearly_then_retry_finishes(repo, remote, lfs_server):
    connect(repo, remote, closed_port_url())
    commit(repo, model(), "v0")
    proc = git(repo, "push", "origin", "main", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "fmhub: push stopped" in err and "cannot reach the LFS server" in err and "connection refused" in err, err
    assert "Traceback" not in err
    assert git(remote, "rev-parse", "-q", "--verify", "refs/heads/main", check=False).returncode != 0  # git sent nothing

    # the server answers, but only with errors
    git(repo, "config", "lfs.url", lfs_server.url)
    lfs_server.fail_next(1000, 503)
    proc = git(repo, "push", "origin", "main", check=False)
    assert proc.returncode != 0 and "HTTP 503" in proc.stderr.decode(), proc.stderr.decode()
    assert git(remote, "rev-parse", "-q", "--verify", "refs/heads/main", check=False).returncode != 0

    lfs_server.fail_next(0)
    proc = git(repo, "push", "origin", "main")
    assert "fmhub: uploaded" in proc.stderr.decode()
    assert set(dict(manifest(repo).oids())) <= set(lfs_server.objects())
    assert git(remote, "rev-parse", "refs/heads/main").stdout == git(repo, "rev-parse", "HEAD").stdout


def test_push_of_an_object_the_store_lost_names_file_and_tensor(repo, remote, lfs_server):
    connect(repo, remote, lfs_server.url)
    commit(repo, model(), "v0")
    victim = manifest(repo).tensors[2]
    lost = victim.storage()[0][0]  # the object that holds it (compressed)
    obj = repo / ".git" / "lfs" / "objects" / lost[:2] / lost[2:4] / lost
    obj.unlink()
    proc = git(repo, "push", "origin", "main", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert CKPT in err and repr(victim.name) in err and lost in err and "fmhub fetch" in err, err
    assert uploads(lfs_server) == {}  # nothing half-pushed
    assert git(remote, "rev-parse", "-q", "--verify", "refs/heads/main", check=False).returncode != 0


def test_pushed_before_install_then_push_objects(repo, remote, lfs_server, tmp_path):
    connect(repo, remote, lfs_server.url)
    t = model()
    commit(repo, t, "v0")
    t["embed"] = t["embed"] * 2
    commit(repo, t, "v1")
    git(repo, "push", "-q", "--no-verify", "origin", "main")  # as if the hook were not installed
    assert lfs_server.objects() == {}
    out = fmhub(repo, "push-objects").stdout.decode()
    everything = dict(manifest(repo).oids()) | dict(manifest(repo, "HEAD~1").oids())
    assert f"uploaded {len(everything)} object(s)" in out, out
    assert set(lfs_server.objects()) == set(everything)
    assert "uploaded 0 object(s)" in fmhub(repo, "push-objects", "origin", "main").stdout.decode()


def test_fetch_downloads_head_so_checkout_works_with_the_server_stopped(repo, remote, lfs_server, tmp_path):
    connect(repo, remote, lfs_server.url)
    t = model()
    commit(repo, t, "v0")
    commit(repo, model(seed=1, n=2), "adapter", path="adapters/a.safetensors")
    t["layers.0.weight"] = t["layers.0.weight"] * 0
    commit(repo, t, "v1")
    git(repo, "push", "-q", "origin", "main")
    want = {p: sha256_file(repo / p) for p in (CKPT, "adapters/a.safetensors")}

    b = clone(tmp_path, remote, lfs_server.url, "B", "--no-checkout")
    assert store_objects(b) == {}
    out = fmhub(b, "fetch").stdout.decode()
    need = dict(manifest(b).oids()) | dict(manifest(b, path="adapters/a.safetensors").oids())
    assert f"downloaded {len(need)} object(s)" in out, out
    assert set(store_objects(b)) == set(need)
    assert "downloaded 0 object(s)" in fmhub(b, "fetch", "origin", "HEAD").stdout.decode()

    git(b, "config", "lfs.url", closed_port_url())  # the server is gone
    git(b, "checkout", "-q", "main")
    assert {p: sha256_file(b / p) for p in want} == want
    assert git(b, "status", "--porcelain").stdout == b""


def test_missing_object_at_checkout_with_the_server_stopped(repo, remote, lfs_server, tmp_path):
    connect(repo, remote, lfs_server.url)
    t = model()
    commit(repo, t, "v0")
    v0 = sha256_file(repo / CKPT)
    t["layers.4.weight"] = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))  # nothing shared: no chain to v0
    commit(repo, t, "v1")
    v1 = sha256_file(repo / CKPT)
    git(repo, "push", "-q", "origin", "main")
    b = clone(tmp_path, remote, lfs_server.url)
    assert sha256_file(b / CKPT) == v1

    git(b, "config", "lfs.url", closed_port_url())
    (b / CKPT).unlink()
    proc = git(b, "checkout", "HEAD~1", "--", CKPT, check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    line = next(l for l in err.splitlines() if l.startswith("fmhub:"))
    assert CKPT in line and "'layers.4.weight'" in line and "missing" in line, err
    assert "cannot reach the LFS server" in line and "connection refused" in line and "fmhub fetch" in line, err
    assert "Traceback" not in err
    assert not (b / CKPT).exists()  # no partial file
    assert not any((b / ".git" / "lfs" / "tmp").iterdir())  # no half-downloaded object either

    # a whole-commit checkout stops too: HEAD stays; git has removed v1 but writes no partial v0
    git(b, "checkout", "-q", "--", CKPT)
    head = git(b, "rev-parse", "HEAD").stdout
    proc = git(b, "checkout", "-q", "HEAD~1", check=False)
    assert proc.returncode != 0 and "'layers.4.weight'" in proc.stderr.decode()
    assert git(b, "rev-parse", "HEAD").stdout == head
    assert not (b / CKPT).exists()
    git(b, "checkout", "-q", "--", CKPT)  # v1's objects are here
    assert sha256_file(b / CKPT) == v1

    git(b, "config", "lfs.url", lfs_server.url)  # back up: the same checkout works
    git(b, "checkout", "-q", "HEAD~1")
    assert sha256_file(b / CKPT) == v0


def test_smudge_with_no_remote_keeps_the_old_advice(repo):
    commit(repo, model(), "v0")
    lost = manifest(repo).tensors[0].storage()[0][0]
    (repo / ".git" / "lfs" / "objects" / lost[:2] / lost[2:4] / lost).unlink()
    (repo / CKPT).unlink()
    err = git(repo, "checkout", "--", CKPT, check=False).stderr.decode()
    assert "no remote named 'origin'" in err and "fetch them from the repository" in err, err


def test_install_keeps_an_existing_pre_push_hook_and_uninstall_restores_it(tmp_path, remote, lfs_server):
    r = tmp_path / "r"
    r.mkdir()
    git(r, "init", "-q")
    hooks = r / ".git" / "hooks"
    log = tmp_path / "hook.log"
    mine = f'#!/bin/sh\necho "args $1 $2" >> {log}\ncat >> {log}\nexit "${{MY_HOOK_EXIT:-0}}"\n'
    (hooks / "pre-push").write_text(mine)
    (hooks / "pre-push").chmod(0o755)
    fmhub(r, "install")
    fmhub(r, "install")  # idempotent: the user's hook is not lost on a second install
    assert (hooks / "pre-push.local").read_text() == mine
    assert "fmhub pre-push hook" in (hooks / "pre-push").read_text()
    fmhub(r, "track", "*.safetensors")
    git(r, "add", ".gitattributes")
    connect(r, remote, lfs_server.url)
    commit(r, model(), "v0")
    git(r, "push", "-q", "origin", "main")
    text = log.read_text()
    assert f"args origin {remote.as_uri()}" in text and "refs/heads/main" in text  # it got git's arguments and stdin
    assert set(dict(manifest(r).oids())) <= set(lfs_server.objects())

    fmhub(r, "uninstall")
    assert (hooks / "pre-push").read_text() == mine and not (hooks / "pre-push.local").exists()


def test_users_hook_runs_first_and_can_stop_the_push(tmp_path, repo, remote, lfs_server, monkeypatch):
    hooks = repo / ".git" / "hooks"
    (hooks / "pre-push.local").write_text("#!/bin/sh\nexit 1\n")
    (hooks / "pre-push.local").chmod(0o755)
    connect(repo, remote, lfs_server.url)
    commit(repo, model(), "v0")
    assert git(repo, "push", "origin", "main", check=False).returncode != 0
    assert lfs_server.requests == []


def test_git_lfs_and_fmhub_push_to_one_server_and_a_clone_gets_both(tmp_path, remote, lfs_server):
    if shutil.which("git-lfs") is None:
        pytest.skip("git-lfs is not installed")
    a = tmp_path / "A"
    a.mkdir()
    git(a, "init", "-q")
    git(a, "lfs", "install", "--local")
    hooks = a / ".git" / "hooks"
    lfs_hook = (hooks / "pre-push").read_text()
    fmhub(a, "install")  # replaces git-lfs's hook with one that runs both
    assert "fmhub pre-push hook" in (hooks / "pre-push").read_text()
    assert not (hooks / "pre-push.local").exists()
    git(a, "lfs", "track", "*.bin")
    fmhub(a, "track", "*.safetensors")
    data = bytes(range(256)) * 400
    (a / "data.bin").write_bytes(data)
    save_tensors(a / CKPT, model())
    want = sha256_file(a / CKPT)
    git(a, "add", ".")
    git(a, "commit", "-qm", "both")
    connect(a, remote, lfs_server.url)
    git(a, "push", "-q", "origin", "main")
    held = lfs_server.objects()
    assert held.get(hashlib.sha256(data).hexdigest()) == len(data)  # git-lfs's hook ran and pushed its object
    assert set(dict(manifest(a).oids())) <= set(held)  # fmhub's did too
    assert any((r.headers.get("User-Agent") or "").startswith("git-lfs") for r in lfs_server.requests)

    git(tmp_path, "lfs", "install", "--skip-repo")  # git-lfs's filter in the test HOME's global config
    b = clone(tmp_path, remote, lfs_server.url)
    assert (b / "data.bin").read_bytes() == data
    assert sha256_file(b / CKPT) == want
    assert git(b, "status", "--porcelain").stdout == b""

    fmhub(a, "uninstall")
    assert (hooks / "pre-push").read_text() == lfs_hook


def test_clone_before_install_then_fmhub_checkout_downloads(repo, remote, lfs_server, tmp_path):
    connect(repo, remote, lfs_server.url)
    commit(repo, model(), "v0")
    want = sha256_file(repo / CKPT)
    git(repo, "push", "-q", "origin", "main")
    b = tmp_path / "B"
    git(tmp_path, "clone", "-q", "-c", f"lfs.url={lfs_server.url}", remote.as_uri(), str(b))  # no fmhub yet
    assert (b / CKPT).read_bytes().startswith(b"fmhub manifest ")
    fmhub(b, "install")
    assert "model.safetensors" in fmhub(b, "checkout").stdout.decode()
    assert sha256_file(b / CKPT) == want
    assert git(b, "status", "--porcelain").stdout == b""


def test_push_to_a_local_bare_repo_without_lfs_server(repo, remote, tmp_path):
    """No lfs.url and a local remote: objects go into the bare repo's own store, and clones borrow from it."""
    git(repo, "remote", "add", "origin", str(remote))
    commit(repo, model(), "v0")
    want = sha256_file(repo / CKPT)
    git(repo, "push", "-q", "origin", "main")
    held = {p.name for p in (remote / "lfs" / "objects").rglob("*") if p.is_file()}
    assert held == {oid for oid, _ in manifest(repo).oids()}
    fmhub(tmp_path, "install", "--global")
    git(tmp_path, "clone", "-q", str(remote), str(tmp_path / "B"))
    assert sha256_file(tmp_path / "B" / CKPT) == want


def test_partial_checkout_downloads_only_the_selected_tensors(repo, remote, lfs_server, tmp_path):
    """A clone without fmhub's filter holds manifests; `fmhub extract` fetches just the tensors asked for."""
    from safetensors.torch import load_file

    connect(repo, remote, lfs_server.url)
    t = model()
    commit(repo, t, "v0")
    git(repo, "push", "-q", "origin", "main")
    b = tmp_path / "B"
    git(tmp_path, "clone", "-q", "-c", f"lfs.url={lfs_server.url}", remote.as_uri(), str(b))
    lfs_server.clear_log()
    out = tmp_path / "part.safetensors"
    fmhub(b, "extract", f"HEAD:{CKPT}", "-t", "layers.1.*", "-t", "embed", "-o", str(out))
    got = load_file(str(out))
    assert sorted(got) == ["embed", "layers.1.weight"]
    assert all(torch.equal(got[n], t[n]) for n in got)
    wanted = manifest(b).by_name()
    assert sorted(downloads(lfs_server)) == sorted({oid for n in ("layers.1.weight", "embed") for oid, _ in wanted[n].storage()})
    assert (b / CKPT).read_bytes().startswith(b"fmhub manifest ")  # the work tree is untouched
