"""Data pipelines: cleaning (`fmhub.data.clean`), weak-supervision labelling (`fmhub.data.label`),
joins with lookup tables (`join`), row-level diffs (`rowdiff`), a tracked data file at any revision
(`revision`) and small text datasets for training and evaluation (`texts`).

May import: every layer up to `fmhub.git` (base, project, plugin, core, governance, git).
"""
