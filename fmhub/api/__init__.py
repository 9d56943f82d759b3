"""The library under the command line, as dulwich's ``porcelain`` is under its ``cli``: one module per command
group (`git`, `hub`, `models`, `data`, `ml`, `serve`, `run`, `governance`, `server`), one function per command,
taking Python values and returning the objects the command prints. Calling a function has every effect the
command has (lineage records, audit records of failed runs, commits); ``fmhub.cli`` only parses, calls one of
these and renders. Errors are `fmhub.base.errors.FmhubError`s with one-line messages.

Importing this package imports nothing else; each module imports what its functions need when they run.

May import: every layer up to `fmhub.run` (base, project, plugin, core, governance, git, server, data, models,
serving, ml, run); never the plugins (``fmhub_plugins``), the git filter (``fmhub_filters``) or the CLI.
"""
