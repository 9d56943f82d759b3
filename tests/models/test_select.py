"""Model selection: ranking candidates per task and overall, failures, the score cache, real scores of tiny models."""

from __future__ import annotations

import json
import sys
import types
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fmhub.ml.tasks import Task
from fmhub.base.errors import FmhubError
from fmhub.ml.selection import Candidate, leaderboard, parse_candidates, router_from_leaderboard
from tests.helpers.serving import random_adapter, save_base


class Scores:
    """An evaluate function with scores set by the test, counting its calls; ``fail`` names candidates that raise."""

    def __init__(self, table: dict[tuple[str, str], float], fail: dict[str, Exception] | None = None) -> None:
        self.table, self.fail, self.calls = table, fail or {}, []

    def __call__(self, model_dir: str, adapter_dir: str | None, task: Task) -> float:
        name = Path(adapter_dir).name if adapter_dir else "base"
        self.calls.append((name, task.name))
        if name in self.fail:
            raise self.fail[name]
        return self.table[name, task.name]


@pytest.fixture
def setup(tmp_path):
    """A fake base (one safetensors file), three fake adapters, two tasks with data files."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    (base / "config.json").write_text("{}")
    for name in ("a", "b", "c"):
        d = tmp_path / "adapters" / name
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(f"weights of {name}".encode())
        (d / "adapter_config.json").write_text("{}")
    for t in ("qa", "lm"):
        (tmp_path / f"{t}.jsonl").write_text(json.dumps({"text": f"rows of {t}"}) + "\n")
    tasks = [Task("qa", str(tmp_path / "qa.jsonl"), metric="accuracy", classes=["no", "yes"]), Task("lm", str(tmp_path / "lm.jsonl"), metric="loss")]
    return tmp_path, parse_candidates(str(base), [str(tmp_path / "adapters")]), tasks


def names(board) -> list[str]:
    return [r.candidate.name for r in board.rows]


def test_ranks_per_task_and_overall(setup):
    _, cands, tasks = setup
    assert [c.name for c in cands] == ["base", "a", "b", "c"]
    evaluate = Scores({("base", "qa"): 0.25, ("a", "qa"): 0.9, ("b", "qa"): 0.5, ("c", "qa"): 0.7,
                       ("base", "lm"): 3.0, ("a", "lm"): 2.5, ("b", "lm"): 1.5, ("c", "lm"): 2.0})
    board = leaderboard(cands, tasks, evaluate)
    # qa (higher better): a b? no: a 1, c 2, b 3, base 4; lm (lower better): b 1, c 2, a 3, base 4
    ranks = {r.candidate.name: {t: s.rank for t, s in r.scores.items()} for r in board.rows}
    assert ranks == {"a": {"qa": 1, "lm": 3}, "b": {"qa": 3, "lm": 1}, "c": {"qa": 2, "lm": 2}, "base": {"qa": 4, "lm": 4}}
    # mean ranks a 2, b 2, c 2 tie: by name; base 4
    assert names(board) == ["a", "b", "c", "base"] and [r.position for r in board.rows] == [1, 2, 3, 4]
    assert board.best_for("qa").name == "a" and board.best_for("lm").name == "b" and board.best().name == "a"
    assert board.best_for("lm") == Candidate("b", cands[0].model_dir, cands[2].adapter_dir)
    doc = board.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["best"] == {"qa": "a", "lm": "b"} and doc["evaluated"] == 8
    assert doc["tasks"] == [{"name": "qa", "metric": "accuracy", "higher_is_better": True},
                            {"name": "lm", "metric": "loss", "higher_is_better": False}]
    assert doc["rows"][0]["scores"] == {"qa": 0.9, "lm": 2.5} and doc["rows"][0]["mean_rank"] == 2.0
    with pytest.raises(FmhubError, match="no task named 'nope'"):
        board.best_for("nope")

    out = StringIO()
    Console(file=out, width=120, color_system=None).print(board.table())
    text = out.getvalue()
    assert "leaderboard" in text and "accuracy ↑" in text and "loss ↓" in text and "0.9000 (1)" in text
    assert text.index(" a ") < text.index(" b ") < text.index(" base ")


def test_ties_share_ranks_and_order_by_name_whatever_the_input_order(setup):
    _, cands, tasks = setup
    table = {(n, t): 0.5 for n in ("base", "a", "b", "c") for t in ("qa", "lm")}
    table["c", "qa"] = 0.8
    boards = [leaderboard(order, tasks, Scores(table)) for order in (cands, cands[::-1], cands[1:] + cands[:1])]
    for board in boards:
        assert names(board) == ["c", "a", "b", "base"]
        # qa: c 1, the other three tied for 2..4 → 3; lm: all four tied → 2.5
        assert {r.candidate.name: r.scores["qa"].rank for r in board.rows} == {"c": 1, "a": 3, "b": 3, "base": 3}
        assert all(r.scores["lm"].rank == 2.5 for r in board.rows)
        assert board.best_for("lm").name == "a"  # a tie goes to the first name
    assert boards[0].to_json() == boards[1].to_json() == boards[2].to_json()


def test_a_failing_candidate_is_ranked_last_with_its_error(setup):
    tmp, cands, tasks = setup
    table = {(n, t): s for n, s in (("base", 0.1), ("a", 0.9), ("b", 0.2), ("c", 0.3)) for t in ("qa", "lm")}
    evaluate = Scores(table, fail={"a": RuntimeError("size mismatch for lora_A: adapter for another base\nlong trace")})
    missing = Candidate("gone", cands[0].model_dir, str(tmp / "nowhere"))
    board = leaderboard(cands + [missing], tasks, evaluate)
    assert names(board)[-2:] == ["a", "gone"]  # both failed; equal mean ranks, by name
    a = board.row("a")
    assert a.errors == {"qa": "RuntimeError: size mismatch for lora_A: adapter for another base long trace"} | {"lm": a.errors["qa"]}
    assert a.scores["qa"].value is None and a.scores["qa"].rank == 4.5  # after the three that worked: places 4-5 shared
    assert "is not a directory" in board.row("gone").errors["qa"]
    assert ("gone", "qa") not in evaluate.calls  # a candidate that cannot be read is not evaluated
    # the rest ranked among themselves: qa higher better, c 0.3 > b 0.2 > base 0.1; lm lower better: base, b, c
    assert names(board)[:3] == ["b", "base", "c"]  # mean ranks all 2 (qa: c, b, base; lm: base, b, c): by name
    assert {n: board.row(n).scores["qa"].rank for n in ("c", "b", "base")} == {"c": 1, "b": 2, "base": 3}
    assert board.best_for("qa").name == "c"
    doc = board.to_json()
    assert doc["rows"][-1]["errors"]["lm"].endswith("is not a directory") and doc["rows"][-1]["scores"]["lm"] is None
    out = StringIO()
    Console(file=out, width=200, color_system=None).print(board.table())
    assert "error" in out.getvalue() and "a on qa: RuntimeError: size mismatch" in out.getvalue()
    # evaluate returning something that is not a score is an error too
    nan = leaderboard(cands[:2], tasks[:1], lambda m, a, t: float("nan"))
    assert all("not a finite number" in r.errors["qa"] for r in nan.rows)
    with pytest.raises(FmhubError, match="every candidate failed on task 'qa'"):
        nan.best_for("qa")


def test_the_cache_skips_unchanged_work_and_redoes_only_what_changed(setup):
    tmp, cands, tasks = setup
    cache = tmp / "cache.json"
    table = {(n, t): s for n, s in (("base", 0.1), ("a", 0.9), ("b", 0.2), ("c", 0.3)) for t in ("qa", "lm")}
    first = Scores(table)
    board = leaderboard(cands, tasks, first, cache=cache)
    assert len(first.calls) == 8 and board.evaluated == 8 and cache.is_file()

    again = Scores(table)
    rerun = leaderboard(cands, tasks, again, cache=cache)
    assert again.calls == [] and rerun.evaluated == 0
    assert all(s.cached for r in rerun.rows for s in r.scores.values())
    assert [r.to_json()["scores"] for r in rerun.rows] == [r.to_json()["scores"] for r in board.rows]

    # b is retrained: only b is evaluated again, on both tasks, and its new score counts
    (tmp / "adapters" / "b" / "adapter_model.safetensors").write_bytes(b"retrained b")
    table["b", "qa"] = 0.95
    changed = Scores(table)
    board = leaderboard(cands, tasks, changed, cache=cache)
    assert sorted(changed.calls) == [("b", "lm"), ("b", "qa")] and board.best_for("qa").name == "b"

    # the lm eval data changes: every candidate on lm, nobody on qa
    (tmp / "lm.jsonl").write_text(json.dumps({"text": "new rows"}) + "\n")
    data = Scores(table)
    leaderboard(cands, tasks, data, cache=cache)
    assert sorted(data.calls) == sorted((n, "lm") for n in ("base", "a", "b", "c"))

    # a changed base changes every candidate on it; a renamed candidate with the same content is a hit
    (tmp / "base" / "model.safetensors").write_bytes(b"base v2")
    base_changed = Scores(table)
    leaderboard(cands, tasks, base_changed, cache=cache)
    assert len(base_changed.calls) == 8
    renamed = Scores({("base", t): 0.1 for t in ("qa", "lm")})
    leaderboard([Candidate("bare", cands[0].model_dir)], tasks, renamed, cache=cache)
    assert renamed.calls == []

    # errors are not cached (they may pass next time); a broken cache file is rebuilt, not fatal
    (tmp / "adapters" / "c" / "adapter_model.safetensors").write_bytes(b"retrained c")
    failing = Scores(table, fail={"c": OSError("disk hiccup")})
    leaderboard(cands, tasks[:1], failing, cache=cache)
    assert failing.calls == [("c", "qa")]
    retry = Scores(table)
    leaderboard(cands, tasks[:1], retry, cache=cache)
    assert retry.calls == [("c", "qa")]
    done = Scores(table)
    leaderboard(cands, tasks[:1], done, cache=cache)
    assert done.calls == []
    cache.write_text("{not json")
    rebuilt = Scores(table)
    leaderboard(cands, tasks[:1], rebuilt, cache=cache)
    assert len(rebuilt.calls) == 4 and json.loads(cache.read_text())["format"] == "fmhub-select-cache"


def test_bad_arguments_and_the_default_evaluate(setup, monkeypatch):
    tmp, cands, tasks = setup
    with pytest.raises(FmhubError, match="nothing to rank"):
        leaderboard([], tasks, Scores({}))
    with pytest.raises(FmhubError, match="candidate name.*given twice: a"):
        leaderboard([cands[1], cands[1]], tasks, Scores({}))
    with pytest.raises(FmhubError, match=r"no such adapter directory"):
        parse_candidates(cands[0].model_dir, [str(tmp / "nope")])
    named = parse_candidates(cands[0].model_dir, [f"x={tmp / 'adapters' / 'a'}", str(tmp / "adapters" / "b")], include_base=False)
    assert [(c.name, Path(c.adapter_dir).name) for c in named] == [("x", "a"), ("b", "b")]
    # without evaluate=, fmhub.ml.scoring.evaluate scores (a stand-in module here, so this test needs no training code)
    fake = types.ModuleType("fmhub.ml.scoring")
    fake.evaluate = lambda model_dir, adapter_dir, task: 1.0 if adapter_dir else 0.0
    monkeypatch.setitem(sys.modules, "fmhub.ml.scoring", fake)
    board = leaderboard(cands[:2], tasks[:1])
    assert names(board) == ["a", "base"]


def test_a_router_from_the_leaderboard_sends_each_task_to_its_winner(setup):
    _, cands, tasks = setup
    board = leaderboard(cands, tasks, Scores({(n, t): s for (n, t), s in {
        ("a", "qa"): 0.9, ("b", "qa"): 0.1, ("c", "qa"): 0.1, ("base", "qa"): 0.1,
        ("a", "lm"): 5.0, ("b", "lm"): 1.0, ("c", "lm"): 5.0, ("base", "lm"): 5.0}.items()}))
    texts = {"qa": [f"question {i}: what is the capital of country {i}?" for i in range(20)],
             "lm": [f"once upon a time story number {i} began in a forest" for i in range(20)]}
    router = router_from_leaderboard(board, texts, min_confidence=0.6, fallback="base")
    assert router.classes == ["a", "b"]
    assert router.route("question: what is the capital of France?")[0] == "a"
    assert router.route("once upon a time in a dark forest")[0] == "b"
    assert router.route("zzyzx")[0] == "base"
    # tasks with one winner pool their texts; served_names renames a winner to what the server calls it
    pooled = router_from_leaderboard(board, texts, {"qa": "questions about geography"}, served_names={"b": "storyteller"})
    assert pooled.classes == ["a", "storyteller"] and pooled.training["examples"] == {"a": 20, "storyteller": 20}
    assert pooled.route("once upon a time")[0] == "storyteller"


# -- real scores: tiny transformers models, a small loss evaluator --------------------------------

def mean_loss(model_dir: str, adapter_dir: str | None, task: Task) -> float:
    """Mean next-token NLL of the task's texts (UTF-8 bytes as token ids), with the adapter applied when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    rows = [json.loads(line)[task.text] for line in Path(task.eval or task.data).read_text().splitlines()]
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([list(t.encode())]), labels=torch.tensor([list(t.encode())])).loss.item() for t in rows]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_real_models_rank_by_their_computed_loss(tmp_path):
    base = save_base(tmp_path / "base")
    other = save_base(tmp_path / "other", hidden_size=32, intermediate_size=64, num_attention_heads=2)
    for i in range(2):
        random_adapter(tmp_path / "ads" / f"lora{i}", seed=40 + i, base=base)
    random_adapter(tmp_path / "ads" / "alien", seed=3, base=other)  # another base's shapes: cannot load on this one
    for name, rows in (("stories", ["once upon a time", "the end"]), ("facts", ["water boils at 100 C", "2 + 2 = 4"])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    tasks = [Task(n, str(tmp_path / f"{n}.jsonl")) for n in ("stories", "facts")]
    cands = parse_candidates(str(base), [str(tmp_path / "ads")])
    calls = []

    def counting(*args):
        calls.append(args[1])
        return mean_loss(*args)

    board = leaderboard(cands, tasks, counting, cache=tmp_path / "cache.json")
    assert names(board)[-1] == "alien" and "size mismatch" in board.row("alien").errors["stories"]
    ok = [c for c in cands if c.name != "alien"]
    for t in tasks:
        losses = {c.name: mean_loss(c.model_dir, c.adapter_dir, t) for c in ok}
        assert board.best_for(t.name).name == min(losses, key=losses.get)
        assert {c.name: board.row(c.name).scores[t.name].value for c in ok} == pytest.approx(losses)
    calls.clear()
    assert leaderboard(cands, tasks, counting, cache=tmp_path / "cache.json").to_json()["best"] == board.to_json()["best"]
    assert calls == [str(tmp_path / "ads" / "alien")] * 2  # only the failure is tried again
