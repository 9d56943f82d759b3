"""Start-up of the commands git runs: what the filter imports, the -S bootstrap, lazy plugins, cached config."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import FMHUB, git, run, second_ours_plugin

import fmhub
from fmhub.plugin import checks, host
from fmhub.core import repo as fmrepo
from fmhub.base.errors import FmhubError, PluginError

BOOT = Path(fmhub.__file__).parent / "boot.py"

# What the filter must not import to clean a small checkpoint: the CLI framework, the heavy
# libraries, the plugins of kinds it never asks for.
NOT_IMPORTED = (
    "numpy", "pydantic", "typer", "rich", "click", "dulwich", "yaml", "torch", "safetensors", "datasketch",
    "pyarrow", "huggingface_hub", "urllib3", "importlib.metadata",
    "pluggy", "inspect", "typing", "fmhub.plugin.interfaces",  # ~30 ms together: built-ins are called directly
    "dataclasses", "subprocess",  # ~15 ms: records are named tuples; git answers through fmhub.base.prefetch (posix_spawn)
    "fmhub.cli", "fmhub.governance.policy", "fmhub.project.spec", "fmhub.git.sync", "fmhub.git.transfer",
    "fmhub.plugin.options", "fmhub.plugin.report",
)
PLUGINS_IMPORTED = {"fmhub_plugins", "fmhub_plugins.safetensors_format", "fmhub_plugins.policy_roles"}
# About 85 modules today, with Python's own. The margin leaves room to grow; an accidental
# numpy, pydantic or typer brings a hundred or more.
MAX_MODULES = 140
# Summed import time of the filter's start-up (about 0.1 s on an idle 2-core machine, compiling
# fmhub's sources when PYTHONDONTWRITEBYTECODE is set); the best of three runs is compared.
BUDGET_S = 0.75


def tiny_checkpoint(i: int = 0) -> bytes:
    """A valid 72-byte safetensors file: one float32 tensor of 2 elements."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", float(i), float(-i))


def imports_of(stderr: bytes) -> tuple[dict[str, int], float]:
    """Modules -X importtime reported (name -> cumulative µs) and the summed time of top-level imports, in seconds."""
    modules, total = {}, 0
    for m in re.finditer(rb"^import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)$", stderr, re.M):
        modules[m.group(3).decode()] = int(m.group(1))
        if len(m.group(2)) == 1:
            total += int(m.group(1))
    return modules, total / 1e6


def filter_command(repo: Path) -> str:
    return git(repo, "config", "filter.fmhub.process").stdout.decode().strip()


def launcher(command: str) -> list[str]:
    """PYTHON -S BOOT SUBCOMMAND: the words after `sh -c GUARD`, the guard `fmhub install` puts first
    (`fmhub.git.install.guarded`)."""
    return shlex.split(command)[-4:]


# -- the filter's imports -----------------------------------------------------------------


def add_with_importtime(repo: Path, command: str, i: int) -> bytes:
    name = f"tiny{i}.safetensors"
    (repo / name).write_bytes(tiny_checkpoint(i))
    proc = git(repo, "-c", f"filter.fmhub.process={command}", "add", name)
    assert git(repo, "show", f":{name}").stdout.startswith(b"fmhub manifest")
    return proc.stderr


def test_filter_start_up_imports_only_what_a_clean_needs(repo):
    command = filter_command(repo)
    python, flag, boot, sub = launcher(command)
    assert (flag, sub) == ("-S", "filter-process") and Path(boot) == BOOT
    runs = [imports_of(add_with_importtime(repo, shlex.join([python, "-X", "importtime", "-S", boot, sub]), i)) for i in range(3)]
    modules = runs[0][0]
    assert "fmhub_filters.process" in modules and "fmhub.core.checkpoint" in modules
    heavy = [m for m in modules if m.split(".")[0] in NOT_IMPORTED or m in NOT_IMPORTED]
    assert heavy == [], f"the filter imports {heavy}"
    assert {m for m in modules if m.startswith("fmhub_plugins")} <= PLUGINS_IMPORTED
    assert len(modules) <= MAX_MODULES, f"{len(modules)} modules imported"
    best = min(total for _, total in runs)
    assert best < BUDGET_S, f"imports took {best:.3f} s at best (budget {BUDGET_S} s)"


