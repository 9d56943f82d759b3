"""The plugin host: one pluggy PluginManager, filled from the ``fmhub`` entry points, with guard rails.

Plugins are found by reading the ``entry_points.txt`` of the distributions on
``sys.path`` (what `importlib.metadata` reads, at a fraction of its start-up
cost) and imported when a kind they may provide is first asked for: git's
filter process asks for checkpoint formats and access policies, so it does not
import the cleaners, labellers or merge strategies (and pydantic, numpy with
them). A built-in plugin's kinds are listed in `BUILTIN_HOOKS`; a third-party
plugin's are unknown until it is imported, so it is imported for any kind.
Whatever is loaded, plugins are registered in entry-point order, so hook call
order is the one an eager load gives.

Guard rails (pytest's and pluggy's, docs/plugins.md):

* ``FMHUB_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name before they are
  imported (pluggy's ``set_blocked``, pytest's ``-p no:NAME``); built-ins too.
* A plugin that fails to load (its import raises, it defines a function named
  ``fmhub_*`` that is no hook, a hook's arguments are not the spec's: pluggy's
  ``check_pending``) is named with its distribution and skipped, with one
  warning line on stderr per process. It is an error instead (`PluginError`,
  one line) inside git's clean/smudge filter (`set_strict`), where a format
  skipped would change the bytes stored, and wherever access policies are
  asked for to decide access: a broken plugin may be a policy, and policies
  fail closed.
* Objects a hook returns are checked against their kind's Protocol
  (`fmhub.plugin.interfaces`) when first used; one without a ``name`` is
  treated as a plugin that fails to load.
* Two plugins providing one name of one kind clash: `registry` lists the name,
  and using it is refused, naming both plugins (neither wins; disable one).
  Other names of that kind work. `fmhub.plugin.report.describe` shows clashes,
  failures and disabled plugins (``fmhub plugins``).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
from collections import namedtuple

from fmhub.base.errors import PluginError
from fmhub.plugin import hookspecs
from fmhub.plugin import checks
from fmhub.plugin.checks import ACCESS_HOOK, Failure, Registry, _settle

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Any, Iterable

    import pluggy


ENTRY_POINT_GROUP = "fmhub"
DISABLE_ENV = checks.DISABLE_ENV  # FMHUB_DISABLE_PLUGINS

HOOKS = hookspecs.HOOKS
"""Every hook fmhub calls, in `fmhub.plugin.hookspecs`' order."""
KINDS = hookspecs.KINDS
"""Provider hook -> the kind of object it returns, as users name it (the ``kind=`` of its hookspec)."""
_HOOK_OF_KIND = {kind: hook for hook, kind in KINDS.items()}



def set_strict(strict: bool = True) -> None:
    """Make plugins that fail to load errors rather than warnings: git's filter calls this as it starts."""
    checks.STRICT = strict


def disabled() -> tuple[str, ...]:
    """The entry-point names ``FMHUB_DISABLE_PLUGINS`` names (comma-separated; spaces ignored).

    A built-in plugin that provides the access policy cannot be disabled: the policy committed in the repository
    would silently stop applying (and the audit log would record every read as allowed). `PluginError` if named.
    """
    names = tuple(dict.fromkeys(n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()))
    if names:
        guards = {ep.name for ep in _discovered() if ACCESS_HOOK in BUILTIN_HOOKS.get(ep.module, ())}
        refused = [n for n in names if n in guards]
        if refused:
            raise PluginError(f"{DISABLE_ENV}: {', '.join(refused)} provides the access policy and cannot be disabled "
                              "(the policy a repository commits must keep applying)")
    return names

# The hooks each built-in plugin module implements, so that asking for one kind imports only the
# built-ins that provide it. tests/git/test_startup.py checks it against the modules themselves.
BUILTIN_HOOKS: dict[str, frozenset[str]] = {
    f"fmhub_plugins.{module}": frozenset({hook})
    for hook, modules in {
        "fmhub_checkpoint_formats": ["safetensors_format"],
        "fmhub_data_formats": ["data_formats"],
        "fmhub_merge_strategies": ["merge_basic", "merge_linear", "merge_ties_dare", "merge_fisher", "merge_slerp"],
        "fmhub_delta_codecs": ["delta_codecs", "delta_lowrank"],
        "fmhub_cleaners": ["clean_filters", "clean_language", "clean_pii", "clean_schema", "clean_dedup"],
        "fmhub_labelers": ["label_rules", "label_python", "label_model_based"],
        "fmhub_data_backends": ["data_backends", "backend_ray"],
        "fmhub_access_policies": ["policy_roles"],
        "fmhub_serving_backends": ["serve_local", "serve_vllm"],
    }.items()
    for module in modules
}


