"""The hooks: fmhub finds this module through the ``fmhub`` entry point ``example`` (pyproject.toml).

Keep this import cheap: git's filter imports every third-party plugin on every git command.
The cleaner and the strategy import what they need (pydantic, torch) in their own modules,
which this one imports only when fmhub asks for cleaners or merge strategies.
"""

from fmhub import hookimpl


@hookimpl
def fmhub_cleaners():
    from fmhub_example_plugin.cleaner import Caps

    return [Caps()]


@hookimpl
def fmhub_merge_strategies():
    from fmhub_example_plugin.merge import ElementwiseMax

    return [ElementwiseMax()]
