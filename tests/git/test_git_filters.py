"""Plain git workflows over fmhub-tracked checkpoints, with real git in temp repos."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import fmhub, git, save_tensors, sha256_file, store_objects

from fmhub.core.manifest import Manifest


def model(seed: int = 0, n: int = 6, dim: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(dim, dim, generator=g) for i in range(n)} | {
        "embed": torch.randn(50, dim, generator=g).bfloat16(),
        "scale": torch.tensor(1.5),
    }


def test_install_writes_process_filter_and_drivers(repo):
    cfg = git(repo, "config", "--local", "--list").stdout.decode()
    assert "filter.fmhub.process=" in cfg and "filter-process" in cfg
    assert "filter.fmhub.required=true" in cfg
    assert "merge.fmhub.driver=" in cfg and "%O %A %B %P" in cfg
    attrs = (repo / ".gitattributes").read_text()
    assert "*.safetensors filter=fmhub diff=fmhub merge=fmhub -text" in attrs
    assert fmhub(repo, "track").stdout.decode().split() == ["*.safetensors"]

    fmhub(repo, "uninstall")
    cfg = git(repo, "config", "--local", "--list").stdout.decode()
    assert "fmhub" not in cfg


def test_commit_stores_manifest_and_checkout_is_byte_identical(repo):
    ckpt = repo / "model.safetensors"
    save_tensors(ckpt, model(), {"format": "pt"})
    want = sha256_file(ckpt)
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "v0")

    blob = git(repo, "show", "HEAD:model.safetensors").stdout
    m = Manifest.from_bytes(blob)
    assert [t.name for t in m.tensors] == sorted(model(), key=lambda n: [t.name for t in m.tensors].index(n))
    assert m.metadata == {"format": "pt"} and m.size == ckpt.stat().st_size
    assert len(blob) < 2000  # git stores a small text manifest, not the weights
    objs = store_objects(repo)
    assert all(oid in objs for oid, _size in m.oids())  # the header and what holds each tensor (compressed or not)

    ckpt.unlink()
    git(repo, "checkout", "--", "model.safetensors")
    assert sha256_file(ckpt) == want
    assert git(repo, "status", "--porcelain").stdout == b""


def test_ten_commits_one_tensor_each_store_only_the_changes(repo):
    ckpt = repo / "model.safetensors"
    tensors = model(n=10, dim=64)
    save_tensors(ckpt, tensors)
    full = ckpt.stat().st_size
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "v0")
    changed_bytes = 0
    hashes = [sha256_file(ckpt)]
    for i in range(10):
        name = f"layers.{i}.weight"
        tensors[name] = tensors[name] + 0.01 * (i + 1)
        changed_bytes += tensors[name].numel() * 4
        save_tensors(ckpt, tensors)
        hashes.append(sha256_file(ckpt))
        git(repo, "commit", "-qam", f"change {name}")
        diff = git(repo, "diff", "HEAD~1", "HEAD").stdout.decode()  # fmhub's diff driver: one line per changed tensor
        changed = [line.split() for line in diff.splitlines() if line.startswith("changed ")]
        assert [c[1] for c in changed] == [name], diff
        assert f"{len(tensors) - 1} tensors unchanged" in diff

    stored = sum(store_objects(repo).values())
    assert stored <= 1.05 * (full + changed_bytes), (stored, full, changed_bytes)

    for back, want in enumerate(reversed(hashes)):
        git(repo, "checkout", "-q", f"HEAD~{back}" if back else "HEAD", "--", "model.safetensors")
        assert sha256_file(ckpt) == want


def test_log_patch_and_show_name_the_changed_tensor(repo):
    ckpt = repo / "model.safetensors"
    t = model()
    save_tensors(ckpt, t)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v0")
    t["layers.3.weight"][0, 0] = 42.0
    save_tensors(ckpt, t)
    diff = git(repo, "diff").stdout.decode()
    changed = [line.split() for line in diff.splitlines() if line.startswith("changed ")]
    assert [c[1] for c in changed] == ["layers.3.weight"] and "(1/1024)" in diff, diff
    textconv = git(repo, "diff", "--no-ext-diff").stdout.decode().splitlines()
    assert [line.split()[:2] for line in textconv if line.startswith(("-tensor", "+tensor"))] == [
        ["-tensor", '"layers.3.weight"'], ["+tensor", '"layers.3.weight"']
    ]
    git(repo, "commit", "-qam", "v1")
    log = git(repo, "log", "-p", "-1").stdout.decode()
    assert '+tensor "layers.3.weight"' in log
    assert git(repo, "diff", "--stat", "HEAD~1").stdout.decode().count("|") == 1


def test_stash_and_branch_switch(repo):
    ckpt = repo / "model.safetensors"
    t = model()
    save_tensors(ckpt, t)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v0")
    v0 = sha256_file(ckpt)
    t["embed"] = t["embed"] * 2
    save_tensors(ckpt, t)
    v1 = sha256_file(ckpt)
    git(repo, "stash")
    assert sha256_file(ckpt) == v0
    git(repo, "stash", "pop")
    assert sha256_file(ckpt) == v1
    git(repo, "checkout", "-qb", "tuned")
    git(repo, "commit", "-qam", "tuned")
    git(repo, "checkout", "-q", "main")
    assert sha256_file(ckpt) == v0
    git(repo, "checkout", "-q", "tuned")
    assert sha256_file(ckpt) == v1


def test_clone_of_local_repo_with_global_install(repo, tmp_path):
    ckpt = repo / "model.safetensors"
    save_tensors(ckpt, model())
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v0")
    fmhub(tmp_path, "install", "--global")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert sha256_file(clone / "model.safetensors") == sha256_file(ckpt)
    # objects were copied from the origin's store into the clone's own
    assert set(store_objects(clone)) <= set(store_objects(repo)) and store_objects(clone)


def test_clone_before_install_then_fmhub_checkout(repo, tmp_path):
    ckpt = repo / "model.safetensors"
    save_tensors(ckpt, model())
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v0")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert (clone / "model.safetensors").read_bytes().startswith(b"fmhub manifest ")
    fmhub(clone, "install")
    out = fmhub(clone, "checkout").stdout.decode()
    assert "model.safetensors" in out
    assert sha256_file(clone / "model.safetensors") == sha256_file(ckpt)
    assert git(clone, "status", "--porcelain").stdout == b""


def test_sharded_checkpoint_with_index_and_peft_adapter(repo):
    t = model(n=8)
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_tensors(repo / fname, {k: t[k] for k in keys}, {"format": "pt"})
        weight_map |= {k: fname for k in keys}
    (repo / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    adapter = repo / "adapter"
    adapter.mkdir()
    save_tensors(adapter / "adapter_model.safetensors", {
        "base_model.model.q_proj.lora_A.weight": torch.randn(4, 32),
        "base_model.model.q_proj.lora_B.weight": torch.zeros(32, 4),
    })
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    want = {p: sha256_file(repo / p) for p in [*shards, "adapter/adapter_model.safetensors"]}
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "sharded + adapter")
    for p in want:
        assert Manifest.from_bytes(git(repo, "show", f"HEAD:{p}").stdout).tensors
        (repo / p).unlink()
    assert json.loads(git(repo, "show", "HEAD:model.safetensors.index.json").stdout)["weight_map"] == weight_map
    git(repo, "checkout", "--", ".")
    assert {p: sha256_file(repo / p) for p in want} == want


def test_coexists_with_git_lfs(repo):
    import shutil

    if shutil.which("git-lfs") is None:
        pytest.skip("git-lfs is not installed")
    # After `fmhub install`, git-lfs finds fmhub's pre-push hook in its place and
    # says so (exit 2), but configures its filters anyway; fmhub's hook keeps
    # running `git lfs pre-push`, and a second `fmhub install` is quiet.
    done = git(repo, "lfs", "install", "--local", check=False)
    assert git(repo, "config", "filter.lfs.process").stdout.strip() == b"git-lfs filter-process", done.stderr
    hook = (repo / ".git" / "hooks" / "pre-push").read_text()
    assert "fmhub pre-push hook" in hook and "git lfs pre-push" in hook
    fmhub(repo, "install")
    git(repo, "lfs", "track", "*.bin")
    (repo / "data.bin").write_bytes(b"\x00\x01" * 5000)
    save_tensors(repo / "model.safetensors", model())
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "both")
    assert git(repo, "show", "HEAD:data.bin").stdout.startswith(b"version https://git-lfs.github.com/spec/v1")
    assert git(repo, "show", "HEAD:model.safetensors").stdout.startswith(b"fmhub manifest ")
    assert "data.bin" in git(repo, "lfs", "ls-files").stdout.decode()
    for p in ("data.bin", "model.safetensors"):
        (repo / p).unlink()
    want = sha256_file
    git(repo, "checkout", "--", ".")
    assert (repo / "data.bin").read_bytes() == b"\x00\x01" * 5000
    assert want(repo / "model.safetensors")
    assert git(repo, "status", "--porcelain").stdout == b""


def test_track_replaces_an_lfs_line_for_the_same_pattern(tmp_path):
    r = tmp_path / "r"
    r.mkdir()
    git(r, "init", "-q")
    (r / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n")
    out = fmhub(r, "track", "*.safetensors").stdout.decode()
    assert "replaced" in out
    lines = (r / ".gitattributes").read_text().splitlines()
    assert lines == ["*.bin filter=lfs diff=lfs merge=lfs -text", "*.safetensors filter=fmhub diff=fmhub merge=fmhub -text"]
    fmhub(r, "untrack", "*.safetensors")
    assert (r / ".gitattributes").read_text().splitlines() == ["*.bin filter=lfs diff=lfs merge=lfs -text"]


def test_one_filter_process_per_git_command(repo, tmp_path):
    """git must start fmhub once for many files, not once per file."""
    log = tmp_path / "starts.log"
    cmd = git(repo, "config", "filter.fmhub.process").stdout.decode().strip()
    wrapper = tmp_path / "wrap.sh"
    wrapper.write_text(f"#!/bin/sh\necho start >> {log}\nexec {cmd}\n")
    wrapper.chmod(0o755)
    git(repo, "config", "filter.fmhub.process", str(wrapper))
    for i in range(5):
        save_tensors(repo / f"m{i}.safetensors", model(seed=i))
    git(repo, "add", ".")
    assert log.read_text().count("start") == 1
    for i in range(5):
        (repo / f"m{i}.safetensors").unlink()
    git(repo, "checkout", "--", ".")
    assert log.read_text().count("start") == 2


def test_staged_blob_reads_the_index_git_uses(repo, monkeypatch):
    """The re-add fast path compares with what the index holds, including a temporary index."""
    from fmhub.core.repo import staged_blob

    ckpt = repo / "model.safetensors"
    save_tensors(ckpt, model())
    git(repo, "add", "model.safetensors")
    staged = staged_blob("model.safetensors", 1 << 20, cwd=str(repo))
    assert staged == git(repo, "show", ":model.safetensors").stdout
    assert staged_blob("model.safetensors", len(staged) - 1, cwd=str(repo)) is None  # over the limit: not read
    assert staged_blob("absent.safetensors", 1 << 20, cwd=str(repo)) is None

    monkeypatch.setenv("GIT_INDEX_FILE", str(repo / ".git" / "other-index"))
    assert staged_blob("model.safetensors", 1 << 20, cwd=str(repo)) is None


def test_in_place_edit_of_one_tensor_restages_only_it(repo):
    ckpt = repo / "model.safetensors"
    save_tensors(ckpt, model())
    git(repo, "add", "model.safetensors")
    git(repo, "commit", "-qm", "v0")
    before = Manifest.from_bytes(git(repo, "show", "HEAD:model.safetensors").stdout)
    # flip the last byte of layers.2.weight in place, as a tool patching a file would
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        names = list(f.keys())
    header_len = int.from_bytes(ckpt.read_bytes()[:8], "little")
    offsets = json.loads(ckpt.read_bytes()[8 : 8 + header_len])["layers.2.weight"]["data_offsets"]
    with open(ckpt, "r+b") as f:
        f.seek(8 + header_len + offsets[1] - 1)
        last = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([last[0] ^ 1]))
    want = sha256_file(ckpt)
    git(repo, "add", "model.safetensors")
    after = Manifest.from_bytes(git(repo, "show", ":model.safetensors").stdout)
    changed = [t.name for t, u in zip(before.tensors, after.tensors) if t.oid != u.oid]
    assert changed == ["layers.2.weight"] and len(names) == len(after.tensors)
    ckpt.unlink()
    git(repo, "checkout", "--", "model.safetensors")
    assert sha256_file(ckpt) == want
