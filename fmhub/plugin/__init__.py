"""The plugin contract and its host: the hook specifications (`hookspecs`), the Protocols plugin objects
satisfy and the records they exchange (`interfaces`, `records`), and the host that finds, loads, checks and
calls plugins (`host`). Plugins themselves live in ``fmhub_plugins`` (``plugins/``) or third-party packages.

May import: `fmhub.base`. Types of higher layers are named for annotations only (``TYPE_CHECKING``).
"""
