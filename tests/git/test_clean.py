"""``fmhub clean`` end to end: fmhub.yaml pipelines over jsonl and parquet, reports, overrides, backends, bad input."""

from __future__ import annotations

import functools
import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from tests.helpers import FMHUB, run

from fmhub import hookimpl
from fmhub.data.clean import pipeline as clean
from fmhub.plugin import host
from fmhub.data.clean.overrides import OverridesError, load_overrides, row_hash
from fmhub.base.errors import PluginError
from fmhub.plugin.interfaces import Drop, Edit
from fmhub.core.rows import DataError, RowWriter
from fmhub.project.spec import SpecError, load_spec

PROSE_A = ("The committee met on Tuesday to discuss the budget for the coming year and several members argued that "
           "the library needed more money for new books while others wanted to repair the roof first")
PROSE_B = "We walked along the river in the evening and talked about the books we had read during the long winter"
GERMAN = "Gestern war das Wetter schön, deshalb sind wir im Park spazieren gegangen und haben über den Sommer gesprochen."
PII = "Contact me at jane.doe@example.com about the plan for the new library <script>alert(1)</script> and the roof"

SPEC = """\
datasets:
  docs: {path: data.jsonl, text: text}
clean:
  main:
    input: docs
    output: out/clean.jsonl
    overrides: overrides.yaml
    steps:
      - schema: {require: [text], cast: {id: int}}
      - pii
      - length: {min_words: 5}
      - language: {allow: [en]}
      - dedup
      - near-dup: {threshold: 0.7}
"""

ROWS = [
    {"id": 0, "text": PROSE_A},
    {"id": "1", "text": PROSE_A},                               # exact duplicate of 0
    {"id": 2, "text": "far too short"},                         # length
    {"id": 3, "text": PII},                                     # pii: edited, kept
    {"id": 4, "text": PROSE_A.replace("Tuesday", "Friday")},    # near-duplicate of 0
    None,                                                       # a malformed line
    {"id": 6, "title": "no text column"},                       # schema: text required
    {"id": 7, "text": PROSE_B},
    {"id": 8, "text": GERMAN},                                  # language
]
EXPECTED = {1: "dedup", 2: "length", 3: "pii", 4: "near-dup", 5: "input", 6: "schema", 8: "language"}


def write_rows(path: Path, rows: list) -> None:
    path.write_text("".join((json.dumps(r) if r is not None else '{"id": 5, "text": ') + "\n" for r in rows))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "fmhub.yaml").write_text(SPEC)
    write_rows(tmp_path / "data.jsonl", ROWS)
    return tmp_path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def clean_cli(cwd: Path, *args: str, check: bool = True):
    return run([*FMHUB, "clean", *args], cwd, check=check)


# ---------------------------------------------------------------- end to end


