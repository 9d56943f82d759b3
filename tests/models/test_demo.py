"""`fmhub demo`: versions a tiny transformers model with git + fmhub end to end (diff, byte-identical checkout)."""

from __future__ import annotations

from tests.helpers import FMHUB, run, sha256_file


def test_demo_runs_and_round_trips(tmp_path):
    out = run([*FMHUB, "demo", str(tmp_path / "demo")], tmp_path).stdout.decode()
    assert "checkout of v0 byte-identical │ yes" in out
    assert "v0 reloads with transformers  │ yes" in out
    # the semantic diff: lm_head was scaled by 1.1, so its relative change is exactly 0.1
    lm_head = next(line for line in out.splitlines() if "changed  lm_head.weight" in line)
    assert "rel=0.1 " in lm_head and "changed=100%" in lm_head
    assert "37 tensors unchanged" in out
    assert sha256_file(tmp_path / "demo" / "model" / "model.safetensors")
