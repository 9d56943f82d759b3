"""What ``fmhub plugins`` shows: every plugin, what each provides, and what is wrong (`describe`).

Kept out of `fmhub.plugin.host`, which git's filter imports: nothing here runs on a clean or smudge.
"""

from __future__ import annotations

from collections import namedtuple
from typing import TYPE_CHECKING, Any

from fmhub.plugin import checks, host
from fmhub.plugin.checks import Registry

if TYPE_CHECKING:
    import pluggy

    from fmhub.plugin.host import EntryPoint


class PluginInfo(namedtuple("PluginInfo", "name package version value builtin status problem")):
    """One plugin: its entry-point name, distribution (name, version), ``module[:attr]``, whether fmhub ships it,
    its ``status`` (``loaded``, ``disabled``, ``failed``, ``shadowed``: another entry point of its name came first,
    ``registered``: by hand, without an entry point) and, unless loaded, why (one line)."""

    __slots__ = ()


class Item(namedtuple("Item", "kind name plugin package problem")):
    """One object a plugin provides; ``problem`` is empty, or one line: a clash, or a break of its Protocol."""

    __slots__ = ()


class Clash(namedtuple("Clash", "kind name plugins")):
    """A name of one kind that several plugins provide (entry-point names, in hook-call order); using it is refused."""

    __slots__ = ()


class Description(namedtuple("Description", "plugins provided clashes disabled problems")):
    """What `describe` finds: `PluginInfo`s, `Item`s, `Clash`es, the names ``FMHUB_DISABLE_PLUGINS`` gives,
    and one line per problem (a plugin that fails to load, an object without a name)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``fmhub plugins --json``."""
        return {"plugins": [p._asdict() for p in self.plugins], "provided": [i._asdict() for i in self.provided],
                "clashes": [c._asdict() | {"plugins": list(c.plugins)} for c in self.clashes],
                "disabled": list(self.disabled), "problems": list(self.problems)}


def describe(pm: pluggy.PluginManager | None = None) -> Description:
    """Every installed plugin (all loaded), what each provides, clashes, disabled plugins and failures, for
    ``fmhub plugins``. Warns about nothing and raises nothing (but for an invalid ``FMHUB_DISABLE_PLUGINS``): it reports."""
    pm = pm or host._shared()
    if isinstance(pm, host._manager_class()):
        pm.load_all()
    failures = dict(getattr(pm, "failures", {}))
    blocked = host.disabled()
    plugins: list[PluginInfo] = []
    packages: dict[str, str] = {}
    first: dict[str, EntryPoint] = {}
    for ep in host.discover_all() if pm is host._shared() else list(getattr(pm, "_entry_points", [])):
        package, version = ep.project()
        winner = first.get(ep.name)
        if winner is not None and (winner.value, winner.project()[0]) != (ep.value, package):  # not a second copy of one package
            plugins.append(PluginInfo(ep.name, package, version, ep.value, ep.module in host.BUILTIN_HOOKS, "shadowed",
                                      f"the entry point {ep.name!r} of {winner.dist_label} comes first on sys.path"))
            continue
        if ep.name in first:
            continue
        first[ep.name] = ep
        packages[ep.name] = package
        if ep.name in blocked:
            status, problem = "disabled", f"named in {host.DISABLE_ENV}"
        elif ep.name in failures:
            status, problem = "failed", failures[ep.name].message
        else:
            status, problem = "loaded", ""
        plugins.append(PluginInfo(ep.name, package, version, ep.value, ep.module in host.BUILTIN_HOOKS, status, problem))
    for name, plugin in pm.list_name_plugin():
        if plugin is not None and name not in first:
            plugins.append(PluginInfo(name, "", "", "", False, "registered", ""))
    items, bad = host._collect(pm, list(host.KINDS))
    clashes: list[Clash] = []
    provided: list[Item] = []
    for kind in dict.fromkeys(host.KINDS.values()):
        reg = Registry(kind, [p for p in items if p.kind == kind])
        clashing = reg.clashes()
        clashes += [Clash(kind, name, tuple(p.plugin for p in found)) for name, found in clashing.items()]
        for p in (p for p in items if p.kind == kind):
            if p.name in clashing:
                problem = f"clash: also provided by {', '.join(q.plugin for q in clashing[p.name] if q is not p)}"
            else:
                found = checks.problem(p.obj, kind)
                problem = f"unusable: {found[0]} (see fmhub.plugin.interfaces.{found[1]})" if found else ""
            provided.append(Item(kind, p.name, p.plugin, packages.get(p.plugin, ""), problem))
    problems = [f.message for f in failures.values()] + [f.message for f in bad]
    return Description(plugins, provided, clashes, blocked, problems)