def test_cli_cleans_jsonl_with_reports_and_leaves_input_alone(project):
    before = sha256(project / "data.jsonl")
    proc = clean_cli(project, "--spec", "fmhub.yaml", "--backend", "processes", "--workers", "2",
                     "--report", "run.json", "--report", "run.html")
    out = proc.stdout.decode()
    assert "3 of 9 rows kept" in out and "near-dup" in out and "total" in out

    rows = read_jsonl(project / "out" / "clean.jsonl")
    assert [r["id"] for r in rows] == [0, 3, 7]
    assert rows[1]["text"] == PII.replace("jane.doe@example.com", "<EMAIL>")
    assert sha256(project / "data.jsonl") == before

    report = json.loads((project / "run.json").read_text())
    by_pos = {d["position"]: d for d in report["decisions"]}
    assert {p: d["step"] for p, d in by_pos.items()} == EXPECTED
    assert all(d["reason"] for d in by_pos.values())
    assert by_pos[3]["action"] == "edit" and by_pos[3]["columns"] == ["text"] and by_pos[3]["reason"] == "redacted 1 email"
    assert by_pos[1]["detail"] == {"duplicate_of": 0} and by_pos[4]["detail"]["duplicate_of"] == 0
    assert by_pos[5]["reason"].startswith("line 6 is not valid JSON") and by_pos[5]["row"] is None
    assert by_pos[8]["detail"]["language"] == "de"
    assert by_pos[1]["row"] == row_hash(ROWS[1])
    assert report["input"] == {"path": str(project / "data.jsonl"), "sha256": before, "rows": 8, "malformed": 1}
    assert report["output"]["sha256"] == sha256(project / "out" / "clean.jsonl") and report["output"]["rows"] == 3
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["schema"]["rows_in"] == 8 and steps["pii"]["edited"] == 1 and steps["near-dup"]["dropped"] == 1
    assert report["spec"]["pipeline"]["steps"][2] == {"length": {"min_words": 5}}
    assert "jane.doe" not in (project / "run.json").read_text()  # the edited row's excerpt is the redacted text

    page = (project / "run.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "near-duplicate of position 0" in page and "<td>near-dup</td>" in page


@pytest.fixture
def reviewed(project):
    clean_cli(project, "--backend", "serial", "--report", "run.json")
    return project


def test_review_writes_overrides_that_the_next_run_respects(reviewed):
    proc = clean_cli(reviewed, "review", "run.json", "--keep", "4,2", "--drop", "7", "--reason", "checked by hand")
    assert "3 new override(s)" in proc.stdout.decode()
    ov = load_overrides(str(reviewed / "overrides.yaml"))
    assert set(ov.keep_hashes) == {row_hash(ROWS[4]), row_hash(ROWS[2])}
    assert ov.drop_positions == {7: "checked by hand"}  # row 7 was kept: the report has no hash for it

    clean_cli(reviewed, "--backend", "serial", "--report", "run2.json")
    assert [r["id"] for r in read_jsonl(reviewed / "out" / "clean.jsonl")] == [0, 2, 3, 4]
    by_pos = {d["position"]: d for d in json.loads((reviewed / "run2.json").read_text())["decisions"]}
    assert by_pos[4]["overridden"] is True and by_pos[4]["step"] == "near-dup"
    assert by_pos[2]["overridden"] is True and by_pos[2]["step"] == "length"
    assert by_pos[7]["step"] == "override" and by_pos[7]["reason"] == "dropped by reviewer: checked by hand"
    assert "overridden" not in by_pos[1]

    # changing one's mind moves a row from keep to drop; a position never decided cannot be kept
    clean_cli(reviewed, "review", "run2.json", "--drop", "4")
    ov = load_overrides(str(reviewed / "overrides.yaml"))
    assert row_hash(ROWS[4]) in ov.drop_hashes and row_hash(ROWS[4]) not in ov.keep_hashes
    proc = clean_cli(reviewed, "review", "run2.json", "--keep", "0", check=False)
    assert proc.returncode == 1 and b"records no decision on position 0" in proc.stderr


def test_overrides_by_hash_follow_rows_that_moved(reviewed):
    (reviewed / "overrides.yaml").write_text(f"keep:\n  - row: {row_hash(ROWS[2])}\n    reason: short but fine\n"
                                             "drop:\n  - {position: 0, reason: spam}\n  - 99\n")
    write_rows(reviewed / "data.jsonl", [{"id": 9, "text": PROSE_B.upper()}] + ROWS)  # every position moves down one
    res = clean.run(load_spec(str(reviewed / "fmhub.yaml")), backend="serial")
    kept = [r["id"] for r in read_jsonl(reviewed / "out" / "clean.jsonl")]
    assert 2 in kept and 9 not in kept  # the hash found row 2 at its new position; position 0 is now row 9
    assert res.override_drops == 1
    assert res.overrides["unmatched"] == ["drop position 99"] and "matched no row" in res.warnings[0]


def test_parquet_in_parquet_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "text": t} for i, t in enumerate([PROSE_A, PROSE_A, "tiny", PII, PROSE_B])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=2)
    (tmp_path / "fmhub.yaml").write_text(textwrap.dedent("""\
        clean:
          p:
            input: in.parquet
            output: out.parquet
            batch_size: 2
            steps: [pii, {length: {min_words: 3}}, dedup]
        """))
    res = clean.run(load_spec(str(tmp_path / "fmhub.yaml")), backend="serial", reports=[str(tmp_path / "r.json")])
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == [0, 3, 4] and "<EMAIL>" in out[1]["text"]
    assert (res.rows_read, res.rows_out) == (5, 3)
    decisions = json.loads((tmp_path / "r.json").read_text())["decisions"]
    assert [(d["position"], d["step"]) for d in decisions] == [(1, "dedup"), (2, "length"), (3, "pii")]


