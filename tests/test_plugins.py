"""The plugin host: built-ins arrive through entry points, and so does a third-party package."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import FMHUB, git, run, save_tensors, second_ours_plugin

from fmhub.plugin import host
from fmhub.base.errors import PluginError

PLUGIN = textwrap.dedent(
    '''
    """A third-party fmhub plugin: an element-wise max merge strategy."""
    from fmhub import hookimpl


    class ElementwiseMax:
        name = "elementwise-max"

        def merge(self, name, base, load, sides, options):
            import torch

            out = load(0)
            for i in range(1, sides):
                out = torch.maximum(out, load(i))
            return out


    @hookimpl
    def fmhub_merge_strategies():
        return [ElementwiseMax()]
    '''
)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Install a plugin package the way pip would: a module plus a dist-info with an entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "fmhub_max_plugin.py").write_text(PLUGIN)
    dist = site / "fmhub_max_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fmhub-max-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fmhub]\nmax = fmhub_max_plugin\n")
    monkeypatch.setenv("PYTHONPATH", str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return site


def test_builtins_register_through_entry_points():
    pm = host.new_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"safetensors", "merge-basic"} <= names
    dists = {pm.get_name(p): d.project_name for p, d in pm.list_plugin_distinfo()}
    assert dists["safetensors"] == "fmhub"
    assert set(host.registry("merge-strategy", pm)) >= {"ours", "theirs"}
    assert host.registry("format", pm)["safetensors"].name == "safetensors"
    assert set(host.registry("serving-backend", pm)) >= {"local", "vllm"}


def test_without_entry_points_nothing_is_loaded():
    pm = host.new_plugin_manager(load_entry_points=False)
    assert host.registry("format", pm) == {}
    with pytest.raises(PluginError, match="no format named 'safetensors'"):
        host.lookup("format", "safetensors", pm)


def test_name_clash_between_plugins_is_refused():
    pm = host.new_plugin_manager()
    pm.register(second_ours_plugin(), name="dup")
    with pytest.raises(PluginError, match="two plugins provide the merge-strategy 'ours'"):
        host.registry("merge-strategy", pm)


def test_fmhub_plugins_lists_a_third_party_package(third_party, tmp_path):
    out = run([*FMHUB, "plugins", "--json"], tmp_path).stdout
    rows = json.loads(out)
    assert {"kind": "merge-strategy", "name": "elementwise-max", "plugin": "max", "package": "fmhub-max-plugin"} in rows
    assert any(r["name"] == "safetensors" and r["package"] == "fmhub" for r in rows)


def test_third_party_strategy_is_used_by_git_merge(third_party, repo):
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
