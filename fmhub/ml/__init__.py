"""ML workflows over models and data: automated fine-tuning (`autotune`), model selection (`selection`),
evaluation and its reports (`evaluation`, `eval_report`, `slices`), explanations of predictions by
training rows (`explain`), patches (`patch`) and adapter rebases (`rebase`).

May import: every layer up to `fmhub.serving`.
"""