# ---------------------------------------------------------------- backends

BIG_SPEC = """\
clean:
  big:
    input: big.jsonl
    output: {output}
    batch_size: 150
    steps:
      - pii
      - length: {{min_words: 4}}
      - dedup: {{casefold: true}}
      - near-dup: {{threshold: 0.6}}
      - regex: {{replace: {{"\\\\bw1\\\\b": ONE}}}}
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    import random

    d = tmp_path_factory.mktemp("big")
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(400)]
    rows = []
    for i in range(2000):
        r = rng.random()
        if r < 0.1 and rows:
            rows.append(dict(rng.choice(rows), id=i))  # exact copy
        elif r < 0.2 and rows:
            words = rng.choice(rows)["text"].split()
            words[rng.randrange(len(words))] = "edited"
            rows.append({"id": i, "text": " ".join(words)})
        else:
            n = rng.choice([2, 12, 30])
            text = " ".join(rng.choice(vocab) for _ in range(n))
            if rng.random() < 0.05:
                text += f" mail user{i}@example.org"
            rows.append({"id": i, "text": text})
    write_rows(d / "big.jsonl", rows)
    return d


def _run_big(d: Path, backend: str, out: str) -> tuple[bytes, list]:
    (d / f"{backend}.yaml").write_text(BIG_SPEC.format(output=out))
    report = d / f"{backend}.json"
    clean.run(load_spec(str(d / f"{backend}.yaml")), backend=backend, workers=2, reports=[str(report)])
    return (d / out).read_bytes(), json.loads(report.read_text())["decisions"]


def test_serial_and_processes_backends_give_identical_output(big):
    serial, serial_decisions = _run_big(big, "serial", "serial.jsonl")
    procs, procs_decisions = _run_big(big, "processes", "processes.jsonl")
    assert serial == procs and serial_decisions == procs_decisions
    steps = {d["step"] for d in serial_decisions}
    assert steps == {"pii", "length", "dedup", "near-dup", "regex"}


@pytest.fixture
def ray_local():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()  # its processes would sit idle through the rest of the suite


def test_ray_backend_matches_and_surfaces_worker_errors(big, ray_local):
    serial, serial_decisions = _run_big(big, "serial", "serial.jsonl")
    ray_out, ray_decisions = _run_big(big, "ray", "ray.jsonl")
    assert ray_out == serial and ray_decisions == serial_decisions
    backend = host.lookup("data-backend", "ray")
    with pytest.raises(ValueError, match="invalid literal for int"):
        list(backend.map_batches(int, ["1", "x", "2"], 2))
    from fmhub.core.rows import data_format

    with pytest.raises(DataError, match="unknown data format"):
        list(backend.map_batches(data_format, ["a.jsonl", "b.txt"], 2))


def test_processes_backend_surfaces_worker_errors():
    backend = host.lookup("data-backend", "processes")
    with pytest.raises(ValueError, match="invalid literal for int"):
        list(backend.map_batches(functools.partial(int, base=10), ["1", "x", "2"], 2))


# ---------------------------------------------------------------- bad spec, bad input


def _spec(tmp_path: Path, text: str):
    (tmp_path / "fmhub.yaml").write_text(textwrap.dedent(text))
    return load_spec(str(tmp_path / "fmhub.yaml"))


def test_errors_point_at_the_fmhub_yaml_line(project):
    loaded = _spec(project, """\
        clean:
          a:
            input: data.jsonl
            output: o.jsonl
            steps:
              - pii
              - near-dup:
                  num_perm: 128
                  treshold: 0.8
        """)
    with pytest.raises(SpecError, match=r"fmhub.yaml:9: clean\.a\.steps\[1\]\.near-dup\.treshold: near-dup: option 'treshold': unknown option"):
        clean.run(loaded)
    proc = clean_cli(project, check=False)
    assert proc.returncode == 1 and b"fmhub.yaml:9:" in proc.stderr and b"treshold" in proc.stderr

    cases = {
        "- lenght": r"fmhub.yaml:6: clean\.a\.steps\[0\]: unknown cleaner 'lenght'; installed: dedup, ",
        "- length: {min_chars: -1}": r"fmhub.yaml:6: clean\.a\.steps\[0\]\.length\.min_chars: .*greater than or equal to 0",
        "- dedup: {columns: 3}": r"fmhub.yaml:6: clean\.a\.steps\[0\]\.dedup\.columns: columns must be",
        "- language: {allow: [klingon]}": r"fmhub.yaml:6: .*unknown language 'klingon'",
    }
    for step, pattern in cases.items():
        loaded = _spec(project, f"clean:\n  a:\n    input: data.jsonl\n    output: o.jsonl\n    steps:\n      {step}\n")
        with pytest.raises(SpecError, match=pattern):
            clean.run(loaded)
    assert not (project / "o.jsonl").exists()


def test_refuses_to_overwrite_its_input_or_write_odd_reports(project):
    loaded = _spec(project, "clean:\n  a:\n    input: data.jsonl\n    output: ./data.jsonl\n    steps: [dedup]\n")
    with pytest.raises(SpecError, match="fmhub.yaml:4: clean.a.output: output is the input"):
        clean.run(loaded)
    loaded = _spec(project, "clean:\n  a:\n    input: data.jsonl\n    output: o.jsonl\n    steps: [dedup]\n")
    with pytest.raises(DataError, match="use a path ending in .json or .html"):
        clean.run(loaded, reports=[str(project / "r.txt")])
    with pytest.raises(PluginError, match="no data-backend named 'spark'"):
        clean.run(loaded, backend="spark")


def test_empty_inputs_are_errors_and_all_dropped_is_a_warning(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "short.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    text = "clean:\n" + "".join(f"  {n}:\n    input: {n}.jsonl\n    output: out-{n}.{ext}\n    steps: [{{length: {{min_chars: 5}}}}]\n"
                                for n, ext in (("empty", "jsonl"), ("blank", "jsonl"), ("short", "parquet")))
    loaded = _spec(tmp_path, text)
    with pytest.raises(DataError, match="empty.jsonl is empty: there are no rows to clean"):
        clean.run(loaded, "empty")
    with pytest.raises(DataError, match="holds no rows"):
        clean.run(loaded, "blank")
    assert not list(tmp_path.glob("out-*")) and not list(tmp_path.glob(".fmhub-*"))
    res = clean.run(loaded, "short", backend="serial")
    assert res.rows_out == 0 and res.warnings == [f"every row was dropped: {tmp_path / 'out-short.parquet'} is empty"]
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "out-short.parquet").num_rows == 0


def test_an_interrupted_run_leaves_the_old_output_and_no_temp_files(project, monkeypatch):
    loaded = load_spec(str(project / "fmhub.yaml"))
    clean.run(loaded, backend="serial")
    out = project / "out" / "clean.jsonl"
    first = out.read_bytes()
    write_rows(project / "data.jsonl", ROWS * 3)
    calls = []

    def interrupted(self, rows):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(RowWriter, "write", interrupted)
    monkeypatch.setattr(RowWriter, "write_encoded", interrupted)  # jsonl output: rows arrive encoded by the workers
    with pytest.raises(KeyboardInterrupt):
        clean.run(loaded, backend="serial", reports=[str(project / "r.json")])
    assert calls and out.read_bytes() == first
    assert not list((project / "out").glob(".fmhub-*")) and not (project / "r.json").exists()
    monkeypatch.undo()
    clean.run(loaded, backend="serial")  # re-running starts over and finishes
    assert len(read_jsonl(out)) == 3


# ---------------------------------------------------------------- the plugin contract


class Shout:
    name = "test-shout"
    scope = "row"

    def configure(self, options, context):
        if set(options) - {"suffix"}:
            raise ValueError("only 'suffix'")
        return (context.columns[0], options.get("suffix", "!"))

    def clean(self, rows, config):
        col, suffix = config
        return [Edit({**r, col: r[col].upper() + suffix}, "shouted") if len(r[col]) < 20 else None for r in rows]


class EveryOther:
    """A dataset step without ``prepare``: its pass gets the rows themselves."""

    name = "test-every-other"
    scope = "dataset"

    def configure(self, options, context):
        return None

    def open(self, config):
        class Pass:
            seen = 0

            def clean(self, positions, rows):
                out = []
                for row in rows:
                    Pass.seen += 1
                    out.append(Drop(f"#{Pass.seen} is even ({row['id']})") if Pass.seen % 2 == 0 else None)
                return out

        return Pass()


class Miscount(Shout):
    name = "test-miscount"

    def clean(self, rows, config):
        return []


class _Plugin:
    @hookimpl
    def fmhub_cleaners(self):
        return [Shout(), EveryOther(), Miscount()]


@pytest.fixture
def test_plugin():
    pm = host.plugin_manager()
    plugin = _Plugin()
    pm.register(plugin, name="test-clean-plugin")
    clean._cleaner.cache_clear()
    yield
    pm.unregister(plugin)
    clean._cleaner.cache_clear()


def test_third_party_cleaners_follow_the_documented_contract(tmp_path, test_plugin):
    write_rows(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t in enumerate(["hi", "a much longer sentence here", "yo", "ok"])])
    loaded = _spec(tmp_path, """\
        clean:
          t:
            input: d.jsonl
            output: o.jsonl
            batch_size: 3
            steps: [{test-shout: {suffix: "?"}}, test-every-other]
        """)
    res = clean.run(loaded, backend="serial", reports=[str(tmp_path / "r.json")])
    assert read_jsonl(tmp_path / "o.jsonl") == [{"id": 0, "text": "HI?"}, {"id": 2, "text": "YO?"}]
    decisions = json.loads((tmp_path / "r.json").read_text())["decisions"]
    assert [(d["position"], d["step"], d["action"]) for d in decisions] == [
        (0, "test-shout", "edit"), (1, "test-every-other", "drop"), (2, "test-shout", "edit"), (3, "test-shout", "edit"), (3, "test-every-other", "drop")]
    assert decisions[1]["reason"] == "#2 is even (1)"
    assert res.steps[0].edited == 3 and res.steps[1].dropped == 2

    bad = _spec(tmp_path, "clean:\n  t:\n    input: d.jsonl\n    output: o.jsonl\n    steps: [{test-shout: {loud: 1}}]\n")
    with pytest.raises(SpecError, match="fmhub.yaml:5: clean.t.steps.0.: test-shout: only 'suffix'"):
        clean.run(bad)
    bad = _spec(tmp_path, "clean:\n  t:\n    input: d.jsonl\n    output: o.jsonl\n    steps: [test-miscount]\n")
    with pytest.raises(PluginError, match="returned 0 results for 4 rows"):
        clean.run(bad, backend="serial")


# ---------------------------------------------------------------- overrides files


def test_overrides_files_are_checked(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("keep: [12, 0123456789abcdef]\ndrop: [{row: 0123456789ABCDEF, reason: spam}]\n")
    with pytest.raises(OverridesError, match="row 0123456789abcdef is in both keep and drop"):
        load_overrides(str(f))
    f.write_text("keep: [12, {position: 3, reason: fine}, deadbeef]\n")
    with pytest.raises(OverridesError, match=r"keep\[2\]: 'deadbeef' is neither a row hash"):
        load_overrides(str(f))
    f.write_text("keep: [12, {position: 3, reason: fine}]\n")
    assert load_overrides(str(f)).keep_positions == {12: "reviewer", 3: "fine"}
    assert row_hash({"a": 1, "b": "x"}) == row_hash({"b": "x", "a": 1}) != row_hash({"a": 1, "b": "y"})


def test_plugins_lists_the_cleaners_and_the_ray_backend(tmp_path):
    listed = json.loads(run([*FMHUB, "plugins", "--json"], tmp_path).stdout)
    names = {(p["kind"], p["name"]) for p in listed["provided"]}
    assert {("cleaner", n) for n in ("dedup", "near-dup", "length", "language", "regex", "quality", "pii", "schema")} <= names
    assert ("data-backend", "ray") in names


def test_clean_without_fmhub_yaml_says_what_to_do(tmp_path):
    proc = run([*FMHUB, "clean"], tmp_path, check=False)
    assert proc.returncode == 1 and b"fmhub.yaml not found" in proc.stderr
