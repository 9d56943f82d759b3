"""``site``'s start-up, run late: for a process that `fmhub.boot` started with ``python -S``."""

from __future__ import annotations

import sys


def full_site() -> bool:
    """Run what ``python`` without ``-S`` runs at start-up (every .pth file, sitecustomize) if this process skipped
    it and has not run it since; True if it ran now. `fmhub.plugin.host` calls it when a plugin fails to import,
    `fmhub.boot` when a module only a ``.pth`` file's code line provides is imported."""
    import importlib
    import site

    if not sys.flags.no_site or site.ENABLE_USER_SITE is not None:  # site.main() sets ENABLE_USER_SITE
        return False
    site.main()
    importlib.invalidate_caches()
    return True
