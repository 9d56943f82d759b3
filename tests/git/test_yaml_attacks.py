"""Hostile YAML and JSON in a repository (issue 21): fmhub.yaml, the policy, recipes, records, configs.

A clone brings its ``fmhub.yaml`` (and everything else): a "billion laughs"
of aliases, ``[[[[…`` nested 100,000 deep, ``2024-13-45``, an unknown tag or
a list as a key must each be one line naming ``fmhub.yaml:LINE``, never a
traceback. The policy's readers (licences, a policy that is only staged) fail
closed in one line; ``--anchor`` is never an option to git, and a big blob is
not read to find out it is not an anchor; JSON a repository brings is parsed
within bounds.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import BILLION_LAUGHS, REPO_ROOT, fmhub, git, save_tensors

from fmhub.governance import access
from fmhub.governance import audit
from fmhub.governance import audit_verify
from fmhub.base.errors import FmhubError
from fmhub.governance.policy import PolicyError
from fmhub.plugin.records import AccessRequest
from fmhub.base.yamlschema import validate_yaml
from fmhub.project.spec import SPEC_LIMITS, Spec, SpecError, parse_spec
from plugins.policy_roles import RolePolicy

DEEP = 100_000


# text -> how the one line starts (fmhub's "fmhub: " prefix removed)
HOSTILE_SPECS = {
    "billion laughs": (BILLION_LAUGHS, "fmhub.yaml:7: more than 100000 keys and values"),
    "nested flow": ("datasets: " + "[" * DEEP + "]" * DEEP + "\n", "fmhub.yaml:1: nested deeper than 32 levels"),
    "nested mappings": ("datasets: " + "{a: " * DEEP + "1" + "}" * DEEP + "\n", "fmhub.yaml:1: nested deeper than 32 levels"),
    "unclosed flow": ("version: 1\ndatasets: " + "[" * DEEP, "fmhub.yaml:2: nested deeper than 32 levels"),
    "bad date": ("version: 1\ndatasets:\n  d:\n    path: 2024-13-45\n", "fmhub.yaml:4: not a valid !!timestamp value"),
    "python tag": ("version: 1\ndatasets:\n  d:\n    path: !!python/name:os.system x\n", "fmhub.yaml:4: not a valid !!python/name:os.system"),
    "local tag": ("version: 1\nmodels:\n  m: {path: !secret x}\n", "fmhub.yaml:3: not a valid !secret value"),
    "list key": ("version: 1\n? [a, b]\n: 1\n", "fmhub.yaml:2: a key must be a plain value"),
    "alias of a list as key": ("x: &x [1]\n? *x\n: 1\n", "fmhub.yaml:2: a key must be a plain value"),
    "self-referencing alias": ("datasets: &d {a: *d}\n", "fmhub.yaml:1: *d names no anchor"),
    "merge key": ("datasets:\n  a: &d {path: a.jsonl}\n  b: {<<: *d}\n", "fmhub.yaml:3: YAML merge keys"),
    "huge integer": ("finetune: {seed: " + "9" * 5000 + "}\n", "fmhub.yaml:1: an integer of more than 40 digits"),
    "long value": ("datasets: {d: {path: " + "x" * (70 << 10) + "}}\n", "fmhub.yaml:1: a value of 71680 characters"),
    "control characters in a key": ('"a\\nb\\e[31m": 1\n', "fmhub.yaml:1: a\\nb\\x1b[31m: unknown key"),
}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error of a failed command: no traceback, one line (besides the audit writer's warning, if any)."""
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("fmhub: warning:")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("fmhub: ")


# -- fmhub.yaml: every problem one line naming fmhub.yaml:LINE --------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE_SPECS))
def test_a_hostile_spec_is_one_line_naming_the_file_and_line(name):
    text, start = HOSTILE_SPECS[name]
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message and len(message) <= 1001, message


