"""``fmhub label`` end to end: fmhub.yaml in, labelled rows and a report out, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fmhub.data.label import pipeline as labelling
from fmhub.data.label.model import LabelModelError
from fmhub.core.rows import DataError
from fmhub.project.spec import SpecError, load_spec

REVIEWS = [
    "I love it, works great", "Terrible. Broke after a week", "Great value, love the design", "waste of money, terrible",
    "not great, I returned it", "Arrived on Tuesday.", "Excellent, highly recommend!", "broke on day two, awful",
    "great sound, love it", "returned it, terrible support",
]

LFS_PY = textwrap.dedent("""
    def exclaim(row):
        if row["text"].startswith("Arrived"):
            raise ValueError("no opinion on deliveries")
        return "positive" if "!" in row["text"] else None

    def always_fails(row):
        raise RuntimeError("this rule is broken")

    def interrupt(row):
        if "day two" in row["text"]:
            raise KeyboardInterrupt
        return None

    def by_column(row):
        return row["a"]
""")


def write_spec(d: Path, lfs: str, extra: str = "", pipeline: str = "sentiment") -> Path:
    (d / "fmhub.yaml").write_text(textwrap.dedent(f"""\
        datasets:
          reviews:
            path: reviews.jsonl
            key: id
        label:
          {pipeline}:
            input: reviews
            output: out/labelled.jsonl
            classes: [negative, positive]
        """) + textwrap.indent(textwrap.dedent(extra), "    ") + "    lfs:\n" + textwrap.indent(textwrap.dedent(lfs), "      "))
    return d / "fmhub.yaml"


RULES = """\
- keyword: {words: [great, love, excellent], label: positive}
- keyword: {words: [terrible, broke, waste, awful], label: negative}
- regex: {pattern: "returned|refund", label: negative, name: returns}
- python: {function: "lfs.py:exclaim"}
"""


@pytest.fixture
def workdir(tmp_path):
    rows = [json.dumps({"id": f"r{i}", "text": t}) for i, t in enumerate(REVIEWS)]
    rows.insert(3, "{not json")
    (tmp_path / "reviews.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "lfs.py").write_text(LFS_PY)
    return tmp_path


def fmhub_label(d: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # wide enough that rich does not fold the table
    return subprocess.run([sys.executable, "-m", "fmhub", "label", *args], cwd=d, capture_output=True, text=True, env=env)


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cli_labels_every_row_writes_a_report_and_records_what_failed(workdir):
    write_spec(workdir, RULES)
    before = digest(workdir / "reviews.jsonl")
    proc = fmhub_label(workdir, "--spec", "fmhub.yaml", "--backend", "serial", "--suggest", "3")
    assert proc.returncode == 0, proc.stderr
    assert digest(workdir / "reviews.jsonl") == before  # the input is only read
    out = read_jsonl(workdir / "out" / "labelled.jsonl")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(len(REVIEWS))]  # the malformed line is left out
    by_id = {r["id"]: r for r in out}
    assert by_id["r0"]["label"] == "positive" and by_id["r1"]["label"] == "negative"
    assert by_id["r5"]["label"] is None  # no function voted on it
    for r in out:
        assert set(r["label_probs"]) == {"negative", "positive"} and sum(r["label_probs"].values()) == pytest.approx(1, abs=1e-5)

    rep = json.loads((workdir / "out" / "labelled.report.json").read_text())
    assert rep["rows"] == len(REVIEWS)
    assert rep["malformed_rows"]["count"] == 1 and rep["malformed_rows"]["first"][0]["position"] == 3
    lfs = {lf["name"]: lf for lf in rep["lfs"]}
    assert list(lfs) == ["keyword:great,love,excellent", "keyword:terrible,broke,waste,awful", "returns", "python:exclaim"]
    assert lfs["keyword:great,love,excellent"]["coverage"] == pytest.approx(5 / 10)
    assert lfs["returns"]["polarity"] == ["negative"] and lfs["returns"]["conflicts"] == pytest.approx(1 / 10)  # "not great, I returned it"
    failed = lfs["python:exclaim"]
    assert failed["errors"] == 1 and failed["first_errors"] == [{"position": 6, "error": "ValueError: no opinion on deliveries"}]
    assert rep["labels"]["counts"]["positive"] + rep["labels"]["counts"]["negative"] + rep["labels"]["unlabelled"] == 10
    assert len(rep["suggestions"]) == 3 and rep["suggestions"][0]["text"]
    assert "labelling functions (10 rows)" in proc.stdout and "│ keyword:terrible,broke,waste,awful │ negative │ 40.0% │" in proc.stdout
    assert "labelled 10 rows" in proc.stdout
    assert "failed on 1 row(s)" in proc.stderr and "malformed" in proc.stderr


def test_cli_stops_naming_a_function_that_fails_on_every_row(workdir):
    write_spec(workdir, RULES + '- python: {function: "lfs.py:always_fails", name: broken-rule}\n')
    proc = fmhub_label(workdir, "--backend", "serial")
    assert proc.returncode == 1
    assert "labelling function 'broken-rule' failed on every row" in proc.stderr
    assert "RuntimeError: this rule is broken" in proc.stderr
    assert not (workdir / "out" / "labelled.jsonl").exists()


def test_processes_backend_gives_the_same_labels_as_serial(workdir):
    rows = [json.dumps({"id": f"r{i}", "text": REVIEWS[i % len(REVIEWS)] + " " * (i % 3)}) for i in range(240)]
    (workdir / "reviews.jsonl").write_text("\n".join(rows) + "\n")
    write_spec(workdir, RULES, "batch_size: 40\n")
    loaded = load_spec(str(workdir / "fmhub.yaml"))
    serial = labelling.run(loaded, backend="serial")
    first = (workdir / "out" / "labelled.jsonl").read_bytes()
    parallel = labelling.run(loaded, backend="processes", workers=2)
    assert (workdir / "out" / "labelled.jsonl").read_bytes() == first
    assert parallel["lfs"] == serial["lfs"] and parallel["rows"] == 240


def test_gold_labels_decide_between_two_functions_that_contradict_each_other(workdir):
    # a and b vote on every row and disagree on 40 of 100: from the votes alone either could be right
    rows = [{"id": f"r{i}", "text": "x", "a": "positive" if i % 2 else "negative"} for i in range(100)]
    for i, r in enumerate(rows):
        r["b"] = r["a"] if i < 60 else ("negative" if r["a"] == "positive" else "positive")
    (workdir / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "gold.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "label": rows[i]["a"]}) for i in range(60, 70)) +
                                     "".join(json.dumps({"position": i, "label": rows[i]["a"]}) + "\n" for i in (70, 71)))
    (workdir / "gold.jsonl").write_text((workdir / "gold.jsonl").read_text().replace("}{", "}\n{"))
    lfs = '- python: {function: "lfs.py:by_column", name: a}\n- lookup: {column: b, map: {negative: negative, positive: positive}, name: b}\n'
    write_spec(workdir, lfs)
    loaded = load_spec(str(workdir / "fmhub.yaml"))
    labelling.run(loaded, backend="serial")
    before = read_jsonl(workdir / "out" / "labelled.jsonl")
    conflicted = range(72, 100)  # not gold themselves
    assert all(0.3 < before[i]["label_probs"]["positive"] < 0.7 for i in conflicted)

    write_spec(workdir, lfs, "gold: gold.jsonl\n")
    rep = labelling.run(load_spec(str(workdir / "fmhub.yaml")), backend="serial")
    after = read_jsonl(workdir / "out" / "labelled.jsonl")
    assert all(after[i]["label"] == rows[i]["a"] and after[i]["label_probs"][rows[i]["a"]] > 0.8 for i in conflicted)
    assert after[60]["label_probs"][rows[60]["a"]] == 1.0  # a gold row carries its gold label
    assert rep["gold"]["rows"] == 12 and rep["gold"]["unmatched"] == 0
    acc = {lf["name"]: lf["gold_accuracy"] for lf in rep["lfs"]}
    assert acc == {"a": 1.0, "b": 0.0}


def test_spec_errors_point_at_the_line(workdir):
    write_spec(workdir, "- keyword: {words: [great], label: positive}\n- keywrd: {words: [bad], label: negative}\n")
    with pytest.raises(SpecError, match=r"fmhub.yaml:12: label.sentiment.lfs\[1\]: unknown labelling function kind 'keywrd'; installed: .*keyword"):
        labelling.prepare(load_spec(str(workdir / "fmhub.yaml")))
    write_spec(workdir, "- keyword: {words: [great], label: positive}\n- regex: {pattern: bad, label: neutral}\n")
    with pytest.raises(SpecError, match=r"fmhub.yaml:12: label.sentiment.lfs\[1\]: regex: option 'label': 'neutral' is not one"):
        labelling.prepare(load_spec(str(workdir / "fmhub.yaml")))
    write_spec(workdir, "- keyword: {words: [great], label: positive}\n", "model: {abstains: sometimes}\n")
    with pytest.raises(SpecError, match=r"fmhub.yaml:10: label.sentiment.model: abstains must be one of"):
        labelling.run(load_spec(str(workdir / "fmhub.yaml")), backend="serial")
    proc = fmhub_label(workdir)
    assert proc.returncode == 1 and "fmhub.yaml:10:" in proc.stderr


def test_bad_inputs_give_clear_errors(workdir):
    write_spec(workdir, "- keyword: {words: [great], label: positive}\n")
    spec = str(workdir / "fmhub.yaml")
    (workdir / "reviews.jsonl").write_text('{"id": 1, "body": "great"}\n{"id": 2, "body": "bad"}\n')
    with pytest.raises(DataError, match=r"has no column 'text' \(it has: body, id\); set 'column:'"):
        labelling.run(load_spec(spec), backend="serial")
    (workdir / "reviews.jsonl").write_text("")
    with pytest.raises(labelling.LabelError, match="has no rows to label"):
        labelling.run(load_spec(spec), backend="serial")
    (workdir / "reviews.jsonl").write_text('{"text": "meh"}\n{"text": "fine"}\n')
    with pytest.raises(LabelModelError, match="label.sentiment: every labelling function abstains on every row"):
        labelling.run(load_spec(spec), backend="serial")
    (workdir / "fmhub.yaml").write_text((workdir / "fmhub.yaml").read_text().replace("out/labelled.jsonl", "reviews.jsonl"))
    with pytest.raises(SpecError, match="output is the input file"):
        labelling.run(load_spec(spec), backend="serial")


def test_an_interrupted_run_leaves_no_partial_output_and_runs_again(workdir):
    write_spec(workdir, RULES)
    spec = str(workdir / "fmhub.yaml")
    labelling.run(load_spec(spec), backend="serial")
    good = (workdir / "out" / "labelled.jsonl").read_bytes()
    write_spec(workdir, RULES + '- python: {function: "lfs.py:interrupt"}\n')
    with pytest.raises(KeyboardInterrupt):
        labelling.run(load_spec(spec), backend="serial")
    assert (workdir / "out" / "labelled.jsonl").read_bytes() == good  # the last complete output, untouched
    assert sorted(os.listdir(workdir / "out")) == ["labelled.jsonl", "labelled.jsonl.lineage.json", "labelled.report.json"]  # no temp files
    write_spec(workdir, RULES)
    labelling.run(load_spec(spec), backend="serial")
    assert (workdir / "out" / "labelled.jsonl").read_bytes() == good


def test_parquet_in_and_out_with_an_html_report(workdir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(REVIEWS))], "text": REVIEWS}), workdir / "reviews.parquet")
    write_spec(workdir, RULES)
    (workdir / "fmhub.yaml").write_text((workdir / "fmhub.yaml").read_text().replace("reviews.jsonl", "reviews.parquet").replace("labelled.jsonl", "labelled.parquet"))
    rep = labelling.run(load_spec(str(workdir / "fmhub.yaml")), backend="serial", report=str(workdir / "report.html"), suggest=2)
    table = pq.read_table(workdir / "out" / "labelled.parquet").to_pylist()
    assert [r["label"] for r in table[:2]] == ["positive", "negative"]
    assert set(table[0]["label_probs"]) == {"negative", "positive"}
    page = (workdir / "report.html").read_text()
    assert "<table>" in page and "python:exclaim" in page and "Label these next" in page
    assert rep["report"].endswith("report.html")


class _DriverOnly:
    """A labeler whose functions ask to run in the calling process (as the model labeler does)."""

    name = "test-driver-only"

    def configure(self, options, context):
        class LF:
            name = "driver-only"
            in_driver = True

            def vote(self, rows):
                # votes only where it runs in the process that started the run
                return ["negative" if os.getpid() == options["pid"] else "positive" for _ in rows]

        return LF()


def test_in_driver_functions_run_in_the_calling_process_while_the_others_run_in_workers(workdir):
    from fmhub import hookimpl
    from fmhub.plugin import host

    class Plugin:
        @hookimpl
        def fmhub_labelers(self):
            return [_DriverOnly()]

    rows = [json.dumps({"id": f"r{i}", "text": REVIEWS[i % len(REVIEWS)]}) for i in range(120)]
    (workdir / "reviews.jsonl").write_text("\n".join(rows) + "\n")
    write_spec(workdir, RULES + f"- test-driver-only: {{pid: {os.getpid()}}}\n", "batch_size: 30\n")
    pm = host.plugin_manager()
    plugin = Plugin()
    pm.register(plugin, "test-driver-only")
    try:
        rep = labelling.run(load_spec(str(workdir / "fmhub.yaml")), backend="processes", workers=2)
    finally:
        pm.unregister(plugin)
    lfs = {lf["name"]: lf for lf in rep["lfs"]}
    assert lfs["driver-only"]["coverage"] == 1.0 and lfs["driver-only"]["polarity"] == ["negative"]
    assert lfs["returns"]["coverage"] == pytest.approx(0.2)  # computed in the workers


def test_a_function_failing_on_all_of_the_first_rows_stops_the_run_early(workdir):
    rows = [json.dumps({"id": f"r{i}", "text": REVIEWS[i % len(REVIEWS)]}) for i in range(200)]
    (workdir / "reviews.jsonl").write_text("\n".join(rows) + "\n")
    write_spec(workdir, RULES + '- python: {function: "lfs.py:always_fails"}\n', "batch_size: 20\n")
    with pytest.raises(labelling.LabelError, match=r"'python:always_fails' failed on each of the first 60 rows \(row 0: RuntimeError"):
        labelling.run(load_spec(str(workdir / "fmhub.yaml")), backend="serial")
