"""`fmhub.api`: every command's behaviour callable from Python with the command's effects (audit and lineage records,
commits), and `fmhub.cli.main(argv)`, typer's CliRunner and the shell reading the same words the same way."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tests.helpers import FMHUB, fmhub, git

import fmhub.cli as cli
from fmhub.api import data, ml, models
from fmhub.api import serve as serving
from fmhub.base.errors import FmhubError


def audit_entries(repo: Path) -> list[dict]:
    log = repo / ".git" / "fmhub" / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def write_clean_spec(repo: Path) -> None:
    (repo / "data.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["a b c", "d"])))
    (repo / "fmhub.yaml").write_text(
        "clean:\n  short:\n    input: data.jsonl\n    output: clean.jsonl\n    steps: [{length: {min_words: 2}}]\n")


# -- the command table ---------------------------------------------------------------------------------------------


def test_the_lazy_command_table_matches_the_commands():
    """`fmhub --help` lists COMMANDS without importing a command module: each entry must say what the command says."""
    group = cli.typer.main.get_command(cli.app)
    for name, (module, hidden, text) in cli.COMMANDS.items():
        real = group.load(name)
        assert real.name == name and real.hidden == hidden, name
        if not hidden:
            assert inspect.cleandoc(real.help or "").split("\n\n")[0].replace("\n", " ") == text, name


def test_help_imports_no_command_module(tmp_path):
    code = "import sys; from fmhub.cli import main; main(['--help']); print(sorted(m for m in sys.modules if m.startswith('fmhub.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    loaded = eval(out.strip().splitlines()[-1])
    assert "fmhub.cli" in loaded and not [m for m in loaded if m.startswith(("fmhub.cli.", "fmhub.api"))], loaded


# -- main(argv), CliRunner and the shell agree ---------------------------------------------------------------------


def test_main_argv_cli_runner_and_the_shell_read_dash_dash_alike(repo, monkeypatch, capsys):
    """`fmhub diff -- v1`: after `--`, v1 is a path, whichever way the command line arrives; without it, a revision."""
    fmhub(repo, "track", "*.jsonl")
    (repo / "d.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    git(repo, "branch", "v1")
    (repo / "d.jsonl").write_text('{"a": 1}\n{"a": 3}\n')
    (repo / "v1").mkdir()
    (repo / "v1" / "notes.txt").write_text("a directory named like the branch\n")
    monkeypatch.chdir(repo)
    for args in (["diff", "--", "v1"], ["diff", "v1"]):
        shell = fmhub(repo, *args)
        assert main_result(args, capsys) == (0, shell.stdout.decode(), shell.stderr.decode())
        runner = CliRunner().invoke(cli.app, args)
        assert (runner.exit_code, runner.stdout) == (0, shell.stdout.decode())
        changed = "d.jsonl (v1 → work tree)" in shell.stdout.decode()
        assert changed == (args == ["diff", "v1"]), shell.stdout.decode()


def main_result(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_errors_are_one_line_with_exit_1_from_main(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fmhub.api.governance.lineage", lambda target: 1 / 0)
    code, out, err = main_result(["lineage", "x"], capsys)
    assert code == 1 and err.startswith("fmhub: fmhub lineage failed unexpectedly (ZeroDivisionError") and err.count("\n") == 1
    monkeypatch.setattr("fmhub.api.governance.lineage", lambda target: (_ for _ in ()).throw(FmhubError("no\nsuch")))
    code, out, err = main_result(["lineage", "x"], capsys)
    assert (code, err) == (1, "fmhub: no\\nsuch\n")
    assert cli.main(["no-such-command"]) == 2


# -- audit records of failed pipeline runs -------------------------------------------------------------------------


def test_a_failed_clean_is_audited_from_python_as_from_the_cli(repo, monkeypatch):
    write_clean_spec(repo)
    monkeypatch.chdir(repo)
    with pytest.raises(FmhubError, match="nosuch"):
        data.clean("nosuch")
    from_python = audit_entries(repo)[-1]
    proc = fmhub(repo, "clean", "nosuch", check=False)
    assert proc.returncode == 1
    from_cli = audit_entries(repo)[-1]
    for e in (from_python, from_cli):
        assert (e["what"], e["target"], e["decision"]) == ("clean-pipeline", "nosuch", "error")
    assert from_python["details"] == from_cli["details"]
    with pytest.raises(FmhubError):
        data.label("nosuch")
    assert (audit_entries(repo)[-1]["what"], audit_entries(repo)[-1]["decision"]) == ("label-pipeline", "error")


def test_a_clean_run_from_python(repo, monkeypatch):
    write_clean_spec(repo)
    monkeypatch.chdir(repo)
    res = data.clean(backend="serial")
    assert (res.rows_read, res.rows_out) == (2, 1)
    assert [json.loads(line)["id"] for line in (repo / "clean.jsonl").read_text().splitlines()] == [0]


# -- lineage records of sparsify and finetune ----------------------------------------------------------------------


def test_sparsify_and_finetune_record_their_lineage_from_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("base.safetensors", "tuned.safetensors", "fisher.safetensors", "data.jsonl"):
        (tmp_path / name).write_bytes(b"x")

    def fake_sparse_update(base, finetuned, fisher, output, k):
        Path(output).write_bytes(b"sparse")
        return SimpleNamespace(k=k)

    def fake_finetune(base, data, output, **kw):
        Path(output).mkdir()
        return SimpleNamespace(kw=kw)

    monkeypatch.setattr("fmhub.models.sparse_update.sparse_update", fake_sparse_update)
    monkeypatch.setattr("fmhub.models.sparse_update.finetune_masked", fake_finetune)
    done = models.sparsify("base.safetensors", "tuned.safetensors", "fisher.safetensors", "1%", "sparse.safetensors")
    assert done.report.k == pytest.approx(0.01) and done.losses == {}
    record = json.loads((tmp_path / "sparse.safetensors.lineage.json").read_text())
    assert record["step"] == "sparsify" and record["params"] == {"keep": "1%", "fisher": "fisher.safetensors"}
    assert [i["path"] for i in record["inputs"]] == ["base.safetensors", "tuned.safetensors"]

    rep = ml.finetune("base.safetensors", "data.jsonl", "tuned-dir", steps=3, seed=1)
    assert rep.kw["steps"] == 3 and rep.kw["k_fraction"] is None
    record = json.loads((tmp_path / "tuned-dir.lineage.json").read_text())
    assert record["step"] == "finetune" and record["params"]["steps"] == 3
    assert [(i["path"], i["kind"]) for i in record["inputs"]] == [("base.safetensors", "model"), ("data.jsonl", "dataset")]
    with pytest.raises(FmhubError, match="--fisher and --keep go together"):
        ml.finetune("base.safetensors", "data.jsonl", "other", keep="1%")
    with pytest.raises(FmhubError, match="outside 0%..100%"):
        models.fraction("150%")


# -- patch --commit through run's commit ---------------------------------------------------------------------------


def test_patch_commit_goes_through_the_run_commit(repo, monkeypatch):
    (repo / "other.txt").write_text("staged, not the patch's\n")
    git(repo, "add", "other.txt")

    def fake_run_patch(loaded, name, progress=None):
        (repo / "patched").mkdir()
        (repo / "patched" / "w.txt").write_text("w\n")
        (repo / "patched.lineage.json").write_text("{}\n")
        (repo / "patch.jsonl").write_text("{}\n")
        return {"patch": "fix", "slice": "short", "output": str(repo / "patched"), "data": str(repo / "patch.jsonl")}

    calls = []
    from fmhub.run import plan

    real = plan.commit_paths
    monkeypatch.setattr(plan, "commit_paths", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr("fmhub.ml.patch.run_patch", fake_run_patch)
    monkeypatch.setattr("fmhub.project.spec.load_spec", lambda spec=None: SimpleNamespace(root=str(repo)))
    done = ml.patch("fix", commit=True)
    assert len(calls) == 1 and done.commit == git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    assert git(repo, "log", "-1", "--format=%s").stdout.decode().strip() == "fmhub patch fix: slice short fixed through data"
    files = git(repo, "show", "--name-only", "--format=", "HEAD").stdout.decode().split()
    assert sorted(files) == ["patch.jsonl", "patched.lineage.json", "patched/w.txt"]
    assert git(repo, "diff", "--cached", "--name-only").stdout.decode().split() == ["other.txt"]  # left staged


# -- serving: option precedence, and run's local check through the backend registry --------------------------------


def test_serve_options_given_beat_the_spec(tmp_path, monkeypatch):
    (tmp_path / "fmhub.yaml").write_text("serve:\n  base: model\n  port: 9000\n  device: cpu\n")
    monkeypatch.chdir(tmp_path)
    options, cwd = serving.serve_options({"port": 1234, "adapters": None, "dtype": None})
    assert (options["base"], options["port"], options["device"], cwd) == ("model", 1234, "cpu", str(tmp_path))
    options, cwd = serving.serve_options({"base": "elsewhere"})
    assert options["base"] == "elsewhere" and cwd is None  # paths given here are relative to here
    with pytest.raises(FmhubError, match="no serve option 'colour'"):
        serving.serve_options({"colour": "red"})


def test_run_local_check_serves_through_the_backend_registry(monkeypatch):
    from fmhub.run import plan

    served = []

    class Handle:
        url = "http://127.0.0.1:1"
        stopped = False

        def stop(self):
            Handle.stopped = True

    class Backend:
        def serve(self, config):
            served.append(config)
            return Handle()

    monkeypatch.setattr("fmhub.serving.backends.backend", lambda name: Backend() if name == "local" else None)
    loaded = SimpleNamespace(spec=SimpleNamespace(select=None), resolve=lambda p: p)
    out = plan.check_local("base-dir", [], loaded, "hi", 1)
    assert out == {"served": [], "routed": None} and Handle.stopped  # the stopped server's URL is not reported
    assert served[0].port == 0 and served[0].base.path.endswith("base-dir")


def test_python_m_fmhub_and_main_agree_on_usage(tmp_path):
    proc = subprocess.run([*FMHUB, "textconv"], cwd=tmp_path, capture_output=True)
    assert proc.returncode == 2 and b"Missing argument" in proc.stderr
    assert cli.main(["textconv"]) == 2
