#!/usr/bin/env python3
"""`fmhub server` under concurrent clones: its throughput against the test LFS server's, for the same clones, as a ratio.

    python benchmarks/server_bench.py                                  # 1 GiB bf16 checkpoint, 16 concurrent clones, 3 repeats
    python benchmarks/server_bench.py --repeat 2 --json out.json
    python benchmarks/server_bench.py --size-mb 8 --clients 4 --repeat 1   # a smoke run (~15 s)

One Llama-shaped bf16 checkpoint (`ckpt_gen.py`: hidden 2048, MLP 5504, 8
layers, the vocabulary filling it to --size-mb; smaller sizes shrink the
widths) is committed once by an admin in a work repository with nothing but
`fmhub install` + `fmhub track "*.safetensors"`, and pushed to both servers:

* **test server**: the project's test LFS server (`tests/helpers/lfs_server.py`:
  dulwich's LFS server made streaming, a ThreadingHTTPServer), in a process of
  its own; git itself comes from a bare repository (``file://``) and the
  objects from the server through ``lfs.url``;
* **fmhub server**: ``fmhub server --root ROOT --port 0`` in a process of its
  own, as users start it (waitress, 32 threads); git over smart HTTP and the
  objects from the LFS URL git-lfs derives (``…/NAME.git/info/lfs``), with a
  reader token (``fmhub server token … --repo NAME``) in a git credential
  helper (``store --file=…``, one file per client).

A clone is ``git clone --no-checkout`` (+ ``-c credential.helper=…`` for
fmhub server, + ``-c lfs.url=…`` for the test server), ``fmhub install`` in
the clone, then ``git checkout main``: the smudge filter downloads the objects
and decodes them. --clients clones (each a bash process running those three
commands) start at once; the wall time runs from the start to the last one
finishing, and the throughput is clients × checkpoint bytes / wall (GiB of
checkpoint delivered per second). The "fetch" variant replaces the checkout
by ``fmhub fetch`` (objects downloaded and hash-checked, nothing decoded): the
transfer alone. Every checked-out file is sha256-compared with the original,
and every fetched store compared with the admin's (names and sizes),
untimed.

Each repeat runs both servers in both variants (the order of the servers flips
on every other repeat); the ratio is fmhub server's throughput over the test
server's in the same repeat, reported as the median (min–max) over repeats.
Before each round the servers' stores and the bare repositories are evicted
from the page cache and dirty pages flushed; the previous round's clones are
deleted first. Measured per round: each client's phases (clone, install,
checkout or fetch), the CPU seconds of the server process, the CPU seconds of
all clients together, and the server's peak RSS (sampled every 0.1 s, and
VmHWM over the whole run). Clients run with OMP/MKL/OpenBLAS threads = 1
(--threads). A private HOME and global git config keep the user's out.

Disk: about clients × 1.7 × the checkpoint per round (the work trees and the
clones' stores), plus the two servers' copies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent  # where `tests.helpers.lfs_server` imports from
sys.path.insert(0, str(HERE))

import ckpt_gen as cg  # noqa: E402  (the Llama-shaped bf16 checkpoint)
import gitbench as gb  # noqa: E402  (isolated env, cold caches, sha256, tool versions)

GiB = 1 << 30
MiB = 1 << 20
FILE = "model.safetensors"
REPO = "bench"
ADMIN, READER = "admin@example.com", "reader@example.com"
SERVERS = ("test", "fmhub")
LABEL = {"test": "test LFS server", "fmhub": "fmhub server"}
MODES = ("checkout", "fetch")
LAST_PHASE = {"checkout": "checkout", "fetch": "fetch"}

# the test LFS server in a process of its own: prints its LFS URL, serves until its stdin closes
TEST_SERVER = """\
import sys
sys.path.insert(0, sys.argv[1])
from tests.helpers.lfs_server import running_lfs_server
with running_lfs_server(sys.argv[2]) as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the checkpoint


