"""``fmhub join``: metadata tables (csv, jsonl, parquet) joined into text rows by key or by mention, atomically, with lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmhub.governance import lineage
from fmhub.data.join import JoinError, JoinStats, join_rows, read_table, run_join
from fmhub.project.spec import JoinSpec, SpecError, load_spec

TABLE_CSV = """\
entity,type,country
Acme,company,US
New York,city,US
Globex Corp,company,DE
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def spec_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fmhub.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def mentions_spec(**kw) -> JoinSpec:
    return JoinSpec(**{"input": "in.jsonl", "table": "t.csv", "mentions": "text", "output": "out.jsonl", **kw})


@pytest.fixture
def table(tmp_path: Path) -> dict:
    (tmp_path / "t.csv").write_text(TABLE_CSV, encoding="utf-8")
    return read_table(str(tmp_path / "t.csv"), "entity")


def test_on_mode_joins_csv_table_by_exact_key(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(TABLE_CSV, encoding="utf-8")
    write_jsonl(tmp_path / "in.jsonl", [
        {"id": 1, "org": "Acme", "text": "a"},
        {"id": 2, "org": "acme", "text": "b"},  # on: is exact, so this does not match
        {"id": 3, "org": "Globex Corp", "text": "c"},
    ])
    spec_file(tmp_path, "join:\n  orgs:\n    input: in.jsonl\n    table: t.csv\n    'on': org\n    prefix: org_\n    output: out/joined.jsonl\n")
    report = run_join(load_spec(str(tmp_path / "fmhub.yaml")))
    rows = read_jsonl(tmp_path / "out" / "joined.jsonl")
    assert rows == [
        {"id": 1, "org": "Acme", "text": "a", "org_type": "company", "org_country": "US"},
        {"id": 2, "org": "acme", "text": "b", "org_type": None, "org_country": None},
        {"id": 3, "org": "Globex Corp", "text": "c", "org_type": "company", "org_country": "DE"},
    ]
    assert (report["rows_in"], report["rows_out"], report["rows_matched"], report["rows_dropped"]) == (3, 3, 2, 0)
    assert report["columns_added"] == ["org_type", "org_country"]
    assert report["entity_counts"] == {"Acme": 1, "Globex Corp": 1}
    assert report["output"] == str(tmp_path / "out" / "joined.jsonl")


def test_mentions_multiword_case_insensitive_and_in_order_of_first_mention(table: dict) -> None:
    rows = [
        {"text": "Flights from NEW YORK to acme headquarters; acme again, then new\nyork."},
        {"text": "globex corp bought Acme."},
    ]
    out = list(join_rows(rows, table, mentions_spec()))
    assert out[0]["entities"] == ["New York", "Acme"]  # distinct, as the table writes them, in order of first mention
    assert out[0]["type"] == ["city", "company"] and out[0]["country"] == ["US", "US"]
    assert out[1]["entities"] == ["Globex Corp", "Acme"]
    assert out[1]["country"] == ["DE", "US"]
    assert out[0]["text"] == rows[0]["text"] and "entities" not in rows[0]  # input rows are not modified


def test_mentions_match_whole_words_only(table: dict) -> None:
    rows = [{"text": "We moved to Acmeville and met the acmes"}, {"text": "not-Acme, but (acme)!"}, {"text": "NewYork"}]
    out = list(join_rows(rows, table, mentions_spec()))
    assert out[0]["entities"] == [] and out[0]["type"] == []
    assert out[1]["entities"] == ["Acme"]  # punctuation is a word boundary
    assert out[2]["entities"] == []


def test_mentions_prefer_the_longest_name(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t.jsonl", [{"entity": "New York", "kind": "state"}, {"entity": "New York City", "kind": "city"},
                                       {"entity": "C++", "kind": "language"}])
    table = read_table(str(tmp_path / "t.jsonl"), "entity")
    out = list(join_rows([{"text": "new york city code in C++, upstate New York"}], table, mentions_spec()))
    assert out[0]["entities"] == ["New York City", "C++", "New York"]
    assert out[0]["kind"] == ["city", "language", "state"]


def test_missing_keep_drop_and_error(table: dict) -> None:
    rows = [{"text": "Acme rocks"}, {"text": "nobody here"}, {"text": None}]
    kept = list(join_rows(rows, table, mentions_spec(missing="keep")))
    assert [r["entities"] for r in kept] == [["Acme"], [], []]
    assert kept[1]["type"] == []
    stats = JoinStats()
    dropped = list(join_rows(rows, table, mentions_spec(missing="drop"), stats=stats))
    assert [r["text"] for r in dropped] == ["Acme rocks"]
    assert (stats.rows_in, stats.matched, stats.dropped) == (3, 1, 2)
    with pytest.raises(JoinError, match=r"data\.jsonl:8: no table entity in column 'text'"):
        list(join_rows(rows, table, mentions_spec(missing="error"), positions=[0, 7, 9], source="data.jsonl"))
    on = JoinSpec(input="i.jsonl", table="t.csv", on="org", output="o.jsonl", missing="error")
    with pytest.raises(JoinError, match=r"input:2: no table entity in column 'org' \(value 'Initech'\)"):
        list(join_rows([{"org": "Acme"}, {"org": "Initech"}], table, on))


