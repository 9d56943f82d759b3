"""A new user's first hour (issue 23, "fix the rest"): what a merge conflict offers, what the merge commit says, one-line
errors, output through a pipe, ``--version``, ``-h`` and help without ``<bool>``. Real git in temporary repos."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.helpers import FMHUB, fmhub, git, run, save_tensors

import fmhub as fmhub_pkg

CKPT = "model.safetensors"


def base_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"l{i}.weight": torch.randn(8, 8, generator=g) for i in range(4)} | {"head": torch.randn(4, 8, generator=g)}


def commit(repo, tensors: dict[str, torch.Tensor], message: str) -> None:
    save_tensors(repo / CKPT, tensors, {"format": "pt"})
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)


def branch(repo, name: str, edits: dict[str, torch.Tensor], start: str = "main") -> dict[str, torch.Tensor]:
    git(repo, "checkout", "-q", "-b", name, start)
    t = load_file(str(repo / CKPT)) | edits
    commit(repo, t, name)
    return t


def two_finetunes(repo, with_plan: bool = True) -> tuple[dict, dict, dict]:
    """main: the base; task-a and task-b change l0, l1 and head (task-b l2 too) differently."""
    if with_plan:
        (repo / ".fmhub").mkdir()
        (repo / ".fmhub" / "merge.yaml").write_text("strategy: task-arithmetic\ntensors:\n  - {pattern: head, strategy: linear}\n")
    base = base_model()
    commit(repo, base, "base")
    a = branch(repo, "task-a", {n: base[n] + 0.1 for n in ("l0.weight", "l1.weight", "head")})
    b = branch(repo, "task-b", {n: base[n] - 0.2 for n in ("l0.weight", "l1.weight", "l2.weight", "head")})
    git(repo, "checkout", "-q", "task-a")
    return base, a, b


def message(repo, rev: str = "HEAD") -> str:
    return git(repo, "log", "-1", "--format=%B", rev).stdout.decode()


# -- the merge commit names the strategy per tensor group ----------------------------------------------------------


def test_merge_commit_message_names_the_strategies_that_merged_tensors(repo):
    base, a, b = two_finetunes(repo)
    git(repo, "merge", "-q", "--no-edit", "task-b")
    merged = load_file(str(repo / CKPT))
    torch.testing.assert_close(merged["l0.weight"], a["l0.weight"] + b["l0.weight"] - base["l0.weight"])
    torch.testing.assert_close(merged["head"], (a["head"] + b["head"]) / 2)
    text = message(repo)
    assert text.startswith("Merge branch 'task-b'")
    assert "fmhub: model.safetensors: task-arithmetic (2 tensors), linear (1)" in text.splitlines(), text
    # the notes are used up: the next commit says nothing of them
    (repo / "notes.txt").write_text("x\n")
    git(repo, "add", "notes.txt")
    git(repo, "commit", "-qm", "plain")
    assert "fmhub:" not in message(repo)


def stop_on_a_text_conflict(repo) -> None:
    """Merge task-b into task-a with a text file changed on both sides: git stops after the driver merged the model."""
    (repo / "other.txt").write_text("ours\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-qm", "ours text")
    git(repo, "checkout", "-q", "task-b")
    (repo / "other.txt").write_text("theirs\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-qm", "theirs text")
    git(repo, "checkout", "-q", "task-a")
    assert git(repo, "merge", "--no-edit", "task-b", check=False).returncode != 0


def test_an_aborted_merge_leaves_no_strategy_line_behind(repo):
    two_finetunes(repo)
    stop_on_a_text_conflict(repo)
    git(repo, "merge", "--abort")
    # merged again, but this time taking ours wholesale: the model is not what the driver wrote
    git(repo, "merge", "-q", "--no-edit", "-s", "ours", "task-b")
    assert "fmhub:" not in message(repo)


def test_merge_commit_after_a_resolved_text_conflict_keeps_the_line(repo):
    two_finetunes(repo)
    stop_on_a_text_conflict(repo)
    (repo / "other.txt").write_text("both\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-q", "--no-edit")
    assert "fmhub: model.safetensors: task-arithmetic (2 tensors), linear (1)" in message(repo).splitlines()


# -- a conflict offers only safe ways out -------------------------------------------------------------------------


def test_conflict_message_offers_only_safe_choices_and_its_fmhub_merge_works(repo):
    base, a, b = two_finetunes(repo, with_plan=False)
    proc = git(repo, "merge", "--no-edit", "task-b", check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0 and "l0.weight" in out and "head" in out
    assert "git merge --abort" in out and ".fmhub/merge.yaml" in out and "fmhub-merge=NAME" in out
    # `git checkout --ours/--theirs` only with the warning that it keeps a whole file
    for m in re.finditer(r"checkout --ours/--theirs", out):
        assert "whole file" in out[m.end():m.end() + 80], out
    # the `fmhub merge` it offers writes the merged file, and git takes it
    suggested = re.search(r"`(fmhub merge [^`]+)`", out).group(1)
    mb = git(repo, "merge-base", "HEAD", "MERGE_HEAD").stdout.decode().strip()
    words = suggested.replace("$(git merge-base HEAD MERGE_HEAD)", mb).replace("NAME", "task-arithmetic").split()
    fmhub(repo, *words[1:])
    git(repo, "add", CKPT)
    git(repo, "commit", "-q", "--no-edit")
    merged = load_file(str(repo / CKPT))
    for n in ("l0.weight", "l1.weight", "head"):  # both changed: base + both changes
        torch.testing.assert_close(merged[n], a[n] + b[n] - base[n])
    assert torch.equal(merged["l2.weight"], b["l2.weight"])  # theirs only: kept, not dropped


# -- one-line errors ----------------------------------------------------------------------------------------------


def test_ls_of_a_missing_file_is_one_line(repo):
    proc = fmhub(repo, "ls", "missing.safetensors", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip() == "fmhub: missing.safetensors: no such file"


def test_ties_without_a_base_asks_for_base(repo):
    base = base_model()
    save_tensors(repo / "a.safetensors", {n: t + 0.1 for n, t in base.items()})
    save_tensors(repo / "b.safetensors", {n: t - 0.1 for n, t in base.items()})
    for strategy in ("ties", "task-arithmetic"):
        proc = fmhub(repo, "merge", "a.safetensors", "b.safetensors", "-s", strategy, "--option", "density=0.5",
                     "-o", "out.safetensors", check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "--base" in err and "the base has no tensor" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (repo / "out.safetensors").exists()


# -- output through a pipe ----------------------------------------------------------------------------------------


def test_piped_ls_shows_long_tensor_names_whole(repo, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    long = "model.layers.17.self_attn.rotary_embedding_with_a_really_quite_long_descriptive_name.inv_freq"
    save_tensors(repo / CKPT, {long: torch.zeros(3), "b": torch.zeros(1)})
    # stdout is a pipe here; the environment is os.environ's (some pytest setups also leave COLUMNS=80 in the process's
    # C environment, which a child given no env would inherit)
    out = run([*FMHUB, "ls", CKPT], repo, env=dict(os.environ)).stdout.decode()
    assert long in out
    assert "…" not in out


def test_ls_and_track_json_give_every_field_whole(repo):
    import json

    long = "model.layers.17.self_attn.rotary_embedding_with_a_really_quite_long_descriptive_name.inv_freq"
    save_tensors(repo / CKPT, {long: torch.zeros(3, 2), "b": torch.zeros(1)})
    git(repo, "add", CKPT)
    git(repo, "commit", "-qm", "one")
    doc = json.loads(fmhub(repo, "ls", CKPT, "--rev", "HEAD", "--json").stdout)
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name[long]["shape"] == [3, 2] and by_name[long]["bytes"] == 24 and by_name[long]["dtype"] == "F32"
    assert len(by_name[long]["object"]) == 64 and doc["bytes"] == (repo / CKPT).stat().st_size
    assert "*.safetensors" in json.loads(fmhub(repo, "track", "--json").stdout)
    done = json.loads(fmhub(repo, "track", "*.bin", "--json").stdout)
    assert done["tracking"] == ["*.bin"] and done["installed"] is None and done["raw_staged"] == []


# -- --version, -h, help without <bool> ---------------------------------------------------------------------------


def test_version(repo):
    assert fmhub(repo, "--version").stdout.decode().strip() == f"fmhub {fmhub_pkg.__version__}"


@pytest.mark.parametrize("words", [[], ["merge"], ["adapter", "ls"], ["diff"], ["clean"], ["hub"]])
def test_h_is_help(repo, words):
    assert fmhub(repo, *words, "-h").stdout == fmhub(repo, *words, "--help").stdout


def test_help_shows_no_bool_type_labels():
    from fmhub import cli

    runner = CliRunner()
    seen = 0
    for name, (_, hidden, _) in cli.COMMANDS.items():
        if hidden:
            continue
        out = runner.invoke(cli.app, [name, "--help"]).output
        assert "Usage:" in out, (name, out)
        assert "<bool>" not in out, name
        seen += 1
    root = runner.invoke(cli.app, ["--help"]).output
    assert "<bool>" not in root and "--version" in root and "-h" in root
    assert seen > 30
