"""The one governance gate (fmhub.governance.gate): fine-tuning, selection and provenance read training rows as `fmhub clean` does.

The repository holds an access policy (tests/helpers/policy.py's, plus ``rows:`` rules) and tickets, a quarter
of them tagged ``tier: restricted``. bob may read the file but not those rows; alice (ml-core, hence
pii-readers) may read every row. ``data/users.jsonl`` has a column (``email``) bob may not read at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers import git
from tests.helpers.policy import ALICE, BOB, POLICY, ROW_RULES, SECRET_ROW, audit_entries

from fmhub.governance import gate
from fmhub.governance.access import AccessDenied


SPEC = """\
datasets:
  tickets: {path: tickets/t.jsonl}
models:
  m: {path: m}
clean:
  web:
    input: tickets
    output: out/t.clean.jsonl
    backend: serial
    steps:
      - length: {min_words: 1}
tasks:
  t: {data: tickets, metric: loss}
  users: {data: data/users.jsonl, metric: loss}
eval:
  e: {task: t, data: tickets}
"""


def ticket(i: int) -> dict:
    secret = i % 4 == 1
    return {"text": f"SECRET-TICKET-{i} abcdefgh" if secret else f"ticket {i} abcdefgh", "tier": "restricted" if secret else "open"}


@pytest.fixture
def governed(tmp_path, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    (repo / ".fmhub").mkdir(parents=True)
    git(repo, "init", "-q")
    git(repo, "config", "fmhub.audit", "true")  # on without installing the filters
    (repo / ".fmhub/policy.yaml").write_text(POLICY.replace("rules:\n", "rules:\n" + ROW_RULES, 1))
    (repo / "tickets").mkdir()
    (repo / "tickets/t.jsonl").write_text("".join(json.dumps(ticket(i)) + "\n" for i in range(12)))
    (repo / "data").mkdir()
    users = [{"text": f"user {i} is fine", "email": SECRET_ROW if i == 3 else f"u{i}@x.example"} for i in range(8)]
    (repo / "data/users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in users))
    (repo / "fmhub.yaml").write_text(SPEC)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("FMHUB_USER", BOB)
    return repo


def loaded_spec(repo: Path):
    from fmhub.project.spec import load_spec

    return load_spec(str(repo / "fmhub.yaml"))


def withheld_records(repo: Path, pipeline: str) -> list[dict]:
    return [e for e in audit_entries(repo) if e["what"] == "access" and e["details"].get("rows_withheld")
            and pipeline in e["details"].get("pipeline", "")]


def test_training_rows_are_the_rows_clean_keeps(governed, monkeypatch):
    """A task's reader (fine-tuning, evaluate, select) gets the rows `fmhub clean` lets through: no more, no fewer."""
    from fmhub.data.clean import pipeline as clean
    from fmhub.ml import tasks

    loaded = loaded_spec(governed)
    res = clean.run(loaded)
    cleaned = {json.loads(line)["text"] for line in (governed / "out/t.clean.jsonl").read_text().splitlines()}
    assert res.withheld == 3 and len(cleaned) == 9 and not any("SECRET" in t for t in cleaned)

    task = tasks.task_of(loaded, "t")
    train, held = tasks.split(task, new_version=True)
    assert {r.values["text"] for r in train + held} == cleaned
    assert [e["details"]["rows_withheld"] for e in withheld_records(governed, "tasks.t")] == [3]
    assert "SECRET" not in json.dumps(audit_entries(governed))
    # the router's texts too
    assert set(tasks.task_texts(task)) == cleaned

    monkeypatch.setenv("FMHUB_USER", ALICE)  # pii-readers: every row, as clean gives her
    assert clean.run(loaded_spec(governed)).withheld == 0
    assert sum(map(len, tasks.split(tasks.task_of(loaded_spec(governed), "t")))) == 12


def test_a_denied_column_refuses_finetune_evaluate_and_clean_alike(governed, tmp_path):
    """bob may not read data/users.jsonl's email column: every reader refuses before any row is read, naming the spec line."""
    from fmhub.ml.autotune import train_adapter
    from fmhub.ml.scoring import evaluate
    from fmhub.ml.tasks import Task, task_of

    loaded = loaded_spec(governed)
    task = task_of(loaded, "users")
    for run in (lambda: train_adapter(str(tmp_path / "no-base"), task, str(tmp_path / "out"), steps=1, lrs=[1e-3]),
                lambda: evaluate(str(tmp_path / "no-base"), None, task)):  # refused before the model is even looked for
        with pytest.raises(AccessDenied) as info:
            run()
        msg = str(info.value)
        assert msg.startswith("fmhub.yaml:14: tasks.users: access denied: bob@example.com may not read the rows of data/users.jsonl")
        assert msg.endswith("no row was read") and SECRET_ROW not in msg
    assert not (tmp_path / "out").exists()
    # a task built by hand, with no spec, is refused too, naming itself
    with pytest.raises(AccessDenied, match=r"^task 'mine': access denied: bob@example.com may not read"):
        train_adapter(str(tmp_path / "no-base"), Task("mine", str(governed / "data/users.jsonl")), str(tmp_path / "out"))
    # as the clean pipeline's gate refuses it
    rows = gate.open_rows(gate.pipeline_step(loaded, "clean", "web"), str(governed / "tickets/t.jsonl"), ["text"])
    assert rows.gate is not None
    with pytest.raises(AccessDenied, match="may not read the rows of data/users.jsonl"):
        gate.open_rows(gate.pipeline_step(loaded, "clean", "web"), str(governed / "data/users.jsonl"), ["text"])


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_finetune_trains_on_no_withheld_row(governed, monkeypatch):
    """`fmhub run`'s finetune step (train_adapter on a declared task) never sees a row clean withholds."""
    from fmhub.ml import autotune, training
    from fmhub.ml.tasks import task_of
    from tests.helpers.tiny import tiny_base

    base = tiny_base(governed / "m")
    seen: list[list[int]] = []
    real = training.train_steps

    def spy(base_dir, lora, examples, *args, **kw):
        seen.append([len(e.ids) for e in examples])
        return real(base_dir, lora, examples, *args, **kw)

    monkeypatch.setattr(training, "train_steps", spy)
    res = autotune.train_adapter(base, task_of(loaded_spec(governed), "t"), str(governed / "out/adapter"), steps=2, lrs=[1e-3],
                                 batch_size=4)
    assert res.steps == 2 and (governed / "out/adapter/adapter_config.json").exists()
    rec = json.loads((governed / "out/adapter.lineage.json").read_text())
    assert rec["step"] == "finetune" and [i["kind"] for i in rec["inputs"]] == ["model", "dataset"]
    # 9 readable rows, split into training and held-out rows; the 3 restricted ones are in neither
    from fmhub.ml import tasks

    train, held = tasks.split(task_of(loaded_spec(governed), "t"))
    assert len(train) + len(held) == 9 and seen == [[len(e.ids) for e in tasks.examples(
        task_of(loaded_spec(governed), "t"), train, autotune.datasets_io.load_tokenizer(base, 256), 128)]]
    assert withheld_records(governed, "tasks.t") and all(e["details"]["rows_withheld"] == 3 for e in withheld_records(governed, "tasks.t"))


