"""``fmhub run``: steps in dependency order, each re-run only when its inputs changed; cycles and failures reported."""

from __future__ import annotations

import json
import textwrap

import pytest

from fmhub.run import dag
from fmhub.run import plan as runner
from fmhub.project import spec as spec_mod
from fmhub.project.spec import load_spec


def _step(tmp_path, sid, inputs, outputs, calls, body=None, params=None):
    def go():
        calls.append(sid)
        if body:
            body()
        for o in outputs:
            (tmp_path / o).write_text("".join((tmp_path / i).read_text() for i in inputs) + sid)
        return {"n": len(calls)}

    return dag.Step(sid, [str(tmp_path / i) for i in inputs], [str(tmp_path / o) for o in outputs], params or {}, go)


def test_only_steps_downstream_of_a_change_rerun(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    calls: list[str] = []

    def steps():  # declared out of order: the dependency order comes from the files
        return [_step(tmp_path, "join", ["a2", "b2"], ["ab"], calls),
                _step(tmp_path, "a", ["a.txt"], ["a2"], calls),
                _step(tmp_path, "b", ["b.txt"], ["b2"], calls)]

    state = dag.State(str(tmp_path / "state.json"))
    out = dag.run(steps(), state)
    assert calls == ["a", "b", "join"] and [o.status for o in out] == ["ran"] * 3
    calls.clear()
    assert [o.status for o in dag.run(steps(), dag.State(str(tmp_path / "state.json")))] == ["up to date"] * 3 and calls == []
    (tmp_path / "b.txt").write_text("B")
    dag.run(steps(), dag.State(str(tmp_path / "state.json")))
    assert calls == ["b", "join"]  # a did not run again
    calls.clear()
    (tmp_path / "ab").write_text("edited by hand")
    dag.run(steps(), dag.State(str(tmp_path / "state.json")))
    assert calls == ["join"]  # an output changed by hand is rebuilt
    calls.clear()
    plan = dag.run(steps(), dag.State(str(tmp_path / "state.json")), dry_run=True)
    assert calls == [] and {o.status for o in plan} == {"up to date"}
    (tmp_path / "a.txt").write_text("A")
    plan = dag.run(steps(), dag.State(str(tmp_path / "state.json")), dry_run=True)
    assert [(o.step, o.status) for o in plan] == [("a", "would run"), ("b", "up to date"), ("join", "would run")] and calls == []


def test_a_failed_step_keeps_the_completed_ones_and_the_next_run_resumes(tmp_path):
    from fmhub.base.errors import FmhubError

    (tmp_path / "a.txt").write_text("a")
    calls: list[str] = []
    broken = [True]

    def fail():
        if broken[0]:
            raise FmhubError("out of disk")

    steps = lambda: [_step(tmp_path, "one", ["a.txt"], ["x"], calls), _step(tmp_path, "two", ["x"], ["y"], calls, fail)]  # noqa: E731
    with pytest.raises(dag.DagError) as info:
        dag.run(steps(), dag.State(str(tmp_path / "s.json")))
    assert "step two failed: out of disk" in str(info.value) and "1 step(s) before it are kept" in str(info.value)
    broken[0] = False
    calls.clear()
    dag.run(steps(), dag.State(str(tmp_path / "s.json")))
    assert calls == ["two"]


def test_cycles_and_missing_inputs_are_named(tmp_path):
    calls: list[str] = []
    cyc = [_step(tmp_path, "p", ["q.out"], ["p.out"], calls), _step(tmp_path, "q", ["p.out"], ["q.out"], calls)]
    cyc[0].where = "fmhub.yaml:3"
    with pytest.raises(dag.DagError, match=r"fmhub.yaml:3: a cycle: p -> q -> p"):
        dag.run(cyc, dag.State(str(tmp_path / "s.json")))
    with pytest.raises(dag.DagError, match=r"needs .*nothing.txt, which does not exist and no step makes it"):
        dag.run([_step(tmp_path, "r", ["nothing.txt"], ["r.out"], calls)], dag.State(str(tmp_path / "s.json")))
    assert calls == []


SPEC = """\
datasets:
  raw_a: {path: raw/a.jsonl}
  raw_b: {path: raw/b.jsonl}
clean:
  a:
    input: raw_a
    output: clean/a.jsonl
    steps: [dedup]
  b:
    input: raw_b
    output: clean/b.jsonl
    steps: [dedup]
label:
  la:
    input: clean/a.jsonl
    output: labelled/a.jsonl
    classes: [neg, pos]
    backend: serial
    lfs:
      - keyword: {words: [great, good], label: pos}
      - keyword: {words: [bad, awful], label: neg}
"""


def _rows(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))


