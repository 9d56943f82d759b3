"""The ways around fmhub's filter that used to be silent: `fmhub track` before `fmhub install`, a raw checkpoint
staged or committed at a tracked path, a moved or deleted environment, a clone made without fmhub."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import fmhub, git, run, save_tensors, sha256_file

TRACK = "*.safetensors filter=fmhub diff=fmhub merge=fmhub -text"


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(16, 16, generator=g), "b": torch.randn(8, generator=g)}


def new_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q")
    return path


def is_manifest(repo: Path, rev_path: str) -> bool:
    return git(repo, "cat-file", "blob", rev_path).stdout.startswith(b"fmhub manifest")


def out(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.decode() + proc.stderr.decode()


# -- track before install -------------------------------------------------------------------------------------------


def test_track_before_install_installs_the_filter_and_the_commit_holds_a_manifest(tmp_path):
    r = new_repo(tmp_path / "r")
    proc = fmhub(r, "track", "*.safetensors")
    assert "installed it (as `fmhub install`)" in proc.stdout.decode()
    assert git(r, "config", "filter.fmhub.required").stdout.strip() == b"true"
    assert (r / ".git" / "hooks" / "pre-commit").is_file()
    lines = (r / ".gitattributes").read_text().splitlines()
    assert lines[0].startswith("# ") and "fmhub install && fmhub checkout" in lines[0] and lines[1:] == [TRACK]
    save_tensors(r / "m.safetensors", tensors())
    git(r, "add", ".gitattributes", "m.safetensors")
    git(r, "commit", "-qm", "m")
    assert is_manifest(r, "HEAD:m.safetensors")
    # once installed, tracking says nothing about installing
    assert "install" not in fmhub(r, "track", "*.bin").stdout.decode()
    fmhub(r, "untrack", "*.safetensors", "*.bin")
    assert (r / ".gitattributes").read_text() == ""  # nothing left for fmhub: its hint goes too


def test_track_names_files_already_staged_raw_and_the_pre_commit_hook_refuses_them(tmp_path):
    r = new_repo(tmp_path / "r")
    save_tensors(r / "m.safetensors", tensors())
    git(r, "add", "m.safetensors")  # staged before tracking: raw bytes in the index
    said = fmhub(r, "track", "*.safetensors").stdout.decode()
    assert "already staged as raw checkpoint bytes: m.safetensors" in said and "git add --renormalize" in said
    git(r, "add", ".gitattributes")
    proc = git(r, "commit", "-qm", "raw", check=False)
    assert proc.returncode != 0
    msg = proc.stderr.decode()
    assert "commit refused: m.safetensors staged as raw checkpoint bytes" in msg
    assert "git add --renormalize m.safetensors" in msg and "Traceback" not in msg
    assert len([ln for ln in msg.splitlines() if ln.startswith("fmhub:")]) == 1
    assert git(r, "rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode != 0  # nothing committed
    # the fix it names works, and the hook lets the commit through
    git(r, "add", "--renormalize", "m.safetensors")
    git(r, "commit", "-qm", "m")
    assert is_manifest(r, "HEAD:m.safetensors")


def test_pre_commit_hook_keeps_an_existing_hook_and_ignores_untracked_checkpoints(tmp_path):
    r = new_repo(tmp_path / "r")
    hooks = r / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    mark = tmp_path / "ran"
    (hooks / "pre-commit").write_text(f"#!/bin/sh\necho ran >> {shlex.quote(str(mark))}\n")
    (hooks / "pre-commit").chmod(0o755)
    fmhub(r, "install")
    fmhub(r, "track", "*.safetensors")
    assert (hooks / "pre-commit.local").is_file()
    save_tensors(r / "plain.pt.bin", tensors())  # a checkpoint at a path fmhub does not track: git's business
    save_tensors(r / "m.safetensors", tensors(1))
    git(r, "add", ".")
    git(r, "commit", "-qm", "ok")
    assert mark.read_text() == "ran\n"
    fmhub(r, "uninstall")
    assert "fmhub" not in (hooks / "pre-commit").read_text() and not (hooks / "pre-commit.local").exists()


# -- a raw checkpoint committed without the filter ------------------------------------------------------------------


def commit_raw(r: Path, seed: int = 0) -> str:
    """What `fmhub track` did before it installed the filter: .gitattributes written, the checkpoint committed raw."""
    (r / ".gitattributes").write_text(TRACK + "\n")
    save_tensors(r / "m.safetensors", tensors(seed))
    git(r, "add", ".gitattributes", "m.safetensors")
    git(r, "commit", "-qm", "raw", "--no-verify")
    return git(r, "rev-parse", "HEAD").stdout.decode().strip()


def test_fsck_flags_a_raw_checkpoint_committed_at_a_tracked_path(tmp_path):
    r = new_repo(tmp_path / "r")
    sha = commit_raw(r)
    assert not is_manifest(r, "HEAD:m.safetensors")
    proc = fmhub(r, "fsck", check=False)
    assert proc.returncode == 1 and "store is consistent" not in proc.stdout.decode()
    err = proc.stderr.decode()
    assert "fmhub's filter is not installed in this repository" in err and "fmhub install && fmhub checkout" in err
    line = next(ln for ln in err.splitlines() if "is a raw checkpoint" in ln)
    assert f"m.safetensors at commit {sha[:12]}" in line
    assert "fmhub install && git add --renormalize m.safetensors && git commit" in line

    # the fix it names
    fmhub(r, "install")
    git(r, "add", "--renormalize", "m.safetensors")
    git(r, "commit", "-qm", "through fmhub")
    assert is_manifest(r, "HEAD:m.safetensors")
    proc = fmhub(r, "fsck")
    assert "store is consistent" in proc.stdout.decode()
    # the old commit keeps its bytes: said, not failed
    assert f"m.safetensors at {sha[:12]}" in proc.stderr.decode() and "until it is rewritten" in proc.stderr.decode()
    # ... and `--rev` of the raw commit fails again
    assert fmhub(r, "fsck", "--rev", sha, check=False).returncode == 1


def test_fsck_ignores_checkpoints_at_paths_fmhub_does_not_track(repo):
    save_tensors(repo / "plain.bin", tensors())
    git(repo, "add", "plain.bin")
    git(repo, "commit", "-qm", "plain")
    proc = fmhub(repo, "fsck")
    assert "store is consistent" in proc.stdout.decode() and proc.stderr == b""


# -- a moved or deleted environment ---------------------------------------------------------------------------------


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
                   check=True, capture_output=True)
    return path / "bin" / "python"


def test_a_deleted_environment_says_to_run_install_again(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    python = make_venv(tmp_path / "venv")
    r = new_repo(tmp_path / "r")
    run([str(python), "-m", "fmhub", "track", "*.safetensors"], r)  # installs with the environment's Python
    assert str(python) in git(r, "config", "filter.fmhub.process").stdout.decode()
    save_tensors(r / "m.safetensors", tensors())
    git(r, "add", ".gitattributes", "m.safetensors")
    git(r, "commit", "-qm", "m")
    want = sha256_file(r / "m.safetensors")

    subprocess.run(["rm", "-rf", str(tmp_path / "venv")], check=True)  # the environment goes
    save_tensors(r / "m.safetensors", tensors(1))
    proc = git(r, "add", "m.safetensors", check=False)
    assert proc.returncode != 0
    assert (f"fmhub: the Python that `fmhub install` recorded ({python}) is gone; run `fmhub install` again"
            in proc.stderr.decode())
    assert is_manifest(r, ":m.safetensors")  # nothing raw got in: filter.fmhub.required still holds
    proc = fmhub(r, "fsck", check=False)
    assert proc.returncode == 1 and "run `fmhub install` again" in proc.stderr.decode()

    # the fix it names, from the Python fmhub is installed in now
    said = fmhub(r, "install").stdout.decode()
    assert sys.executable in said
    git(r, "checkout", "--", "m.safetensors")
    assert sha256_file(r / "m.safetensors") == want
    assert git(r, "status", "--porcelain").stdout == b""


def test_a_moved_fmhub_installation_says_to_run_install_again(repo):
    """The guard checks boot.py too: an editable install's source tree that moved."""
    from fmhub.git.install import driver_config, guarded

    gone = repo.parent / "moved" / "fmhub" / "boot.py"
    for key, value in driver_config(guarded(sys.executable, "-S", str(gone))).items():
        git(repo, "config", key, value)
    save_tensors(repo / "m.safetensors", tensors())
    proc = git(repo, "add", "m.safetensors", check=False)
    assert proc.returncode != 0
    assert f"fmhub: the fmhub installation that `fmhub install` recorded ({gone}) is gone" in proc.stderr.decode()
    assert git(repo, "ls-files", "m.safetensors").stdout == b""
    # `fmhub track` (and `fmhub checkout`) notice and install again
    assert "installed fmhub again" in fmhub(repo, "track", "*.safetensors").stdout.decode()
    git(repo, "add", "m.safetensors")
    assert is_manifest(repo, ":m.safetensors")


