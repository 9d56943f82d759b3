"""The repository's side of things: installing fmhub into git (`install`), turning work-tree manifests
into files (`worktree`), maintenance (`gc`, `repack`, `fsck`), and remotes: where a remote keeps its LFS
objects (`endpoint`), the Git LFS batch client (`transfer`), moving objects (`sync`) and the Hugging Face
Hub (`hub`).

May import: `fmhub.base`, `fmhub.project`, `fmhub.plugin`, `fmhub.core`, `fmhub.governance`.
"""
