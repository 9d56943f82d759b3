"""Semantic model diffs: git diff / log -p / show through fmhub's diff driver and textconv, and `fmhub diff`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import fmhub, git, save_tensors

from fmhub.core import checkpoint
from fmhub.models import diff as df
from fmhub.models import difftext, tensorstats
from fmhub.models.views import CheckpointView
from fmhub.core.manifest import Manifest
from fmhub.core.store import ObjectStore

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def expected(old: torch.Tensor, new: torch.Tensor) -> dict:
    """What fmhub should report for one tensor, computed independently in torch (float64)."""
    if old.dtype == new.dtype:
        bits_old = old.reshape(-1).view(_INT_VIEW[old.element_size()]) if old.dtype != torch.bool else old.reshape(-1)
        bits_new = new.reshape(-1).view(_INT_VIEW[new.element_size()]) if new.dtype != torch.bool else new.reshape(-1)
        neq = bits_old != bits_new
    else:
        o, n = old.double().reshape(-1), new.double().reshape(-1)
        neq = ~((o == n) | (o.isnan() & n.isnan()))
    o, n = old.double().reshape(-1), new.double().reshape(-1)
    d = (n - o)[neq]
    return {
        "delta_norm": d.norm().item(),
        "old_norm": o.norm().item(),
        "rel_change": (d.norm() / o.norm()).item(),
        "n_changed": int(neq.sum()),
        "frac_changed": neq.double().mean().item(),
        "max_abs": d.abs().max().item() if d.numel() else 0.0,
    }


_LINE = re.compile(r"^(added|removed|dtype|shape|changed)\s+(\S+)\s+(\S+ \S+)\s+(.*)$")


def parse_text(out: str) -> dict[str, dict]:
    """The per-tensor lines of the driver's output, as {name: {status, kind, numbers...}}."""
    rows = {}
    for line in out.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        status, name, kind, rest = m.groups()
        row = {"status": status, "kind": kind}
        for key, value in re.findall(r"(\w+)=(\S+)", rest):
            row[key] = value
        if (c := re.search(r"changed=\S+% \((\d+)/(\d+)\)", rest)):
            row["n_changed"], row["numel"] = int(c.group(1)), int(c.group(2))
        rows[name] = row
    return rows


def close(text: str, want: float, rel: float = 1e-3) -> bool:
    return math.isclose(float(text), want, rel_tol=rel, abs_tol=1e-12)


def v0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 64, generator=g),
        "keep": torch.randn(32, generator=g),
        "gone": torch.randn(8, generator=g),
        "emb": torch.randn(10, 4, generator=g).bfloat16(),
        "steps": torch.arange(16, dtype=torch.int32),
    }


