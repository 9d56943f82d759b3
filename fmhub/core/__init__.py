"""Storage: the content-addressed object store (`store` reads, `storewrite` writes, `packfile` packs, `streams`
moves many objects on a thread), manifests, checkpoint and data-file clean/smudge (`checkpoint`, `datafile`, the
installed `formats`), the delta and low-rank codecs' maths (`deltas`, `codecs`, `planes`, `lowrank*`, `tensorio`,
`parallel`), content-defined chunking, rows of data files, raw tensor bytes, running git (`gitrun`: the one git
runner of fmhub, and its error rule) and where a repository keeps things (`repo`). Knows no policy: clean and
smudge take the access check as an argument.

May import: `fmhub.base`, `fmhub.plugin`.
"""