def test_fmhub_run_reruns_only_the_pipelines_of_a_changed_asset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmhub.yaml").write_text(SPEC)
    _rows(tmp_path / "raw/a.jsonl", ["a great thing", "a great thing", "bad stuff", "good good"])
    _rows(tmp_path / "raw/b.jsonl", ["x", "y", "y"])
    loaded = load_spec(str(tmp_path / "fmhub.yaml"))

    def run():
        p = runner.plan(loaded)
        return {o.step: o for o in dag.run(p.steps, dag.State(runner.state_path(loaded)))}

    first = run()
    assert [first[s].status for s in ("clean:a", "clean:b", "label:la")] == ["ran"] * 3
    assert first["clean:a"].summary["rows_out"] == 3 and first["label:la"].summary["labelled"] == 3
    assert (tmp_path / "labelled/a.jsonl").exists() and (tmp_path / "clean/a.jsonl.lineage.json").exists()
    assert {o.status for o in run().values()} == {"up to date"}
    _rows(tmp_path / "raw/b.jsonl", ["x", "y", "z"])  # only b's pipeline depends on it
    again = run()
    assert again["clean:b"].status == "ran" and again["clean:a"].status == "up to date" and again["label:la"].status == "up to date"
    _rows(tmp_path / "raw/a.jsonl", ["a great thing", "awful", "good good"])
    third = run()
    assert third["clean:a"].status == "ran" and third["label:la"].status == "ran" and third["clean:b"].status == "up to date"


def test_spec_errors_point_at_the_line(tmp_path):
    (tmp_path / "fmhub.yaml").write_text(textwrap.dedent("""\
        models:
          tiny: {path: m}
        tasks:
          t: {data: d.jsonl, metric: f1}
        """))
    from fmhub.project.spec import SpecError

    with pytest.raises(SpecError, match=r"fmhub.yaml:4: tasks.t.metric"):
        load_spec(str(tmp_path / "fmhub.yaml"))
    (tmp_path / "fmhub.yaml").write_text("models:\n  tiny: {path: m}\ntasks:\n  t: {data: d.jsonl}\nfinetune:\n  models: [big]\n")
    with pytest.raises(SpecError, match=r"fmhub.yaml:6: finetune.models\[0\]: unknown model 'big'"):
        runner.plan(load_spec(str(tmp_path / "fmhub.yaml")))
    (tmp_path / "fmhub.yaml").write_text("models:\n  tiny: {path: m}\ntasks:\n  t: {data: d.jsonl}\n")
    with pytest.raises(SpecError, match=r"no finetune: section"):
        runner.plan(load_spec(str(tmp_path / "fmhub.yaml")))


def test_models_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    from fmhub.project.spec import SpecError

    cache = tmp_path / "hf"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import, which may have happened
    (tmp_path / "fmhub.yaml").write_text("models:\n  tiny: {hub: acme/tiny}\n  gone: {hub: acme/gone}\n")
    loaded = load_spec(str(tmp_path / "fmhub.yaml"))
    assert spec_mod.model_dir_of(loaded, "tiny") == str(snap)
    with pytest.raises(SpecError, match=r"fmhub.yaml:3: models.gone.hub: acme/gone is not in the local Hugging Face cache"):
        spec_mod.model_dir_of(loaded, "gone")
    (tmp_path / "fmhub.yaml").write_text("models:\n  both: {hub: acme/tiny, path: m}\n  bad: {hub: tiny}\n")
    with pytest.raises(SpecError) as info:
        load_spec(str(tmp_path / "fmhub.yaml"))
    assert "fmhub.yaml:2: models.both" in str(info.value) and "either path" in str(info.value)
    assert "fmhub.yaml:3: models.bad.hub" in str(info.value) and "not a Hub model id" in str(info.value)


def test_fishmask_finetune_with_a_sparsity_constraint(tmp_path):
    """finetune.method fishmask: a full model per task, 1 % of its entries trained, ranked by select; merge/deploy refuse it."""
    from safetensors.torch import load_file

    from fmhub.project.spec import SpecError
    from tests.helpers.tiny import sentiment_rows, tiny_base, write_jsonl

    tiny_base(tmp_path / "m")
    write_jsonl(tmp_path / "s.jsonl", sentiment_rows(160, 1))
    spec = textwrap.dedent("""\
        models: {tiny: {path: m}}
        tasks: {sent: {data: s.jsonl, metric: accuracy, classes: [pos, neg]}}
        finetune: {method: fishmask, sparsity: 0.99, steps: 40, lrs: [0.03]}
        select: {output: board.json}
        """)
    (tmp_path / "fmhub.yaml").write_text(spec)
    loaded = load_spec(str(tmp_path / "fmhub.yaml"))
    out = {o.step: o for o in dag.run(runner.plan(loaded).steps, dag.State(str(tmp_path / "state.json")))}
    assert out["finetune:sent"].status == "ran" and out["select"].status == "ran"
    base, tuned = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(str(tmp_path / "adapters" / "sent" / "model.safetensors"))
    changed = sum(int((tuned[n] != base[n]).sum()) for n in base)
    assert 0 < changed <= 0.0101 * sum(t.numel() for t in base.values())
    board = json.loads((tmp_path / "board.json").read_text())
    assert "sent" in json.dumps(board) and not (tmp_path / "runs" / "router.json").exists()
    (tmp_path / "fmhub.yaml").write_text(spec + "merge: {}\n")
    with pytest.raises(SpecError, match=r"fmhub.yaml:5: merge: merge: works on LoRA adapters"):
        runner.plan(load_spec(str(tmp_path / "fmhub.yaml")))
    (tmp_path / "fmhub.yaml").write_text(spec.replace("method: fishmask, sparsity: 0.99", "method: fishmask"))
    with pytest.raises(SpecError, match=r"fmhub.yaml:3: finetune: .*needs sparsity"):
        load_spec(str(tmp_path / "fmhub.yaml"))
