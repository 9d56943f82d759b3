"""The filter benchmark runs end to end at tiny scale and its figures mean what they say.

Speed is not asserted here (that is the benchmark's job at 1 GiB); what is asserted are the
behaviours the timings rest on: both tools check out v0 byte-identically, and fmhub stores only
the changed tensors of v1 while git-lfs stores the whole file again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "filter_bench.py"

pytestmark = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")


def test_filter_benchmark_small(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--size-mb", "8", "--tensors", "7", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    ck = data["checkpoint"]
    res = data["results"]

    for tool in ("git-lfs", "fmhub"):
        assert res[tool]["checkout"]["byte_identical"] is True, tool
        assert res[tool]["checkout"]["sha256"] == ck["sha256"]["v0"]
        for step in ("first_add", "re_add", "checkout"):
            assert res[tool][step]["filter_peak_rss_bytes"] > 0, (tool, step)

    changed = sum(t["bytes"] for t in ck["v1_changed_tensors"])
    assert changed < ck["bytes"] / 2
    fm, lfs = res["fmhub"]["repo_bytes"], res["git-lfs"]["repo_bytes"]
    fm_growth = fm["after_v1"] - fm["after_v0"]
    lfs_growth = lfs["after_v1"] - lfs["after_v0"]
    # fmhub's store grows by the changed tensors (plus a manifest and git objects), git-lfs by a whole file.
    assert fm_growth < changed + 256 * 1024, (fm_growth, changed)
    assert lfs_growth >= ck["bytes"]
    assert "fmhub/git-lfs" in proc.stdout


def test_push_benchmark_small(tmp_path):
    """fmhub's pushes of v1 and v2 upload exactly the changed tensors; git-lfs uploads the whole file each time."""
    out = tmp_path / "push.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "push_bench.py"), "--size-mb", "8", "--tensors", "7", "--workdir", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    fm, lfs = data["results"]["fmhub"], data["results"]["git-lfs"]
    assert fm[0]["uploaded_bytes"] >= data["checkpoint_bytes"] and lfs[0]["uploaded_bytes"] == data["checkpoint_bytes"]
    for i in (1, 2):
        assert fm[i]["uploaded_bytes"] == data["changed_bytes"]
        assert fm[i]["request_bytes"] < data["changed_bytes"] + 16 * 1024
        assert lfs[i]["uploaded_bytes"] == data["checkpoint_bytes"]
    assert "fmhub/git-lfs" in proc.stdout


def test_sparse_benchmark_small(tmp_path):
    """The 1% Fisher-masked fine-tune is stored in at most 3% of a full copy and checks out bit-exact."""
    out = tmp_path / "sparse.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "sparse_bench.py"), "--steps", "5", "--pretrain-steps", "5", "--train", "16",
         "--eval", "8", "--hidden", "32", "--layers", "1", "--vocab", "128", "--batch-size", "8", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["checkout_bit_exact"] for r in rows.values())
    assert rows["fisher mask 0.01"]["stored_fraction"] <= 0.03
    assert rows["dense, sparsified 0.01"]["stored_fraction"] <= 0.03
    assert rows["dense"]["stored_fraction"] > 0.5  # a dense update is stored whole
    assert "stored/full" in proc.stdout


def test_lowrank_benchmark_small(tmp_path):
    """lowrank_bench.py runs, checks its round trips, and an fmhub merge stores just the factors."""
    out = tmp_path / "lowrank.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "lowrank_bench.py"), "--size", "256", "--rank", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["merge"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fmhub merge"]["stored/full"] == pytest.approx(4 * 512 * 4 / (256 * 256 * 4), rel=0.05)
    assert rows["peft-style"]["stored/full"] < 0.5 and rows["peft-style"]["sparse/full"] > 0.9
    assert rows["peft-style within 1e-6"]["max_err"] <= 1e-6
    assert "stored/full" in proc.stdout


def test_label_benchmark_small(tmp_path):
    """label_bench.py runs through fmhub's pipeline, and fmhub's label model is at least as good as majority vote and snorkel."""
    out = tmp_path / "label.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "label_bench.py"), "--rows", "2000", "--backend", "serial", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    acc = {r["method"].split(" (")[0]: r["covered_acc"] for r in data["results"]}
    assert len(data["lfs"]) >= 5 and data["redundant_pairs"]
    assert acc["fmhub LabelModel"] >= acc["majority vote"]
    if "snorkel LabelModel" in acc:  # installed with fmhub[bench]
        assert acc["fmhub LabelModel"] >= acc["snorkel LabelModel"]
    assert "covered acc" in proc.stdout
