"""Shared fixtures: isolated git config, and fmhub-enabled repositories in temp dirs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

# pytest-xdist workers share the machine's cores: give each worker (and the fmhub
# processes its tests start) its share of threads, set before anything imports torch
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pytest

from lfs_server import running_lfs_server

FMHUB = [sys.executable, "-m", "fmhub"]


@pytest.fixture(autouse=True)
def git_env(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's git config: a private HOME and global config."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for k, v in {
        "GIT_AUTHOR_NAME": "fmhub tests", "GIT_AUTHOR_EMAIL": "tests@fmhub.invalid",
        "GIT_COMMITTER_NAME": "fmhub tests", "GIT_COMMITTER_EMAIL": "tests@fmhub.invalid",
    }.items():
        monkeypatch.setenv(k, v)
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")
    return home


def isolate_git(mp: pytest.MonkeyPatch, home: Path) -> None:
    """What `git_env` does, for fixtures wider than a test (module scope): a private HOME, git config and identity."""
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")
    for k, v in {"HOME": str(home), "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"), "GIT_CONFIG_NOSYSTEM": "1",
                 "GIT_AUTHOR_NAME": "fmhub tests", "GIT_AUTHOR_EMAIL": "tests@fmhub.invalid",
                 "GIT_COMMITTER_NAME": "fmhub tests", "GIT_COMMITTER_EMAIL": "tests@fmhub.invalid"}.items():
        mp.setenv(k, v)


def run(cmd: list[str], cwd: Path | str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["git", *args], repo, check=check)


def fmhub(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*FMHUB, *args], repo, check=check)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def store_objects(repo: Path) -> dict[str, int]:
    """oid -> size of every object in the repo's fmhub store."""
    root = repo / ".git" / "lfs" / "objects"
    return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.exists() else {}


@pytest.fixture
def lfs_server(tmp_path):
    """A real Git LFS server (dulwich's, streaming, with fault switches) on 127.0.0.1; see tests/lfs_server.py.

    Yields an LFSTestServer: ``.url`` (use as ``lfs.url``), ``.store_dir``, ``.requests``,
    ``.objects()``, ``.put(data)``, ``fail_next(n, status)``, ``corrupt(oid)``, ``require_auth(value)``.
    """
    with running_lfs_server(tmp_path / "lfs-server") as server:
        yield server


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: matrices this small gain nothing from a second thread, and on a busy
    machine its spin-waits made steps ~7x slower. Use with ``pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A fresh git repo with fmhub installed and *.safetensors tracked."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    fmhub(path, "install")
    fmhub(path, "track", "*.safetensors")
    git(path, "add", ".gitattributes")
    git(path, "commit", "-qm", "track safetensors")
    return path


def save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def commit_checkpoint(repo: Path, tensors: dict, message: str, path: str = "model.safetensors") -> str:
    """Save ``tensors`` to ``path`` in ``repo``, add and commit it; the sha256 of the file committed."""
    save_tensors(repo / path, tensors)
    git(repo, "add", path)
    git(repo, "commit", "-qm", message)
    return sha256_file(repo / path)


def committed_manifest(repo: Path, rev: str = "HEAD", path: str = "model.safetensors"):
    """The manifest git holds for ``path`` at ``rev``."""
    from fmhub.core.manifest import Manifest

    return Manifest.from_bytes(git(repo, "show", f"{rev}:{path}").stdout)


def second_ours_plugin() -> object:
    """A plugin that provides a merge strategy named ``ours``, as the built-in merge-basic does: a name clash."""
    from fmhub import hookimpl

    class Dup:
        @hookimpl
        def fmhub_merge_strategies(self):
            class S:
                name = "ours"

            return [S()]

    return Dup()


# a YAML document of a few lines whose aliases stand for 9**9 strings: what a bounded loader must refuse
BILLION_LAUGHS = """\
version: 1
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def socket_closed_within(sock, within: float) -> bool:
    """Whether the server has closed ``sock`` (after an answer or without one) within ``within`` seconds."""
    import socket

    sock.settimeout(within)
    try:
        while sock.recv(1 << 16):
            pass
    except socket.timeout:
        return False
    except ConnectionError:  # reset: it kept sending after the server closed
        pass
    return True