@pytest.mark.parametrize("name", ["billion laughs", "nested flow", "bad date", "python tag", "list key"])
def test_fmhub_run_on_a_hostile_spec_is_one_line(tmp_path, name):
    text, start = HOSTILE_SPECS[name]
    (tmp_path / "fmhub.yaml").write_text(text)
    line = one_line_error(fmhub(tmp_path, "run", "--dry-run", check=False))
    assert line.startswith(start), line


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b"version: 1\n\xff\n"), "fmhub.yaml: not UTF-8 text (byte 11)"),
    (lambda p: p.symlink_to("/dev/zero"), "fmhub.yaml: not a regular file"),
    (lambda p: p.write_bytes(b"#" * ((1 << 20) + 1)), "fmhub.yaml: larger than a spec may be (1048576 bytes)"),
])
def test_an_unreadable_spec_is_one_line(tmp_path, make, expected):
    make(tmp_path / "fmhub.yaml")
    assert one_line_error(fmhub(tmp_path, "run", "--dry-run", check=False)) == expected


def test_aliases_a_real_spec_uses_still_work():
    loaded = parse_spec("datasets:\n  a: &d {path: a.jsonl, text: body}\n  b: *d\nserve: {cycle_time: .inf}\n")
    assert loaded.spec.datasets["b"].text == "body" and loaded.spec.serve.cycle_time == float("inf")
    assert loaded.line(("datasets", "b")) == 3


def test_the_spec_limits_fit_the_documented_example():
    from fmhub.run.example import SPEC as EXAMPLE  # the spec `fmhub init --example` writes

    with open(REPO_ROOT / "docs" / "fmhub-yaml.md", encoding="utf-8") as f:
        doc = f.read()
    assert len(EXAMPLE) < SPEC_LIMITS.max_bytes // 100 and len(doc) < SPEC_LIMITS.max_bytes // 50
    parse_spec(EXAMPLE)


_TOKENS = ["[", "]", "{", "}", ": ", ", ", "- ", "\n", "  ", "? ", "&a ", "*a", "&b ", "*b", "<<: ", "!!binary ", "!!int ",
           "!!float ", "!!timestamp ", "!!python/object:os.system ", "!x ", "!!set ", "!!omap ", '"', "'", "#", "|", ">",
           "version", "datasets", "path", "text", "clean", "steps", "models", "tasks", "finetune", "seed", "serve", "port",
           "1", "1²", "٣", "0x1f", "1:2:3", "2024-13-45", "2024-01-01", ".inf", ".nan", "9" * 60, "~", "true", "on",
           "\\", "\t", "\0", "\udcff", "é", "\u2028", "%YAML 1.1\n", "---\n", "...\n"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join)))
def test_fuzz_any_yaml_text_is_a_spec_or_one_spec_error(text):
    try:
        validate_yaml(text, "fmhub.yaml", Spec, SpecError, "the spec must be a mapping", SPEC_LIMITS)
    except SpecError as exc:  # nothing else may escape: no YAMLError, RecursionError, TypeError, ValueError
        assert "\n" not in str(exc) and str(exc).startswith("fmhub.yaml"), str(exc)


# -- the policy's other readers: licences, a policy that is only staged ---------------------------


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b"licences: {commercial: true}\n\xff\n"), "not UTF-8 text (byte 29)"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_bytes(b"#" * (300 << 10)), "larger than a policy may be"),
    (lambda p: p.symlink_to(p.parent / "gone"), "cannot be read"),
    (lambda p: p.write_text(BILLION_LAUGHS), "YAML aliases"),
])
def test_licence_policy_that_cannot_be_read_fails_closed_in_one_line(tmp_path, make, expected):
    from fmhub.governance.licences import policy_settings

    (tmp_path / ".fmhub").mkdir()
    make(tmp_path / ".fmhub" / "policy.yaml")
    with pytest.raises(PolicyError) as info:
        policy_settings(str(tmp_path))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_licence_policy_still_read(tmp_path):
    from fmhub.governance.licences import policy_settings

    assert policy_settings(str(tmp_path)) == {}
    (tmp_path / ".fmhub").mkdir()
    (tmp_path / ".fmhub" / "policy.yaml").write_text("licences: {commercial: true}\n")
    assert policy_settings(str(tmp_path))["commercial"] is True


def test_a_staged_policy_too_big_to_read_denies(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / ".fmhub").mkdir()
    policy = tmp_path / ".fmhub" / "policy.yaml"
    policy.write_text("version: 1\ndefault: allow\n" + "#" * 2000 + "\n")
    git(tmp_path, "add", ".fmhub/policy.yaml")
    policy.unlink()  # only the index holds it: a sparse or half-done checkout
    reader = access.work_tree_reader(str(tmp_path))
    access._index_blob.cache_clear()
    assert reader(".fmhub/policy.yaml").startswith(b"version: 1")  # within bounds: read as it is
    monkeypatch.setattr(access, "MAX_READ", 1000)
    access._index_blob.cache_clear()
    try:
        data = reader(".fmhub/policy.yaml")
        assert data.startswith(b"\0") and len(data) < 100  # not None, which would mean "no policy"
        assert reader(".fmhub/other.yaml") is None
        d = RolePolicy().check(AccessRequest("alice@example.com", "read", str(tmp_path), "m.safetensors", read_file=reader))
        assert not d.allowed
    finally:
        access._index_blob.cache_clear()


