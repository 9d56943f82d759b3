"""The package layout: no import goes up a layer, no import cycle, no module over 600 lines (`fmhub.tools.layers`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fmhub.tools import layers
from tests.helpers import REPO_ROOT

MAX_LINES = 600


def test_fmhub_has_no_upward_import_and_no_cycle():
    report = layers.check(str(REPO_ROOT))
    assert report.upward == [] and report.cycles == [], layers.render(report)


def test_the_command_prints_the_layer_graph_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "fmhub.tools.layers"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "core        -> base, plugin" in proc.stdout and proc.stdout.rstrip().endswith("ok: no upward edge, no cycle")


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(REPO_ROOT)): n for d in ("fmhub", "filters", "plugins") for p in (REPO_ROOT / d).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_says_what_it_owns_and_may_import():
    for init in (REPO_ROOT / "fmhub").glob("*/__init__.py"):
        doc = init.read_text(encoding="utf-8")
        assert doc.startswith('"""') and ("May import" in doc or "may import" in doc or "Imports nothing" in doc), init


def test_the_cli_calls_the_api_not_the_layers_below():
    """cli/ parses, calls one `fmhub.api` function and renders: of the layers below it only renderers and error types."""
    report = layers.check(str(REPO_ROOT))
    allowed = ("fmhub.api", "fmhub.cli", "fmhub.base", "fmhub_filters.commands",  # the commands git runs: not the CLI's
               "fmhub.models.difftext", "fmhub.data.rowdiff", "fmhub.data.label.report",  # renderers
               "fmhub.ml.patch", "fmhub.ml.evaluation")  # PatchRejected, the eval report's text
    for module, imported in report.edges.items():
        if module.startswith("fmhub.cli"):
            assert [m for m in imported if m != "fmhub" and not m.startswith(allowed)] == [], module  # fmhub: __version__


# -- the check itself, on trees made to get past it ------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"fmhub/__init__.py": "", "fmhub/base/__init__.py": "", "fmhub/core/__init__.py": "",
                       "filters/__init__.py": "", "plugins/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_an_import_inside_a_function_is_an_edge(tmp_path):
    root = _tree(tmp_path, {"fmhub/base/a.py": "def f():\n    from fmhub.core import b\n", "fmhub/core/b.py": ""})
    report = layers.check(str(root))
    assert [(m, t) for m, t, _ in report.upward] == [("fmhub.base.a", "fmhub.core.b")]


def test_from_package_import_module_and_relative_imports_are_edges(tmp_path):
    root = _tree(tmp_path, {"fmhub/base/a.py": "from ..core import b\n", "fmhub/base/c.py": "import fmhub.core.b as x\n",
                            "fmhub/core/b.py": ""})
    assert sorted(m for m, _, _ in layers.check(str(root)).upward) == ["fmhub.base.a", "fmhub.base.c"]


def test_type_checking_imports_are_not_edges(tmp_path):
    root = _tree(tmp_path, {"fmhub/base/a.py": "TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from fmhub.core.b import X\n",
                            "fmhub/core/b.py": ""})
    assert layers.check(str(root)).ok


def test_the_else_of_type_checking_runs_and_counts(tmp_path):
    root = _tree(tmp_path, {"fmhub/base/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\n"
                                               "else:\n    from fmhub.core import b\n", "fmhub/core/b.py": ""})
    assert not layers.check(str(root)).ok


def test_a_cycle_within_a_layer_is_found(tmp_path):
    root = _tree(tmp_path, {"fmhub/core/a.py": "def f():\n    from fmhub.core import b\n", "fmhub/core/b.py": "import fmhub.core.a\n"})
    report = layers.check(str(root))
    assert report.upward == [] and report.cycles == [["fmhub.core.a", "fmhub.core.b"]]
    assert "cycle: fmhub.core.a <-> fmhub.core.b" in layers.render(report)


def test_a_plugin_module_imported_by_core_is_upward(tmp_path):
    root = _tree(tmp_path, {"fmhub/core/a.py": "from fmhub_plugins.x import BITS\n", "plugins/x.py": "BITS = 1\n"})
    assert [(m, t) for m, t, _ in layers.check(str(root)).upward] == [("fmhub.core.a", "fmhub_plugins.x")]


def test_import_module_and_dunder_import_of_a_literal_name_are_edges(tmp_path):
    root = _tree(tmp_path, {"fmhub/base/a.py": "import importlib\ndef f():\n    return importlib.import_module('fmhub.core.b')\n",
                            "fmhub/base/c.py": "def g():\n    return __import__('fmhub.core.b')\n", "fmhub/core/b.py": ""})
    assert sorted(m for m, _, _ in layers.check(str(root)).upward) == ["fmhub.base.a", "fmhub.base.c"]


def test_type_checking_set_true_runs_its_imports(tmp_path):
    root = _tree(tmp_path, {"fmhub/base/a.py": "TYPE_CHECKING = True\nif TYPE_CHECKING:\n    import fmhub.core.b\n",
                            "fmhub/core/b.py": ""})
    assert not layers.check(str(root)).ok
