"""Developer tools that read fmhub's source: the layer check (`layers`) and the one-off relayout (`relayout`).

Imports nothing of fmhub.
"""
