"""The example third-party plugin package (tests/plugin_example), installed with pip into a virtual environment
and driven through ``fmhub plugins``, ``fmhub clean`` and a real ``git merge``; and the host's guard rails seen
from outside: FMHUB_DISABLE_PLUGINS, a plugin that fails to import (outside and inside git's filter), a misspelt
hook, an object without a name, a name clash.

The environment is made with ``python -m venv --system-site-packages`` (it sees fmhub and its dependencies as
installed here) and the package installed with ``pip install --no-deps --no-build-isolation --no-index`` from a
copy, so nothing is downloaded and neither this environment nor the source tree is changed. git runs fmhub's
filter and merge driver with the environment's python (``fmhub install`` from it writes that command).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, git, run, save_tensors

EXAMPLE = REPO_ROOT / "tests" / "plugin_example"

SPEC = """\
datasets:
  posts: {path: posts.jsonl, text: text}
clean:
  main:
    input: posts
    output: clean.jsonl
    steps:
      - caps: {max_ratio: 0.6, min_letters: 8}
      - length: {min_words: 2}
"""
ROWS = [
    {"id": 0, "text": "A calm sentence about the weather today"},
    {"id": 1, "text": "BUY NOW THIS IS THE BEST OFFER EVER"},
    {"id": 2, "text": "NASA launched a probe"},  # an acronym, not shouting
    {"id": 3, "text": "short"},
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtual environment with the example plugin installed: its python."""
    root = tmp_path_factory.mktemp("example-venv")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(root / "venv")],
                   check=True, capture_output=True)
    python = root / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": str(root)}
    # pip comes from the system site-packages; it installs into the environment it runs in
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)], root, env=env)
    return python


