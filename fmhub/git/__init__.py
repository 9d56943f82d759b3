"""The repository's side of things: installing fmhub into git (`install`), turning work-tree manifests
into files (`worktree`), the manifests in a repository's history (`history`), maintenance (`gc`, `repack`,
`fsck`, which need no network), and remotes: where a remote keeps its LFS objects (`endpoint`), the Git LFS
batch client (`transfer`, with `lfsbatch` parsing its answers and `lfshttp` bounding what a server sends),
moving objects (`sync`) and the Hugging Face Hub (`hub`). git itself runs through `fmhub.base.gitrun`.

May import: `fmhub.base`, `fmhub.project`, `fmhub.plugin`, `fmhub.core`, `fmhub.governance`.
"""
