"""Row I/O for data assets, the fmhub.yaml spec loader, and the local data backends."""

from __future__ import annotations

import functools
import hashlib
import json
import os

import pytest

from fmhub.plugin import host
from fmhub.core.rows import DataError, RowWriter, count_rows, data_format, read_batches
from fmhub.project.spec import SpecError, load_spec, parse_spec, pipeline

ROWS = [{"id": i, "text": f"row {i}", "score": i * 0.5} for i in range(25)]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_write_then_read_batches(tmp_path, ext):
    path = str(tmp_path / f"d.{ext}")
    with RowWriter(path) as w:
        w.write(ROWS[:10])
        w.write(ROWS[10:])
    assert w.rows_written == 25
    assert count_rows(path) == 25
    batches = list(read_batches(path, batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [r for b in batches for r in b.rows] == ROWS
    assert [p for b in batches for p in b.positions] == list(range(25))
    only_text = [r for b in read_batches(path, 7, columns=["text"]) for r in b.rows]
    assert only_text == [{"text": r["text"]} for r in ROWS]


def test_jsonl_bad_lines_are_per_row_records_with_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{oops\n\n[1, 2]\n{"text": "b"}\n"just a string"')
    batches = list(read_batches(str(path), 100))
    rows = [r for b in batches for r in b.rows]
    errors = dict(e for b in batches for e in b.errors)
    assert rows == [{"text": "a"}, {"text": "b"}]
    assert [p for b in batches for p in b.positions] == [0, 4]  # position = line index, blanks counted
    assert sorted(errors) == [1, 3, 5]
    assert errors[1].startswith("line 2 is not valid JSON")
    assert errors[3] == "line 4 is a JSON list, not an object"
    assert count_rows(str(path)) == 6


def test_writer_is_atomic_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"old": true}\n')
    with pytest.raises(RuntimeError):
        with RowWriter(str(path)) as w:
            w.write(ROWS)
            raise RuntimeError("interrupted")
    assert path.read_text() == '{"old": true}\n'
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left behind


def test_parquet_schema_mismatch_is_a_clear_error_and_writes_nothing(tmp_path):
    path = tmp_path / "out.parquet"
    with pytest.raises(DataError, match="do not fit one parquet schema"):
        with RowWriter(str(path), row_group_size=1) as w:
            w.write([{"n": 1}])
            w.write([{"n": "one"}])
    assert not path.exists() and os.listdir(tmp_path) == []


def test_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        data_format("x.csv")
    with pytest.raises(DataError, match="cannot read"):
        list(read_batches(str(tmp_path / "missing.jsonl")))
    good = tmp_path / "good.parquet"
    with RowWriter(str(good)) as w:
        w.write(ROWS)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(DataError, match="not a readable parquet file"):
        list(read_batches(str(bad)))
    with pytest.raises(DataError, match="has no column 'body'"):
        list(read_batches(str(good), columns=["body"]))


def test_empty_parquet_output_is_valid(tmp_path):
    path = str(tmp_path / "empty.parquet")
    with RowWriter(path):
        pass
    assert count_rows(path) == 0 and list(read_batches(path)) == []


SPEC = """\
version: 1
datasets:
  reviews:
    path: data/reviews.jsonl
    text: body
clean:
  reviews:
    input: reviews
    output: data/reviews.clean.jsonl
    steps:
      - length: {min_chars: 3}
      - dedup
label:
  sentiment:
    input: data/reviews.clean.jsonl
    output: data/labels.jsonl
    classes: [neg, pos]
    lfs:
      - keyword: {words: [great], label: pos}
"""


def test_spec_parses_steps_and_resolves_datasets(tmp_path):
    (tmp_path / "fmhub.yaml").write_text(SPEC)
    loaded = load_spec(str(tmp_path / "fmhub.yaml"))
    name, pipe = pipeline(loaded, "clean", None)
    assert name == "reviews"
    assert [(s.name, dict(s.options)) for s in pipe.steps] == [("length", {"min_chars": 3}), ("dedup", {})]
    assert loaded.dataset_path(pipe.input) == os.path.join(str(tmp_path), "data/reviews.jsonl")
    assert loaded.text_column("reviews") == "body"
    assert loaded.dataset_path("other.jsonl") == os.path.join(str(tmp_path), "other.jsonl")
    # a plugin's complaint about a step points at the step's line
    err = loaded.error(pipe.steps[1].loc, "unknown cleaner 'dedup'")
    assert str(err).endswith("fmhub.yaml:12: clean.reviews.steps[1]: unknown cleaner 'dedup'")


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("    output: data/reviews.clean.jsonl\n", "    outptu: data/reviews.clean.jsonl\n"), "fmhub.yaml:9: clean.reviews.outptu: unknown key (a typo?)"),
        (("      - dedup\n", "      - dedup: 3\n"), "fmhub.yaml:12: clean.reviews.steps[1]: a step is NAME"),
        (("classes: [neg, pos]", "classes: [neg]"), "fmhub.yaml:17: label.sentiment.classes: List should have at least 2 items"),
        (("version: 1", "version: 99"), "fmhub.yaml:1: version: this fmhub reads spec version 1"),
        (("  reviews:\n    path", "  reviews: [\n    path"), "fmhub.yaml:5: not valid YAML: expected ',' or ']'"),
        (("    text: body\n", "    text: body\n  reviews:\n    path: x.jsonl\n"), "fmhub.yaml:6: datasets.reviews: duplicate key"),
    ],
)
def test_spec_errors_name_file_line_and_key(edit, expected):
    with pytest.raises(SpecError) as info:
        parse_spec(SPEC.replace(*edit))
    assert expected in str(info.value)


def test_spec_pipeline_choice_errors(tmp_path):
    loaded = parse_spec(SPEC)
    with pytest.raises(SpecError, match="no clean pipeline 'nope'; it has: reviews"):
        pipeline(loaded, "clean", "nope")
    with pytest.raises(SpecError, match="fmhub.yaml not found"):
        load_spec(str(tmp_path / "fmhub.yaml"))
    with pytest.raises(SpecError, match="declares no label pipelines"):
        pipeline(parse_spec("datasets: {}"), "label", None)


def _digest(salt: str, batch: list[int]) -> str:
    if 13 in batch:
        raise ValueError(f"unlucky batch {batch}")
    return hashlib.sha256((salt + json.dumps(batch)).encode()).hexdigest()


@pytest.mark.parametrize("backend", ["serial", "processes"])
def test_backends_keep_order_and_surface_worker_errors(backend):
    b = host.lookup("data-backend", backend)
    batches = [[i, i + 1] for i in range(0, 12, 2)]
    got = list(b.map_batches(functools.partial(_digest, "s"), iter(batches), 2))
    assert got == [_digest("s", x) for x in batches]
    with pytest.raises(ValueError, match=r"unlucky batch \[12, 13\]"):
        list(b.map_batches(functools.partial(_digest, "s"), iter(batches + [[12, 13]]), 2))