def test_missing_error_in_a_run_names_the_input_line_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(TABLE_CSV, encoding="utf-8")
    write_jsonl(tmp_path / "in.jsonl", [{"org": "Acme"}, {"org": "Acme"}, {"org": "Initech"}])
    spec_file(tmp_path, "join:\n  j:\n    input: in.jsonl\n    table: t.csv\n    'on': org\n    missing: error\n    output: out.jsonl\n")
    with pytest.raises(JoinError, match=r"in\.jsonl:3: no table entity"):
        run_join(load_spec(str(tmp_path / "fmhub.yaml")))
    assert not (tmp_path / "out.jsonl").exists()
    assert not list(tmp_path.glob(".fmhub-*.tmp"))


def test_duplicate_entity_in_table_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(TABLE_CSV + "Acme,bakery,FR\n", encoding="utf-8")
    with pytest.raises(JoinError, match=r"t\.csv:5: duplicate entity 'Acme', already at .*t\.csv:2"):
        read_table(str(path), "entity")
    # mentions mode matches case-insensitively, so case-only differences are duplicates there, and only there
    path.write_text(TABLE_CSV + "ACME,bakery,FR\n", encoding="utf-8")
    assert "ACME" in read_table(str(path), "entity")
    with pytest.raises(JoinError, match=r"t\.csv:5: duplicate entity 'ACME'.*as 'Acme'"):
        read_table(str(path), "entity", fold_case=True)


