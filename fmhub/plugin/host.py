"""The plugin host: one pluggy PluginManager, filled from the ``fmhub`` entry points.

Plugins are found by reading the ``entry_points.txt`` of the distributions on
``sys.path`` (what `importlib.metadata` reads, at a fraction of its start-up
cost) and imported when a kind they may provide is first asked for: git's
filter process asks for checkpoint formats and access policies, so it does not
import the cleaners, labellers or merge strategies (and pydantic, numpy with
them). A built-in plugin's kinds are listed in `BUILTIN_HOOKS`; a third-party
plugin's are unknown until it is imported, so it is imported for any kind.
Whatever is loaded, plugins are registered in entry-point order, so hook call
order is the one an eager load gives.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
from collections import namedtuple

from fmhub.base.errors import PluginError

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Any, Iterable

    import pluggy


ENTRY_POINT_GROUP = "fmhub"

# provider hook -> the kind of object it returns, as users name it
KINDS = {
    "fmhub_checkpoint_formats": "format",
    "fmhub_data_formats": "data-format",
    "fmhub_merge_strategies": "merge-strategy",
    "fmhub_delta_codecs": "delta-codec",
    "fmhub_cleaners": "cleaner",
    "fmhub_labelers": "labeler",
    "fmhub_data_backends": "data-backend",
    "fmhub_access_policies": "access-policy",
    "fmhub_serving_backends": "serving-backend",
}
_HOOK_OF_KIND = {kind: hook for hook, kind in KINDS.items()}

# The hooks each built-in plugin module implements, so that asking for one kind imports only the
# built-ins that provide it. tests/test_startup.py checks it against the modules themselves.
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
    for root in list(sys.path if path is None else path):
        for ep in _root_entry_points(root):
            out.setdefault(ep.name, ep)
    return list(out.values())


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


# -- the manager ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _manager_class() -> type:
    """`PluginManager`, defined on first use: it subclasses pluggy's, and pluggy (with ``inspect``) costs git's
    filter more than the clean of a small file; the filter asks for built-in plugins only (`provided`)."""
    import pluggy

    from fmhub.plugin import hookspecs

    class PluginManager(pluggy.PluginManager):
        """pluggy's manager, filled from entry points when a kind is asked for (`load`) or all at once (`load_all`)."""

        def __init__(self, entry_points: list[EntryPoint]) -> None:
            super().__init__(ENTRY_POINT_GROUP)
            self.add_hookspecs(hookspecs)
            self._entry_points = entry_points
            self._loaded: dict[str, tuple[EntryPoint, Any]] = {}  # entry-point name -> (entry point, plugin), registered
            self._seen: set[str] = set()  # entry points imported or skipped: never loaded twice (unregistered ones stay so)
            self._others: list[tuple[Any, str | None]] = []  # plugins registered by hand, in order
            self._lock = threading.RLock()

        def register(self, plugin: Any, name: str | None = None) -> str | None:
            with self._lock:
                result = super().register(plugin, name)
                if result is not None:
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
                # as pluggy's load_setuptools_entrypoints: a name registered by hand or blocked is skipped
                new = [ep for ep in todo if not self.get_plugin(ep.name) and not self.is_blocked(ep.name)]
                plugins = [(ep, _import(ep)) for ep in new]  # a plugin that fails to import fails every ask (fail closed)
                self._seen.update(ep.name for ep in todo)
                if not new:
                    return
                rank = {ep.name: i for i, ep in enumerate(self._entry_points)}
                settled = [(ep, p) for ep, p in self._loaded.values()]
                if settled and max(rank[ep.name] for ep, _ in settled) > rank[new[0].name] or self._others:
                    self._reregister(sorted(settled + plugins, key=lambda item: rank[item[0].name]))
                    return
                for ep, plugin in plugins:
                    self._loaded[ep.name] = (ep, plugin)
                    super().register(plugin, name=ep.name)

        def _reregister(self, plugins: list[tuple[EntryPoint, Any]]) -> None:
            """Register entry-point plugins in entry-point order, then the ones registered by hand: an eager load's order."""
            others = self._others
            for ep, plugin in self._loaded.values():
                super().unregister(plugin)
            for plugin, _name in others:
                super().unregister(plugin)
            self._loaded = {}
            for ep, plugin in plugins:
                self._loaded[ep.name] = (ep, plugin)
                super().register(plugin, name=ep.name)
            for plugin, name in others:
                super().register(plugin, name)

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
        raise _load_error(ep, exc) from exc
    except Exception as exc:
        raise _load_error(ep, exc) from exc


