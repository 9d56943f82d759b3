"""The plugin contract and its host: the hook specifications (`hookspecs`), the Protocols plugin objects
satisfy and the records they exchange (`interfaces`, `records`), the host that finds, loads and calls plugins
(`host`) with its guard rails (`checks`: failures, unknown hooks, Protocols, clashes), what ``fmhub plugins``
shows (`report`), and the one options helper of cleaner and labeler plugins (`options`). Plugins themselves
live in ``fmhub_plugins`` (``plugins/``) or third-party packages; docs/plugins.md is the author's guide.

May import: `fmhub.base`. Types of higher layers are named for annotations only (``TYPE_CHECKING``).
"""