# -- finding entry points -----------------------------------------------------------------


class EntryPoint(namedtuple("EntryPoint", "name value dist_path dist", defaults=(None,))):
    """One ``fmhub`` entry point: ``name = module[:attr]`` in the distribution at ``dist_path`` (``dist``: the
    importlib.metadata distribution, when one was made). A named tuple: git's filter defines it on every command."""

    __slots__ = ()
    _PATTERN = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")

    @property
    def module(self) -> str:
        m = self._PATTERN.match(self.value)
        return m.group("module") if m else self.value

    @property
    def dist_label(self) -> str:
        """The distribution as its metadata directory names it (``fmhub_max_plugin-0.1``)."""
        return os.path.basename(self.dist_path).rpartition(".")[0]

    def project(self) -> tuple[str, str]:
        """(name, version) of the distribution, from its metadata (``fmhub-max-plugin``, ``0.1``)."""
        fields: dict[str, str] = {}
        for meta in ("METADATA", "PKG-INFO"):
            try:
                with open(os.path.join(self.dist_path, meta), encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if not line.strip():
                            break  # the headers end at the first blank line
                        key, sep, value = line.partition(":")
                        if sep and key in ("Name", "Version"):
                            fields.setdefault(key, value.strip())
                break
            except OSError:
                continue
        name, _, version = self.dist_label.partition("-")
        return fields.get("Name", name), fields.get("Version", version)

    def load(self) -> Any:
        """Import the plugin, as `importlib.metadata.EntryPoint.load` does."""
        import importlib

        m = self._PATTERN.match(self.value)
        if m is None:
            raise ValueError(f"{self.value!r} is not `module` or `module:attribute`")
        obj = importlib.import_module(m.group("module"))
        for attr in filter(None, (m.group("attr") or "").split(".")):
            obj = getattr(obj, attr)
        return obj


def discover(path: Iterable[str] | None = None) -> list[EntryPoint]:
    """The ``fmhub`` entry points of the distributions on ``path`` (default sys.path), in the order
    `importlib.metadata.distributions` lists them; of two with one name the first counts, as in pluggy.
    """
    out: dict[str, EntryPoint] = {}
    for ep in discover_all(path):
        out.setdefault(ep.name, ep)
    return list(out.values())


def discover_all(path: Iterable[str] | None = None) -> list[EntryPoint]:
    """Every ``fmhub`` entry point on ``path``, in `discover`'s order, those a first one of the same name shadows included."""
    return [ep for root in list(sys.path if path is None else path) for ep in _root_entry_points(root)]


def _root_entry_points(root: str) -> list[EntryPoint]:
    try:
        children = os.listdir(root or ".")
    except OSError:
        return _zip_entry_points(root) if os.path.isfile(root) else []
    return [EntryPoint(name, value, dist) for dist in _distributions(root, children) for name, value in _entry_points(dist)]


def _zip_entry_points(root: str) -> list[EntryPoint]:
    """Entry points of distributions inside a zip on sys.path: rare enough to leave to importlib.metadata."""
    import importlib.metadata

    return [EntryPoint(ep.name, ep.value, str(getattr(dist, "_path", root)), dist)
            for dist in importlib.metadata.distributions(path=[root])
            for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _distributions(root: str, children: list[str]) -> list[str]:
    """Metadata directories among ``children`` of ``root``, grouped and ordered as `importlib.metadata`'s path search does."""
    base = os.path.basename(root).lower()
    infos: dict[str, list[str]] = {}
    eggs: dict[str, list[str]] = {}
    for child in children:
        low = child.lower()
        if low.endswith((".dist-info", ".egg-info")):
            infos.setdefault(_normalize(low.rpartition(".")[0].partition("-")[0]), []).append(os.path.join(root, child))
        elif base.endswith(".egg") and low == "egg-info":
            eggs.setdefault(base, []).append(os.path.join(root, child))
    return [d for group in (*infos.values(), *eggs.values()) for d in group]


def _entry_points(dist: str) -> list[tuple[str, str]]:
    """(name, value) of the ``[fmhub]`` section of a distribution's entry_points.txt."""
    try:
        with open(os.path.join(dist, "entry_points.txt"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return []
    if f"[{ENTRY_POINT_GROUP}]" not in text.replace(" ", ""):
        return []
    out, section = [], None
    for line in map(str.strip, text.splitlines()):
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == ENTRY_POINT_GROUP and "=" in line:
            name, value = line.split("=", 1)
            out.append((name.strip(), value.strip()))
    return out


# -- failures -------------------------------------------------------------------------------


def _failure(ep: EntryPoint, exc: BaseException, what: str = "cannot load plugin", plugin: Any = None) -> Failure:
    """One line naming the plugin and its package, as pytest reports a broken plugin. The hooks it may have
    provided: a built-in's; for an imported third-party ``plugin``, all but the access policy's unless it has that
    hook (or a typo of it); else None (not imported: possibly any, so commands that check access fail closed)."""
    detail = " ".join(str(exc).split()) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    hooks = BUILTIN_HOOKS.get(ep.module)
    if hooks is None and plugin is not None and not _may_be_a_policy(plugin):
        hooks = frozenset(KINDS) - {ACCESS_HOOK}  # imported, and visibly no access policy: refusing it fails nothing closed
    return Failure(ep.name, f"{what} {ep.name!r} ({ep.value}, from {ep.dist_label}): {detail}", hooks)


def _may_be_a_policy(plugin: Any) -> bool:
    """Whether a refused plugin implements the access-policy hook, or a name close to it (a typo of it)."""
    import difflib

    names = [n for n in dir(plugin) if n.startswith("fmhub_")]
    return ACCESS_HOOK in names or bool(difflib.get_close_matches(ACCESS_HOOK, names, n=1, cutoff=0.8))


# -- the manager ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _manager_class() -> type:
    """`PluginManager`, defined on first use: it subclasses pluggy's, and pluggy (with ``inspect``) costs git's
    filter more than the clean of a small file; the filter asks for built-in plugins only (`provided`)."""
    import pluggy

    class PluginManager(pluggy.PluginManager):
        """pluggy's manager, filled from entry points when a kind is asked for (`load`) or all at once (`load_all`).

        Plugins named in ``FMHUB_DISABLE_PLUGINS`` are blocked; one that fails to import or to register
        is left out and kept in ``failures`` (entry-point name -> `Failure`).
        """

        def __init__(self, entry_points: list[EntryPoint]) -> None:
            super().__init__(ENTRY_POINT_GROUP)
            self.add_hookspecs(hookspecs)
            self._entry_points = entry_points
            self._loaded: dict[str, tuple[EntryPoint, Any]] = {}  # entry-point name -> (entry point, plugin), registered
            self._seen: set[str] = set()  # entry points imported, failed or skipped: never loaded twice
            self._others: list[tuple[Any, str | None]] = []  # plugins registered by hand, in order
            self._lock = threading.RLock()
            self.failures: dict[str, Failure] = {}
            for name in disabled():
                self.set_blocked(name)

        def register(self, plugin: Any, name: str | None = None) -> str | None:
            with self._lock:
                result = super().register(plugin, name)
                if result is not None:
                    try:
                        checks.check_hooks(self, plugin, result)
                    except PluginError:
                        super().unregister(plugin)
                        raise
                    self._others.append((plugin, name))
                return result

        def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
            with self._lock:
                plugin = super().unregister(plugin, name)
                self._others = [(p, n) for p, n in self._others if p is not plugin]
                self._loaded = {k: (ep, p) for k, (ep, p) in self._loaded.items() if p is not plugin}
                return plugin

        def load(self, hooks: Iterable[str]) -> None:
            """Import and register every plugin that may implement one of ``hooks``."""
            wanted = set(hooks)
            self._load([ep for ep in self._entry_points if BUILTIN_HOOKS.get(ep.module, wanted) & wanted])

        def load_all(self) -> None:
            self._load(self._entry_points)

        def _load(self, entry_points: list[EntryPoint]) -> None:
            with self._lock:
                todo = [ep for ep in entry_points if ep.name not in self._seen]
                self._seen.update(ep.name for ep in todo)
                # as pluggy's load_setuptools_entrypoints: a name registered by hand or blocked is skipped
                new = [ep for ep in todo if not self.get_plugin(ep.name) and not self.is_blocked(ep.name)]
                plugins = []
                for ep in new:
                    try:
                        plugins.append((ep, _import(ep)))
                    except PluginError as exc:
                        self.failures[ep.name] = _failure(ep, exc.__cause__ or exc)
                if not plugins:
                    return
                rank = {ep.name: i for i, ep in enumerate(self._entry_points)}
                settled = [(ep, p) for ep, p in self._loaded.values()]
                if settled and max(rank[ep.name] for ep, _ in settled) > rank[plugins[0][0].name] or self._others:
                    self._reregister(sorted(settled + plugins, key=lambda item: rank[item[0].name]), {ep.name for ep, _ in plugins})
                    return
                for ep, plugin in plugins:
                    self._register_entry_point(ep, plugin)

        def _register_entry_point(self, ep: EntryPoint, plugin: Any) -> None:
            """Register ``plugin``, checked as pluggy's register and check_pending check it; a failure leaves it out."""
            try:
                super().register(plugin, name=ep.name)
            except (ValueError, pluggy.PluginValidationError) as exc:
                self.failures[ep.name] = _failure(ep, exc, "cannot register plugin", plugin)
                return
            try:
                checks.check_hooks(self, plugin, ep.name)
            except PluginError as exc:
                super().unregister(plugin)
                self.failures[ep.name] = _failure(ep, exc, "refused plugin", plugin)
                return
            self._loaded[ep.name] = (ep, plugin)

        def _reregister(self, plugins: list[tuple[EntryPoint, Any]], new: set[str]) -> None:
            """Register entry-point plugins in entry-point order, then the ones registered by hand: an eager load's order."""
            others = self._others
            for ep, plugin in self._loaded.values():
                super().unregister(plugin)
            for plugin, _name in others:
                super().unregister(plugin)
            self._loaded = {}
            for ep, plugin in plugins:
                if ep.name in new:
                    self._register_entry_point(ep, plugin)
                else:
                    self._loaded[ep.name] = (ep, plugin)
                    super().register(plugin, name=ep.name)
            for plugin, name in others:
                super().register(plugin, name)

        def entry_point(self, name: str) -> EntryPoint | None:
            """The entry point a plugin was loaded from (None: registered by hand)."""
            return self._loaded[name][0] if name in self._loaded else None

        def list_plugin_distinfo(self) -> list[tuple[Any, Any]]:
            """(plugin, distribution) of every plugin loaded from an entry point, as pluggy gives them."""
            import importlib.metadata
            import pathlib

            from pluggy._manager import DistFacade

            return [(plugin, DistFacade(ep.dist or importlib.metadata.PathDistribution(pathlib.Path(ep.dist_path))))
                    for ep, plugin in self._loaded.values()]

    return PluginManager


def __getattr__(name: str) -> Any:
    if name == "PluginManager":
        return _manager_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _import(ep: EntryPoint) -> Any:
    try:
        return ep.load()
    except ImportError as exc:
        from fmhub.base.sitestart import full_site

        if full_site():  # started without `site` (fmhub.boot): the plugin may need a .pth file's import hook
            return _import(ep)
        raise _failure(ep, exc).error() from exc
    except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() as it loads is a broken plugin too
        raise _failure(ep, exc).error() from exc


def new_plugin_manager(load_entry_points: bool = True, lazy: bool = False) -> "pluggy.PluginManager":
    """Return a fresh manager with fmhub's hook specs and, by default, every installed plugin.

    With ``lazy``, plugins are imported when `registry` (or `PluginManager.load`) asks for their kind.
    """
    pm = _manager_class()(_discovered() if load_entry_points else [])
    if not lazy:
        pm.load_all()
    return pm


@functools.lru_cache(maxsize=1)
def _discovered() -> list[EntryPoint]:
    return discover()


@functools.lru_cache(maxsize=1)
def _shared() -> "pluggy.PluginManager":
    return new_plugin_manager(lazy=True)


def plugin_manager() -> "pluggy.PluginManager":
    """The process-wide manager, with every plugin loaded (plugins are loaded once per process)."""
    pm = _shared()
    pm.load_all()
    _settle(pm.failures.values(), HOOKS, listing=True)
    return pm


# -- what plugins provide -------------------------------------------------------------------


class Provided(namedtuple("Provided", "kind name plugin obj source", defaults=("",))):
    """One object a plugin provides: its kind, its name, the plugin's name, the object, and where the plugin
    comes from (``from fmhub_max_plugin-0.1``; empty for a plugin registered by hand)."""

    __slots__ = ()


def provided(pm: pluggy.PluginManager | None = None, kinds: Iterable[str] | None = None) -> list[Provided]:
    """Everything every plugin provides (of ``kinds``, default all), in hook-call order, with the providing plugin's name.

    Plugins that failed to load, and objects without a name, are warned about and left out, or raised
    (`Failure`; git's filter, access policies).
    """
    return _provided(pm, kinds)[0]


def _provided(pm: pluggy.PluginManager | None, kinds: Iterable[str] | None) -> tuple[list[Provided], bool]:
    """`provided`, and whether the objects are to be checked against their Protocols (not built-ins called directly)."""
    hooks = [hook for hook, kind in KINDS.items() if kinds is None or kind in kinds]
    if pm is None and _shared.cache_info().currsize == 0:
        direct = _built_in_only(hooks, listing=kinds is None)
        if direct is not None:
            return direct, False
    pm = pm or _shared()
    if isinstance(pm, _manager_class()):
        pm.load(hooks)
    out, bad = _collect(pm, hooks)
    _settle([*getattr(pm, "failures", {}).values(), *bad], hooks, listing=kinds is None)
    return out, True


def _collect(pm: pluggy.PluginManager, hooks: Iterable[str]) -> tuple[list[Provided], list[Failure]]:
    """What the plugins' ``hooks`` return, plugin by plugin (not hook()), so each object can be traced to its
    plugin; and a `Failure` for each hook that returned something unusable (not a list, an object without a name)."""
    out: list[Provided] = []
    bad: list[Failure] = []
    for hook_name in hooks:
        hook = getattr(pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            ep = pm.entry_point(impl.plugin_name) if hasattr(pm, "entry_point") else None
            where = f"plugin {impl.plugin_name!r}" + (f" ({ep.value}, from {ep.dist_label})" if ep else "")
            try:
                result = impl.function()
            except (Exception, SystemExit) as exc:  # the plugin's own failure: named, as one that fails to load
                detail = " ".join(str(exc).split())
                bad.append(Failure(impl.plugin_name, f"{where}: {hook_name}() failed: {type(exc).__name__}: {detail}",
                                   frozenset({hook_name})))
                continue
            try:
                objs = list(result or [])
            except TypeError:
                bad.append(Failure(impl.plugin_name, f"{where}: {hook_name}() must return a list of {KINDS[hook_name]}s",
                                   frozenset({hook_name})))
                continue
            for obj in objs:
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    what = "no name" if name is None else f"the name {name!r}, not a non-empty string"
                    bad.append(Failure(impl.plugin_name, f"{where}: {hook_name}() returned a {KINDS[hook_name]} with {what} "
                                                         f"({type(obj).__name__}); every {KINDS[hook_name]} needs a unique `name`",
                                       frozenset({hook_name})))
                    continue
                out.append(Provided(KINDS[hook_name], name, impl.plugin_name, obj, f"from {ep.dist_label}" if ep else ""))
    return out, bad


_fast_failures: dict[str, Failure] = {}


def _built_in_only(hooks: list[str], listing: bool = False) -> list[Provided] | None:
    """What `provided` gives, without pluggy, when only built-in plugins may implement ``hooks`` and no manager
    exists yet (nothing registered by hand): each plugin's hook called directly, in pluggy's call order (the
    reverse of registration, which follows entry-point order; built-ins use no tryfirst/trylast). None otherwise."""
    wanted = set(hooks)
    off = disabled()
    eps = [ep for ep in _discovered() if BUILTIN_HOOKS.get(ep.module, wanted) & wanted and ep.name not in off]
    if any(ep.module not in BUILTIN_HOOKS for ep in eps):
        return None  # a third-party plugin: pluggy's own rules (and its checks) apply
    modules = {}
    for ep in eps:
        if ep.name not in _fast_failures:
            try:
                modules[ep.name] = _import(ep)
            except PluginError as exc:
                _fast_failures[ep.name] = _failure(ep, exc.__cause__ or exc)
    _settle(_fast_failures.values(), hooks, listing)
    out: list[Provided] = []
    for hook_name in hooks:
        for ep in reversed([ep for ep in eps if hook_name in BUILTIN_HOOKS[ep.module] and ep.name in modules]):
            for obj in getattr(modules[ep.name], hook_name)() or []:
                out.append(Provided(KINDS[hook_name], obj.name, ep.name, obj, f"from {ep.dist_label}"))
    return out


def registry(kind: str, pm: pluggy.PluginManager | None = None) -> Registry:
    """Objects of one kind by name (a `Registry`: using a name two plugins provide is refused)."""
    if kind not in _HOOK_OF_KIND:
        return Registry(kind, ())
    items, check = _provided(pm, [kind])
    return Registry(kind, items, check)


def lookup(kind: str, name: str, pm: pluggy.PluginManager | None = None) -> Any:
    """One object of a kind by name, or a clear error listing what is available (and plugins that failed to load)."""
    objs = registry(kind, pm)
    if name not in objs:
        have = ", ".join(sorted(objs)) or "none"
        hook = _HOOK_OF_KIND.get(kind, "")
        failures = [*getattr(pm or (_shared() if _shared.cache_info().currsize else None), "failures", {}).values(),
                    *_fast_failures.values()]
        broken = sorted({f.plugin for f in failures if f.concerns({hook})})
        also = f"; plugins that failed to load: {', '.join(broken)}" if broken else ""
        raise PluginError(f"no {kind} named {name!r} is installed (available: {have}){also}; see `fmhub plugins`")
    return objs[name]