def test_python_m_fmhub_filter_process_skips_the_cli(repo):
    """A command written by an older `fmhub install` (`python -m fmhub filter-process`) goes around typer too."""
    command = shlex.join([sys.executable, "-X", "importtime", "-m", "fmhub", "filter-process"])
    modules, _ = imports_of(add_with_importtime(repo, command, 0))
    assert not {"typer", "rich", "click", "fmhub.cli"} & set(modules)


def test_git_invoked_commands_skip_the_cli(repo):
    (repo / "m.safetensors").write_bytes(tiny_checkpoint(1))
    git(repo, "add", "m.safetensors")
    git(repo, "commit", "-qm", "m")
    python, flag, boot, _ = launcher(filter_command(repo))
    proc = run([python, "-X", "importtime", flag, boot, "textconv", "m.safetensors"], repo)
    assert b'tensor "w" F32 [2]' in proc.stdout
    modules, _ = imports_of(proc.stderr)
    assert not {"typer", "rich", "click", "fmhub.cli"} & set(modules)


def test_malformed_git_commands_still_get_the_cli_usage(tmp_path):
    proc = run([*FMHUB, "textconv"], tmp_path, check=False)
    assert proc.returncode == 2 and b"Usage" in proc.stderr
    assert b"Usage" in run([*FMHUB, "filter-clean", "--help"], tmp_path).stdout


# -- the bootstrap ----------------------------------------------------------------------------


def test_install_writes_the_bootstrap_for_every_driver(repo):
    """Each command is the bootstrap behind a guard that the Python and boot.py are still there (tests/git/test_footguns.py)."""
    from fmhub.git.install import guarded

    prefix = guarded(sys.executable, "-S", str(BOOT))
    for key, sub in (("filter.fmhub.process", "filter-process"), ("filter.fmhub.clean", "filter-clean %f"),
                     ("diff.fmhub.command", "diff-driver"), ("diff.fmhub.textconv", "textconv"),
                     ("merge.fmhub.driver", "merge-driver %O %A %B %P")):
        value = git(repo, "config", key).stdout.decode().strip()
        assert value == f"{prefix} {sub}"
        words = shlex.split(value)
        assert words[:2] == ["sh", "-c"] and words[3:6] == [sys.executable, "-S", str(BOOT)]
    assert f"{prefix} pre-push" in (repo / ".git" / "hooks" / "pre-push").read_text()
    assert f"{prefix} pre-commit" in (repo / ".git" / "hooks" / "pre-commit").read_text()


def test_add_and_checkout_through_the_bootstrap(repo):
    data = tiny_checkpoint(7)
    (repo / "m.safetensors").write_bytes(data)
    git(repo, "add", "m.safetensors")
    git(repo, "commit", "-qm", "m")
    assert git(repo, "show", "HEAD:m.safetensors").stdout.startswith(b"fmhub manifest")
    (repo / "m.safetensors").unlink()
    git(repo, "checkout", "--", "m.safetensors")
    assert (repo / "m.safetensors").read_bytes() == data
    assert git(repo, "status", "--porcelain").stdout == b""
    entries = [json.loads(line) for line in (repo / ".git" / "fmhub" / "audit.log").read_text().splitlines()]
    assert {("clean", "m.safetensors"), ("smudge", "m.safetensors")} <= {(e["what"], e["target"]) for e in entries}


