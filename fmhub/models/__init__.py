"""Operations on models and adapters: tensor-level diffs (`diff`: comparing two views; `tensorstats`: decoding
elements and per-tensor statistics; `difftext`: rendering; `diffsides`: the sides of ``fmhub diff`` read out of
git; `textconv`: git's one-line-per-tensor summary), merges and their maths (`merge`, `merge_math`), LoRA
(`lora`, `adapters`), Fisher information (`fisher`), sparse updates and their commit
(`sparse_update`, `sparse_commit`), checkpoints seen as tensors wherever they live (`views`) and partial
checkouts (`extract`).

May import: every layer up to `fmhub.data`.
"""