def test_select_checks_the_policy_before_its_cache_and_keys_scores_by_reader(governed, monkeypatch, tmp_path):
    from fmhub.ml.selection import Candidate, leaderboard
    from fmhub.ml.tasks import task_of

    (governed / "m").mkdir()
    (governed / "m/config.json").write_text("{}")
    cands = [Candidate("base", str(governed / "m"))]
    cache = tmp_path / "cache.json"
    reads: list[int] = []

    def evaluate(model_dir, adapter_dir, task):
        from fmhub.ml.tasks import split

        reads.append(sum(map(len, split(task))))
        return 1.0

    monkeypatch.setenv("FMHUB_USER", ALICE)
    board = leaderboard(cands, [task_of(loaded_spec(governed), "t"), task_of(loaded_spec(governed), "users")], evaluate, cache=cache)
    assert board.evaluated == 2 and reads == [12, 8]
    monkeypatch.setenv("FMHUB_USER", BOB)
    # bob's rows are not alice's: his score is his own, over the 9 rows he may read
    board = leaderboard(cands, [task_of(loaded_spec(governed), "t")], evaluate, cache=cache)
    assert board.evaluated == 1 and reads[-1] == 9
    assert leaderboard(cands, [task_of(loaded_spec(governed), "t")], evaluate, cache=cache).evaluated == 0  # cached for bob now
    # a task he may not read: refused, though alice's score for it is in the cache
    with pytest.raises(AccessDenied, match="tasks.users: access denied: bob@example.com"):
        leaderboard(cands, [task_of(loaded_spec(governed), "users")], evaluate, cache=cache)


def test_explain_reads_training_rows_through_the_gate(governed, monkeypatch):
    """`fmhub explain` ranks training rows as candidates: withheld rows are never among them, a denied file is refused."""
    from fmhub.ml import explain as provenance

    loaded = loaded_spec(governed)
    out = governed / "evals/e"
    out.mkdir(parents=True)
    (out / "predictions.jsonl").write_text(json.dumps({"key": "k", "row": {"text": "ticket 0 abcdefgh"}, "target": None,
                                                       "prediction": None, "correct": None, "score": 3.0, "slices": []}) + "\n")
    from fmhub.ml import evaluation, identity

    # the predictions name the model that made them, as fmhub eval records it: explain takes exactly that model
    made_by = identity.of(evaluation.plan(loaded, "e", read_rows=False).model, None, str(governed))
    digest = hashlib.sha256((out / "predictions.jsonl").read_bytes()).hexdigest()  # and are bound to these bytes
    (out / "predictions.jsonl.lineage.json").write_text(json.dumps({"params": {"identity": made_by,
                                                                               identity.PREDICTIONS_SHA: digest}}))
    got: dict = {}

    def fake_explain(model_dir, adapter_dir, task, train_rows, queries, targets, **kw):
        got["train"] = list(train_rows)
        return [[] for _ in queries]

    monkeypatch.setattr(provenance, "explain", fake_explain)
    provenance.explain_eval(loaded, "e", train=["tickets/t.jsonl"])
    assert len(got["train"]) == 9 and not any("SECRET" in r["text"] for r in got["train"])
    assert [e["details"]["rows_withheld"] for e in withheld_records(governed, "eval.e")] == [3]
    with pytest.raises(AccessDenied, match="eval.e: access denied: bob@example.com may not read the rows of data/users.jsonl"):
        provenance.explain_eval(loaded, "e", train=["data/users.jsonl"])
    monkeypatch.setenv("FMHUB_USER", ALICE)
    provenance.explain_eval(loaded, "e", train=["tickets/t.jsonl"])
    assert len(got["train"]) == 12


def test_texts_read_through_the_gate(governed):
    """fmhub.data.texts (Fisher data, `fmhub finetune`'s masked fine-tuning) leaves withheld rows out and refuses denied files."""
    from fmhub.data import texts

    assert len(texts.load_examples(str(governed / "tickets/t.jsonl"))) == 9
    with pytest.raises(AccessDenied, match=r"^data file '.*users.jsonl': access denied"):
        texts.load_examples(str(governed / "data/users.jsonl"))
    assert texts.DataError is __import__("fmhub.core.rows", fromlist=["DataError"]).DataError  # one DataError