def v1(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    t = {k: v.clone() for k, v in t.items()}
    t["w"][:3] += 0.01 * torch.randn(3, 64, generator=g)
    t["w"][40, 7] = -5.0
    del t["gone"]
    t["fresh"] = torch.full((5,), 2.0)
    t["emb"] = t["emb"].float() + 0.001 * torch.randn(10, 4, generator=g)  # dtype change BF16 -> F32
    t["steps"][::4] += 100
    return t


def commit_two_versions(repo: Path) -> tuple[dict, dict]:
    old = v0()
    save_tensors(repo / "model.safetensors", old, {"format": "pt"})
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v0")
    new = v1(old)
    save_tensors(repo / "model.safetensors", new, {"format": "pt"})
    return old, new


def check_rows(rows: dict, old: dict, new: dict) -> None:
    assert set(rows) == {"w", "gone", "emb", "steps", "fresh"}  # "keep" is unchanged: not listed
    assert rows["gone"]["status"] == "removed" and close(rows["gone"]["norm"], old["gone"].double().norm().item())
    assert rows["fresh"]["status"] == "added" and close(rows["fresh"]["norm"], new["fresh"].double().norm().item())
    assert rows["fresh"]["kind"] == "F32 [5]"
    for name, status, kind in (("w", "changed", "F32 [64,64]"), ("steps", "changed", "I32 [16]"), ("emb", "dtype", "BF16->F32 [10,4]")):
        row, want = rows[name], expected(old[name], new[name])
        assert row["status"] == status and row["kind"] == kind, row
        assert close(row["delta_norm"], want["delta_norm"]), (name, row, want)
        assert close(row["rel"], want["rel_change"]), (name, row, want)
        assert close(row["max_abs"], want["max_abs"]), (name, row, want)
        assert (row["n_changed"], row["numel"]) == (want["n_changed"], old[name].numel()), (name, row, want)
    assert rows["w"]["n_changed"] == 3 * 64 + 1 and rows["steps"]["n_changed"] == 4
    assert close(rows["w"]["max_abs"], abs(-5.0 - old["w"][40, 7].item()))


def test_git_diff_reports_each_tensor_change_with_numbers(repo):
    old, new = commit_two_versions(repo)
    worktree = git(repo, "diff").stdout.decode()  # the new side is the work-tree file: read from disk by offset
    assert worktree.startswith("diff --fmhub a/model.safetensors b/model.safetensors\n")
    check_rows(parse_text(worktree), old, new)
    assert "1 tensor unchanged (128 B)" in worktree

    git(repo, "commit", "-qam", "v1")
    committed = git(repo, "diff", "HEAD~1", "HEAD").stdout.decode()  # both sides: manifests + object store
    check_rows(parse_text(committed), old, new)
    strip = lambda s: [l for l in s.splitlines() if _LINE.match(l)]  # noqa: E731
    assert strip(committed) == strip(worktree)  # reading the file or the store gives the same numbers

    log = git(repo, "log", "-p", "--ext-diff", "-1").stdout.decode()
    assert strip(log) == strip(committed) and "1 tensor unchanged (128 B)" in log
    assert git(repo, "diff", "HEAD", "HEAD").stdout == b""


def test_git_show_and_log_use_textconv_per_tensor_lines(repo):
    old, new = commit_two_versions(repo)
    git(repo, "commit", "-qam", "v1")
    manifests = [Manifest.from_bytes(git(repo, "show", f"{rev}:model.safetensors").stdout).by_name() for rev in ("HEAD~1", "HEAD")]
    for out in (git(repo, "show").stdout.decode(), git(repo, "log", "-p", "-1").stdout.decode()):
        lines = out.splitlines()
        for sign, tensors, m in (("-", old, manifests[0]), ("+", new, manifests[1])):
            [w] = [l for l in lines if l.startswith(f'{sign}tensor "w" ')]
            x = tensors["w"].double()
            fields = dict(re.findall(r"(\w+)=(\S+)", w))
            assert f"sha256:{m['w'].oid[:12]}" in w and w.split()[2:4] == ["F32", "[64,64]"]
            assert close(fields["norm"], x.norm().item(), 1e-5)
            assert close(fields["mean"], x.mean().item(), 1e-5)
            assert close(fields["std"], x.std(unbiased=False).item(), 1e-5)
        assert any(l.startswith(' tensor "keep" F32 [32] ') for l in lines)  # unchanged: a context line
        assert any(l.startswith('-tensor "gone" ') for l in lines) and any(l.startswith('+tensor "fresh" ') for l in lines)
        assert any(l.startswith('-tensor "emb" BF16 ') for l in lines) and any(l.startswith('+tensor "emb" F32 ') for l in lines)
    # without the external command, plain `git diff` also falls back to the textconv
    plain = git(repo, "diff", "--no-ext-diff", "HEAD~1", "HEAD").stdout.decode().splitlines()
    assert len([l for l in plain if l.startswith(('-tensor "w"', '+tensor "w"'))]) == 2
    assert git(repo, "diff", "--stat", "HEAD~1").stdout.decode().count("|") == 1


def test_textconv_reads_a_manifest_through_the_store(repo):
    old, _ = commit_two_versions(repo)
    blob = repo / "manifest.txt"
    blob.write_bytes(git(repo, "show", "HEAD:model.safetensors").stdout)
    via_manifest = fmhub(repo, "textconv", str(blob)).stdout.decode()
    git(repo, "checkout", "--", "model.safetensors")
    via_file = fmhub(repo, "textconv", "model.safetensors").stdout.decode()
    assert via_manifest == via_file
    assert len([l for l in via_file.splitlines() if l.startswith("tensor ")]) == len(old)


def test_fmhub_diff_json_matches_torch(repo):
    old, new = commit_two_versions(repo)
    git(repo, "commit", "-qam", "v1")
    out = json.loads(fmhub(repo, "diff", "--json", "HEAD~1", "HEAD").stdout)
    assert (out["old"], out["new"]) == ("HEAD~1", "HEAD")
    by = {t["name"]: t for t in out["tensors"]}
    assert {n: t["status"] for n, t in by.items()} == {
        "w": "changed", "keep": "unchanged", "gone": "removed", "emb": "dtype", "steps": "changed", "fresh": "added"
    }
    assert out["counts"] == {"added": 1, "removed": 1, "dtype": 1, "shape": 0, "changed": 2, "unchanged": 1}
    assert out["unchanged_bytes"] == 128
    for name in ("w", "emb", "steps"):
        want = expected(old[name], new[name])
        for key, value in want.items():
            assert by[name][key] == pytest.approx(value, rel=1e-9), (name, key)
    assert by["w"]["old_shape"] == [64, 64] and by["w"]["path"] == "model.safetensors"
    assert by["gone"]["old_norm"] == pytest.approx(old["gone"].double().norm().item(), rel=1e-9)
    assert by["fresh"]["new_norm"] == pytest.approx(new["fresh"].double().norm().item(), rel=1e-9)
    table = fmhub(repo, "diff", "HEAD~1", "HEAD").stdout.decode()
    assert all(n in table for n in ("w", "gone", "emb", "steps", "fresh")) and "1 tensor unchanged" in table


def test_fmhub_diff_defaults_to_head_vs_work_tree(repo):
    old = v0()
    save_tensors(repo / "model.safetensors", old)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "v0")
    assert "no tensor changed" in fmhub(repo, "diff").stdout.decode()
    new = {k: v.clone() for k, v in old.items()}
    new["keep"][3] = float("nan")
    save_tensors(repo / "model.safetensors", new)
    out = json.loads(fmhub(repo, "diff", "--json").stdout)
    assert (out["old"], out["new"]) == ("HEAD", "work tree")
    [keep] = [t for t in out["tensors"] if t["status"] != "unchanged"]
    assert keep["name"] == "keep" and keep["n_changed"] == 1
    assert keep["delta_norm"] is None and keep["max_abs"] is None  # NaN: not finite, so null in JSON
    git(repo, "commit", "-qam", "nan")
    save_tensors(repo / "model.safetensors", new)  # rewritten, same bytes: NaN stays NaN bitwise
    assert "no tensor changed" in fmhub(repo, "diff", "--", "model.safetensors").stdout.decode()
    out = json.loads(fmhub(repo, "diff", "--json", "HEAD").stdout)
    assert out["counts"]["unchanged"] == len(new)
    assert "no tensor changed" not in fmhub(repo, "diff", "HEAD~1", "--", "model.safetensors").stdout.decode()
    nothing = fmhub(repo, "diff", "--json", "HEAD~1", "--", "nothing-here", check=False)  # a path matching nothing: one line
    assert nothing.returncode == 1 and nothing.stderr.decode().strip() == "fmhub: nothing-here: matches no file at HEAD~1 or work tree (check the path)"