def test_the_guard_quotes_odd_paths_and_passes_arguments_on(tmp_path):
    from fmhub.git.install import guarded, recorded_paths

    odd = tmp_path / "it's a `dir` $HOME %f" / "python"
    command = guarded(str(odd), "-S", "boot.py")
    assert recorded_paths(command) == [str(odd), "boot.py"]
    proc = subprocess.run(["sh", "-c", command + ' filter-process "$@"', "x", "arg"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == f"fmhub: the Python that `fmhub install` recorded ({odd}) is gone; run `fmhub install` again\n"
    echo = guarded("/bin/echo", "started")
    proc = subprocess.run(["sh", "-c", f"exec {echo} \"$@\"", "x", "a b", "c"], capture_output=True, text=True)
    assert proc.stdout == "started a b c\n"  # one simple command: a wrapper may `exec` it


# -- a clone made without fmhub -------------------------------------------------------------------------------------


def clone_without_fmhub(repo, tmp_path):
    """A checkpoint committed in ``repo``, then a plain `git clone` of it where git knows no fmhub filter (no
    `fmhub install --global`): the clone's directory and the checkpoint's sha256."""
    save_tensors(repo / "m.safetensors", tensors())
    git(repo, "add", "m.safetensors")
    git(repo, "commit", "-qm", "m")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    return clone, sha256_file(repo / "m.safetensors")


def test_a_clone_without_fmhub_holds_manifests_and_checkout_restores_it(repo, tmp_path):
    clone, want = clone_without_fmhub(repo, tmp_path)
    assert (clone / "m.safetensors").read_bytes().startswith(b"fmhub manifest")
    assert "fmhub install && fmhub checkout" in (clone / ".gitattributes").read_text()  # `fmhub track`'s hint
    proc = fmhub(clone, "fsck", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "fmhub install && fmhub checkout" in err
    assert "1 tracked file(s) in the work tree hold a manifest" in err and "m.safetensors" in err

    fmhub(clone, "install")
    assert "checked out m.safetensors" in fmhub(clone, "checkout").stdout.decode()
    assert sha256_file(clone / "m.safetensors") == want
    assert git(clone, "status", "--porcelain").stdout == b""
    proc = fmhub(clone, "fsck")
    assert "store is consistent" in proc.stdout.decode() and proc.stderr == b""


def test_checkout_in_a_clone_without_fmhub_installs_it_first(repo, tmp_path):
    clone, want = clone_without_fmhub(repo, tmp_path)
    said = fmhub(clone, "checkout").stdout.decode()
    assert "installed it (as `fmhub install`)" in said and "checked out m.safetensors" in said
    assert sha256_file(clone / "m.safetensors") == want
    save_tensors(clone / "m.safetensors", tensors(2))
    git(clone, "commit", "-qam", "v2")  # through the filter now
    assert is_manifest(clone, "HEAD:m.safetensors")

