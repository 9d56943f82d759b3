"""Storage: the content-addressed object store, manifests, checkpoint and data-file clean/smudge, the
delta and low-rank codecs' maths, content-defined chunking, rows of data files, raw tensor bytes, and where
a repository keeps things (`repo`, the one place that runs git for the storage layer). Knows no policy:
clean and smudge take the access check as an argument.

May import: `fmhub.base`, `fmhub.plugin`.
"""
