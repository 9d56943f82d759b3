"""`fmhub server` as users run it: a subprocess on 127.0.0.1, repositories made by `fmhub server init`, tokens
by `fmhub server token`, clients that are plain git, git-lfs and fmhub with a git credential helper."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

from tests.helpers import FMHUB, fmhub, git, run, save_tensors

ADMIN, READER = "admin@example.com", "reader@example.com"
POLICY = """\
version: 1
roles:
  admin: [admin@example.com]
rules:
  - allow: [read, write]
    roles: [admin]
  - deny: [read, write]
    paths: ["secret/*"]
"""


@contextlib.contextmanager
def running_server(root: Path, *args: str, env: Optional[dict] = None) -> Iterator[tuple[str, list[str]]]:
    """Start ``fmhub server --root ROOT --port 0`` and yield (its URL, the lines it has logged so far)."""
    proc = subprocess.Popen([*FMHUB, "server", "--root", str(root), "--port", "0", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    url: dict[str, str] = {}

    def drain() -> None:  # the server logs to stderr: read it all, or it blocks when the pipe fills
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r" at (http://\S+) ", line)
            if m:
                url["url"] = m.group(1)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 60
    while "url" not in url:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("fmhub server did not start:\n" + "".join(lines))
        time.sleep(0.05)
    try:
        yield url["url"], lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def init_root(tmp_path: Path) -> tuple[Path, str, str]:
    """A server root with ``models`` (made by `fmhub server init`), ``plain`` (a plain `git init --bare`: HEAD -> master)
    and tokens for an admin of both and a reader of both; (root, admin token, reader token)."""
    root = tmp_path / "srv"
    fmhub(tmp_path, "server", "init", "models", "--root", str(root))
    run(["git", "-c", "init.defaultBranch=master", "init", "-q", "--bare", str(root / "plain.git")], tmp_path)
    admin = fmhub(tmp_path, "server", "token", ADMIN, "--admin", "models", "--admin", "plain", "--root", str(root)).stdout.decode().strip()
    reader = fmhub(tmp_path, "server", "token", READER, "--repo", "models", "--repo", "plain", "--root", str(root)).stdout.decode().strip()
    return root, admin, reader


def use_token(repo: Path, url: str, token: str, user: str) -> None:
    """Configure ``repo`` as a user does: a git credential helper holding the token, and the user's identity."""
    creds = repo.parent / f".creds-{repo.name}"
    creds.write_text(f"http://{user.partition('@')[0]}:{token}@{url.removeprefix('http://')}\n")
    git(repo, "config", "credential.helper", f"store --file={creds}")
    git(repo, "config", "user.email", user)


def clone(tmp_path: Path, url: str, name: str, token: str, user: str, dest: str, branch: str = "main",
          check: bool = True) -> tuple[Path, subprocess.CompletedProcess]:
    """git clone --no-checkout, the credential helper and `fmhub install`, then check out ``branch``."""
    path = tmp_path / dest
    creds = tmp_path / f".creds-{dest}"
    creds.write_text(f"http://{user.partition('@')[0]}:{token}@{url.removeprefix('http://')}\n")
    run(["git", "-c", f"credential.helper=store --file={creds}", "clone", "-q", "--no-checkout", f"{url}/{name}.git", str(path)], tmp_path)
    use_token(path, url, token, user)
    fmhub(path, "install")
    return path, git(path, "checkout", "-q", branch, check=check)


def lfs_request(url: str, path: str, token: Optional[str], body=None, method: Optional[str] = None) -> tuple[int, dict, dict]:
    """(status, JSON answer or {"raw": bytes}, headers) of one request to the server."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/vnd.git-lfs+json", "Accept": "application/vnd.git-lfs+json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), dict(exc.headers)
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, {"raw": raw}, headers


def batch(url: str, repo: str, token: Optional[str], oids: list[tuple[str, int]], operation: str = "download"):
    body = {"operation": operation, "transfers": ["basic"], "objects": [{"oid": o, "size": s} for o, s in oids]}
    return lfs_request(url, f"/{repo}.git/info/lfs/objects/batch", token, body)


def audit_entries(root: Path, repo: str) -> list[dict]:
    log = root / f"{repo}.git" / "fmhub" / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def work_tree(tmp_path: Path, checkpoints: dict, policy: Optional[str] = None, user: str = ADMIN) -> Path:
    """A repository with fmhub installed, ``*.safetensors`` tracked, ``checkpoints`` (path -> tensors) and the policy, committed."""
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    git(work, "config", "user.email", user)
    fmhub(work, "install")
    fmhub(work, "track", "*.safetensors")
    if policy is not None:
        (work / ".fmhub").mkdir()
        (work / ".fmhub" / "policy.yaml").write_text(policy)
    for path, tensors in checkpoints.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        save_tensors(work / path, tensors)
    git(work, "add", "-A")
    git(work, "commit", "-qm", "checkpoints")
    return work
