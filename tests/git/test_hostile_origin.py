"""A hostile origin: commits whose manifests lie, served with objects that hash right, cloned with real git.

Each attack is a commit an attacker can push (manifests are plain text; the
objects are whatever bytes the attacker uploads, so they always hash to their
names). A clone must fail the checkout of that file with one ``fmhub:`` line,
stay under a memory bound, and leave no file that claims to be the checkpoint.
The store stays consistent and `fmhub fsck` names the bad manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from tests.helpers import fmhub, git

from fmhub.core.sparse_index import _HEAD as PATCH_HEAD

CKPT = "model.safetensors"
MAX_RSS_MB = 1024  # the bound; the defences keep these runs near the filter's own ~60 MB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def st_header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """A safetensors header (length prefix included) for ``(name, dtype, shape, nbytes)`` entries, in order."""
    obj, offset = {}, 0
    for name, dtype, shape, size in entries:
        obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def manifest(header: bytes, tensors: list[str], version: int = 1, size: str | None = None) -> bytes:
    """A manifest with the given tensor lines (after ``tensor ``); ``size`` overrides the file size line."""
    total = size if size is not None else str(len(header) + sum(int(t.split(" ")[3]) for t in tensors))
    lines = [f"fmhub manifest {version}", "format safetensors", f"size {total}", f"header sha256:{sha(header)} {len(header)}"]
    return ("\n".join(lines + [f"tensor {t}" for t in tensors]) + "\n").encode()


def zlib_bomb(inflated: int) -> bytes:
    """``b"FXZ1"`` and a zlib stream of ``inflated`` zero bytes (about a thousandth of that in size)."""
    z, zeros = zlib.compressobj(9), bytes(1 << 20)
    parts = [z.compress(zeros) for _ in range(inflated >> 20)]
    return b"FXZ1" + b"".join(parts) + z.flush()


def sparse_patch(count: int, first_index: int) -> bytes:
    block = zlib.compress(struct.pack("<I", first_index))
    return b"FSP1" + PATCH_HEAD.pack(4, 1, count, len(block)) + block + b"\x07"


PAYLOAD = bytes(range(16))
ROOT_1M = bytes(1 << 20)


def _lying_size():
    h = st_header([("a", "F32", [8], 32)])
    return manifest(h, [f'"a" F32 [8] 32 sha256:{sha(PAYLOAD)}']), [h, PAYLOAD], ("declares 32", "not 32;")


def _huge_shape():
    n = 1 << 40
    h = st_header([("a", "U8", [n], n)])
    return manifest(h, [f'"a" U8 [{n}] {n} sha256:{sha(PAYLOAD)}']), [h, PAYLOAD], (f"declares {n}", f"not {n};")


def _unicode_tensor_size():
    h = st_header([("a", "F32", [4], 16)])
    m = manifest(h, [f'"a" F32 [4] 16 sha256:{sha(PAYLOAD)}']).replace(b" 16 sha256", " 1\u00b2 sha256".encode())
    return m, [h, PAYLOAD], "malformed tensor line"


def _unicode_file_size():
    h = st_header([("a", "F32", [4], 16)])
    return manifest(h, [f'"a" F32 [4] 16 sha256:{sha(PAYLOAD)}'], size=f"{len(h) + 16}\u00b2"), [h, PAYLOAD], "malformed file size"


def _unicode_shape():
    h = st_header([("a", "F32", [4], 16)])
    return manifest(h, [f'"a" F32 [\u0664] 16 sha256:{sha(PAYLOAD)}']), [h, PAYLOAD], "malformed tensor line"


def _zlib_bomb_on_small_root():
    """A 16-byte root under a tensor that claims 1 GiB, then a delta that would inflate to 256 MiB."""
    n, bomb = 1 << 30, zlib_bomb(256 << 20)
    h = st_header([("a", "U8", [n], n)])
    line = f'"a" U8 [{n}] {n} sha256:{"0" * 64} from sha256:{sha(PAYLOAD)} delta xor-zlib sha256:{sha(bomb)} {len(bomb)}'
    return manifest(h, [line], version=2), [h, PAYLOAD, bomb], ("declares 1073741824", "not 1073741824;")


def _zlib_bomb_on_true_root():
    """A true 1 MiB root and a delta whose stream inflates to 256 MiB: inflation stops at the tensor's size."""
    n, bomb = len(ROOT_1M), zlib_bomb(256 << 20)
    h = st_header([("a", "U8", [n], n)])
    line = f'"a" U8 [{n}] {n} sha256:{"0" * 64} from sha256:{sha(ROOT_1M)} delta xor-zlib sha256:{sha(bomb)} {len(bomb)}'
    return manifest(h, [line], version=2), [h, ROOT_1M, bomb], "does not inflate to the tensor's size"


