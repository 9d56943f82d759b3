"""``fmhub clean``: the pipeline (`pipeline`), the helpers cleaner plugins build on (`cleaners`), reviewed
decisions (`overrides`) and the report (`report`). The cleaners themselves are plugins (``plugins/clean_*.py``).

Part of the `fmhub.data` layer.
"""
