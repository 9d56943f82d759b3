"""Foundations with no knowledge of models, data or git: errors and their one-line form, atomic writes,
bounded JSON and YAML parsing, YAML validated by a pydantic schema (`yamlschema`), units, progress bars, and the
start-up helpers git's filter uses (`prefetch`, `sitestart`).

May import: the standard library and third-party libraries fmhub depends on (pyyaml, pydantic), and ``fmhub``
itself; no other fmhub package. Everything else may import it.
"""