def test_table_errors_name_the_file_and_row(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("name,type\nAcme,company\n", encoding="utf-8")
    with pytest.raises(JoinError, match=r"t\.csv:2: no key column 'entity' \(columns: name, type\)"):
        read_table(str(tmp_path / "t.csv"), "entity")
    (tmp_path / "e.csv").write_text("entity,type\nAcme,company\n,city\n", encoding="utf-8")
    with pytest.raises(JoinError, match=r"e\.csv:3: empty entity key"):
        read_table(str(tmp_path / "e.csv"), "entity")
    with pytest.raises(JoinError, match="does not exist"):
        read_table(str(tmp_path / "nope.csv"), "entity")
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(JoinError, match=r"unknown format '\.xlsx'"):
        read_table(str(tmp_path / "t.xlsx"), "entity")
    write_jsonl(tmp_path / "n.jsonl", [{"entity": 7, "type": "number"}])
    assert read_table(str(tmp_path / "n.jsonl"), "entity") == {"7": {"entity": 7, "type": "number"}}
    out = list(join_rows([{"n": 7}], read_table(str(tmp_path / "n.jsonl"), "entity"),
                         JoinSpec(input="i.jsonl", table="n.jsonl", on="n", output="o.jsonl")))
    assert out == [{"n": 7, "type": "number"}]  # keys compare as text, so an int row value finds its int key


def test_joined_column_that_exists_in_the_row_is_an_error(table: dict) -> None:
    spec = JoinSpec(input="i.jsonl", table="t.csv", on="org", output="o.jsonl")
    with pytest.raises(JoinError, match=r"input:1: the row already has a column 'type'.*prefix"):
        list(join_rows([{"org": "Acme", "type": "review"}], table, spec))
    with pytest.raises(JoinError, match=r"already has a column 'entities'"):
        list(join_rows([{"text": "Acme", "entities": []}], table, mentions_spec()))
    out = list(join_rows([{"org": "Acme", "type": "review"}], table, spec.model_copy(update={"prefix": "org_"})))
    assert out[0]["type"] == "review" and out[0]["org_type"] == "company"


def test_failed_run_leaves_previous_output_untouched(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(TABLE_CSV, encoding="utf-8")
    rows = [{"org": "Acme"}] * 5 + [{"org": "Acme", "type": "clash"}]  # the collision comes after rows were written
    write_jsonl(tmp_path / "in.jsonl", rows)
    previous = b'{"an": "earlier output"}\n'
    (tmp_path / "out.jsonl").write_bytes(previous)
    spec_file(tmp_path, "join:\n  j:\n    input: in.jsonl\n    table: t.csv\n    'on': org\n    output: out.jsonl\n")
    loaded = load_spec(str(tmp_path / "fmhub.yaml"))
    with pytest.raises(JoinError, match=r"in\.jsonl:6: the row already has a column 'type'"):
        run_join(loaded)
    assert (tmp_path / "out.jsonl").read_bytes() == previous
    assert not (tmp_path / "out.jsonl.lineage.json").exists()
    assert not list(tmp_path.glob(".fmhub-*.tmp"))


def test_lineage_records_input_and_table(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(TABLE_CSV, encoding="utf-8")
    write_jsonl(tmp_path / "reviews.jsonl", [{"text": "Acme in New York"}])
    spec_file(tmp_path, "datasets:\n  reviews: {path: reviews.jsonl}\njoin:\n  m:\n    input: reviews\n    table: t.csv\n"
                        "    mentions: text\n    columns: [type]\n    output: joined.jsonl\n")
    report = run_join(load_spec(str(tmp_path / "fmhub.yaml")), "m")
    assert read_jsonl(tmp_path / "joined.jsonl") == [{"text": "Acme in New York", "type": ["company", "city"], "entities": ["Acme", "New York"]}]
    assert report["columns_added"] == ["type", "entities"]
    rec = lineage.read("joined.jsonl", cwd=str(tmp_path))
    assert rec["step"] == "join" and rec["pipeline"] == "m"
    assert [(i["path"], i["kind"]) for i in rec["inputs"]] == [("reviews.jsonl", "dataset"), ("t.csv", "dataset")]
    assert rec["params"]["mentions"] == "text" and rec["params"]["columns"] == ["type"]
    graph = lineage.walk("joined.jsonl", cwd=str(tmp_path))
    assert set(graph.sources()) == {"reviews.jsonl", "t.csv"}


def test_parquet_table_and_parquet_output(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"sku": [101, 202], "category": ["toys", "tools"], "price": [9.5, 20.0]}), tmp_path / "products.parquet")
    write_jsonl(tmp_path / "in.jsonl", [{"sku": 202, "text": "x"}, {"sku": 303, "text": "y"}, {"sku": 101, "text": "z"}])
    spec_file(tmp_path, "join:\n  p:\n    input: in.jsonl\n    table: products.parquet\n    key: sku\n    'on': sku\n"
                        "    missing: drop\n    output: out.parquet\n")
    report = run_join(load_spec(str(tmp_path / "fmhub.yaml")))
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [
        {"sku": 202, "text": "x", "category": "tools", "price": 20.0},
        {"sku": 101, "text": "z", "category": "toys", "price": 9.5},
    ]
    assert (report["rows_in"], report["rows_out"], report["rows_dropped"]) == (3, 2, 1)
    assert report["entity_counts"] == {"202": 1, "101": 1}


def test_spec_errors_name_the_fmhub_yaml_line(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "join:\n  j:\n    input: in.jsonl\n    table: t.csv\n    'on': org\n    mentions: text\n    output: o.jsonl\n")
    with pytest.raises(SpecError, match=r"fmhub\.yaml:2: join\.j: give either on:"):
        load_spec(str(path))
    (tmp_path / "t.csv").write_text(TABLE_CSV, encoding="utf-8")
    write_jsonl(tmp_path / "in.jsonl", [{"org": "Acme"}])
    path = spec_file(tmp_path, "join:\n  j:\n    input: in.jsonl\n    table: t.csv\n    'on': org\n    output: t.csv\n")
    with pytest.raises(SpecError, match=r"fmhub\.yaml:6: join\.j\.output: .*output is the table"):
        run_join(load_spec(str(path)))
    path = spec_file(tmp_path, "join:\n  j:\n    input: in.jsonl\n    table: t.csv\n    'on': org\n    columns: [type, colour]\n    output: o.jsonl\n")
    with pytest.raises(SpecError, match=r"fmhub\.yaml:6: join\.j\.columns: the table has no column 'colour'"):
        run_join(load_spec(str(path)))
    path = spec_file(tmp_path, "join:\n  j:\n    input: in.jsonl\n    table: t.csv\n    'on': organisation\n    output: o.jsonl\n")
    with pytest.raises(SpecError, match=r"fmhub\.yaml:5: join\.j\.on: .*has no column 'organisation' \(it has: org\)"):
        run_join(load_spec(str(path)))
    assert not (tmp_path / "o.jsonl").exists()


def test_unquoted_on_key_is_accepted(tmp_path: Path) -> None:
    path = spec_file(tmp_path, "join:\n  j:\n    input: in.jsonl\n    table: t.csv\n    on: org\n    output: o.jsonl\n")
    assert load_spec(str(path)).spec.join["j"].on == "org"


def test_mentions_trie_matches_as_the_plain_alternation_did(tmp_path: Path) -> None:
    """Names sharing prefixes (in any case), punctuation, and names nested too deep for one trie pattern."""
    import re

    from fmhub.data.join import _name_pattern, _trie_pattern

    names = ["New York", "NEW YORK CITY", "C++", "C", "Acme Lumen", "AcmeX", "a.b", "Ab"]
    text = "new  york city, New York. c++ and C; acme lumen acmex acmexy A.B ab"
    flat = "|".join(_name_pattern(n) for n in sorted(names, key=lambda n: (-len(n.strip()), n)))
    matches = [re.compile(rf"(?<!\w)(?:{p})(?!\w)", re.IGNORECASE).findall(text) for p in (flat, _trie_pattern(names))]
    assert matches[0] == matches[1] == ["new  york city", "New York", "c++", "C", "acme lumen", "acmex", "A.B", "ab"]
    deep = {"a" * k: {"k": str(k)} for k in range(1, 400)}  # 399 branch points on one path: the plain alternation
    out = list(join_rows([{"t": "x " + "a" * 7 + " y"}], deep, JoinSpec(input="i", table="t", key="k", mentions="t", output="o")))
    assert out[0]["entities"] == ["a" * 7]
