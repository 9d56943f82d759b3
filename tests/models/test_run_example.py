"""The README's first command, `fmhub init --example`: every stage end to end; editing one data file re-runs only what depends on it."""

from __future__ import annotations

import json

import pytest

from tests.helpers import FMHUB, fmhub, git, run

pytestmark = pytest.mark.slow


def test_example_end_to_end_then_only_dependent_steps_rerun(tmp_path):
    proc = run([*FMHUB, "init", "--example", str(tmp_path / "ex")], tmp_path)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    ex = tmp_path / "ex"
    for step in ("clean:reviews", "label:sentiment", "finetune:sentiment", "finetune:tickets", "select", "merge", "deploy"):
        assert step in out
    # the table explains itself, names no server that has stopped, and no library's warning reaches the terminal
    assert "committed" in out and "http://" not in out and "result: rows_in: rows read" in out
    assert "scores on each task's held-out rows" in out
    assert "Warning" not in err and "warnings.warn" not in err and "Writing model shards" not in err
    assert git(ex, "status", "--porcelain").stdout.decode() == ""  # every file the run wrote is committed or ignored
    state = json.loads((ex / ".git" / "fmhub" / "run-state.json").read_text())["steps"]
    assert set(state) == {"clean:reviews", "clean:tickets", "label:sentiment", "finetune:sentiment", "finetune:tickets",
                          "select", "merge", "deploy"}
    # the point of the example: each adapter beats the base on its own task by a clear margin and ranks first there
    # (measured: 1.0 against the base's 0.655 on sentiment, 1.0 against 0.574 on tickets; the bar leaves room for either
    # score to move by several held-out rows between torch builds)
    board = json.loads((ex / "runs" / "leaderboard.json").read_text())
    scores = {r["name"]: r["scores"] for r in board["rows"]}
    assert board["best"] == {"sentiment": "sentiment", "tickets": "tickets"}
    for task in ("sentiment", "tickets"):
        assert state[f"finetune:{task}"]["summary"]["metric"] == "accuracy"
        assert scores[task][task] >= scores["tiny"][task] + 0.15, (task, scores)
        other = "tickets" if task == "sentiment" else "sentiment"
        assert scores[task][task] > scores[other][task], (task, scores)
    # the merge step scores the merged adapter on both tasks, and it keeps most of each adapter's gain over the base
    # (measured: 0.931 and 1.0, i.e. 80 % and 100 % of the gains; the bar is half of each)
    merged = state["merge"]["summary"]["scores"]
    assert set(merged) == {"sentiment", "tickets"}
    for task in ("sentiment", "tickets"):
        gain = scores[task][task] - scores["tiny"][task]
        assert merged[task] - scores["tiny"][task] >= 0.5 * gain, (task, merged, scores)
    # the router sends each task's rows to that task's adapter
    from fmhub.serving.router import Router

    router = Router.load(str(ex / "runs" / "router.json"))
    for task, data in (("sentiment", "data/labelled/reviews.jsonl"), ("tickets", "data/clean/tickets.jsonl")):
        texts = [json.loads(line)["text"] for line in (ex / data).read_text().splitlines()]
        routed = [router.route(t)[0] for t in texts]
        assert routed.count(task) >= 0.95 * len(texts), (task, sorted(set(routed)))
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
        f.write(json.dumps({"id": 999, "text": "hello (order 1234), my invoice is missing", "label": "billing"}) + "\n")
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