def _sparse_out_of_range():
    h = st_header([("a", "U8", [16], 16)])
    patch = sparse_patch(1, 1000)
    line = f'"a" U8 [16] 16 sha256:{"1" * 64} from sha256:{sha(PAYLOAD)} delta sparse sha256:{sha(patch)} {len(patch)}'
    return manifest(h, [line], version=2), [h, PAYLOAD, patch], "past the end of the tensor"


def _sparse_huge_count():
    h = st_header([("a", "U8", [16], 16)])
    patch = sparse_patch(1 << 40, 3)
    line = f'"a" U8 [16] 16 sha256:{"2" * 64} from sha256:{sha(PAYLOAD)} delta sparse sha256:{sha(patch)} {len(patch)}'
    return manifest(h, [line], version=2), [h, PAYLOAD, patch], "patch"


def _nested_header():
    raw = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    raw += b" " * (-len(raw) % 8)
    h = struct.pack("<Q", len(raw)) + raw
    return manifest(h, []), [h], "nested deeper"


def _header_disagrees():
    """The header object says [4] F32; the manifest says [2] F64 over the same 16 bytes."""
    h = st_header([("a", "F32", [4], 16)])
    return manifest(h, [f'"a" F64 [2] 16 sha256:{sha(PAYLOAD)}']), [h, PAYLOAD], "does not match its header"


def _long_chain():
    h = st_header([("a", "U8", [16], 16)])
    links = " ".join(f"delta sparse sha256:{sha(PAYLOAD)} 16" for _ in range(100))
    return manifest(h, [f'"a" U8 [16] 16 sha256:{"3" * 64} from sha256:{sha(PAYLOAD)} {links}'], version=2), [h, PAYLOAD], "over the limit"


ATTACKS = {
    "lying size": _lying_size,
    "shape 2^40 over 16 bytes": _huge_shape,
    "unicode digit in a tensor size": _unicode_tensor_size,
    "unicode digit in the file size": _unicode_file_size,
    "unicode digit in a shape": _unicode_shape,
    "zlib bomb on a root that lies": _zlib_bomb_on_small_root,
    "zlib bomb on a true root": _zlib_bomb_on_true_root,
    "sparse index out of range": _sparse_out_of_range,
    "sparse count 2^40": _sparse_huge_count,
    "nested safetensors header": _nested_header,
    "header disagrees with manifest": _header_disagrees,
    "chain of 100 links": _long_chain,
}


@pytest.fixture(scope="module")
def bombs():
    """The attacks' bytes, made once (the zlib bombs take a second or two to compress)."""
    return {name: make() for name, make in ATTACKS.items()}


def push_hostile(tmp_path: Path, text: bytes, lfs_server) -> Path:
    """A bare origin whose HEAD commits ``text`` as model.safetensors, tracked by fmhub, as an attacker would push it."""
    evil = tmp_path / "evil"
    evil.mkdir()
    git(evil, "init", "-q")
    fmhub(evil, "track", "*.safetensors")
    blob = subprocess.run(["git", "hash-object", "-w", "--no-filters", "--stdin"], cwd=evil, input=text,
                          capture_output=True, check=True).stdout.decode().strip()
    git(evil, "add", ".gitattributes")
    git(evil, "update-index", "--add", "--cacheinfo", f"100644,{blob},{CKPT}")
    git(evil, "commit", "-qm", "hostile")
    bare = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(evil), str(bare))
    return bare


