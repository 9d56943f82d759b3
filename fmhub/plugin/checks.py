"""The plugin host's checks: hooks a plugin defines (pluggy's ``check_pending``), objects against their kind's
Protocol, and names two plugins provide (`Registry`).

Imported by `fmhub.plugin.host` in git's filter: nothing here imports ``typing``, pluggy or
`fmhub.plugin.interfaces` until a check runs (the filter's built-in plugins are never checked
at run time; tests/git/test_plugins.py checks them once).
"""

from __future__ import annotations

import os
import sys
from collections import namedtuple

from fmhub.base.errors import PluginError
from fmhub.plugin import hookspecs

TYPE_CHECKING = False  # annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Any, Iterable

    from fmhub.plugin.host import Provided


DISABLE_ENV = "FMHUB_DISABLE_PLUGINS"
_WARNED_ENV = "_FMHUB_PLUGINS_WARNED"  # warnings already given, so worker processes do not repeat them
ACCESS_HOOK = next(hook for hook, kind in hookspecs.KINDS.items() if kind == "access-policy")

STRICT = False
"""Whether a plugin that fails to load is an error for every ask (git's clean/smudge filter, `fmhub.plugin.host.set_strict`)."""


# -- plugins that fail ----------------------------------------------------------------------


class Failure(namedtuple("Failure", "plugin message hooks")):
    """A plugin (entry-point name) that failed to load, or an object of one that cannot be used.

    ``message`` is one line naming the plugin and its distribution; ``hooks`` the hooks the failure
    may take objects from (None: any, a third-party plugin that could not be imported).
    """

    __slots__ = ()

    def concerns(self, hooks: Iterable[str]) -> bool:
        return self.hooks is None or not self.hooks.isdisjoint(hooks)

    def error(self) -> PluginError:
        return PluginError(f"{self.message}; fix or uninstall that package, or set {DISABLE_ENV}={self.plugin} to run without it")


_warned: set[str] = set()


def _settle(failures: Iterable[Failure], hooks: Iterable[str], listing: bool = False) -> None:
    """Act on the failures that may concern ``hooks``: raise the first where that is the rule (`STRICT`, or
    access policies asked for to decide, not ``listing`` them), warn about the others."""
    hooks = set(hooks)
    for f in failures:
        if not f.concerns(hooks):
            continue
        if STRICT or (not listing and ACCESS_HOOK in hooks and f.concerns({ACCESS_HOOK})):
            raise f.error()
        _warn(f)


