"""The plugin host: one pluggy PluginManager, filled from the ``fmhub`` entry points."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pluggy

from fmhub import hookspecs
from fmhub.errors import PluginError

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


def new_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """Return a fresh manager with fmhub's hook specs and, by default, every installed plugin."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (plugins are loaded once per process)."""
    return new_plugin_manager()


@dataclass(frozen=True)
class Provided:
    kind: str
    name: str
    plugin: str
    obj: Any


def provided(pm: pluggy.PluginManager | None = None) -> list[Provided]:
    """Everything every plugin provides, in hook-call order, with the providing plugin's name."""
    pm = pm or plugin_manager()
    out: list[Provided] = []
    for hook_name, kind in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        # Call plugin by plugin (not hook()) so each object can be traced to its plugin.
        for impl in reversed(hook.get_hookimpls()):
            for obj in impl.function() or []:
                out.append(Provided(kind, obj.name, impl.plugin_name, obj))
    return out


def registry(kind: str, pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Objects of one kind by name; refuses two plugins providing the same name."""
    found: dict[str, Provided] = {}
    for p in provided(pm):
        if p.kind != kind:
            continue
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