def shape_for(size_bytes: int) -> cg.Shape:
    """Llama widths for ``size_bytes`` of bf16: hidden 2048 / MLP 5504 / 8 layers at 1 GiB, narrower below, the vocabulary filling the rest."""
    for hidden in (2048, 1024, 512, 256, 128, 64):
        inter = hidden * 43 // 16  # 5504 for 2048, 2752 for 1024 (scale_bench's acceptance shape)
        for layers in range(8, 0, -1):
            try:
                shape = cg.shape_of_size(size_bytes, hidden, inter, layers)
            except ValueError:
                continue
            if shape.vocab >= 4 * hidden:  # embeddings and lm_head of a plausible vocabulary
                return shape
    raise SystemExit(f"--size-mb too small for a Llama-shaped checkpoint: {size_bytes} bytes")


# --------------------------------------------------------------------------- servers


class Proc:
    """A server subprocess, its CPU time and RSS (psutil), and a sampler of its peak RSS while a round runs."""

    def __init__(self, popen: subprocess.Popen) -> None:
        import psutil

        self.popen = popen
        self.ps = psutil.Process(popen.pid)
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU seconds so far."""
        t = self.ps.cpu_times()
        return t.user, t.system

    def start_sampling(self) -> None:
        self._peak, self._stop = 0, threading.Event()

        import psutil

        def sample() -> None:
            while not self._stop.wait(0.1):
                try:
                    self._peak = max(self._peak, self.ps.memory_info().rss)
                except psutil.Error:  # it exited
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop_sampling(self) -> int:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return self._peak

    def hwm(self) -> int | None:
        """VmHWM: the process's peak RSS since it started."""
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def threads(self) -> int:
        return self.ps.num_threads()

    def stop(self) -> None:
        if self.popen.stdin:
            self.popen.stdin.close()
        self.popen.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def start_test_server(store: Path, env: dict) -> tuple[Proc, str]:
    p = subprocess.Popen([sys.executable, "-c", TEST_SERVER, str(REPO_ROOT), str(store)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    url = p.stdout.readline().strip()
    if not url.startswith("http://"):
        p.kill()
        raise SystemExit(f"the test LFS server did not start (it printed {url!r})")
    return Proc(p), url


def start_fmhub_server(root: Path, env: dict, log_path: Path) -> tuple[Proc, str, list[str]]:
    """``fmhub server --root ROOT --port 0``; (process, base URL, the lines it logged so far: warnings, errors)."""
    p = subprocess.Popen([*gb.fmhub_cmd("server", "--root", str(root), "--port", "0")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    found: dict[str, str] = {}

    def drain() -> None:  # it logs to stderr: read it all, or it blocks once the pipe fills
        with open(log_path, "a") as out:
            for line in p.stderr:
                lines.append(line)
                out.write(line)
                out.flush()
                m = re.search(r" at (http://\S+) ", line)
                if m:
                    found["url"] = m.group(1)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 60
    while "url" not in found:
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise SystemExit("fmhub server did not start:\n" + "".join(lines))
        time.sleep(0.05)
    return Proc(p), found["url"], lines


# --------------------------------------------------------------------------- set-up


def store_objects(root: Path) -> dict[str, int]:
    """name -> size of every file under ``root`` (an LFS object store: files are named by their oid)."""
    return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file() and re.fullmatch(r"[0-9a-f]{64}", p.name)} if root.exists() else {}


def setup(work: Path, r: gb.Runner, shape: cg.Shape, seed: int) -> dict:
    """The admin's repository with v0 committed, the fmhub server root with its repository and tokens, the bare repository."""
    repo = work / "admin"
    repo.mkdir()
    r.run(["git", "init", "-q", "-b", "main"], repo)
    r.run(["git", "config", "user.email", ADMIN], repo)
    r.run(gb.fmhub_cmd("install"), repo)
    r.run(gb.fmhub_cmd("track", "*.safetensors"), repo)
    t0 = time.perf_counter()
    written = cg.write_version(repo, shape, seed, "v0", 1)
    log(f"wrote {FILE}: {(repo / FILE).stat().st_size / MiB:.1f} MiB in {time.perf_counter() - t0:.1f} s; committing")
    r.run(["git", "add", "-A"], repo)
    r.run(["git", "commit", "-qm", "v0"], repo)
    srv = work / "srv"
    r.run(gb.fmhub_cmd("server", "init", REPO, "--root", str(srv)), work)
    admin = r.out(gb.fmhub_cmd("server", "token", ADMIN, "--admin", REPO, "--root", str(srv)), work).splitlines()[-1].strip()
    reader = r.out(gb.fmhub_cmd("server", "token", READER, "--repo", REPO, "--root", str(srv)), work).splitlines()[-1].strip()
    bare = work / "bare.git"
    r.run(["git", "init", "-q", "--bare", str(bare)], work)
    return {"repo": repo, "srv": srv, "bare": bare, "admin_token": admin, "reader_token": reader, "sha256": written.sha256[FILE],
            "bytes": (repo / FILE).stat().st_size, "objects": store_objects(repo / ".git" / "lfs")}


def creds_line(url: str, user: str, token: str) -> str:
    return f"http://{user.partition('@')[0]}:{token}@{url.removeprefix('http://')}\n"


def push_both(s: dict, r: gb.Runner, fmhub_url: str, test_lfs_url: str, work: Path) -> dict:
    repo = s["repo"]
    creds = work / ".creds-admin"
    creds.write_text(creds_line(fmhub_url, ADMIN, s["admin_token"]))
    r.run(["git", "config", "credential.helper", f"store --file={creds}"], repo)
    r.run(["git", "remote", "add", "server", f"{fmhub_url}/{REPO}.git"], repo)
    r.run(["git", "remote", "add", "base", s["bare"].as_uri()], repo)
    times = {}
    t0 = time.perf_counter()
    r.run(["git", "push", "-q", "server", "main"], repo)
    times["fmhub"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r.run(["git", "-c", f"lfs.url={test_lfs_url}", "push", "-q", "base", "main"], repo)
    times["test"] = time.perf_counter() - t0
    return times


# --------------------------------------------------------------------------- a round of clones


def client_script(server: str, mode: str, dest: Path, times: Path, url: str, creds: Path | None, bare: Path) -> str:
    """bash: the clone's three commands, a timestamp ($EPOCHREALTIME) before and after each. ``url``: fmhub server's base URL, or the test server's LFS URL."""
    if server == "fmhub":
        clone = ["git", "clone", "-q", "--no-checkout", "-c", f"credential.helper=store --file={creds}", f"{url}/{REPO}.git", str(dest)]
    else:
        clone = ["git", "clone", "-q", "--no-checkout", "-c", f"lfs.url={url}", bare.as_uri(), str(dest)]
    last = ["git", "checkout", "-q", "main"] if mode == "checkout" else gb.fmhub_cmd("fetch")
    stamp = f"echo $EPOCHREALTIME >> {shlex.quote(str(times))}"
    return "\n".join(["set -e", stamp, shlex.join(clone), stamp, f"cd {shlex.quote(str(dest))}", shlex.join(gb.fmhub_cmd("install")),
                      stamp, shlex.join(last), stamp])


def run_round(server: str, mode: str, ctx: dict, proc: Proc, url: str) -> dict:
    clients, work, env = ctx["clients"], ctx["work"], ctx["env"]
    rdir = work / "round"
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir()
    scripts = []
    for i in range(clients):
        creds = None
        if server == "fmhub":
            creds = rdir / f".creds-{i}"
            creds.write_text(creds_line(url, READER, ctx["reader_token"]))
        scripts.append(client_script(server, mode, rdir / f"c{i}", rdir / f"t{i}", url, creds, ctx["bare"]))
    gb.evict(ctx["srv"], ctx["bare"], ctx["test_store"])
    cpu0 = proc.cpu_seconds()
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.start_sampling()
    spy = None
    if ctx["py_spy"] is not None and server == "fmhub":
        ctx["py_spy"].mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.popen.pid), "--rate", "50", "--format", "raw", "--threads",
                                "--output", str(ctx["py_spy"] / f"fmhub-server-{mode}-{ctx['round']}.txt")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    with contextlib.ExitStack() as files:
        outs = [files.enter_context(open(rdir / f"out{i}", "wb")) for i in range(clients)]
        logs = [files.enter_context(open(rdir / f"log{i}", "wb")) for i in range(clients)]
        t0 = time.time()
        popens = [subprocess.Popen(["bash", "-c", s], cwd=rdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=lg)
                  for s, out, lg in zip(scripts, outs, logs)]
        rcs = [p.wait() for p in popens]
        wall = time.time() - t0
    peak = proc.stop_sampling()
    if spy is not None:
        import signal

        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = proc.cpu_seconds()
    server_user, server_sys = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    failed = [i for i, rc in enumerate(rcs) if rc != 0]
    if failed:
        i = failed[0]
        raise SystemExit(f"{len(failed)} of {clients} clones from {LABEL[server]} failed ({mode}); client {i}'s output:\n"
                         + (rdir / f"out{i}").read_text(errors="replace")[-2000:] + (rdir / f"log{i}").read_text(errors="replace")[-4000:])
    per_client = []
    for i in range(clients):
        ts = [float(x) for x in (rdir / f"t{i}").read_text().split()]
        per_client.append({"clone": ts[1] - ts[0], "install": ts[2] - ts[1], LAST_PHASE[mode]: ts[3] - ts[2], "done_after": ts[3] - t0})
    warnings = sorted({line.strip() for i in range(clients) for line in (rdir / f"log{i}").read_text(errors="replace").splitlines() if line.strip()})
    ok = verify(mode, rdir, clients, ctx)
    shutil.rmtree(rdir)
    os.sync()
    phases = ["clone", "install", LAST_PHASE[mode]]
    return {
        "server": server, "mode": mode, "wall_seconds": wall,
        "gib_per_s": clients * ctx["bytes"] / GiB / wall,
        "phase_median_seconds": {ph: statistics.median(c[ph] for c in per_client) for ph in phases},
        "phase_max_seconds": {ph: max(c[ph] for c in per_client) for ph in phases},
        "first_done_seconds": min(c["done_after"] for c in per_client),
        "server_cpu_seconds": server_user + server_sys, "server_user_seconds": server_user, "server_system_seconds": server_sys,
        "clients_cpu_seconds": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "server_peak_rss_bytes": peak, "server_threads_after": proc.threads(),
        "verified": ok, "client_stderr": warnings[:20], "per_client": per_client,
    }


def verify(mode: str, rdir: Path, clients: int, ctx: dict) -> bool:
    """Every checked-out file has the original's sha256; every fetched store holds exactly the admin's objects."""
    for i in range(clients):
        dest = rdir / f"c{i}"
        if mode == "checkout":
            got = gb.sha256_file(dest / FILE)
            if got != ctx["sha256"]:
                raise SystemExit(f"clone {i}: {FILE} has sha256 {got}, not the original's {ctx['sha256']}")
        else:
            got = store_objects(dest / ".git" / "lfs")
            if got != ctx["objects"]:
                raise SystemExit(f"clone {i}: fetched {len(got)} objects ({sum(got.values())} bytes), "
                                 f"the admin has {len(ctx['objects'])} ({sum(ctx['objects'].values())} bytes)")
    return True


# --------------------------------------------------------------------------- report


def med(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def spread(xs: list[float], fmt: str) -> str:
    m, lo, hi = med(xs)
    return f"{m:{fmt}}" if len(xs) == 1 else f"{m:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def summarize(rounds: list[dict], modes: list[str]) -> dict:
    out = {}
    for mode in modes:
        per = {s: [r for r in rounds if r["mode"] == mode and r["server"] == s] for s in SERVERS}
        ratios = [f["gib_per_s"] / t["gib_per_s"] for t, f in zip(per["test"], per["fmhub"])]
        out[mode] = {"ratio_fmhub_over_test": med(ratios), "ratios": ratios,
                     **{s: {k: med([r[k] for r in per[s]]) for k in ("wall_seconds", "gib_per_s", "server_cpu_seconds",
                                                                      "clients_cpu_seconds", "server_peak_rss_bytes", "first_done_seconds")}
                        for s in SERVERS}}
    return out


def render(rounds: list[dict], modes: list[str], meta: dict) -> str:
    n, size = meta["clients"], meta["checkpoint_bytes"]
    title = (f"{n} concurrent clones of a {size / GiB:.3f} GiB bf16 checkpoint ({size / MiB:.0f} MiB, {meta['tensors']} tensors, "
             f"{meta['objects']} objects, {meta['object_bytes'] / MiB:.0f} MiB stored); medians (min–max) of {meta['repeat']} "
             f"repeat{'s' * (meta['repeat'] > 1)}, {meta['cpus']} CPUs, fmhub at {meta['fmhub_source']}")
    header = ("| variant | server | wall | GiB/s delivered | per clone: clone / install / last step (median; slowest last step) | "
              "server CPU (user + sys) | clients CPU | server peak RSS |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        for s in SERVERS:
            rs = [r for r in rounds if r["mode"] == mode and r["server"] == s]
            ph = [statistics.median(r["phase_median_seconds"][p] for r in rs) for p in ("clone", "install", LAST_PHASE[mode])]
            slow = statistics.median(r["phase_max_seconds"][LAST_PHASE[mode]] for r in rs)
            lines.append(f"| {mode} | {LABEL[s]} | {spread([r['wall_seconds'] for r in rs], '.1f')} s | "
                         f"{spread([r['gib_per_s'] for r in rs], '.3f')} | {ph[0]:.2f} / {ph[1]:.2f} / {ph[2]:.1f} s; {slow:.1f} s | "
                         f"{statistics.median(r['server_cpu_seconds'] for r in rs):.1f} s "
                         f"({statistics.median(r['server_user_seconds'] for r in rs):.1f} + {statistics.median(r['server_system_seconds'] for r in rs):.1f}) | "
                         f"{statistics.median(r['clients_cpu_seconds'] for r in rs):.0f} s | "
                         f"{max(r['server_peak_rss_bytes'] for r in rs) / MiB:.0f} MiB |")
    lines += ["", "| variant | throughput, fmhub server / test server |", "|---|---|"]
    for mode in modes:
        per = {s: [r for r in rounds if r["mode"] == mode and r["server"] == s] for s in SERVERS}
        ratios = [f["gib_per_s"] / t["gib_per_s"] for t, f in zip(per["test"], per["fmhub"])]
        lines.append(f"| {mode} | **{spread(ratios, '.3f')}×** |")
    lines += ["", (f"last step: `git checkout main` (smudge: download + decode) or `fmhub fetch` (download only); "
                   f"GiB/s = {n} × checkpoint / wall; server peak RSS sampled every 0.1 s during the rounds "
                   f"(VmHWM over the whole run: test server {meta['vmhwm']['test'] / MiB:.0f} MiB, "
                   f"fmhub server {meta['vmhwm']['fmhub'] / MiB:.0f} MiB).")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def source_state() -> str | None:
    """The commit of the fmhub checkout being measured, "+dirty" when fmhub/ has uncommitted changes."""
    top = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=top, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fmhub"], cwd=top, capture_output=True, text=True, check=False).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size-mb", type=int, default=1024, help="checkpoint size in MiB (default 1024)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clones (default 16)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per server and variant; medians (min–max) are shown (default 3)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from checkout,fetch (default both)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL/OpenBLAS threads of every client process (default 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the repositories go (a fresh subdir, removed at the end; default: temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure as JSON here")
    ap.add_argument("--keep-server-log", type=Path, default=None, help="copy fmhub server's log (stderr) here")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="profile the fmhub server during its rounds with `py-spy record` (collapsed stacks into DIR; "
                         "the sampler takes CPU too: the figures of such a run are not the benchmark's)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES) or not modes:
        raise SystemExit(f"--modes: from {','.join(MODES)}")
    shape = shape_for(args.size_mb * MiB)
    source = source_state()
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = (args.clients * 1.8 + 4) * shape.payload_bytes
    free = shutil.disk_usage(parent).free
    if free < need:
        raise SystemExit(f"not enough disk under {parent}: about {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free (fewer --clients or a smaller --size-mb)")
    work = Path(tempfile.mkdtemp(prefix="fmhub-server-bench-", dir=parent)).resolve()
    threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
    env = gb.isolated_env(work / "home", threads)
    r = gb.Runner(env)
    servers: dict[str, Proc] = {}
    try:
        log(f"checkpoint: {shape}, {shape.payload_bytes / MiB:.0f} MiB; {args.clients} clients; in {work}")
        s = setup(work, r, shape, args.seed)
        test_store = work / "test-lfs"
        servers["test"], test_url = start_test_server(test_store, env)
        servers["fmhub"], fmhub_url, server_lines = start_fmhub_server(s["srv"], env, work / "fmhub-server.log")
        push_times = push_both(s, r, fmhub_url, test_url, work)
        log(f"pushed: fmhub server {push_times['fmhub']:.1f} s, test server {push_times['test']:.1f} s")
        held = {"test": store_objects(test_store), "fmhub": store_objects(s["srv"] / ".fmhub" / "lfs")}
        for name, objs in held.items():
            if not set(s["objects"]) <= set(objs):
                raise SystemExit(f"{LABEL[name]} lacks {len(set(s['objects']) - set(objs))} of the pushed objects")
        ctx = {"clients": args.clients, "work": work, "env": env, "srv": s["srv"], "bare": s["bare"], "test_store": test_store,
               "reader_token": s["reader_token"], "sha256": s["sha256"], "bytes": s["bytes"], "objects": s["objects"],
               "py_spy": args.py_spy, "round": 0}
        shutil.rmtree(s["repo"])  # the clones get every object from the servers; one checkpoint less on disk
        os.sync()
        urls = {"test": test_url, "fmhub": fmhub_url}
        rounds = []
        for i in range(args.repeat):
            order = SERVERS if i % 2 == 0 else SERVERS[::-1]
            for mode in modes:
                for name in order:
                    log(f"repeat {i + 1}/{args.repeat}: {args.clients} × {mode} from {LABEL[name]}")
                    ctx["round"] = i
                    res = run_round(name, mode, ctx, servers[name], urls[name])
                    res["repeat"] = i
                    rounds.append(res)
                    log(f"  {res['wall_seconds']:.1f} s, {res['gib_per_s']:.3f} GiB/s; server CPU {res['server_user_seconds']:.1f} + {res['server_system_seconds']:.1f} s, "
                        f"peak RSS {res['server_peak_rss_bytes'] / MiB:.0f} MiB")
        vmhwm = {k: p.hwm() or 0 for k, p in servers.items()}
        meta = {"clients": args.clients, "repeat": args.repeat, "modes": modes, "shape": vars(shape), "tensors": len(shape.tensors()),
                "checkpoint_bytes": s["bytes"], "sha256": s["sha256"], "objects": len(s["objects"]), "object_bytes": sum(s["objects"].values()),
                "push_seconds": push_times, "vmhwm": vmhwm, "threads": args.threads, "seed": args.seed, "cpus": os.cpu_count(),
                "fmhub_server_log": [ln.rstrip() for ln in server_lines][:50], "tool_versions": gb.tool_versions(env),
                "fmhub_source": source if source == source_state() else f"{source}, then {source_state()} by the end"}
        if args.keep_server_log:
            shutil.copyfile(work / "fmhub-server.log", args.keep_server_log)
    finally:
        for p in servers.values():
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(render(rounds, modes, meta))
    noisy = sorted({line for rd in rounds for line in rd["client_stderr"]})
    if noisy:
        print("\nwhat the clients wrote to stderr (first lines):\n" + "\n".join(f"  {line}" for line in noisy[:10]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "summary": summarize(rounds, modes), "rounds": rounds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
