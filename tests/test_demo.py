"""The README's first command: `fmhub demo` runs end to end on the built-in example."""

from __future__ import annotations

from conftest import FMHUB, run, sha256_file


def test_demo_runs_and_round_trips(tmp_path):
    out = run([*FMHUB, "demo", str(tmp_path / "demo")], tmp_path).stdout.decode()
    assert "checkout of v0 byte-identical │ yes" in out
    assert "v0 reloads with transformers  │ yes" in out
    assert '+tensor "lm_head.weight"' in out
    assert sha256_file(tmp_path / "demo" / "model" / "model.safetensors")
