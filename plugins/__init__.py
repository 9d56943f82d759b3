"""fmhub's built-in plugins, installed as the ``fmhub_plugins`` package.

Each module implements hooks from `fmhub.plugin.hookspecs` and registers through the
``fmhub`` entry-point group in pyproject.toml, exactly as a third-party plugin would.
"""
