"""Declarative runs: ``fmhub run``'s plan of steps from ``fmhub.yaml`` (`plan`), the content-addressed step
runner (`dag`), the example project (`example`) and the demo (`demo`).

May import: every layer up to `fmhub.ml`.
"""