def write_shards(d: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    d.mkdir(exist_ok=True)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def test_sharded_checkpoint_matches_tensors_by_name_across_shards(repo):
    g = torch.Generator().manual_seed(2)
    t = {n: torch.randn(8, 8, generator=g) for n in ("a", "b", "c", "d")}
    write_shards(repo / "ckpt", [{"a": t["a"], "b": t["b"]}, {"c": t["c"], "d": t["d"]}])
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "sharded")
    d2 = t["d"].clone()
    d2[0] += 1.0
    write_shards(repo / "ckpt", [{"a": t["a"]}, {"b": t["b"], "c": t["c"], "d": d2}])  # b moves to shard 2
    git(repo, "commit", "-qam", "move b, change d")

    out = json.loads(fmhub(repo, "diff", "--json", "HEAD~1", "HEAD", "--", "ckpt").stdout)
    by = {x["name"]: x for x in out["tensors"]}
    assert {n: x["status"] for n, x in by.items()} == {"a": "unchanged", "b": "unchanged", "c": "unchanged", "d": "changed"}
    assert by["b"]["path"] == "ckpt/model-00002-of-00002.safetensors"
    want = expected(t["d"], d2)
    assert by["d"]["delta_norm"] == pytest.approx(want["delta_norm"]) and by["d"]["n_changed"] == 8
    # from inside the directory, paths are relative to it, as with git
    inner = json.loads(fmhub(repo / "ckpt", "diff", "--json", "HEAD~1", "HEAD", "--", ".").stdout)
    assert inner["counts"] == out["counts"]
    # git diffs file by file, so there the moved tensor is removed from one shard and added to the other
    rows = parse_text(git(repo, "diff", "HEAD~1", "HEAD").stdout.decode())
    assert rows["b"]["status"] in ("added", "removed") and rows["d"]["status"] == "changed"