def _warn(f: Failure) -> None:
    """One line on stderr, once per process (and once for the worker processes it starts)."""
    given = set(filter(None, os.environ.get(_WARNED_ENV, "").split("\n")))
    if f.message in _warned or f.message in given:
        return
    _warned.add(f.message)
    os.environ[_WARNED_ENV] = "\n".join(sorted(given | {f.message}))
    try:
        sys.stderr.write(f"fmhub: warning: {f.message}; skipped it (fix or uninstall that package, or set {DISABLE_ENV}={f.plugin})\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


# -- hooks ----------------------------------------------------------------------------------


def check_hooks(pm: Any, plugin: Any, name: str) -> None:
    """Refuse a registered plugin with a hook no hookspec names, as pluggy's ``check_pending`` (and pytest) do:
    a function named ``fmhub_*`` that is not a hook (a typo), marked or not, or a hook not marked ``@hookimpl``
    (pluggy would ignore it). A hook marked ``optionalhook=True`` may name a hook this fmhub lacks.
    Raises `PluginError` with one line naming the plugin and the function.
    """
    import inspect

    for attr in dir(plugin):
        if not attr.startswith("fmhub_"):
            continue
        try:
            func = getattr(plugin, attr)
        except Exception:  # a property that raises: not a hook
            continue
        if not inspect.isroutine(func):
            continue
        opts = getattr(func, "fmhub_impl", None)
        hook = (opts or {}).get("specname") or attr
        if hook in hookspecs.HOOKS:
            if opts is None:
                raise PluginError(f"{hook} is not marked as a hook implementation, so it would be ignored; "
                                  "decorate it with @fmhub.hookimpl (from fmhub import hookimpl)")
            continue
        if opts is not None and opts.get("optionalhook"):
            continue
        raise PluginError(f"{hook} is not an fmhub hook{_did_you_mean(hook)}; the hooks are in fmhub.plugin.hookspecs")
    for caller in pm.get_hookcallers(plugin) or []:  # pluggy's own pending check: an impl with no spec
        if not caller.has_spec() and not all(impl.optionalhook for impl in caller.get_hookimpls() if impl.plugin is plugin):
            raise PluginError(f"{caller.name} is not an fmhub hook{_did_you_mean(caller.name)}; the hooks are in fmhub.plugin.hookspecs")


def _did_you_mean(hook: str) -> str:
    import difflib

    near = difflib.get_close_matches(hook, hookspecs.HOOKS, n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


# -- objects --------------------------------------------------------------------------------


def protocol(kind: str) -> Any:
    """The `fmhub.plugin.interfaces` Protocol of a kind, named by its hookspec's return annotation (``list[Cleaner]``)."""
    import re

    from fmhub.plugin import interfaces

    hook = next(h for h, k in hookspecs.KINDS.items() if k == kind)
    annotation = getattr(hookspecs, hook).__annotations__.get("return", "")
    m = re.fullmatch(r"list\[(\w+)\]", str(annotation))
    return getattr(interfaces, m.group(1)) if m else None


def members(proto: type) -> dict[str, str]:
    """A Protocol's members, its bases' first: name -> ``"attribute"`` or ``"method"``."""
    out: dict[str, str] = {}
    for klass in reversed(proto.__mro__):
        if not getattr(klass, "_is_protocol", False) or klass.__module__ == "typing":
            continue
        for name in klass.__dict__.get("__annotations__", {}):
            out[name] = "attribute"
        for name, value in klass.__dict__.items():
            if not name.startswith("_") and callable(value):
                out[name] = "method"
    return out


def problem(obj: Any, kind: str) -> tuple[str, str] | None:
    """What makes ``obj`` unusable as a ``kind``, and the Protocol's name; None when it conforms."""
    from fmhub.plugin import interfaces

    proto = protocol(kind)
    if proto is None:
        return None
    if proto is interfaces.Cleaner:
        scope = getattr(obj, "scope", None)
        if scope not in ("row", "dataset"):
            return f"has scope {scope!r}; a cleaner's scope is 'row' or 'dataset'", proto.__name__
        proto = interfaces.RowCleaner if scope == "row" else interfaces.DatasetCleaner
    for name, what in members(proto).items():
        if not hasattr(obj, name):
            return (f"has no method {name}()" if what == "method" else f"has no attribute {name!r}"), proto.__name__
        if what == "method" and not callable(getattr(obj, name)):
            return f"has {name}, but it is not a method", proto.__name__
    if proto is interfaces.DataFormat and not (isinstance(obj.extensions, (tuple, list)) and all(isinstance(e, str) for e in obj.extensions)):
        return "has extensions that are not a tuple of strings ('.jsonl')", proto.__name__
    for name, (want, ok) in interfaces.OPTIONAL.get(proto, {}).items():
        if hasattr(obj, name) and not ok(getattr(obj, name)):
            return f"has {name}, but it is not {want}", proto.__name__
    return None


def check_object(p: Provided) -> None:
    """Raise `PluginError` (one line naming the plugin, the object and the member at fault) when ``p.obj`` breaks its kind's Protocol."""
    found = problem(p.obj, p.kind)
    if found is not None:
        why, proto = found
        raise PluginError(f"plugin {_label(p)}: the {p.kind} {p.name!r} {why}; see fmhub.plugin.interfaces.{proto} "
                          f"(or set {DISABLE_ENV}={p.plugin})")


# -- names ----------------------------------------------------------------------------------


class Registry:
    """The objects of one kind by name, as `registry` gives them: a read-only mapping that refuses, when a name
    is used (``reg[name]``, ``get``, ``values``, ``items``), a name two plugins provide and an object that
    breaks its kind's Protocol, each with one line naming the plugins. Listing names never raises."""

    __slots__ = ("kind", "_by_name", "_check", "_ok")

    def __init__(self, kind: str, items: Iterable[Provided], check: bool = True) -> None:
        self.kind, self._check, self._ok = kind, check, set()
        self._by_name: dict[str, list[Provided]] = {}
        for p in items:
            self._by_name.setdefault(p.name, []).append(p)

    def __getitem__(self, name: str) -> Any:
        found = self._by_name[name]
        if len(found) > 1:
            raise PluginError(_clash_message(self.kind, name, found))
        p = found[0]
        if self._check and name not in self._ok:
            check_object(p)
            self._ok.add(name)
        return p.obj

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._by_name else default

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def keys(self):
        return self._by_name.keys()

    def values(self) -> list[Any]:
        return [self[name] for name in self._by_name]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, self[name]) for name in self._by_name]

    def clashes(self) -> dict[str, list[Provided]]:
        """Names more than one plugin provides -> what each provides."""
        return {name: found for name, found in self._by_name.items() if len(found) > 1}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Registry):
            other = dict(other.items())
        return isinstance(other, dict) and dict(self.items()) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{self.kind} registry: {', '.join(self._by_name)}>"


def _label(p: Provided) -> str:
    """``'name' (from dist-1.0)`` for an entry-point plugin, ``'name'`` for one registered by hand."""
    return f"{p.plugin!r}" + (f" ({p.source})" if p.source else "")


def _clash_message(kind: str, name: str, found: list[Provided]) -> str:
    count = {2: "two", 3: "three"}.get(len(found), str(len(found)))
    who = " and ".join(_label(p) for p in found)
    return (f"{count} plugins provide the {kind} {name!r}: {who}; fmhub uses neither: "
            f"set {DISABLE_ENV} to the plugin not to use, or uninstall it (`fmhub plugins` lists clashes)")


