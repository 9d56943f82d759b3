"""``fmhub clean``: the pipeline (`pipeline`), reviewed decisions (`overrides`) and the report (`report`).
The cleaners themselves are plugins (``plugins/clean_*.py``), built on `fmhub.plugin.options`.

Part of the `fmhub.data` layer.
"""
