"""The layer graph of fmhub's packages: ``python -m fmhub.tools.layers [--json]``.

Every module of ``fmhub``, ``fmhub_filters`` and ``fmhub_plugins`` belongs to
one layer (`LAYERS`, lowest first). A module may import modules of its own
layer and of lower ones, never of a higher one, and no module may be part of
an import cycle. Imports made inside functions count as much as those at the
top of a file (they only run later); imports under ``if TYPE_CHECKING:`` do
not (they never run), unless the module sets ``TYPE_CHECKING`` to anything
but False. ``importlib.import_module`` and ``__import__`` of a literal name
count as imports; a name computed at run time cannot be seen (the plugin
host's entry points, the CLI's table of command modules). The check reads the source with `ast`: it imports
nothing, so it also runs on a tree that does not import.

Prints each layer with the layers it imports, then every upward edge and
every cycle; exits 1 when there is one.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass, field

# lowest first; a package's subpackages belong to it (fmhub.data.clean is in "data")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("root", ("fmhub",)),  # fmhub/__init__.py: the version and the hookimpl marker, importing nothing
    ("base", ("fmhub.base",)),
    ("project", ("fmhub.project",)),
    ("plugin", ("fmhub.plugin",)),
    ("core", ("fmhub.core",)),
    ("governance", ("fmhub.governance",)),
    ("git", ("fmhub.git",)),
    ("server", ("fmhub.server",)),
    ("data", ("fmhub.data",)),
    ("models", ("fmhub.models",)),
    ("serving", ("fmhub.serving",)),
    ("ml", ("fmhub.ml",)),
    ("run", ("fmhub.run",)),
    ("api", ("fmhub.api",)),
    ("extensions", ("fmhub_plugins", "fmhub_filters")),
    ("cli", ("fmhub.cli",)),
    ("entry", ("fmhub.__main__", "fmhub.boot")),
    ("tools", ("fmhub.tools",)),
]
# where an editable checkout keeps each top-level package (pyproject.toml's package-dir)
SOURCE_DIRS = {"fmhub": "fmhub", "fmhub_filters": "filters", "fmhub_plugins": "plugins"}


def layer_of(module: str) -> int:
    """The index in `LAYERS` of the longest prefix naming ``module``'s package."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best < 0:
        raise ValueError(f"{module}: in no layer of fmhub.tools.layers.LAYERS")
    return best


def find_modules(root: str) -> dict[str, str]:
    """Module name -> file, for every ``.py`` file of the three packages under the checkout ``root``."""
    found: dict[str, str] = {}
    for package, directory in SOURCE_DIRS.items():
        base = os.path.join(root, directory)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, base)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    stem = name[:-3]
                    found[".".join(parts if stem == "__init__" else parts + [stem])] = os.path.join(dirpath, name)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dynamic_import(node: ast.Call) -> ast.Import | None:
    """``importlib.import_module("a.b")`` or ``__import__("a.b")`` with a literal name, as the import it makes."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return ast.Import(names=[ast.alias(name=node.args[0].value)], lineno=node.lineno)
    return None


def _truthy_type_checking(tree: ast.AST) -> bool:
    """Whether the module sets ``TYPE_CHECKING`` to anything but False (its ``if TYPE_CHECKING:`` bodies then run)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" for t in node.targets):
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                return True
    return False


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom of the tree (and import_module / __import__ of a literal name), outside
    ``if TYPE_CHECKING:`` bodies."""
    skip_type_checking = not _truthy_type_checking(tree)
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call) and (dynamic := _dynamic_import(node)) is not None:
            yield dynamic
        children = list(ast.iter_child_nodes(node))
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)


def imports_of(module: str, path: str, known: dict[str, str]) -> dict[str, int]:
    """The known modules ``module`` imports -> the first line importing each."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_pkg = os.path.basename(path) == "__init__.py"
    out: dict[str, int] = {}
    for node in _import_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a non-module attribute: its package
                t = t.rpartition(".")[0]
            if t and t != module:
                out.setdefault(t, node.lineno)
    return out


@dataclass
class Report:
    edges: dict[str, dict[str, int]]  # module -> imported module -> line
    upward: list[tuple[str, str, int]] = field(default_factory=list)  # (module, imported, line)
    cycles: list[list[str]] = field(default_factory=list)
    layer_edges: dict[str, set[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.upward and not self.cycles


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, {})))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def check(root: str) -> Report:
    """The import graph of the checkout at ``root``, its upward edges and its cycles."""
    known = find_modules(root)
    edges = {m: imports_of(m, p, known) for m, p in known.items()}
    report = Report(edges, layer_edges={name: set() for name, _ in LAYERS})
    for m, targets in sorted(edges.items()):
        lm = layer_of(m)
        for t, line in sorted(targets.items()):
            lt = layer_of(t)
            if lt > lm:
                report.upward.append((m, t, line))
            elif lt < lm:
                report.layer_edges[LAYERS[lm][0]].add(LAYERS[lt][0])
    report.cycles = _cycles(edges)
    return report


def render(report: Report) -> str:
    lines = ["layers, lowest first (each imports only those listed):"]
    for name, _ in LAYERS:
        below = sorted(report.layer_edges[name], key=lambda n: [x for x, _ in LAYERS].index(n))
        lines.append(f"  {name:<11} -> {', '.join(below) or '-'}")
    for m, t, line in report.upward:
        lines.append(f"upward: {m} (line {line}) imports {t} ({LAYERS[layer_of(m)][0]} -> {LAYERS[layer_of(t)][0]})")
    for cycle in report.cycles:
        lines.append(f"cycle: {' <-> '.join(cycle)}")
    lines.append("ok: no upward edge, no cycle" if report.ok else
                 f"{len(report.upward)} upward edge(s), {len(report.cycles)} cycle(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    report = check(root)
    if "--json" in argv:
        print(json.dumps({"layers": [n for n, _ in LAYERS],
                          "imports": {k: sorted(v) for k, v in report.layer_edges.items()},
                          "upward": [list(u) for u in report.upward], "cycles": report.cycles}, indent=1))
    else:
        print(render(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
