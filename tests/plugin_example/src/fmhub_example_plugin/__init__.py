"""An example fmhub plugin: the ``caps`` cleaner (drops shouted rows) and the ``elementwise-max`` merge strategy.

The hooks are in `fmhub_example_plugin.plugin`, which the ``fmhub`` entry point of
pyproject.toml names; this file stays empty so that importing the plugin is cheap.
"""

__version__ = "0.1.0"
