"""The README's first command, `fmhub init --example`: every stage end to end; editing one data file re-runs only what depends on it."""

from __future__ import annotations

import json

import pytest

from tests.helpers import FMHUB, fmhub, git, run

pytestmark = pytest.mark.slow


def test_example_end_to_end_then_only_dependent_steps_rerun(tmp_path):
    proc = run([*FMHUB, "init", "--example", str(tmp_path / "ex")], tmp_path)
    out = proc.stdout.decode()
    ex = tmp_path / "ex"
    for step in ("clean:reviews", "label:sentiment", "finetune:sentiment", "finetune:tickets", "select", "merge", "deploy"):
        assert step in out
    assert "committed" in out and "url=http://127.0.0.1:" in out
    state = json.loads((ex / ".git" / "fmhub" / "run-state.json").read_text())["steps"]
    assert set(state) == {"clean:reviews", "clean:tickets", "label:sentiment", "finetune:sentiment", "finetune:tickets",
                          "select", "merge", "deploy"}
    sentiment = state["finetune:sentiment"]["summary"]
    # above chance (about 0.5): the eval split is a handful of rows, so the score moves in steps of a sixth between
    # torch builds (0.8 measured once, 0.67 with torch 2.13.0's CPU wheel); a higher bar would have no margin
    assert sentiment["metric"] == "accuracy" and sentiment["score"] > 0.5
    board = json.loads((ex / "runs" / "leaderboard.json").read_text())
    assert board and (ex / "runs" / "router.json").is_file()
    assert state["deploy"]["summary"]["routed"] == "sentiment"  # "the battery" goes to the review adapter
    # the results are a committed version: adapters stored by fmhub, with lineage records
    files = git(ex, "show", "--name-only", "--format=", "HEAD").stdout.decode().split()
    assert "adapters/sentiment/adapter_model.safetensors" in files and "adapters/sentiment.lineage.json" in files
    assert git(ex, "show", "HEAD:adapters/sentiment/adapter_model.safetensors").stdout.startswith(b"fmhub manifest")
    lineage = fmhub(ex, "lineage", "adapters/sentiment@HEAD", "--json").stdout.decode()
    assert "data/reviews.jsonl" in lineage  # the adapter traces back through labelling and cleaning to the raw data
    assert "runs/leaderboard.json.lineage.json" in files  # and the ranking back to the adapters it ranked
    ranked = fmhub(ex, "lineage", "runs/leaderboard.json@HEAD", "--json").stdout.decode()
    assert "adapters/tickets" in ranked and "data/raw" not in ranked and "data/tickets.jsonl" in ranked

    with open(ex / "data" / "tickets.jsonl", "a") as f:
        f.write(json.dumps({"id": 999, "text": "hello, my invoice is missing (order 1234). thanks"}) + "\n")
    again = json.loads(fmhub(ex, "run", "--json").stdout)
    status = {s["step"]: s["status"] for s in again["steps"]}
    assert status == {"clean:tickets": "ran", "finetune:tickets": "ran", "select": "ran", "merge": "ran", "deploy": "ran",
                      "clean:reviews": "up to date", "label:sentiment": "up to date", "finetune:sentiment": "up to date"}
    assert {s["status"] for s in json.loads(fmhub(ex, "run", "--json").stdout)["steps"]} == {"up to date"}


def test_init_without_example_and_into_a_non_empty_directory(tmp_path):
    fmhub(tmp_path, "init", "plain")
    plain = tmp_path / "plain"
    assert (plain / "fmhub.yaml").is_file() and "filter=fmhub" in (plain / ".gitattributes").read_text()
    assert git(plain, "config", "--get", "filter.fmhub.process").stdout.strip()
    bad = fmhub(tmp_path, "init", "--example", "plain", check=False)
    assert bad.returncode == 1 and b"is not empty" in bad.stderr
