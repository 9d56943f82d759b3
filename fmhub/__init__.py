"""fmhub: foundation models engineered like software, in plain git repositories."""

__version__ = "0.1.0"

import pluggy as _pluggy

hookimpl = _pluggy.HookimplMarker("fmhub")
"""Marker for plugin hook implementations: ``@fmhub.hookimpl``."""