def clone_measured(tmp_path: Path, bare: Path, lfs_url: str) -> tuple[subprocess.CompletedProcess, int]:
    """`git clone` with the filter installed globally; its result and the peak RSS (MB) of git and its filter."""
    fmhub(tmp_path, "install", "--global")
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True); "
             "sys.stdout.buffer.write(p.stderr); print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(p.returncode)")
    cmd = [sys.executable, "-c", probe, "git", "clone", "-q", "-c", f"lfs.url={lfs_url}", "-c", "lfs.transfer.maxretries=1",
           bare.as_uri(), str(tmp_path / "victim")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True)
    out = proc.stdout.decode(errors="replace")
    rss_kb = int(out.rsplit("RSS ", 1)[1])
    proc.stderr = out.rsplit("RSS ", 1)[0].encode()
    return proc, rss_kb // 1024


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_clone_of_a_hostile_origin_fails_the_file_in_one_line(attack, bombs, tmp_path, lfs_server):
    text, objects, needle = bombs[attack]
    for data in objects:
        lfs_server.put(data)
    bare = push_hostile(tmp_path, text, lfs_server)

    proc, rss_mb = clone_measured(tmp_path, bare, lfs_server.url)

    err = proc.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.startswith("fmhub:")]
    assert len(lines) == 1, err
    needles = needle if isinstance(needle, tuple) else (needle,)  # the download's size check, or smudge's
    assert CKPT in lines[0] and any(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in err and "report" not in err
    assert rss_mb < MAX_RSS_MB, rss_mb
    victim = tmp_path / "victim"
    assert not (victim / CKPT).exists(), "a file that claims to be the checkpoint was left behind"
    assert CKPT in git(victim, "status", "--porcelain").stdout.decode()  # git knows the file is not there
    check = fmhub(victim, "fsck", check=False)
    assert check.returncode != 0
    assert "Traceback" not in check.stderr.decode(errors="replace")


def test_a_true_origin_still_clones(tmp_path, lfs_server):
    """The control: the same construction with honest sizes checks out byte for byte."""
    h = st_header([("a", "F32", [4], 16)])
    text = manifest(h, [f'"a" F32 [4] 16 sha256:{sha(PAYLOAD)}'])
    for data in (h, PAYLOAD):
        lfs_server.put(data)
    bare = push_hostile(tmp_path, text, lfs_server)
    proc, _ = clone_measured(tmp_path, bare, lfs_server.url)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "victim" / CKPT).read_bytes() == h + PAYLOAD
    assert fmhub(tmp_path / "victim", "fsck").returncode == 0


@pytest.mark.parametrize("attack", ["lying size", "shape 2^40 over 16 bytes", "zlib bomb on a root that lies"])
def test_objects_already_in_the_store_are_checked_against_the_manifest_before_writing(attack, bombs, repo):
    """The same lies when the objects are local (fetched earlier under an honest manifest, or an alternate store):
    the download's size check never ran, so smudge's own must refuse before the first byte."""
    text, objects, _ = bombs[attack]
    commit_hostile(repo, text, objects)

    proc = git(repo, "checkout", "--", CKPT, check=False)
    lines = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.startswith("fmhub:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "the manifest declares" in lines[0] and "fmhub fsck" in lines[0], lines[0]
    assert not (repo / CKPT).exists()
    report = fmhub(repo, "fsck", check=False)
    assert report.returncode != 0 and b"the manifest declares" in report.stdout + report.stderr


def commit_hostile(repo: Path, text: bytes, objects: list[bytes], path: str = CKPT, message: str = "hostile") -> None:
    """Objects into the repository's own store, ``text`` committed at ``path`` as it is (no filter)."""
    from fmhub.core.store import ObjectStore

    store = ObjectStore.create(str(repo / ".git" / "lfs"))
    for data in objects:
        store.write_bytes(data)
    store.flush()
    blob = subprocess.run(["git", "hash-object", "-w", "--no-filters", "--stdin"], cwd=repo, input=text,
                          capture_output=True, check=True).stdout.decode().strip()
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
    git(repo, "commit", "-qm", message)


def one_fmhub_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.startswith("fmhub:")]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("attack", ["lying size", "shape 2^40 over 16 bytes"])
def test_extract_checks_sizes_before_allocating(attack, bombs, repo, tmp_path):
    text, objects, _ = bombs[attack]
    commit_hostile(repo, text, objects)
    out = tmp_path / "out.safetensors"
    line = one_fmhub_line(fmhub(repo, "extract", f"HEAD:{CKPT}", "-t", "a", "-o", str(out), check=False))
    assert "the manifest declares" in line
    assert not out.exists()


