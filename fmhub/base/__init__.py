"""Foundations with no knowledge of models, data or git: errors and their one-line form, atomic writes,
bounded JSON and YAML parsing, units, progress bars, and the start-up helpers git's filter uses
(`prefetch`, `sitestart`).

May import: the standard library only (and ``fmhub`` itself). Everything else may import it.
"""
