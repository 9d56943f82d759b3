"""Start ``vllm serve`` on an export (`fmhub.serving.export`) and hold it as a `fmhub.plugin.interfaces.ServerHandle`.

vLLM runs as a child process in its own process group (it starts workers of
its own), with its output in ``<export>/vllm.log``. ``serve`` returns once
``GET /health`` answers; if vLLM exits first, the error carries the end of
its output, which is where vLLM says why (no GPU, out of memory, a bad flag).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from fmhub.base.errors import FmhubError
from fmhub.serving.config import ServeConfig
from fmhub.serving.export import API_KEY_ENV, ExportPlan, backend_options, export
from fmhub.serving.vllm_client import VllmClient

LOG_FILE = "vllm.log"
STOP_GRACE_S = 30.0  # vLLM frees the GPU on SIGTERM; give it that long before SIGKILL


def serve(config: ServeConfig) -> "VllmServer":
    """Export ``config`` (to the backend option export_dir, else <cache_dir>/vllm) and run vLLM on it.

    Without vLLM here, the export is still written and the error says how to run it elsewhere.
    """
    opts = backend_options(config)
    if config.port == 0:
        config = dataclasses.replace(config, port=free_port(config.host))
    out, temp = opts.get("export_dir") or export_dir(config), None
    if out is None:
        out = temp = tempfile.mkdtemp(prefix="fmhub-vllm-")
    plan = export(config, out)
    vllm = find_vllm(opts.get("executable"))
    if vllm is None:
        raise not_installed(plan.out_dir)
    return launch(plan, vllm, opts["timeout"], config.admin_token, cleanup=temp)


def export_dir(config: ServeConfig) -> str | None:
    """<cache_dir>/vllm, with the local backend's default cache_dir (in the git dir) when none is set; None: a temp dir."""
    if config.cache_dir:
        return os.path.join(config.cache_dir, "vllm")
    if config.base.repo:
        from fmhub.core.repo import common_dir

        return os.path.join(common_dir(config.base.repo), "fmhub", "serve-cache", "vllm")
    return None


def find_vllm(executable: str | None = None) -> list[str] | None:
    """The command that runs vLLM's CLI, or None where vLLM is not installed."""
    if executable:
        found = shutil.which(executable)
        if not found:
            raise FmhubError(f"backend option executable: {executable!r} is not an executable file or a command on PATH")
        return [found]
    found = shutil.which("vllm") or shutil.which("vllm", path=os.path.dirname(sys.executable))
    return [found] if found else None


def not_installed(export_dir: str) -> FmhubError:
    return FmhubError(
        "vLLM is not installed here: install it on a machine with a GPU (`pip install vllm`) and run fmhub there, "
        f"or run `fmhub serve --backend vllm --export-only DIR` and then DIR/serve.sh on that machine "
        f"(this run's export is at {export_dir}; copy the whole directory)"
    )


def free_port(host: str) -> int:
    """A port nothing listens on now, for a config that asked for port 0 (vLLM would not tell us which it took)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "0.0.0.0", "::") else ("::" if family == socket.AF_INET6 else "127.0.0.1"), 0))
        return s.getsockname()[1]


class VllmServer:
    """A running ``vllm serve``: ``url``, ``wait()``, ``stop()`` (idempotent)."""

    def __init__(self, plan: ExportPlan, process: subprocess.Popen, log_path: str, cleanup: str | None = None) -> None:
        self.plan = plan
        self.url = plan.url
        self.process = process
        self.log_path = log_path
        self._cleanup = cleanup  # a temporary export to remove once stopped

    def wait(self) -> None:
        try:
            rc = self.process.wait()
        except KeyboardInterrupt:
            self.stop()
            return
        self._remove_temp()
        if rc not in (0, -signal.SIGTERM, -signal.SIGINT):
            raise FmhubError(f"vLLM stopped with status {rc}: {log_tail(self.log_path)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._remove_temp()

    def _remove_temp(self) -> None:
        if self._cleanup:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None


def launch(plan: ExportPlan, vllm: list[str], timeout: float, token: str | None = None,
           cleanup: str | None = None) -> VllmServer:
    """Run ``plan``'s command with ``vllm`` as the program and return once it answers ``/health``."""
    env = {**os.environ, **plan.env}
    if token:
        env[API_KEY_ENV] = token  # not in argv: other users can read a process's arguments
    log_path = os.path.join(plan.out_dir, LOG_FILE)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*vllm, *plan.argv[1:]], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = VllmServer(plan, proc, log_path, cleanup)
    client = VllmClient(plan.url, timeout=5.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                raise FmhubError(f"vLLM exited with status {rc} before answering on {plan.url}: {log_tail(log_path)}")
            if client.health():
                return server
            if time.monotonic() > deadline:
                raise FmhubError(f"vLLM did not answer {plan.url}/health within {timeout:g} s (a large model still "
                                 f"loading? raise the backend option timeout); its output is in {log_path}")
            time.sleep(0.25)
    except BaseException:
        server._cleanup = None  # keep the export: the message points at its log
        server.stop()
        raise


def log_tail(path: str, lines: int = 15, limit: int = 4000) -> str:
    """The end of vLLM's output, on one line per line joined by ' | ', and where the rest is."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no output; see {path})"
    tail = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    return (" | ".join(tail) or "(no output)") + f" (full output: {path})"
