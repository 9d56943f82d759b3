"""Start fmhub for git without the ``site`` module: ``python -S .../fmhub/boot.py COMMAND [ARGS]``.

`fmhub install` writes this command into git's config. git starts the filter
once per ``git add``, ``git status``, ``git checkout``, and ``site`` alone
costs more than a small clean: it runs the code lines of every ``.pth`` file
(editable installs' import hooks, certificate patches, ...). Instead, this puts
on ``sys.path`` what ``site`` would from the site-packages directories (and
the directories their ``.pth`` files name), in ``site``'s order, and imports
fmhub's own packages from this installation (an editable install's source tree
keeps them in ``filters/`` and ``plugins/``, mapped as pyproject.toml maps them).

The code lines of ``.pth`` files are not run. When a plugin then fails to
import (`fmhub.plugin.host`), or a module that such a line would have provided is
imported (`SiteOnDemand`), ``site``'s full start-up runs after all (`fmhub.base.sitestart.full_site`)
and the import is tried again: a plugin reachable only through a hook still loads.
"""

# Only built-in modules until sys.path is mended: while this file runs as a script its directory
# (fmhub/) is sys.path[0], and fmhub/ml/selection.py would shadow the standard library's select.
import sys

if __name__ == "__main__" and not getattr(sys.flags, "safe_path", False):
    del sys.path[0]

import os  # noqa: E402

# pyproject.toml's [tool.setuptools.package-dir]: where an editable install's packages live
SOURCE_DIRS = {"fmhub": "fmhub", "fmhub_filters": "filters", "fmhub_plugins": "plugins"}


def site_dirs() -> list[str]:
    """The site-packages directories ``site`` would add, in its order: a virtual environment's, the user's,
    the installation's. In a virtual environment, sets ``sys.prefix`` to it, as ``site`` does."""
    import site

    prefixes = [sys.prefix, sys.exec_prefix]
    user = site.check_enableusersite()
    dirs: list[str] = []
    venv = _venv_config()
    if venv is not None:
        home, system = venv
        sys.prefix = sys.exec_prefix = home  # as site.venv() sets them
        dirs += site.getsitepackages([home])
        if not system:
            prefixes, user = [], False
    if user:
        dirs.append(site.getusersitepackages())
    dirs += site.getsitepackages(prefixes)
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _venv_config() -> tuple[str, bool] | None:
    """(the virtual environment's directory, whether it sees the system site-packages) from its pyvenv.cfg, as site.venv() reads it."""
    exe_dir = os.path.dirname(os.path.abspath(sys.executable))
    home = os.path.dirname(exe_dir)
    for conf in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(home, "pyvenv.cfg")):
        if os.path.isfile(conf):
            system = True
            with open(conf, encoding="utf-8") as f:
                for line in f:
                    key, eq, value = line.partition("=")
                    if eq and key.strip().lower() == "include-system-site-packages":
                        system = value.strip().lower() == "true"
            return home, system
    return None