def test_extract_refuses_a_manifest_that_contradicts_its_header(repo, tmp_path):
    """The header object says F32 [4]; the manifest says F64 [2] over the same 16 bytes: checkout refuses, and so
    must every reader (extract used to write a file of two float64s)."""
    h = st_header([("a", "F32", [4], 16)])
    commit_hostile(repo, manifest(h, [f'"a" F64 [2] 16 sha256:{sha(PAYLOAD)}']), [h, PAYLOAD])
    out = tmp_path / "out.safetensors"
    line = one_fmhub_line(fmhub(repo, "extract", f"HEAD:{CKPT}", "-t", "a", "-o", str(out), check=False))
    assert "does not match its header object" in line
    assert not out.exists()


def test_merge_of_a_side_whose_sizes_lie_is_a_conflict_not_a_crash(repo):
    import torch
    from tests.helpers import commit_checkpoint

    commit_checkpoint(repo, {"a": torch.arange(4, dtype=torch.float32)}, "base")
    git(repo, "config", "fmhub.merge.strategy", "linear")
    home = git(repo, "branch", "--show-current").stdout.decode().strip()
    git(repo, "checkout", "-qb", "theirs")
    n = 1 << 40
    h = st_header([("a", "F32", [n // 4], n)])
    commit_hostile(repo, manifest(h, [f'"a" F32 [{n // 4}] {n} sha256:{sha(PAYLOAD)}']), [h, PAYLOAD], message="theirs")
    git(repo, "checkout", "-qf", home)  # the work tree still holds the base file, not the lie
    commit_checkpoint(repo, {"a": torch.arange(4, dtype=torch.float32) + 1}, "ours")
    proc = git(repo, "merge", "-q", "theirs", check=False)
    err = proc.stderr.decode(errors="replace") + proc.stdout.decode(errors="replace")
    assert proc.returncode != 0 and "Traceback" not in err and "MemoryError" not in err, err


def test_a_newline_in_a_path_cannot_forge_a_line(repo):
    """Paths and names come from whoever pushed: printed escaped, one line per error, in every command."""
    evil = "evil\nfmhub: model.safetensors: verified, 0 problems\nx.safetensors"
    h = st_header([("a", "F32", [8], 32)])
    commit_hostile(repo, manifest(h, [f'"a" F32 [8] 32 sha256:{sha(PAYLOAD)}']), [h, PAYLOAD], path=evil)
    proc = subprocess.run([sys.executable, "-m", "fmhub", "filter-smudge", evil], cwd=repo, capture_output=True,
                          input=git(repo, "cat-file", "blob", f"HEAD:{evil}").stdout)
    line = one_fmhub_line(proc)
    assert "evil\\nfmhub: model.safetensors: verified" in line
    report = fmhub(repo, "fsck", check=False)
    out = (report.stdout + report.stderr).decode(errors="replace")
    assert not any(line.startswith("fmhub: model.safetensors: verified") for line in out.splitlines()), out


def test_an_unanticipated_error_is_one_line_and_debug_shows_the_traceback(repo):
    crash = ("import sys, fmhub.git.fsck as f; f.fsck = lambda *a, **k: 1 / 0; sys.argv = ['fmhub', 'fsck']; "
             "from fmhub.cli import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", crash], cwd=repo, capture_output=True)
    line = one_fmhub_line(proc)
    assert "ZeroDivisionError" in line and "FMHUB_DEBUG=1" in line
    proc = subprocess.run([sys.executable, "-c", crash], cwd=repo, capture_output=True, env={**os.environ, "FMHUB_DEBUG": "1"})
    assert b"Traceback" in proc.stderr


def test_fmhub_checkout_of_a_path_missing_from_the_work_tree_is_one_clear_line(repo):
    """After `git clone --no-checkout` (or a deletion) the file is git's to write: say so, not 'failed unexpectedly'."""
    import torch
    from tests.helpers import commit_checkpoint

    commit_checkpoint(repo, {"a": torch.arange(4, dtype=torch.float32)}, "v0")
    (repo / CKPT).unlink()
    line = one_fmhub_line(fmhub(repo, "checkout", CKPT, check=False))
    assert "not in the work tree" in line and f"git checkout -- {CKPT}" in line
