"""Bad input to fmhub eval / explain / patch: a clear error naming the spec line or the file, and nothing written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCHMARKS, fmhub

sys.path.insert(0, str(BENCHMARKS))
import slice_data as sd  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

SPEC = """\
models:
  base: {path: base}
tasks:
  t: {data: rows.jsonl, metric: accuracy, classes: [neg, pos]}
slices:
  s: {regex: zorbo}
  c: {clusters: 2}
eval:
  e: {task: t, data: rows.jsonl}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd.tiny_llama(str(tmp_path / "base"), hidden=32, layers=1)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sd.make_task(n_train=20).train))
    (tmp_path / "fmhub.yaml").write_text(SPEC)
    return tmp_path


def _err(tmp_path: Path, *args: str) -> str:
    proc = fmhub(tmp_path, *args, check=False)
    assert proc.returncode == 1, proc
    return proc.stderr.decode()


def _raises(spec: str, fn, *args, **kw) -> str:
    from fmhub.base.errors import FmhubError
    from fmhub.project.spec import parse_spec

    with pytest.raises(FmhubError) as info:
        fn(parse_spec(spec, str(Path.cwd() / "fmhub.yaml")), *args, **kw)
    return str(info.value)


def test_spec_errors_name_their_line(project):
    from fmhub.ml.evaluation import plan
    from fmhub.ml.patch import run_patch

    assert "fmhub.yaml:10: eval.f.task: no task 'nope'" in _raises(SPEC + "  f: {task: nope}\n", plan, "f")
    assert "eval.g.slices: no slice 'missing'" in _raises(SPEC + "  g: {task: t, slices: [s, missing]}\n", plan, "g")
    assert "patch.p.slice: patch a where:, regex: or lf: slice" in _raises(
        SPEC + "patch:\n  p: {eval: e, slice: c, output: out}\n", run_patch, "p")
    assert "patch.p.output: output is the model being patched" in _raises(
        SPEC + "patch:\n  p: {eval: e, slice: s, output: base}\n", run_patch, "p")
    assert not (project / "out").exists() and not (project / "evals").exists()


def test_eval_writes_a_report_and_bad_predictions_or_missing_ones_are_said(project):
    from fmhub.ml.evaluation import run_eval
    from fmhub.ml.explain import explain_eval

    assert "no predictions; run `fmhub eval e` first" in _raises(SPEC, explain_eval, "e")
    out = json.loads(fmhub(project, "eval", "e", "--json", "--no-plots").stdout)
    assert out["rows"] == 20 and [s["name"] for s in out["slices"]] == ["s", "c:0", "c:1"]
    assert sum(s["n"] for s in out["slices"] if s["kind"] == "cluster") == 20
    assert not (project / "evals/e/report.html").exists() and (project / "evals/e/predictions.jsonl.lineage.json").is_file()
    (project / "bad.jsonl").write_text('{"no": "key"}\n')
    assert "bad.jsonl:1: not a predictions record" in _raises(SPEC, run_eval, "e", compare_to="bad.jsonl", plots=False)
    assert "no predictions at nope:evals/e/predictions.jsonl" in _raises(SPEC, run_eval, "e", compare_to="nope", plots=False)
    assert "no row of the predictions is in slice 'zzz'" in _raises(SPEC, explain_eval, "e", slice_name="zzz")
    assert "row 99 is not in" in _raises(SPEC, explain_eval, "e", rows=[99])
    assert "--fail-on is 'flagged' or 'worse'" in _err(project, "eval", "e", "--fail-on", "bad")


def test_lora_patch_is_merged_into_a_full_model(project):
    from fmhub.ml.patch import run_patch
    from fmhub.project.spec import parse_spec

    spec = SPEC.replace("  s: {regex: zorbo}\n", "  s: {regex: zorbo}\n  toy: {regex: 'kite|doll|ball'}\n")
    spec += ("patch:\n  p: {eval: e, slice: toy, method: lora, r: 2, steps: 3, lrs: [1e-3], batch_size: 4,\n"
                   "       gate: {min_gain: -1.0, max_regression: 1.0}, output: patched}\n")
    rep = run_patch(parse_spec(spec, str(project / "fmhub.yaml")), "p")
    assert rep["gate"]["passed"] and rep["method"] == "lora" and rep["output"] == "patched"
    files = set(os.listdir(project / "patched"))
    assert {"config.json", "model.safetensors", "fmhub-patch.json"} <= files and "adapter_config.json" not in files
    from safetensors.torch import load_file

    before, after = load_file(str(project / "base/model.safetensors")), load_file(str(project / "patched/model.safetensors"))
    assert set(before) == set(after) and any(not (before[k] == after[k]).all() for k in before)  # the merged update moved weights
    assert json.loads((project / "patched.lineage.json").read_text())["step"] == "patch"
    assert not [p for p in os.listdir(project) if p.startswith(".fmhub-patch-")]


def test_loss_and_exact_match_evals_score_every_row(project):
    from fmhub.ml.evaluation import run_eval
    from fmhub.project.spec import parse_spec

    rows = [{"text": f"abc {i}", "prompt": f"count {i}:", "completion": str(i + 1)} for i in range(12)]
    (project / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = SPEC.replace("  c: {clusters: 2}\n", "  one: {regex: '1'}\n").replace(
        "  t: {data: rows.jsonl, metric: accuracy, classes: [neg, pos]}\n",
        "  t: {data: rows.jsonl, metric: accuracy, classes: [neg, pos]}\n  l: {data: gen.jsonl}\n  x: {data: gen.jsonl, metric: exact_match}\n")
    spec += "  el: {task: l, data: gen.jsonl}\n  ex: {task: x, data: gen.jsonl}\n"
    loaded = parse_spec(spec, str(project / "fmhub.yaml"))
    loss = run_eval(loaded, "el", plots=False)
    assert loss["metric"] == "loss" and not loss["higher_is_better"] and loss["overall"]["value"] > 0
    preds = [json.loads(x) for x in (project / "evals/el/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(p["correct"] is None and p["score"] > 0 for p in preds)
    em = run_eval(loaded, "ex", plots=False)
    preds = [json.loads(x) for x in (project / "evals/ex/predictions.jsonl").read_text().splitlines()]
    assert em["overall"]["value"] == sum(p["correct"] for p in preds) / 12  # a random model completes nothing right, or little
    assert all(isinstance(p["prediction"], str) and p["target"] == str(i + 1) for i, p in enumerate(preds))
    assert {s["name"] for s in em["slices"]} == {"s", "one"}