def test_the_filter_process_index_reader_also_marks_a_too_big_blob(tmp_path):
    from fmhub.core.repo import _IndexReader

    git(tmp_path, "init", "-q")
    (tmp_path / "p.yaml").write_text("x" * 2000)
    git(tmp_path, "add", "p.yaml")
    reader = _IndexReader(str(tmp_path), str(tmp_path / ".git" / "index"))
    try:
        assert reader.blob("p.yaml", 1000, b"\0big") == b"\0big"
        assert reader.blob("p.yaml", 1000) is None
        assert reader.blob("gone.yaml", 1000, b"\0big") is None
        assert reader.blob("p.yaml", 4000, b"\0big") == b"x" * 2000
    finally:
        reader.close()


# -- --anchor: never an option to git, never a big blob read whole ------------------------------------


@pytest.mark.parametrize("text", ["--batch-all-objects", "-p", "HEAD:secret.txt", "HEAD..HEAD~1", "a b", "x\n--batch", ""])
def test_anchor_text_that_is_not_a_rev_is_refused(tmp_path, text):
    git(tmp_path, "init", "-q")
    with pytest.raises(audit.AuditError) as info:
        audit_verify.resolve_anchor(text, cwd=str(tmp_path))
    assert str(info.value).startswith("--anchor ") and "\n" not in str(info.value)


def test_anchor_ref_to_a_big_or_binary_blob_is_not_an_anchor(tmp_path):
    git(tmp_path, "init", "-q")

    def blob_ref(data: bytes, ref: str) -> None:
        oid = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=tmp_path, input=data, capture_output=True,
                             check=True).stdout.decode().strip()
        git(tmp_path, "update-ref", ref, oid)

    good = f"fmhub audit anchor 1\nseq 3\nhash {'a' * 64}\n".encode()
    blob_ref(good, "refs/fmhub/good")
    assert audit_verify.resolve_anchor("refs/fmhub/good", cwd=str(tmp_path)) == f"3:{'a' * 64}"
    blob_ref(good + b"#" * (8 << 20), "refs/fmhub/big")  # its first lines are an anchor, but it is not read
    blob_ref(b"seq \xff\xfe\nhash \x80\n", "refs/fmhub/binary")
    blob_ref(f"seq 1\u00b2\nhash {'a' * 64}\n".encode(), "refs/fmhub/superscript")
    for ref in ("refs/fmhub/big", "refs/fmhub/binary", "refs/fmhub/superscript", "refs/fmhub/missing"):
        with pytest.raises(audit.AuditError, match="not an anchor"):
            audit_verify.resolve_anchor(ref, cwd=str(tmp_path))


# -- JSON and YAML a repository brings: one error line, never a traceback -----------------------------

NESTED = "[" * DEEP + "]" * DEEP


def test_a_nested_lineage_record_is_one_line(tmp_path):
    from fmhub.governance import lineage

    (tmp_path / "m.safetensors.lineage.json").write_text(NESTED)
    with pytest.raises(lineage.LineageError, match="nested deeper than 64"):
        lineage.read("m.safetensors", cwd=str(tmp_path))
    (tmp_path / "m.safetensors.lineage.json").write_bytes(b'{"v": 1, "x": "\xff"}')
    with pytest.raises(lineage.LineageError, match="not UTF-8"):
        lineage.read("m.safetensors", cwd=str(tmp_path))
    (tmp_path / "m.safetensors.lineage.json").write_text('{"v": 1, "params": {"score": NaN}}')
    assert lineage.read("m.safetensors", cwd=str(tmp_path))["params"]["score"] != 0  # NaN, as fmhub wrote it


