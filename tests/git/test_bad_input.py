"""Bad input, missing or corrupt objects, a full disk, a killed filter: real git in temp repos.

Every failure must give one clear ``fmhub:`` line naming the file (and the
tensor at fault, where there is one), leave git's index unchanged and the
object store consistent (every visible object complete, no temp leftovers),
and the same command must succeed once the cause is fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from fmhub.core.manifest import Manifest

FMHUB = [sys.executable, "-m", "fmhub"]
CKPT = "model.safetensors"


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture
def env(git_env) -> dict[str, str]:
    """The test's environment, which conftest's `git_env` keeps away from the user's git config, as a dict."""
    e = dict(os.environ)
    e["GIT_TERMINAL_PROMPT"] = "0"
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        e.pop(k, None)
    return e


class Repo:
    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env
        self.lfs = path / ".git" / "lfs"

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=self.path, env=self.env, capture_output=True, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout!r}\n{proc.stderr.decode(errors='replace')}")
        return proc

    def git(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return self.run("git", *args, check=check, **kw)

    def fmhub(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return self.run(*FMHUB, *args, check=check, **kw)

    def stage(self) -> str:
        return self.git("ls-files", "--stage").stdout.decode()

    def write(self, name: str, data: bytes) -> Path:
        p = self.path / name
        p.write_bytes(data)
        return p

    def committed_manifest(self, name: str = CKPT, rev: str = "HEAD") -> Manifest:
        return Manifest.from_bytes(self.git("show", f"{rev}:{name}").stdout, name)

    def object_path(self, oid: str) -> Path:
        return self.lfs / "objects" / oid[0:2] / oid[2:4] / oid

    def objects(self) -> dict[str, Path]:
        root = self.lfs / "objects"
        return {p.name: p for p in root.rglob("*") if p.is_file()} if root.exists() else {}

    def temp_files(self) -> list[Path]:
        d = self.lfs / "tmp"
        return sorted(d.iterdir()) if d.exists() else []


@pytest.fixture
def repo(repo: Path, env) -> Repo:
    """conftest's `repo`, driven through `Repo`."""
    r = Repo(repo, env)
    assert r.git("status", "--porcelain").stdout == b""
    assert r.objects() == {} and r.temp_files() == []
    return r


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_bytes(seed: int = 0, metadata: dict | None = None) -> bytes:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "embed": torch.randn(64, 16, generator=g).bfloat16(),
        'layer 0."attn" weight': torch.randn(16, 16, generator=g),
        "layer.1.weight": torch.randn(16, 16, generator=g),
        "scale": torch.tensor(1.5),
    }
    return st_save(tensors, metadata=metadata or {"format": "pt"})


def raw_safetensors(header: dict, buffer: bytes, pad: bool = True) -> bytes:
    """A safetensors file written by hand, so its header can say anything."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + buffer


def fmhub_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode("utf-8", "replace").splitlines() if line.startswith("fmhub:")]


def assert_one_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exactly one ``fmhub:`` line, and it holds every needle."""
    assert proc.returncode != 0, proc
    lines = fmhub_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr.decode(errors="replace")
    line = lines[0]
    for needle in needles:
        assert needle in line, (needle, line)
    assert "internal error" not in line and "Traceback" not in proc.stderr.decode(errors="replace")
    return line


def assert_store_consistent(repo: Repo) -> None:
    """Every visible object is complete (hashes to its name, in the aa/bb/ layout); no temp leftovers."""
    for oid, p in repo.objects().items():
        assert len(oid) == 64 and p.parent.name == oid[2:4] and p.parent.parent.name == oid[0:2], p
        assert sha256(p.read_bytes()) == oid, f"partial or corrupt object {p}"
    assert repo.temp_files() == []


def assert_add_commit_checkout_identical(repo: Repo, data: bytes, name: str = CKPT) -> None:
    """The fixed file adds, commits, and checks out again byte for byte."""
    repo.write(name, data)
    repo.git("add", name)
    repo.git("commit", "-qm", f"add {name}")
    m = repo.committed_manifest(name)
    assert m.size == len(data)
    (repo.path / name).unlink()
    repo.git("checkout", "--", name)
    assert (repo.path / name).read_bytes() == data
    assert repo.git("status", "--porcelain").stdout == b""
    assert_store_consistent(repo)


def failed_add(repo: Repo, name: str, data: bytes, *needles: str) -> str:
    """`git add` of ``data`` fails with one clear line, leaving the index and the store consistent."""
    before = repo.stage()
    repo.write(name, data)
    proc = repo.git("add", name, check=False)
    line = assert_one_clear_error(proc, name, *needles)
    assert repo.stage() == before
    assert_store_consistent(repo)
    return line


# -- clean: files that are not what their header says ----------------------------


@pytest.mark.parametrize(
    "where",
    ["in the length prefix", "inside the header", "inside a tensor", "at a tensor boundary", "last byte"],
)
def test_truncated_file(repo, where):
    good = model_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    m_layout = json.loads(good[8 : 8 + n])
    spans = sorted((info["data_offsets"], name) for name, info in m_layout.items() if name != "__metadata__")
    base = 8 + n
    (second_begin, second_end), second = spans[1]
    cut = {
        "in the length prefix": 5,
        "inside the header": 8 + n // 2,
        "inside a tensor": base + (second_begin + second_end) // 2,
        "at a tensor boundary": base + second_begin,
        "last byte": len(good) - 1,
    }[where]
    needles = ["truncated"]
    if cut >= base:
        at_fault = second if where != "last byte" else spans[-1][1]
        needles.append(repr(at_fault))
    if where == "in the length prefix":
        # 5 bytes do not even look like safetensors: refused as not a checkpoint
        needles = ["not a checkpoint"]
    failed_add(repo, CKPT, good[:cut], *needles)
    # the download finished: the same command now succeeds
    assert_add_commit_checkout_identical(repo, good)


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}', "not valid JSON"),  # unclosed
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},}', "not valid JSON"),  # trailing comma
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, \xff8]}}', "not valid JSON"),  # not UTF-8
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', "appears twice"),
        (b'{"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "__metadata__"),
    ],
    ids=["unclosed", "trailing-comma", "not-utf8", "duplicate-key", "metadata-not-str"],
)
def test_corrupt_header_json(repo, raw, needle):
    raw += b" " * (-len(raw) % 8)
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * 8
    failed_add(repo, CKPT, data, needle)
    assert_add_commit_checkout_identical(repo, model_bytes())