def _load_error(ep: EntryPoint, exc: Exception) -> PluginError:
    """One line naming the plugin and its package, as pytest reports a broken plugin."""
    return PluginError(
        f"cannot load plugin {ep.name!r} ({ep.value}, from {ep.dist_label}): {type(exc).__name__}: {exc}; "
        "fix or uninstall that package"
    )


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
    return pm


class Provided(namedtuple("Provided", "kind name plugin obj")):
    """One object a plugin provides: its kind, its name, the plugin's name, and the object."""

    __slots__ = ()


def provided(pm: pluggy.PluginManager | None = None, kinds: Iterable[str] | None = None) -> list[Provided]:
    """Everything every plugin provides (of ``kinds``, default all), in hook-call order, with the providing plugin's name."""
    hooks = [hook for hook, kind in KINDS.items() if kinds is None or kind in kinds]
    if pm is None and _shared.cache_info().currsize == 0:
        direct = _built_in_only(hooks)
        if direct is not None:
            return direct
    pm = pm or _shared()
    if isinstance(pm, _manager_class()):
        pm.load(hooks)
    out: list[Provided] = []
    for hook_name in hooks:
        hook = getattr(pm.hook, hook_name)
        # Call plugin by plugin (not hook()) so each object can be traced to its plugin.
        for impl in reversed(hook.get_hookimpls()):
            for obj in impl.function() or []:
                out.append(Provided(KINDS[hook_name], obj.name, impl.plugin_name, obj))
    return out


def _built_in_only(hooks: list[str]) -> list[Provided] | None:
    """What `provided` gives, without pluggy, when only built-in plugins may implement ``hooks`` and no manager
    exists yet (nothing registered by hand): each plugin's hook called directly, in pluggy's call order (the
    reverse of registration, which follows entry-point order; built-ins use no tryfirst/trylast). None otherwise."""
    wanted = set(hooks)
    eps = [ep for ep in _discovered() if BUILTIN_HOOKS.get(ep.module, wanted) & wanted]
    if any(ep.module not in BUILTIN_HOOKS for ep in eps):
        return None  # a third-party plugin: pluggy's own rules (and its checks) apply
    out: list[Provided] = []
    for hook_name in hooks:
        for ep in reversed([ep for ep in eps if hook_name in BUILTIN_HOOKS[ep.module]]):
            for obj in getattr(_import(ep), hook_name)() or []:
                out.append(Provided(KINDS[hook_name], obj.name, ep.name, obj))
    return out


def registry(kind: str, pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Objects of one kind by name; refuses two plugins providing the same name."""
    if kind not in _HOOK_OF_KIND:
        return {}
    found: dict[str, Provided] = {}
    for p in provided(pm, [kind]):
        if p.name in found:
            raise PluginError(
                f"two plugins provide the {kind} {p.name!r}: {found[p.name].plugin} and {p.plugin}; "
                "uninstall one of them"
            )
        found[p.name] = p
    return {name: p.obj for name, p in found.items()}


def lookup(kind: str, name: str, pm: pluggy.PluginManager | None = None) -> Any:
    """One object of a kind by name, or a clear error listing what is available."""
    objs = registry(kind, pm)
    if name not in objs:
        have = ", ".join(sorted(objs)) or "none"
        raise PluginError(f"no {kind} named {name!r} is installed (available: {have}); see `fmhub plugins`")
    return objs[name]
