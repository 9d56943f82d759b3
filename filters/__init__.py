"""fmhub's git integration: the long-running filter process, and the diff and merge drivers.

Installed as the ``fmhub_filters`` package (the source lives in ``filters/``).
"""