NAME = 'block 3."mlp" weight'


@pytest.mark.parametrize(
    "header, buffer_size, needles",
    [
        (
            {"first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
             NAME: {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
            24,
            [repr(NAME), "overlaps", "lies about offsets"],
        ),
        (
            {"first": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
             NAME: {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]}},
            36,
            [repr(NAME), "gap of 4 bytes"],
        ),
        (
            {NAME: {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]},
             "last": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]}},
            28,
            [repr(NAME), "F32[4] needs 16 bytes", "give 12"],
        ),
        (
            {NAME: {"dtype": "BF16", "shape": [3, 0, 2], "data_offsets": [0, 2]}},
            2,
            [repr(NAME), "needs 0 bytes"],
        ),
        (
            {NAME: {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
            16,
            [repr(NAME), "bad data_offsets"],
        ),
        (
            {NAME: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            4,
            [repr(NAME), "bad shape"],
        ),
    ],
    ids=["overlap", "gap", "size-vs-dtype-shape", "empty-with-bytes", "reversed", "negative-dim"],
)
def test_header_lies_about_offsets_names_the_tensor(repo, header, buffer_size, needles):
    data = raw_safetensors(header, os.urandom(buffer_size))
    failed_add(repo, CKPT, data, *needles)
    assert_add_commit_checkout_identical(repo, model_bytes())


@pytest.mark.parametrize("extra", [1, 7, 4096])
def test_trailing_bytes_after_last_tensor(repo, extra):
    good = model_bytes()
    failed_add(repo, CKPT, good + os.urandom(extra), f"{extra} bytes follow the last tensor")
    assert_add_commit_checkout_identical(repo, good)


@pytest.mark.parametrize(
    "data",
    [b"hello, this is not a checkpoint\n", b"{}\n", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"x"],
    ids=["text", "json", "binary", "one-byte"],
)
def test_file_that_is_not_safetensors(repo, data):
    line = failed_add(repo, "notes.safetensors", data, "not a checkpoint", "fmhub untrack")
    assert line.startswith("fmhub: notes.safetensors:")
    # the fix: make it a real checkpoint (or untrack the pattern)
    assert_add_commit_checkout_identical(repo, model_bytes(), "notes.safetensors")


def test_failed_add_of_one_file_does_not_stage_the_good_one(repo):
    good = model_bytes(1)
    repo.write("good.safetensors", good)
    bad = model_bytes(2)[:-3]
    before = repo.stage()
    repo.write("bad.safetensors", bad)
    proc = repo.git("add", "good.safetensors", "bad.safetensors", check=False)
    assert_one_clear_error(proc, "bad.safetensors", "truncated")
    assert repo.stage() == before
    assert_store_consistent(repo)
    repo.write("bad.safetensors", model_bytes(2))
    repo.git("add", "good.safetensors", "bad.safetensors")
    repo.git("commit", "-qm", "both")
    for name, data in (("good.safetensors", good), ("bad.safetensors", model_bytes(2))):
        (repo.path / name).unlink()
        repo.git("checkout", "--", name)
        assert (repo.path / name).read_bytes() == data


# -- smudge: the store lost or damaged an object -----------------------------------


def commit_model(repo: Repo) -> tuple[bytes, Manifest]:
    data = model_bytes()
    repo.write(CKPT, data)
    repo.git("add", CKPT)
    repo.git("commit", "-qm", "model")
    return data, repo.committed_manifest()


def test_missing_object_at_checkout(repo, tmp_path):
    data, m = commit_model(repo)
    victim = m.by_name()['layer 0."attn" weight']
    obj = repo.object_path(victim.storage()[0][0])  # the object that holds it (compressed: not its own oid)
    saved = tmp_path / "saved-object"
    shutil.copy2(obj, saved)
    obj.unlink()
    before = repo.stage()

    (repo.path / CKPT).unlink()
    proc = repo.git("checkout", "--", CKPT, check=False)
    assert_one_clear_error(proc, CKPT, "missing", repr(victim.name), "fetch them", "fmhub fsck")
    assert repo.stage() == before
    assert not (repo.path / CKPT).exists()  # git writes nothing rather than a partial file
    assert_store_consistent(repo)

    proc = repo.fmhub("fsck", check=False)
    assert proc.returncode != 0
    report = proc.stdout.decode() + proc.stderr.decode()
    assert CKPT in report and victim.name in report and "missing" in report

    # the one-shot smudge says the same
    proc = repo.fmhub("filter-smudge", CKPT, input=m.to_bytes(), check=False)
    assert_one_clear_error(proc, CKPT, "missing", repr(victim.name))

    # put the object back: checkout succeeds, byte for byte
    shutil.copy2(saved, obj)
    repo.git("checkout", "--", CKPT)
    assert (repo.path / CKPT).read_bytes() == data
    assert repo.git("status", "--porcelain").stdout == b""
    assert repo.fmhub("fsck").returncode == 0


@pytest.mark.parametrize("which", ["tensor", "header"])
def test_corrupt_object_at_checkout(repo, which):
    data, m = commit_model(repo)
    victim = m.by_name()["layer.1.weight"]
    oid = victim.storage()[0][0] if which == "tensor" else m.header_oid
    obj = repo.object_path(oid)
    original = obj.read_bytes()
    mode = obj.stat().st_mode
    os.chmod(obj, 0o644)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    obj.write_bytes(bytes(flipped))
    os.chmod(obj, mode)
    before = repo.stage()

    (repo.path / CKPT).unlink()
    proc = repo.git("checkout", "--", CKPT, check=False)
    needles = [CKPT, "corrupt", "fmhub fsck"] + ([repr(victim.name)] if which == "tensor" else [])
    assert_one_clear_error(proc, *needles)
    assert repo.stage() == before
    assert not (repo.path / CKPT).exists()  # git writes nothing rather than a partial file

    proc = repo.fmhub("fsck", check=False)
    assert proc.returncode != 0
    report = proc.stdout.decode() + proc.stderr.decode()
    assert f"sha256:{oid}" in report and "corrupt" in report

    proc = repo.fmhub("filter-smudge", CKPT, input=m.to_bytes(), check=False)
    assert_one_clear_error(proc, *needles)

    os.chmod(obj, 0o644)
    obj.write_bytes(original)
    os.chmod(obj, mode)
    repo.git("checkout", "--", CKPT)
    assert (repo.path / CKPT).read_bytes() == data
    assert repo.git("status", "--porcelain").stdout == b""
    assert repo.fmhub("fsck").returncode == 0
    assert_store_consistent(repo)


# -- the disk fills up; the filter is killed ---------------------------------------


def big_checkpoint(nbytes: int, seed: int = 0) -> tuple[bytes, bytes]:
    """A file with one U8 tensor of ``nbytes`` (returns file, payload)."""
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    payload = payload.numpy().tobytes()
    header = {"__metadata__": {"format": "pt"}, "big": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}
    return raw_safetensors(header, payload), payload


def file_size_limit(nbytes: int):
    def preexec() -> None:
        # writes past the limit fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


@pytest.mark.parametrize(
    "nbytes", [4 << 20, 80 << 20], ids=["buffered-object", "spilled-object"]
)  # the store buffers objects up to 16 MiB (`fmhub.core.storewrite.SPILL_BYTES`), then streams them to a temp file
def test_full_disk(repo, nbytes):
    data, payload = big_checkpoint(nbytes)
    repo.write(CKPT, data)
    before = repo.stage()
    proc = repo.git("add", CKPT, check=False, preexec_fn=file_size_limit(1 << 20))
    assert_one_clear_error(proc, CKPT, "cannot write to the object store", "free some space")
    assert repo.stage() == before
    assert not repo.object_path(sha256(payload)).exists()
    assert_store_consistent(repo)

    # space was freed: the same command succeeds
    repo.git("add", CKPT)
    assert repo.object_path(sha256(payload)).exists()
    repo.git("commit", "-qm", "big")
    (repo.path / CKPT).unlink()
    repo.git("checkout", "--", CKPT)
    assert (repo.path / CKPT).read_bytes() == data
    assert_store_consistent(repo)


def test_killed_clean_leaves_no_visible_object(repo):
    data, payload = big_checkpoint(80 << 20)
    oid = sha256(payload)
    # killed at many points of its run (reading, encoding, writing the object, syncing it): whatever is
    # visible in the store is complete, and the tensor's object is either whole or absent
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8, 1.2):
        proc = subprocess.Popen(
            [*FMHUB, "filter-clean", CKPT], cwd=repo.path, env=repo.env,
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            proc.stdin.write(data)
            proc.stdin.flush()
            time.sleep(delay)
        except BrokenPipeError:
            pass
        finally:
            proc.kill()
            proc.wait()
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        for name, p in repo.objects().items():
            assert sha256(p.read_bytes()) == name
        if repo.object_path(oid).exists():
            repo.object_path(oid).chmod(0o644)
            repo.object_path(oid).unlink()  # the next round starts from nothing again
    leftovers = repo.temp_files()
    if not leftovers:  # every kill fell between writes: leave a writer's temp file the way a kill would
        (repo.lfs / "tmp").mkdir(exist_ok=True)
        (repo.lfs / "tmp" / "obj-killed").write_bytes(payload[: 1 << 20])
        leftovers = repo.temp_files()

    # fsck leaves a young temp file alone (a writer may still own it) ...
    out = repo.fmhub("fsck").stdout.decode()
    assert "0 stale temp files removed" in out and "store is consistent" in out
    assert repo.temp_files() == leftovers
    # ... and removes it once it is old
    old = time.time() - 2 * 3600
    for p in leftovers:
        os.utime(p, (old, old))
    out = repo.fmhub("fsck").stdout.decode()
    assert f"{len(leftovers)} stale temp files removed" in out and "store is consistent" in out
    assert_store_consistent(repo)

    # the full clean now succeeds and stores the tensor
    proc = repo.fmhub("filter-clean", CKPT, input=data)
    m = Manifest.from_bytes(proc.stdout, CKPT)
    assert [(t.name, t.oid) for t in m.tensors] == [("big", oid)]
    assert repo.object_path(oid).exists()
    assert_store_consistent(repo)


# -- stash ---------------------------------------------------------------------------


def test_stash_and_pop_restore_exact_bytes(repo):
    v1, _ = commit_model(repo)
    stage = repo.stage()
    v2 = model_bytes(seed=7, metadata={"format": "pt", "step": "100"})
    repo.write(CKPT, v2)
    assert repo.git("status", "--porcelain").stdout.decode().split() == ["M", CKPT]

    repo.git("stash")
    assert (repo.path / CKPT).read_bytes() == v1
    assert repo.git("status", "--porcelain").stdout == b""
    assert repo.stage() == stage

    repo.git("stash", "pop")
    assert (repo.path / CKPT).read_bytes() == v2
    assert repo.git("status", "--porcelain").stdout.decode().split() == ["M", CKPT]
    assert repo.stage() == stage
    assert_store_consistent(repo)
    assert repo.fmhub("fsck").returncode == 0
