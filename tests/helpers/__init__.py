"""What the tests share besides fixtures: running git and fmhub, an isolated git environment, repositories and
checkpoints, and inputs an attacker would send. Fixtures live in tests/conftest.py; the servers the tests start
are modules of this package (`lfs_server`, `hub_server`, `server` for `fmhub server`, `serving` for the serving
tests' tiny models and adapters).

Tests import it as ``tests.helpers`` (the repository root is on pytest's ``pythonpath``), so the suite runs
the same under every ``--import-mode``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO_ROOT / "benchmarks"

FMHUB = [sys.executable, "-m", "fmhub"]

# The global git config of every test: a fixed default branch, and no automatic gc or maintenance, so that no
# git command of a test starts packing (or detaches a background gc that outlives the test's temp dir).
GITCONFIG = """\
[init]
\tdefaultBranch = main
[gc]
\tauto = 0
[maintenance]
\tauto = false
"""

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "fmhub tests", "GIT_AUTHOR_EMAIL": "tests@fmhub.invalid",
    "GIT_COMMITTER_NAME": "fmhub tests", "GIT_COMMITTER_EMAIL": "tests@fmhub.invalid",
}


def git_environ(home: Path) -> dict[str, str]:
    """The variables that keep git in ``home``: a private HOME and global config (written here), no system config,
    a fixed identity."""
    (home / ".gitconfig").write_text(GITCONFIG)
    return {"HOME": str(home), "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"), "GIT_CONFIG_NOSYSTEM": "1", **GIT_IDENTITY}


def isolate_git(mp, home: Path) -> None:
    """What the `git_env` fixture does, for fixtures wider than a test (module scope): a private HOME, git config
    and identity, set through the pytest.MonkeyPatch ``mp``."""
    for k, v in git_environ(home).items():
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


def make_repo(path: Path, track: tuple[str, ...] = ("*.safetensors",)) -> Path:
    """A new git repo at ``path``: fmhub installed, ``track`` tracked and .gitattributes committed; automatic gc
    and maintenance off in its own config too. What the `repo` fixture copies."""
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "gc.auto", "0")
    git(path, "config", "maintenance.auto", "false")
    fmhub(path, "install")
    fmhub(path, "track", *track)
    git(path, "add", ".gitattributes")
    git(path, "commit", "-qm", "track " + " ".join(p.removeprefix("*.") for p in track))
    return path


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