def test_peft_lora_adapter_diff(repo):
    from peft import LoraConfig, get_peft_model

    from fmhub.run.demo import build_tiny_llama

    model = get_peft_model(build_tiny_llama(seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(repo / "adapter")
    ckpt = repo / "adapter" / "adapter_model.safetensors"
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "lora v0")
    old = load_file(str(ckpt))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.0." in name and "lora_B" in name:
                p.add_(0.05)
    model.save_pretrained(repo / "adapter")
    new = load_file(str(ckpt))
    changed = {n for n in new if not torch.equal(old[n], new[n])}
    assert changed and all("lora_B" in n and "layers.0." in n for n in changed)
    git(repo, "commit", "-qam", "lora v1")

    out = json.loads(fmhub(repo, "diff", "--json", "HEAD~1", "HEAD").stdout)
    by = {x["name"]: x for x in out["tensors"]}
    assert {n for n, x in by.items() if x["status"] != "unchanged"} == changed
    assert out["counts"]["unchanged"] == len(new) - len(changed)
    for n in changed:
        want = expected(old[n], new[n])
        assert by[n]["delta_norm"] == pytest.approx(want["delta_norm"], rel=1e-9)
        assert by[n]["rel_change"] == pytest.approx(want["rel_change"], rel=1e-9)
        assert by[n]["frac_changed"] == pytest.approx(want["frac_changed"])
    rows = parse_text(git(repo, "diff", "HEAD~1", "HEAD").stdout.decode())
    assert set(rows) == changed and all(r["status"] == "changed" for r in rows.values())


def test_install_registers_diff_driver_and_textconv(repo):
    cfg = dict(line.split("=", 1) for line in git(repo, "config", "--local", "--list").stdout.decode().splitlines())
    assert cfg["diff.fmhub.command"].endswith(" diff-driver")
    assert cfg["diff.fmhub.textconv"].endswith(" textconv")
    assert cfg["diff.fmhub.cachetextconv"] == "true"
    assert "diff.fmhub.binary" not in cfg
    fmhub(repo, "uninstall")
    assert "diff.fmhub" not in git(repo, "config", "--local", "--list").stdout.decode()


def test_diff_driver_handles_unmerged_and_unreadable_sides(repo, tmp_path):
    out = fmhub(repo, "diff-driver", "model.safetensors").stdout.decode()
    assert "unmerged" in out
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a checkpoint at all")
    proc = fmhub(repo, "diff-driver", "m.safetensors", "/dev/null", ".", ".", str(junk), "0" * 40, "100644")
    assert proc.returncode == 0 and "could not diff" in proc.stdout.decode()


# --- diff_views on files and stores, without git -------------------------------------------------


def file_view(path: Path, tensors: dict[str, torch.Tensor]) -> CheckpointView:
    save_file(tensors, str(path))
    return CheckpointView.from_file(str(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.int8, torch.uint8, torch.int64, torch.bool])
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_diff_views_dtypes_and_chunking(tmp_path, dtype, chunk):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, 9, generator=g) * 3
    if dtype == torch.bool:
        old, new = base > 0, base > 0.5
    elif dtype.is_floating_point:
        old = base.to(dtype)
        new = old.clone()
        new[10::7] = (base[10::7] + 1.5).to(dtype)  # the first chunks are equal: their old norm is read back later
    else:
        old = base.to(torch.int64).clamp(0 if dtype == torch.uint8 else -100, 100).to(dtype)
        new = old.clone()
        new[10::5] += 1
    a = file_view(tmp_path / "a.safetensors", {"x": old, "same": old.clone()})
    b = file_view(tmp_path / "b.safetensors", {"x": new, "same": old.clone()})
    changes = {c.name: c for c in df.diff_views(a, b, chunk_elems=chunk)}
    assert changes["same"].status == "unchanged"
    c, want = changes["x"], expected(old, new)
    assert c.status == "changed" and c.numel == old.numel()
    assert c.n_changed == want["n_changed"] and c.frac_changed == pytest.approx(want["frac_changed"])
    assert c.delta_norm == pytest.approx(want["delta_norm"], rel=1e-9)
    assert c.old_norm == pytest.approx(want["old_norm"], rel=1e-9)
    assert c.max_abs == pytest.approx(want["max_abs"], rel=1e-9)


