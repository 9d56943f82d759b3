"""Serving backends by name, from the plugins (``fmhub_serving_backends``)."""

from __future__ import annotations

from fmhub.base.errors import FmhubError
from fmhub.plugin.interfaces import ServingBackend


def backend(name: str) -> ServingBackend:
    from fmhub.plugin.host import registry

    found = registry("serving-backend")
    if name not in found:
        raise FmhubError(f"no serving backend {name!r}; installed: {', '.join(sorted(found)) or 'none'} (see `fmhub plugins`)")
    return found[name]
