"""ML workflows over models and data: tasks and their rows (`tasks`, read through
`fmhub.governance.gate`), scoring (`scoring`), automated fine-tuning (`autotune`: the learning-rate search, with
its training loop in `training`), model selection (`selection`),
evaluation and its reports (`evaluation`, `eval_report`, `slices`), explanations of predictions by
training rows (`explain`), patches (`patch`) and adapter rebases (`rebase`).

May import: every layer up to `fmhub.serving`.
"""
