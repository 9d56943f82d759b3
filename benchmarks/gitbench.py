"""What the git-level benchmarks share: cold caches, an isolated git setup, timed commands,
a filter's peak RSS, repositories set up per tool, and pushes measured at the LFS server.

Used by filter_bench.py, push_bench.py and scale_bench.py; nothing here knows a benchmark's steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

MiB = 1 << 20

TOOLS = ("git-lfs", "fmhub")
DRIVER = {"git-lfs": "lfs", "fmhub": "fmhub"}

# Peak RSS of a filter process: git starts `filter.<driver>.process`, which we point at this
# wrapper; it runs the real filter as its child and logs the child's peak once it exits.
WRAPPER = r'''"""filter_bench: run a git filter process as a child, then record its peak RSS (KiB)."""
import resource
import subprocess
import sys

log, argv = sys.argv[1], sys.argv[2:]
rc = subprocess.call(argv)  # stdin, stdout and stderr inherited: git talks to the real filter directly
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(log, "a") as f:
    f.write(f"{peak_kib}\n")
sys.exit(rc)
'''


def write_wrapper(directory: Path) -> Path:
    path = directory / "rss_wrapper.py"
    path.write_text(WRAPPER)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def evict(*roots: Path) -> None:
    """Flush dirty pages, then drop the clean cached pages of every file under roots (no root tricks)."""
    os.sync()
    for root in roots:
        paths = [root] if root.is_file() else (Path(d) / f for d, _, fs in os.walk(root) for f in fs)
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_sync() -> float:
    """Seconds to write back what the last command left dirty (git-lfs and cp leave it; fmhub fsyncs inside)."""
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def isolated_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every command: a HOME and global git config of our own, so the user's config cannot leak in."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / ".gitconfig"
    cfg.write_text("[init]\n\tdefaultBranch = main\n[user]\n\tname = filter bench\n\temail = bench@fmhub.invalid\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_GLOBAL=str(cfg), GIT_CONFIG_NOSYSTEM="1", **(extra or {}))
    return env


class CommandFailed(SystemExit):
    """A command exited non-zero; uncaught it ends the benchmark with the command's output."""


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    """``n`` processes each spinning on a core while the block runs: "under load" (a build or a training job beside
    git), for both tools alike."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


class Runner:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True)
        if proc.returncode != 0:
            raise CommandFailed(
                f"command failed ({proc.returncode}) in {cwd}: {shlex.join(cmd)}\n"
                f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def timed(self, cmd: list[str], cwd: Path) -> float:
        t0 = time.perf_counter()
        self.run(cmd, cwd)
        return time.perf_counter() - t0

    def out(self, cmd: list[str], cwd: Path) -> str:
        return self.run(cmd, cwd).stdout.decode().strip()


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def read_rss(log: Path) -> int | None:
    """Largest peak RSS (bytes) any filter process of a step reported."""
    if not log.exists():
        return None
    vals = [int(x) for x in log.read_text().split()]
    return max(vals) * 1024 if vals else None


def fmhub_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmhub", *args]


class ToolRepo:
    """A fresh repository set up the way a user of ``tool`` would: install, track ``*.safetensors``, commit .gitattributes."""

    def __init__(self, tool: str, root: Path, runner: Runner, wrapper: Path, config: dict[str, str] | None = None) -> None:
        self.tool, self.root, self.r, self.wrapper = tool, root, runner, wrapper
        self.config = config or {}  # extra `git config` after the install (e.g. fmhub.core.deltas), for runs off the defaults
        self.driver = DRIVER[tool]
        self.real_filter: str | None = None

    def setup(self) -> None:
        self.root.mkdir(parents=True)
        self.r.run(["git", "init", "-q"], self.root)
        if self.tool == "git-lfs":
            self.r.run(["git", "lfs", "install", "--local"], self.root)
            self.r.run(["git", "lfs", "track", "*.safetensors"], self.root)
        else:
            self.r.run(fmhub_cmd("install"), self.root)
            self.r.run(fmhub_cmd("track", "*.safetensors"), self.root)
        for key, value in self.config.items():
            self.r.run(["git", "config", key, value], self.root)
        self.real_filter = self.r.out(["git", "config", f"filter.{self.driver}.process"], self.root)
        self.r.run(["git", "add", ".gitattributes"], self.root)
        self.r.run(["git", "commit", "-q", "-m", f"track *.safetensors with {self.tool}"], self.root)

    def measure_rss_into(self, log: Path) -> None:
        """Route the filter through the RSS wrapper, logging to ``log`` (one line per filter process)."""
        cmd = shlex.join([sys.executable, "-I", str(self.wrapper), str(log), *shlex.split(self.real_filter)])
        self.r.run(["git", "config", f"filter.{self.driver}.process", cmd], self.root)

    def unwrap_filter(self) -> None:
        """The real filter again: for steps where the wrapper's own start-up would be most of the time."""
        self.r.run(["git", "config", f"filter.{self.driver}.process", self.real_filter], self.root)

    def cold(self, *extra: Path) -> None:
        evict(self.root, *extra)

    def timed_add_commit(self, paths: list[str], msg: str) -> dict:
        t_add = self.r.timed(["git", "add", "--", *paths], self.root)
        t_commit = self.r.timed(["git", "commit", "-q", "-m", msg], self.root)
        return {"seconds": t_add + t_commit, "add_seconds": t_add, "commit_seconds": t_commit}


def measured_push(push: Callable[[], None], server) -> dict:
    """Run ``push`` against a tests/helpers/lfs_server.py server: the objects it gained, every request body sent, wall time."""
    before = server.objects()
    server.clear_log()
    t0 = time.perf_counter()
    push()
    seconds = time.perf_counter() - t0
    new = {oid: size for oid, size in server.objects().items() if oid not in before}
    wire = sum(int(r.headers.get("Content-Length") or 0) for r in server.requests)  # batch JSON, uploads, verify calls
    return {"uploaded_bytes": sum(new.values()), "objects": len(new), "request_bytes": wire, "seconds": seconds}


def tool_versions(env: dict[str, str]) -> dict:
    import numpy as np

    def v(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env).stdout.strip()
        except OSError:
            return None

    try:
        from importlib.metadata import version

        fm = version("fmhub")
    except Exception:
        fm = None
    return {"git": v(["git", "--version"]), "git-lfs": v(["git", "lfs", "version"]), "fmhub": fm, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(), "cpus": os.cpu_count()}