def test_fraction_changed_is_bitwise_and_nan_safe(tmp_path):
    old = torch.tensor([float("nan"), 1.0, 2.0, 0.0, float("inf")])
    same_nan = torch.tensor([float("nan"), 1.0, 2.5, -0.0, float("inf")])
    a = file_view(tmp_path / "a.safetensors", {"x": old})
    [c] = df.diff_views(a, file_view(tmp_path / "b.safetensors", {"x": same_nan}), chunk_elems=2)
    assert c.n_changed == 2  # 2.0->2.5 and 0.0->-0.0; the NaN and Inf that stay put do not count
    assert c.delta_norm == pytest.approx(0.5) and c.max_abs == pytest.approx(0.5)
    assert math.isnan(c.old_norm) and math.isnan(c.rel_change)  # the old tensor itself holds NaN
    nan_now = torch.tensor([float("nan"), float("nan"), 2.0, 0.0, float("inf")])
    [c] = df.diff_views(a, file_view(tmp_path / "c.safetensors", {"x": nan_now}))
    assert c.n_changed == 1 and math.isnan(c.delta_norm) and math.isnan(c.max_abs)
    assert difftext.to_json([c])["tensors"][0]["delta_norm"] is None
    assert "delta_norm=nan" in difftext.format_text([c])


def test_store_and_file_views_agree_and_equal_oids_are_not_read(tmp_path):
    store = ObjectStore.create(str(tmp_path / "lfs"))
    g = torch.Generator().manual_seed(4)
    t = {"a": torch.randn(100, generator=g), "b": torch.randn(3, 3, generator=g)}
    path = tmp_path / "m.safetensors"
    save_file(t, str(path))
    with open(path, "rb") as f:
        m = Manifest.from_bytes(checkpoint.clean(f, store, str(path)))
    stored = CheckpointView.from_manifest(m, store, "m")
    assert all(c.status == "unchanged" for c in df.diff_views(stored, CheckpointView.from_file(str(path))))
    for oid, _ in m.oids():  # equal oids: decided without opening an object
        import os

        os.chmod(store.object_path(oid), 0o644)
        os.unlink(store.object_path(oid))
    assert all(c.status == "unchanged" for c in df.diff_views(stored, stored))
    t2 = dict(t, a=t["a"] + 1)
    [a, b] = df.diff_views(stored, file_view(tmp_path / "n.safetensors", t2))
    assert a.status == "changed" and a.delta_norm is None and "not in the store" in a.note  # missing object: says so
    path2 = tmp_path / "n.safetensors"
    for src in (path, path2):  # store both versions again: now both sides have oids
        with open(src, "rb") as f:
            checkpoint.clean(f, store, str(src))
    with open(path2, "rb") as f:
        stored2 = CheckpointView.from_manifest(Manifest.from_bytes(checkpoint.clean(f, store, "n")), store, "n")
    from_store = df.diff_views(stored, stored2, chunk_elems=7)
    from_files = df.diff_views(CheckpointView.from_file(str(path)), CheckpointView.from_file(str(path2)), chunk_elems=7)
    assert [c.status for c in from_store] == ["changed", "unchanged"]
    assert from_store[0].delta_norm == from_files[0].delta_norm == pytest.approx(10.0)
    assert from_store[0].old_norm == from_files[0].old_norm == pytest.approx(t["a"].double().norm().item())
    assert b.status == "unchanged"  # its object is gone too, but the file's bytes hash to the manifest's oid


def test_float8_tables_match_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    for st, td in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2), ("F8_E4M3FNUZ", torch.float8_e4m3fnuz),
                   ("F8_E5M2FNUZ", torch.float8_e5m2fnuz), ("F8_E8M0", torch.float8_e8m0fnu)):
        want = codes.view(td).double()
        got = torch.from_numpy(tensorstats.codec(st).values(codes.numpy().tobytes()))
        assert torch.equal(want.isnan(), got.isnan()) and torch.equal(want.nan_to_num(), got.nan_to_num()), st