@pytest.fixture
def env(monkeypatch, venv):
    """The test's environment: no PYTHONPATH of its own, no plugin disabled, no warning already given."""
    for name in ("PYTHONPATH", "FMHUB_DISABLE_PLUGINS", "_FMHUB_PLUGINS_WARNED"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fmhub(venv: Path, cwd: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """The environment's ``python -m fmhub ARGS`` in ``cwd``; stdout and stderr as text."""
    proc = run([str(venv), "-m", "fmhub", *args], cwd, check=check, env=os.environ | env)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def provided_rows(proc: subprocess.CompletedProcess) -> list[dict]:
    """The objects `fmhub plugins --json` lists (a list of rows, or under ``provided``)."""
    data = json.loads(proc.stdout)
    return data["provided"] if isinstance(data, dict) else data


def describe(venv: Path, cwd: Path, **env: str) -> dict:
    """`fmhub.plugin.report.describe()` as the environment's python sees it."""
    code = "import json; from fmhub.plugin.report import describe; print(json.dumps(describe().as_dict()))"
    return json.loads(run([str(venv), "-c", code], cwd, env=os.environ | env).stdout)


def cleaners(venv: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The environment's cleaners, asked for through `fmhub.plugin.host` (names on stdout, warnings on stderr)."""
    code = "from fmhub.plugin import host; print(*host.registry('cleaner'))"
    proc = run([str(venv), "-c", code], cwd, env=dict(os.environ))
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def project(tmp_path: Path, spec: str = SPEC) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "fmhub.yaml").write_text(spec)
    (tmp_path / "posts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def venv_repo(venv: Path, path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q")
    fmhub(venv, path, "install")
    fmhub(venv, path, "track", "*.safetensors")
    return path


def add_plugin(tmp_path: Path, monkeypatch, module: str, text: str, name: str | None = None) -> Path:
    """A plugin package as pip would leave it (a module and a dist-info naming it), on PYTHONPATH."""
    site = tmp_path / f"site-{module}"
    site.mkdir()
    (site / f"{module}.py").write_text(textwrap.dedent(text))
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fmhub]\n{name or module} = {module}\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return site


# -- the example package ----------------------------------------------------------------------------


def test_fmhub_plugins_lists_the_example(venv, env, tmp_path):
    rows = provided_rows(fmhub(venv, tmp_path, "plugins", "--json"))
    mine = {(r["kind"], r["name"]) for r in rows if r["plugin"] == "example"}
    assert mine == {("cleaner", "caps"), ("merge-strategy", "elementwise-max")}
    assert all(r["package"] == "fmhub-example-plugin" for r in rows if r["plugin"] == "example")
    info = describe(venv, tmp_path)
    example = [p for p in info["plugins"] if p["name"] == "example"]
    assert example == [{"name": "example", "package": "fmhub-example-plugin", "version": "0.1.0",
                        "value": "fmhub_example_plugin.plugin", "builtin": False, "status": "loaded", "problem": ""}]
    assert info["clashes"] == [] and info["problems"] == []


def test_fmhub_clean_runs_the_example_cleaner_in_worker_processes(venv, env, tmp_path):
    path = project(tmp_path)
    proc = fmhub(venv, path, "clean", "--backend", "processes", "--workers", "2", "--report", "run.json")
    assert "2 of 4 rows kept" in proc.stdout
    assert [json.loads(line)["id"] for line in (path / "clean.jsonl").read_text().splitlines()] == [0, 2]
    decisions = {d["position"]: d for d in json.loads((path / "run.json").read_text())["decisions"]}
    assert decisions[1]["step"] == "caps" and decisions[1]["reason"] == "28 of 28 letters are capitals > max_ratio 0.6"
    assert decisions[3]["step"] == "length"


def test_the_example_cleaner_refuses_a_bad_option_naming_its_line(venv, env, tmp_path):
    path = project(tmp_path, SPEC.replace("max_ratio: 0.6", "max_ration: 0.6"))
    proc = fmhub(venv, path, "clean", check=False)
    assert proc.returncode == 1
    assert "fmhub.yaml:8: clean.main.steps[0].caps.max_ration: caps: option 'max_ration': unknown option (a typo?); " \
           "caps takes: max_ratio, min_letters, columns" in proc.stderr


def test_git_merge_uses_the_example_strategy(venv, env, tmp_path):
    repo = venv_repo(venv, tmp_path / "repo")
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}
    save_tensors(repo / "model.safetensors", base)
    with open(repo / ".gitattributes", "a") as f:
        f.write("model.safetensors fmhub-merge=elementwise-max\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    for branch, w in (("a", a), ("b", b)):
        git(repo, "checkout", "-q", "-b", branch, "main")
        save_tensors(repo / "model.safetensors", base | {"w": w})
        git(repo, "commit", "-qam", branch)
    git(repo, "checkout", "-q", "a")
    git(repo, "merge", "-q", "--no-edit", "b")
    merged = load_file(str(repo / "model.safetensors"))
    assert torch.equal(merged["w"], torch.maximum(a, b))
    assert torch.equal(merged["b"], base["b"])
    assert git(repo, "status", "--porcelain").stdout == b""


# -- guard rails ----------------------------------------------------------------------------------


def test_a_disabled_plugin_is_not_loaded_and_is_shown_disabled(venv, env, tmp_path):
    path = project(tmp_path)
    rows = provided_rows(fmhub(venv, path, "plugins", "--json", FMHUB_DISABLE_PLUGINS="example, clean-pii"))
    assert not [r for r in rows if r["plugin"] in ("example", "clean-pii")]
    info = describe(venv, path, FMHUB_DISABLE_PLUGINS="example, clean-pii")
    status = {p["name"]: p["status"] for p in info["plugins"]}
    assert status["example"] == status["clean-pii"] == "disabled" and status["clean-filters"] == "loaded"
    assert info["disabled"] == ["example", "clean-pii"]
    proc = fmhub(venv, path, "clean", check=False, FMHUB_DISABLE_PLUGINS="example")
    assert proc.returncode == 1 and "unknown cleaner 'caps'" in proc.stderr


BROKEN = "import fmhub_no_such_module\n"


def test_a_broken_plugin_is_skipped_with_one_warning_outside_the_filter(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_broken_plugin", BROKEN, name="broken")
    proc = cleaners(venv, tmp_path)  # what every command asking for cleaners goes through
    warning = ("fmhub: warning: cannot load plugin 'broken' (fmhub_broken_plugin, from fmhub_broken_plugin-0.1): "
               "ModuleNotFoundError: No module named 'fmhub_no_such_module'; skipped it")
    assert proc.stderr.startswith(warning) and proc.stderr.count("\n") == 1 and "caps" in proc.stdout.split()
    assert ("cleaner", "caps") in {(r["kind"], r["name"]) for r in provided_rows(fmhub(venv, tmp_path, "plugins", "--json"))}
    info = describe(venv, tmp_path)
    assert {p["name"]: p["status"] for p in info["plugins"]}["broken"] == "failed"
    assert info["problems"] == [warning.removeprefix("fmhub: warning: ").removesuffix("; skipped it")]

    # fmhub clean asks the access policies, and a plugin that cannot be imported may be one: it fails closed
    path = project(tmp_path / "p")
    proc = fmhub(venv, path, "clean", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "cannot load plugin 'broken'" in proc.stderr and "FMHUB_DISABLE_PLUGINS=broken" in proc.stderr
    assert "2 of 4 rows kept" in fmhub(venv, path, "clean", FMHUB_DISABLE_PLUGINS="broken").stdout


def test_a_broken_plugin_fails_each_file_in_the_filter_with_one_line(venv, env, tmp_path):
    repo = venv_repo(venv, tmp_path / "repo")
    save_tensors(repo / "model.safetensors", {"w": torch.zeros(4)})
    add_plugin(tmp_path, env, "fmhub_broken_plugin", BROKEN, name="broken")
    proc = git(repo, "add", "model.safetensors", check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert ("fmhub: cannot load plugin 'broken' (fmhub_broken_plugin, from fmhub_broken_plugin-0.1): "
            "ModuleNotFoundError: No module named 'fmhub_no_such_module'; fix or uninstall that package, "
            "or set FMHUB_DISABLE_PLUGINS=broken to run without it") in err
    assert "please report" not in err and "Traceback" not in err and "warning" not in err
    env.setenv("FMHUB_DISABLE_PLUGINS", "broken")
    git(repo, "add", "model.safetensors")
    assert git(repo, "show", ":model.safetensors").stdout.startswith(b"fmhub manifest ")


def test_a_misspelt_hook_refuses_the_plugin_naming_the_hook(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_typo_plugin", """
        from fmhub import hookimpl

        class Shout:
            name = "shout"
            scope = "row"

        @hookimpl
        def fmhub_cleanrs():
            return [Shout()]
    """, name="typo")
    proc = cleaners(venv, tmp_path)
    assert proc.stderr.count("\n") == 1 and "caps" in proc.stdout.split()
    assert ("refused plugin 'typo' (fmhub_typo_plugin, from fmhub_typo_plugin-0.1): fmhub_cleanrs is not an fmhub hook "
            "(did you mean fmhub_cleaners?)") in proc.stderr
    assert {p["name"]: p["status"] for p in describe(venv, tmp_path)["plugins"]}["typo"] == "failed"


def test_an_object_without_a_name_is_named_by_its_plugin(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_nameless_plugin", """
        from fmhub import hookimpl

        class Nameless:
            scope = "row"
            def configure(self, options, context): return None
            def clean(self, rows, config): return [None] * len(rows)

        @hookimpl
        def fmhub_cleaners():
            return [Nameless()]
    """, name="nameless")
    path = project(tmp_path / "p")
    proc = fmhub(venv, path, "clean")  # the other cleaners work
    assert "2 of 4 rows kept" in proc.stdout
    assert proc.stderr.count("fmhub: warning: plugin 'nameless' (fmhub_nameless_plugin, from fmhub_nameless_plugin-0.1): "
                             "fmhub_cleaners() returned a cleaner with no name (Nameless)") == 1
    assert "AttributeError" not in proc.stderr


def test_a_clash_is_shown_and_refused_only_where_the_name_is_used(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_clash_plugin", """
        from fmhub import hookimpl

        class Caps:
            name = "caps"
            scope = "row"
            def configure(self, options, context): return None
            def clean(self, rows, config): return [None] * len(rows)

        class Pii(Caps):
            name = "pii"

        @hookimpl
        def fmhub_cleaners():
            return [Caps(), Pii()]
    """, name="clash")
    path = project(tmp_path / "p")
    info = describe(venv, path)
    assert {(c["kind"], c["name"]): set(c["plugins"]) for c in info["clashes"]} == {
        ("cleaner", "caps"): {"example", "clash"}, ("cleaner", "pii"): {"clean-pii", "clash"}}
    problems = {(i["name"], i["plugin"]): i["problem"] for i in info["provided"] if i["kind"] == "cleaner"}
    assert problems[("pii", "clean-pii")] == "clash: also provided by clash" and problems[("length", "clean-filters")] == ""
    proc = fmhub(venv, path, "clean", check=False)  # the pipeline uses caps: refused, naming both plugins
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "fmhub: two plugins provide the cleaner 'caps': " in proc.stderr and "fmhub uses neither" in proc.stderr
    assert "'clash' (from fmhub_clash_plugin-0.1)" in proc.stderr and "'example' (from fmhub_example_plugin-0.1.0)" in proc.stderr
    (path / "fmhub.yaml").write_text(SPEC.replace("      - caps: {max_ratio: 0.6, min_letters: 8}\n", ""))
    assert "3 of 4 rows kept" in fmhub(venv, path, "clean").stdout  # length alone: the clashes do not block it
    (path / "fmhub.yaml").write_text(SPEC)
    assert "2 of 4 rows kept" in fmhub(venv, path, "clean", FMHUB_DISABLE_PLUGINS="clash").stdout


def test_a_misspelt_hook_does_not_block_commands_that_check_access(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_typo_plugin", "from fmhub import hookimpl\n\n@hookimpl\ndef fmhub_merge_strategys():\n"
                                                  "    return []\n", name="typo")
    proc = fmhub(venv, project(tmp_path / "p"), "clean")  # imported, and provides no access policy: a warning only
    assert "2 of 4 rows kept" in proc.stdout and proc.stderr.count("\n") == 1
    assert "refused plugin 'typo'" in proc.stderr and "did you mean fmhub_merge_strategies?" in proc.stderr


def test_a_hook_that_raises_is_blamed_on_its_plugin(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_raiser_plugin", "from fmhub import hookimpl\n\n@hookimpl\ndef fmhub_cleaners():\n"
                                                    "    raise ValueError('hook body fails')\n", name="raiser")
    proc = cleaners(venv, tmp_path)
    assert proc.stderr == ("fmhub: warning: plugin 'raiser' (fmhub_raiser_plugin, from fmhub_raiser_plugin-0.1): "
                           "fmhub_cleaners() failed: ValueError: hook body fails; skipped it (fix or uninstall that package, "
                           "or set FMHUB_DISABLE_PLUGINS=raiser)\n") and "caps" in proc.stdout.split()
    listed = fmhub(venv, tmp_path, "plugins", "--json")  # the diagnostic command itself still answers
    assert json.loads(listed.stdout)["problems"] and "Traceback" not in listed.stderr


def test_a_plugin_that_exits_as_it_loads_is_named(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_exit_plugin", "import sys\nsys.exit('bye from plugin')\n", name="quitter")
    proc = cleaners(venv, tmp_path)
    assert "cannot load plugin 'quitter'" in proc.stderr and "SystemExit: bye from plugin" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "caps" in proc.stdout.split()


def test_the_access_policy_plugin_cannot_be_disabled(venv, env, tmp_path):
    proc = fmhub(venv, project(tmp_path / "p"), "clean", check=False, FMHUB_DISABLE_PLUGINS="policy-roles")
    assert proc.returncode == 1 and proc.stderr == (
        "fmhub: FMHUB_DISABLE_PLUGINS: policy-roles provides the access policy and cannot be disabled "
        "(the policy a repository commits must keep applying)\n")
    repo = venv_repo(venv, tmp_path / "repo")
    save_tensors(repo / "model.safetensors", {"w": torch.zeros(4)})
    env.setenv("FMHUB_DISABLE_PLUGINS", "policy-roles")
    proc = git(repo, "add", "model.safetensors", check=False)
    assert proc.returncode != 0 and b"policy-roles provides the access policy and cannot be disabled" in proc.stderr


def test_a_typo_of_the_access_policy_hook_fails_closed(venv, env, tmp_path):
    add_plugin(tmp_path, env, "fmhub_guard_plugin", "from fmhub import hookimpl\n\n@hookimpl\ndef fmhub_access_policy():\n"
                                                   "    return []\n", name="guard")
    proc = fmhub(venv, project(tmp_path / "p"), "clean", check=False)  # meant to be a policy: nothing is read without it
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "refused plugin 'guard'" in proc.stderr
