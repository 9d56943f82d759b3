"""Operations on models and adapters: tensor-level diffs (`diff`), merges and their maths (`merge`,
`merge_math`), LoRA (`lora`, `adapters`), Fisher information (`fisher`), sparse updates and their commit
(`sparse_update`, `sparse_commit`), checkpoints seen as tensors wherever they live (`views`) and partial
checkouts (`extract`).

May import: every layer up to `fmhub.data`.
"""