def make_venv(path: Path, system_site: bool = True) -> tuple[Path, Path]:
    """A virtual environment without pip (seeing this one's packages when ``system_site``): (its python, its site-packages)."""
    args = [sys.executable, "-m", "venv", "--without-pip", str(path)] + (["--system-site-packages"] if system_site else [])
    subprocess.run(args, check=True, capture_output=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True)
    return python, Path(site.stdout.strip())


def boot_paths(python: Path | str) -> list[str]:
    """sys.path as the bootstrap sets it up (without site) in ``python``."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("fmhub_boot", {str(BOOT)!r})
        boot = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(boot)
        boot.add_site_paths()
        print(json.dumps(sys.path))
    """)
    return json.loads(subprocess.run([str(python), "-S", "-c", code], capture_output=True, text=True, check=True).stdout)


def site_paths(python: Path | str) -> list[str]:
    out = subprocess.run([str(python), "-c", "import json, sys; print(json.dumps(sys.path))"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def in_order_within(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(p in it for p in part)


@pytest.mark.parametrize("where", ["this", "venv", "venv-isolated"])
def test_bootstrap_paths_are_sites_in_sites_order(where, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    python: Path | str = sys.executable
    if where != "this":
        python, _ = make_venv(tmp_path / "venv", system_site=where == "venv")
    booted, full = [p for p in boot_paths(python) if p], [p for p in site_paths(python) if p]
    assert in_order_within(booted, full), (booted, full)
    import site
    import sysconfig

    # a venv made by this Python sees the *base* installation's site-packages as its system site: when the tests
    # themselves run in a virtual environment, that is not this Python's own site-packages
    base_site = sysconfig.get_path("purelib", vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    ours = site.getsitepackages()[0] if where == "this" else base_site
    assert (ours in booted) == (where != "venv-isolated")
    if where != "this":
        assert str(tmp_path / "venv") in "".join(booted)


PTH_PLUGIN = textwrap.dedent(
    '''
    """An access policy that only an import hook in a .pth file makes importable."""
    from fmhub import hookimpl
    from fmhub.plugin.interfaces import Decision


    class DenyMarked:
        name = "deny-marked"

        def check(self, request):
            if request.action == "write" and (request.path or "").endswith(".deny.safetensors"):
                return Decision(False, "the hooked plugin refuses marked files")
            return None


    @hookimpl
    def fmhub_access_policies():
        return [DenyMarked()]
    '''
)


def install_dist(site: Path, name: str, entry_points: str) -> None:
    dist = site / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)


def venv_repo(tmp_path: Path, python: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    run([str(python), "-m", "fmhub", "install"], path)
    run([str(python), "-m", "fmhub", "track", "*.safetensors"], path)
    return path


def test_plugin_behind_a_pth_import_hook_loads_in_the_filter(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    python, site = make_venv(tmp_path / "venv")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "fmhub_hooked_plugin.py").write_text(PTH_PLUGIN)
    install_dist(site, "fmhub_hooked_plugin", "[fmhub]\nhooked = fmhub_hooked_plugin\n")
    (site / "fmhub_hooked_plugin.pth").write_text(f"import sys; sys.path.append({str(hidden)!r})\n")
    assert str(hidden) not in boot_paths(python)  # only site's full start-up can import it

    path = venv_repo(tmp_path, python)
    assert f"{python} -S " in filter_command(path)
    (path / "ok.safetensors").write_bytes(tiny_checkpoint(1))
    git(path, "add", "ok.safetensors")
    (path / "m.deny.safetensors").write_bytes(tiny_checkpoint(2))
    proc = git(path, "add", "m.deny.safetensors", check=False)
    assert proc.returncode != 0
    assert b"the hooked plugin refuses marked files" in proc.stderr
    assert b"Traceback" not in proc.stderr


EDITABLE_FINDER = """\
import sys
from importlib.machinery import PathFinder

MAPPING: dict[str, str] = {{'fmhub_editable_dep': {where!r}}}


class _Finder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in MAPPING:
            return PathFinder.find_spec(fullname, [MAPPING[fullname].rpartition('/')[0]])


def install():
    sys.meta_path.append(_Finder)
"""


def test_a_module_of_an_editable_install_runs_site_on_demand(tmp_path, monkeypatch):
    """A dependency installed with `pip install -e` is found through its .pth finder; other misses cost nothing."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    python, site = make_venv(tmp_path / "venv")
    dep = tmp_path / "src" / "fmhub_editable_dep"
    dep.mkdir(parents=True)
    (dep / "__init__.py").write_text("VALUE = 42\n")
    (site / "__editable___dep_0_1_finder.py").write_text(EDITABLE_FINDER.format(where=str(dep)))
    (site / "__editable__.dep-0.1.pth").write_text("import __editable___dep_0_1_finder; __editable___dep_0_1_finder.install()\n")
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("fmhub_boot", {str(BOOT)!r})
        boot = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(boot)
        sys.meta_path.append(boot.SiteOnDemand(boot.add_site_paths(), set()))
        import site
        try:
            import fmhub_no_such_module
        except ModuleNotFoundError:
            print("missing", site.ENABLE_USER_SITE)
        import fmhub_editable_dep
        print("found", fmhub_editable_dep.VALUE, site.ENABLE_USER_SITE is not None)
    """)
    out = subprocess.run([str(python), "-S", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["missing None", "found 42 True"]


def test_filter_of_a_non_editable_install(tmp_path, monkeypatch):
    """fmhub installed as a wheel installs it: fmhub_filters and fmhub_plugins next to fmhub in site-packages."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    python, site = make_venv(tmp_path / "venv")
    src = Path(fmhub.__file__).parent.parent
    ignore = shutil.ignore_patterns("__pycache__")
    for name, from_dir in (("fmhub", "fmhub"), ("fmhub_filters", "filters"), ("fmhub_plugins", "plugins")):
        shutil.copytree(src / from_dir, site / name, ignore=ignore)
    eps = importlib.metadata.distribution("fmhub").read_text("entry_points.txt")
    install_dist(site, "fmhub", eps)
    mark = tmp_path / "imported-from"
    with open(site / "fmhub" / "__init__.py", "a") as f:  # say where the filter imports fmhub from
        f.write("\nimport os as _os\nif _os.environ.get('FMHUB_TEST_MARK'):\n    open(_os.environ['FMHUB_TEST_MARK'], 'a').write(__file__ + '\\n')\n")

    path = venv_repo(tmp_path, python)
    assert launcher(filter_command(path))[2] == str(site / "fmhub" / "boot.py")
    data = tiny_checkpoint(3)
    (path / "m.safetensors").write_bytes(data)
    monkeypatch.setenv("FMHUB_TEST_MARK", str(mark))
    git(path, "add", "m.safetensors")
    git(path, "commit", "-qm", "m")
    (path / "m.safetensors").unlink()
    git(path, "checkout", "--", "m.safetensors")
    assert (path / "m.safetensors").read_bytes() == data
    assert set(mark.read_text().split()) == {str(site / "fmhub" / "__init__.py")}


# -- lazy plugins -----------------------------------------------------------------------------


def builtin_hooks() -> dict[str, frozenset[str]]:
    out = {}
    for ep in host.discover():
        if ep.module.startswith("fmhub_plugins."):
            module = importlib.import_module(ep.module)
            out[ep.module] = frozenset(n for n in dir(module) if hasattr(getattr(module, n), "fmhub_impl"))
    return out


def test_builtin_hooks_table_matches_the_plugins():
    assert builtin_hooks() == host.BUILTIN_HOOKS


def test_discovery_matches_importlib_metadata(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_dist(site, "fmhub_extra", "[console_scripts]\nx = y\n\n[fmhub]\nextra = fmhub_extra_mod\nmerge-basic = shadowed\n")
    path = [str(site), *sys.path]
    want: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=path):
        for ep in dist.entry_points:
            if ep.group == "fmhub":
                want.setdefault(ep.name, ep.value)  # pluggy registers the first of a name
    assert [(ep.name, ep.value) for ep in host.discover(path)] == list(want.items())
    assert ("extra", "fmhub_extra_mod") in want.items()


def test_a_kind_imports_only_its_plugins():
    code = textwrap.dedent("""
        import sys
        from fmhub.governance import access
        from fmhub.plugin import host
        host.registry("format")
        access.policies()
        print(" ".join(sorted(m for m in sys.modules if m.startswith("fmhub_plugins."))))
        print(" ".join(m for m in ("numpy", "pydantic", "yaml", "importlib.metadata") if m in sys.modules))
    """)
    plugins, heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[:2]
    assert plugins.split() == ["fmhub_plugins.policy_roles", "fmhub_plugins.safetensors_format"]
    assert heavy == ""


THIRD_PARTY = {
    "tp_formats": '''
from fmhub import hookimpl
class F:
    name = "tp-format"
    def sniff(self, head): return False
class M:
    name = "tp-merge-a"
@hookimpl
def fmhub_checkpoint_formats(): return [F()]
@hookimpl
def fmhub_merge_strategies(): return [M()]
''',
    "tp_merge": '''
from fmhub import hookimpl
class M:
    name = "tp-merge-b"
@hookimpl
def fmhub_merge_strategies(): return [M()]
''',
    "tp_broken": "import fmhub_no_such_module\n",
}


@pytest.fixture
def third_party_modules(tmp_path, monkeypatch):
    for name, text in THIRD_PARTY.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in THIRD_PARTY:
        sys.modules.pop(name, None)


def entry_points(*specs: tuple[str, str]) -> list[host.EntryPoint]:
    return [host.EntryPoint(name, value, f"/nowhere/{name}-0.1.dist-info") for name, value in specs]


def test_lazy_loads_keep_the_eager_order(third_party_modules):
    eps = entry_points(("merge-basic", "fmhub_plugins.merge_basic"), ("tp-formats", "tp_formats"),
                       ("safetensors", "fmhub_plugins.safetensors_format"), ("tp-merge", "tp_merge"),
                       ("merge-linear", "fmhub_plugins.merge_linear"))
    eager = host.PluginManager(eps)
    eager.load_all()
    lazy = host.PluginManager(eps)
    assert set(host.registry("format", lazy)) == {"tp-format", "safetensors"}
    assert "merge-basic" not in dict(lazy.list_name_plugin())  # built-ins of other kinds wait
    # merge-basic comes first in entry-point order, though it is loaded after the third-party plugins
    assert list(host.registry("merge-strategy", lazy))[-3:] == list(host.registry("merge-strategy", eager))[-3:]
    assert [(p.kind, p.name, p.plugin) for p in host.provided(lazy)] == [(p.kind, p.name, p.plugin) for p in host.provided(eager)]
    assert [n for n, _ in lazy.list_name_plugin()] == [n for n, _ in eager.list_name_plugin()]


def test_a_plugin_registered_by_hand_stays_last(third_party_modules):
    messages = []
    for lazy in (False, True):
        pm = host.new_plugin_manager(lazy=lazy)
        pm.register(second_ours_plugin(), name="dup")
        with pytest.raises(PluginError, match="two plugins provide the merge-strategy 'ours'") as exc:
            host.lookup("merge-strategy", "ours", pm)
        messages.append(str(exc.value))
    assert messages[0] == messages[1]  # hooks called in the same order: the one registered by hand first


def test_a_broken_plugin_is_one_line_and_fails_every_time_in_the_filter(third_party_modules, monkeypatch):
    monkeypatch.setattr(checks, "STRICT", True)  # what git's filter sets (host.set_strict)
    pm = host.PluginManager(entry_points(("safetensors", "fmhub_plugins.safetensors_format"), ("tp-broken", "tp_broken")))
    for _ in range(2):  # not loaded the first time, not forgotten the second: a broken format must not vanish
        with pytest.raises(PluginError, match=r"cannot load plugin 'tp-broken' \(tp_broken, from tp-broken-0.1\): "
                                              r"ModuleNotFoundError: .*fmhub_no_such_module.*; fix or uninstall"):
            host.registry("format", pm)


def test_a_broken_plugin_is_skipped_with_one_warning_outside_the_filter(third_party_modules, capsys, monkeypatch):
    monkeypatch.setattr(checks, "_warned", set())
    monkeypatch.delenv("_FMHUB_PLUGINS_WARNED", raising=False)
    pm = host.PluginManager(entry_points(("safetensors", "fmhub_plugins.safetensors_format"), ("tp-broken", "tp_broken")))
    for _ in range(2):
        assert list(host.registry("format", pm)) == ["safetensors"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fmhub: warning: cannot load plugin 'tp-broken' (tp_broken, from tp-broken-0.1)")
    with pytest.raises(PluginError, match="cannot load plugin 'tp-broken'"):  # it may be a policy: access fails closed
        host.registry("access-policy", pm)


def test_policy_file_name_matches_the_parser():
    from fmhub.governance.policy import POLICY_FILE
    from fmhub_plugins import policy_roles

    assert policy_roles.POLICY_FILE == POLICY_FILE


# -- git config read once ---------------------------------------------------------------------

CONFIG = """\
[fmhub]
\tdeltas
\tmulti = a
\tmulti = b
\tTolerance = 1e-3
\tbad = maybe
\tnum = 2k
\tzero = 0
\tempty =
[Fmhub "LowRank"]
\tStrict = yes
[remote "origin"]
\turl = /x/y
"""

READS = [
    ("--get", "fmhub.deltas"), ("--type=bool", "--get", "fmhub.deltas"), ("--get", "fmhub.multi"),
    ("--get", "FMHUB.TOLERANCE"), ("--type=bool", "--get", "fmhub.bad"), ("--type=bool", "--get", "fmhub.num"),
    ("--type=bool", "--get", "fmhub.zero"), ("--type=bool", "--get", "fmhub.empty"), ("--get", "fmhub.empty"),
    ("--get", "fmhub.LowRank.strict"), ("--get", "fmhub.lowrank.strict"), ("--type=bool", "--get", "fmhub.LowRank.STRICT"),
    ("--get", "fmhub.nope"), ("--get-regexp", r"^fmhub\..*"), ("fmhub.multi",), ("--get-regexp", r"^remote\..*\.url$"),
]


@pytest.fixture
def cached_git_state(monkeypatch):
    """`fmhub.core.repo.cache_git_state` for one test, undone after it."""
    monkeypatch.setattr(fmrepo, "_snapshots", None)
    monkeypatch.setattr(fmrepo, "_common_dirs", None)
    monkeypatch.setattr(fmrepo, "_index_files", {})
    monkeypatch.setattr(fmrepo, "_index_readers", {})
    yield fmrepo.cache_git_state
    for reader in fmrepo._index_readers.values():
        reader.close()


def test_config_reads_from_one_listing_answer_as_git_does(tmp_path, cached_git_state):
    git(tmp_path, "init", "-q")
    with open(tmp_path / ".git" / "config", "a") as f:
        f.write(CONFIG)
    cwd = str(tmp_path)

    def answers() -> list:
        out = []
        for args in READS:
            try:
                out.append(fmrepo.git("config", *args, cwd=cwd))
            except FmhubError:
                out.append("error")
        return out

    want = answers()
    cached_git_state()
    assert answers() == want
    assert fmrepo.config_values(r"^fmhub\.(multi|zero)$", cwd) == {"fmhub.multi": "b", "fmhub.zero": "0"}


def test_cached_config_lists_once_and_rereads_after_a_write(tmp_path, cached_git_state, monkeypatch):
    git(tmp_path, "init", "-q")
    cwd = str(tmp_path)
    cached_git_state()
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args) or real_run(args, **kw))
    assert fmrepo.common_dir(cwd) == fmrepo.common_dir(cwd) == str(tmp_path / ".git")
    assert fmrepo.git("config", "--get", "fmhub.x", cwd=cwd, check=False) == ""
    assert fmrepo.store_dir(str(tmp_path / ".git")) == str(tmp_path / ".git" / "lfs")  # the same listing, from .git
    fmrepo.git("config", "fmhub.x", "1", cwd=cwd)
    assert fmrepo.git("config", "--get", "fmhub.x", cwd=cwd) == "1\n"
    assert [c[1:3] for c in calls] == [["rev-parse", "--git-common-dir"], ["config", "--list"], ["config", "fmhub.x"], ["config", "--list"]]


def test_staged_blobs_come_from_one_cat_file_that_follows_the_index(tmp_path, cached_git_state, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "a").write_bytes(b"one")
    (tmp_path / "big").write_bytes(b"x" * 100)
    git(tmp_path, "add", "a", "big")
    cwd = str(tmp_path)
    cached_git_state()
    from fmhub.base import prefetch

    spawned = []
    real_popen, real_child = subprocess.Popen.__init__, prefetch.Child.__init__
    monkeypatch.setattr(subprocess.Popen, "__init__", lambda self, args, **kw: spawned.append(args[1:3]) or real_popen(self, args, **kw))
    monkeypatch.setattr(prefetch.Child, "__init__", lambda self, args, cwd=None: spawned.append(list(args[:2])) or real_child(self, args, cwd))
    assert fmrepo.staged_blob("a", 10, cwd) == b"one"
    assert fmrepo.staged_blob("missing", 10, cwd) is None
    assert fmrepo.staged_blob("a b", 10, cwd) is None
    assert fmrepo.staged_blob("a", 10, cwd) == b"one"
    assert spawned == [["rev-parse", "--git-common-dir"], ["cat-file", "--batch-command"]]
    (tmp_path / "a").write_bytes(b"two!")
    git(tmp_path, "add", "a")  # a new index: the reader starts again and sees it
    assert fmrepo.staged_blob("a", 10, cwd) == b"two!"
    assert fmrepo.staged_blob("big", 10, cwd) is None  # over the limit: not read
    assert fmrepo.staged_blob("big", None, cwd) == b"x" * 100
    assert fmrepo.staged_blob("a", 10, cwd) == b"two!"
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / ".git" / "other-index"))
    monkeypatch.setattr(fmrepo, "_common_dirs", {})
    monkeypatch.setattr(fmrepo, "_index_readers", {})
    assert fmrepo.staged_blob("a", 10, cwd) is None


def test_staged_blob_without_batch_command(tmp_path, cached_git_state, monkeypatch):
    """git before 2.36 has no `cat-file --batch-command`: one `git cat-file` per question, as before."""
    git(tmp_path, "init", "-q")
    (tmp_path / "a").write_bytes(b"one")
    git(tmp_path, "add", "a")
    fake = tmp_path / "bin"
    fake.mkdir()
    real = shutil.which("git")
    (fake / "git").write_text(f'#!/bin/sh\nfor a; do [ "$a" = --batch-command ] && exit 129; done\nexec {real} "$@"\n')
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    cached_git_state()
    assert fmrepo.staged_blob("a", 10, str(tmp_path)) == b"one"
    assert fmrepo.staged_blob("a", 10, str(tmp_path)) == b"one"
    assert not fmrepo._index_readers[str(tmp_path)].works


# -- pkt-lines --------------------------------------------------------------------------------


def test_pkt_lines_round_trip_and_fail_clearly():
    from fmhub_filters.pktio import Hangup, PktLine, PktLineError, PktReader, PktWriter

    out = io.BytesIO()
    proto = PktLine(io.BytesIO().read, out.write)
    proto.write_pkt_line(b"command=clean\n")
    proto.write_pkt_line(None)
    PktWriter(proto).write(b"x" * 70000)
    proto.write_pkt_line(None)
    assert out.getvalue()[:22] == b"0012command=clean\n0000"
    back = PktLine(io.BytesIO(out.getvalue()).read, io.BytesIO().write)
    assert list(back.read_pkt_seq()) == [b"command=clean\n"]
    assert PktReader(back).read_upto(1 << 20) == b"x" * 70000
    with pytest.raises(Hangup):
        back.read_pkt_line()
    for bad in (b"00zzabc", b"0003", b"0010abc", b"00"):
        with pytest.raises(PktLineError):
            PktLine(io.BytesIO(bad).read, io.BytesIO().write).read_pkt_line()


def test_pkt_writer_writes_payloads_with_writev(tmp_path):
    from fmhub_filters.pktio import PktLine, PktWriter

    with open(tmp_path / "out", "wb") as f:
        proto = PktLine(io.BytesIO().read, f.write)
        proto.write_pkt_line(b"status=success\n")
        PktWriter(proto, f).write(memoryview(b"y" * 65517))
        proto.write_pkt_line(None)
    data = (tmp_path / "out").read_bytes()
    assert data == b"0013status=success\n" + b"fff0" + b"y" * 65516 + b"0005y" + b"0000"


def test_audit_time_keeps_its_format():
    from datetime import datetime, timezone

    from fmhub.governance import audit

    now = audit.now_text()
    parsed = datetime.strptime(now, audit.TIME_FORMAT).replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 5


def test_built_ins_called_directly_give_what_pluggy_gives():
    """Without a third-party plugin, `provided` calls the built-in hooks itself (git's filter then needs no pluggy);
    the objects, their names, plugins and order are the ones pluggy's calls give."""
    direct = host._built_in_only(list(host.KINDS))
    assert direct is not None
    pm = host.new_plugin_manager()
    via_pluggy = host.provided(pm)
    assert [(p.kind, p.name, p.plugin) for p in direct] == [(p.kind, p.name, p.plugin) for p in via_pluggy]
    assert [type(p.obj) for p in direct] == [type(p.obj) for p in via_pluggy]


def test_a_third_party_plugin_turns_the_direct_path_off(monkeypatch):
    """A plugin fmhub does not ship may implement any hook, with pluggy's options: then pluggy calls them all."""
    eps = host._discovered() + [host.EntryPoint("tp", "tp_format_plugin", "/nowhere/tp-0.1.dist-info")]
    monkeypatch.setattr(host, "_discovered", lambda: eps)
    assert host._built_in_only(["fmhub_checkpoint_formats"]) is None


def test_prefetched_answers_are_taken_once_and_only_where_they_were_asked(tmp_path, monkeypatch):
    """git's filter asks git its first questions as it starts (`fmhub.base.prefetch`): an answer serves one question,
    from the directory it was asked in; anything else asks git again."""
    from fmhub.base import prefetch

    git(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)
    prefetch.start(("rev-parse", "--git-dir"), ("config", "--get", "nosuch.key"))
    assert prefetch.take("rev-parse", "--git-dir", cwd=str(tmp_path / "elsewhere")) is None  # asked here, not there
    assert prefetch.take("rev-parse", "--git-dir") == (0, b".git\n")
    assert prefetch.take("rev-parse", "--git-dir") is None  # taken already
    assert prefetch.take("config", "--get", "nosuch.key") == (1, b"")
    prefetch.start_child("cat-file", "--batch-command")
    child = prefetch.take_child("cat-file", "--batch-command")
    child.stdin.write(b"info HEAD\n")
    child.stdin.flush()
    assert child.stdout.readline().endswith(b"missing\n")  # an empty repository: no HEAD yet
    child.kill()
    assert child.wait() != 0
