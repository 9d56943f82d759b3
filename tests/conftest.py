"""Shared fixtures: an isolated git environment for every test, the one `repo` fixture, an LFS server; and the
tiers: each test is marked by the folder it sits in (tests/unit, tests/git, tests/models; see TIERS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# pytest-xdist workers share the machine's cores: give each worker (and the fmhub
# processes its tests start) its share of threads, set before anything imports torch
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pytest

from tests.helpers import git, git_environ, isolate_git, make_repo
from tests.helpers.lfs_server import running_lfs_server

HERE = Path(__file__).resolve().parent

# folder under tests/ -> the marker of every test in it (markers registered in pyproject.toml)
TIERS = {
    "unit": "unit",  # pure Python in this process: no git, no subprocess, no transformers model
    "git": "git",  # real git, git-lfs, fmhub commands and servers in subprocesses
    "models": "models",  # builds transformers / peft models
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = item.path.relative_to(HERE).parts[0]
        except ValueError:
            continue
        if folder in TIERS:
            item.add_marker(TIERS[folder])


@pytest.fixture(autouse=True)
def git_env(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's git config: a private HOME and global config (no auto gc or maintenance)."""
    home = tmp_path_factory.mktemp("home")
    for k, v in git_environ(home).items():
        monkeypatch.setenv(k, v)
    return home


@pytest.fixture(scope="session")
def repo_template(tmp_path_factory) -> Path:
    """What `repo` copies, made once per pytest process: `make_repo` in an isolated git environment."""
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(mp, tmp_path_factory.mktemp("template-home"))
        return make_repo(tmp_path_factory.mktemp("template") / "repo")


@pytest.fixture
def repo_config() -> dict[str, str]:
    """git config that `repo` sets in its repository; a module overrides this fixture to vary its repos."""
    return {}


@pytest.fixture
def repo(tmp_path, repo_template, repo_config) -> Path:
    """A fresh git repo at ``tmp_path / "repo"``: fmhub installed, *.safetensors tracked, .gitattributes committed,
    automatic gc and maintenance off, plus ``repo_config``. A copy of `repo_template` (its config, hooks and store
    are all inside .git), so a test pays for no `fmhub install`."""
    path = tmp_path / "repo"
    shutil.copytree(repo_template, path, symlinks=True)
    for key, value in repo_config.items():
        git(path, "config", key, value)
    return path


@pytest.fixture
def lfs_server(tmp_path):
    """A real Git LFS server (dulwich's, streaming, with fault switches) on 127.0.0.1; see tests/helpers/lfs_server.py.

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