@pytest.mark.parametrize("index, expected", [
    (NESTED, "nested deeper than 64"),
    ('{"weight_map": {"a": "../../outside.safetensors"}}', "not a file beside the index"),
    ('{"weight_map": {"a": "/dev/zero"}}', "not a file beside the index"),
    ('{"weight_map": {"a": ["x"]}}', "not a file beside the index"),
    ('{"weight_map": [1]}', "weight_map is not a mapping"),
])
def test_a_hostile_sharded_index_is_one_line(tmp_path, index, expected):
    from fmhub.models.fisher import model_files

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(FmhubError, match=expected):
        model_files(str(tmp_path))


def test_a_sharded_index_still_lists_its_shards(tmp_path):
    from fmhub.models.fisher import model_files

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors"}}))
    assert model_files(str(tmp_path)) == [str(tmp_path / "m-1.safetensors"), str(tmp_path / "m-2.safetensors")]


@pytest.mark.parametrize("config, expected", [
    (NESTED, "nested deeper than 64"),
    ('{"r": 8, "lora_alpha": ' + "9" * 5000 + "}", "an integer of 5000 digits"),
    ("[1]", "not a JSON object"),
    ('{"lora_alpha": "16"}', "must be numbers"),
])
def test_a_hostile_adapter_config_is_one_line(tmp_path, config, expected):
    import torch

    from fmhub.models.lora import CONFIG, WEIGHTS, load_adapter

    save_tensors(tmp_path / WEIGHTS, {"base_model.model.x.lora_A.weight": torch.ones(2, 4),
                                      "base_model.model.x.lora_B.weight": torch.ones(4, 2)})
    (tmp_path / CONFIG).write_text(config)
    with pytest.raises(FmhubError, match=expected):
        load_adapter(str(tmp_path))


def test_nested_data_rows_are_row_errors_not_tracebacks(tmp_path):
    from fmhub.data import texts as datasets_io
    from fmhub.ml.tasks import Task, TaskError
    from fmhub.ml.tasks import read_rows as _read_rows
    from fmhub.core.rows import read_batches

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": "a", "x": NaN}\n' + NESTED + "\n" + '{"n": ' + "9" * 5000 + "}\n")
    [batch] = list(read_batches(str(path)))
    assert [r["text"] for r in batch.rows] == ["fine"]
    assert [e for _, e in batch.errors] == ["line 2 is not valid JSON (nested deeper than 128 levels)",
                                            "line 3 is not valid JSON (an integer of 5000 digits (at most 1000))"]
    with pytest.raises(TaskError, match=r"d\.jsonl:2: not valid JSON \(nested deeper than 128 levels\)"):
        _read_rows(str(path), Task("t", str(path), metric="accuracy", classes=["a", "b"]))
    with pytest.raises(datasets_io.DataError, match=r"d\.jsonl:2: not valid JSON \(nested deeper"):
        datasets_io.load_examples(str(path))


@pytest.mark.parametrize("text, expected", [
    (BILLION_LAUGHS, "r.yaml:7: more than 100000 keys and values"),
    ("models: [" * DEEP, "r.yaml:1: nested deeper than 32 levels"),
    ("models: !!python/object/apply:os.system [echo]\n", "r.yaml:1: not valid YAML: could not determine a constructor"),
])
def test_a_hostile_merge_recipe_is_one_line(tmp_path, text, expected):
    from fmhub.models.merge import load_plan_file

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(FmhubError) as info:
        load_plan_file(str(path))
    assert str(info.value).startswith(str(tmp_path / expected)) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("keep:\n  - {row: 0123456789abcdef, reason: 2024-13-45}\n", ":2: not a valid !!timestamp value"),
    ("keep: " + "[" * DEEP, ":1: nested deeper than 8 levels"),
    ("keep:\n  - {row: !!python/name:os.system x}\n", ":2: not a valid !!python/name:os.system"),
])
def test_a_hostile_overrides_file_is_one_line(tmp_path, text, expected):
    from fmhub.data.clean.overrides import OverridesError, load_overrides

    path = tmp_path / "o.yaml"
    path.write_text(text)
    with pytest.raises(OverridesError) as info:
        load_overrides(str(path))
    assert str(info.value).startswith(str(path) + expected) and "\n" not in str(info.value), str(info.value)


def test_a_bad_merge_option_on_the_command_line_is_one_line(tmp_path):
    line = one_line_error(fmhub(tmp_path, "merge", "a.safetensors", "b.safetensors", "--option", "density=[", check=False))
    assert line.startswith("--option density:"), line