def pth_lines(sitedir: str) -> tuple[list[str], list[str]]:
    """The directories the ``.pth`` files of ``sitedir`` name, in site's order, and their code lines (which are not run)."""
    try:
        names = sorted(n for n in os.listdir(sitedir) if n.endswith(".pth") and not n.startswith("."))
    except OSError:
        return [], []
    dirs, code = [], []
    for name in names:
        try:
            with open(os.path.join(sitedir, name), encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("#") or not line.strip():
                continue
            if line.startswith(("import ", "import\t")):
                code.append(line)
                continue
            path = os.path.abspath(os.path.join(sitedir, line.rstrip()))
            if os.path.exists(path):
                dirs.append(path)
    return dirs, code


def editable_finders(sitedir: str, code: list[str]) -> list[str]:
    """The files of setuptools' editable-install finders that skipped .pth code lines would have imported."""
    out = []
    for line in code:
        module = line.split(None, 2)[1].split(";")[0].strip() if len(line.split()) > 1 else ""
        if module.startswith("__editable__") and module.endswith("_finder"):
            out.append(os.path.join(sitedir, module + ".py"))
    return out


def editable_names(finders: list[str]) -> set[str]:
    """Top-level modules those finders provide (the keys of their ``MAPPING`` and ``NAMESPACES`` tables)."""
    import re

    names: set[str] = set()
    for path in finders:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        for table in re.findall(r"^(?:MAPPING|NAMESPACES)\b[^=]*=\s*(\{.*\})\s*$", text, re.M):
            names.update(n.partition(".")[0] for n in re.findall(r"'([\w.]+)'\s*:", table))
    return names


def add_site_paths() -> list[str]:
    """Append the site directories and their .pth directories to sys.path, as site does; returns `editable_finders`."""
    known = {os.path.normcase(os.path.abspath(p)) for p in sys.path if p}
    finders: list[str] = []
    for sitedir in site_dirs():
        extra, code = pth_lines(sitedir)
        finders += editable_finders(sitedir, code)
        for path in (sitedir, *extra):
            if os.path.normcase(path) not in known:
                known.add(os.path.normcase(path))
                sys.path.append(path)
    return finders


def own_packages(root: str) -> dict[str, str]:
    """fmhub's packages in the installation at ``root`` (site-packages, or an editable install's source tree)."""
    source_tree = os.path.isfile(os.path.join(root, "pyproject.toml"))
    out = {}
    for name, src in SOURCE_DIRS.items():
        for where in (os.path.join(root, name), os.path.join(root, src) if source_tree else None):
            if where and os.path.isfile(os.path.join(where, "__init__.py")):
                out[name] = where
                break
    return out


class OwnPackages:
    """Imports fmhub's packages from one installation (first on sys.meta_path, so this installation's)."""

    def __init__(self, packages: dict[str, str]) -> None:
        self.packages = packages

    def find_spec(self, fullname: str, path=None, target=None):
        where = self.packages.get(fullname)
        if where is None:
            return None
        try:  # importlib.util re-exports it, but importing that module costs more than this whole lookup
            from importlib._bootstrap_external import spec_from_file_location
        except ImportError:
            from importlib.util import spec_from_file_location

        return spec_from_file_location(fullname, os.path.join(where, "__init__.py"), submodule_search_locations=[where])


class SiteOnDemand:
    """Last on sys.meta_path: a module that a skipped editable-install finder provides runs site's full
    start-up, then is looked up again.

    Only for those modules: other imports that find nothing are routine (``subprocess``
    tries ``msvcrt``) and must not cost a full start-up. The finders' tables are read at
    the first such miss, when the modules that reads need are loaded anyway.
    """

    def __init__(self, finders: list[str], own: set[str]) -> None:
        self._finders = finders
        self._own = own
        self._names: set[str] | None = None

    def find_spec(self, fullname: str, path=None, target=None):
        if path is not None:
            return None
        if self._names is None:
            self._names = editable_names(self._finders) - self._own
        if fullname not in self._names:
            return None
        from fmhub.base.sitestart import full_site  # fmhub's own packages import without site: OwnPackages finds them

        if not full_site():
            return None
        for finder in list(sys.meta_path):
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    return spec
        return None


def defer_inspect() -> None:
    """Put off importing ``inspect`` until something uses it.

    ``dataclasses`` imports it (with ``ast``, ``dis``, ``tokenize``: about 16 ms
    here, as much as a whole git-lfs clean) but uses it only for a class that has
    no docstring; fmhub's have. The first attribute looked up on the stand-in
    imports the real module, so nothing behaves differently.
    """
    import types

    class Deferred(types.ModuleType):
        def __getattr__(self, name: str):
            import importlib

            if sys.modules.get("inspect") is self:
                del sys.modules["inspect"]
            real = importlib.import_module("inspect")
            self.__dict__.update(real.__dict__)  # later lookups on the stand-in find the real attributes
            return getattr(real, name)

    sys.modules.setdefault("inspect", Deferred("inspect"))


def main() -> None:
    defer_inspect()
    here = os.path.dirname(os.path.abspath(__file__))
    finders = add_site_paths()
    own = own_packages(os.path.dirname(here))
    sys.meta_path.insert(0, OwnPackages(own))
    if finders:
        sys.meta_path.append(SiteOnDemand(finders, set(own)))
    if sys.argv[1:2] == ["filter-process"]:
        from fmhub.base import prefetch  # git answers while the imports below run (the filter asks both first)

        prefetch.start(("rev-parse", "--git-common-dir", "--git-path", "index"), ("config", "--list", "-z"))
        prefetch.start_child("cat-file", "--batch-command")  # the staged manifests, clean's first question per file
    sys.argv[0] = "fmhub"  # for the CLI's usage lines, should a command go there
    from fmhub.__main__ import main as fmhub_main

    fmhub_main()


if __name__ == "__main__":
    main()
