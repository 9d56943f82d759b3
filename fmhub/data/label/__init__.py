"""``fmhub label``: the pipeline (`pipeline`), labelling functions' votes (`votes`), the label model that
turns votes into probabilistic labels (`model`; its numeric core `em`, dependency search `structure`, collapse
check `collapse`, matrix checks and statistics `matrix`), suggestions of new functions (`suggest`), the report
(`report`). Labelling functions are plugins (``plugins/label_*.py``), built on `fmhub.plugin.options`.

Part of the `fmhub.data` layer.
"""
