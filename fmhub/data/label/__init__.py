"""``fmhub label``: the pipeline (`pipeline`), labelling functions' votes (`votes`), the label model that
turns votes into probabilistic labels (`model`), suggestions of new functions (`suggest`), the report
(`report`) and the helpers labeler plugins build on (`labelers`).

Part of the `fmhub.data` layer.
"""
