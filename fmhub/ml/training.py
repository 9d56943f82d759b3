"""The training loop of `fmhub.ml.autotune`: a LoRA adapter (or FishMask's masked entries) trained for a number of steps.

`train_steps` loads the base, puts a fresh adapter on it (``accelerate``'s
``set_seed`` right before, so every run starts from the same A matrices) or
continues a given one, and trains with AdamW (no weight decay) in the seeded
batch order every fmhub training uses (`fmhub.models.sparse_update.batch_schedule`).
`fisher_mask` picks FishMask's entries; `lora_config` the adapter's shape.
Choosing the learning rate, scoring and saving are `fmhub.ml.autotune`'s.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

from fmhub.ml.tasks import Example, TaskError, collate
from fmhub.models.fisher import load_model
from fmhub.models.sparse_update import batch_schedule  # the one seeded batch order fmhub trains with


def lora_config(model: Any, r: int, alpha: int, target_modules: Optional[Sequence[str]]) -> Any:
    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if target_modules is None and getattr(model.config, "model_type", None) not in DEFAULTS:
        raise TaskError(f"peft has no default LoRA target modules for model type {model.config.model_type!r}; "
                        "give target_modules (e.g. the attention projections' names)")
    # no dropout: it is the only randomness left after the seeded init and batch order
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules) if target_modules else None,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def train_steps(base_dir: str, lora: Any, examples: list[Example], pad: int, accelerator: Any, *,
         lr: float, steps: int, batch_size: int, seed: int, mask: Optional[dict] = None,
         init_adapter: Optional[str] = None) -> tuple[Any, list[float]]:
    """A fresh adapter on the base (or, with ``mask``, the base's masked entries) trained ``steps`` steps at ``lr``.

    Returns the prepared model and the loss of each step. With ``mask``
    (parameter name -> 0/1 tensor) only the entries under a 1 train: their
    gradients are masked, so AdamW (no weight decay) leaves every other entry
    bit-exact. With ``init_adapter`` training continues from that adapter's
    weights instead of a fresh one (``fmhub rebase --retune``).
    """
    import torch
    from accelerate.utils import set_seed
    from peft import get_peft_model

    model = load_model(base_dir)
    set_seed(seed)  # after loading, right before the adapter's init: every run starts from the same A matrices
    if mask is not None:
        for name, p in model.named_parameters():
            m = mask.get(name)
            p.requires_grad_(m is not None)
            if m is not None:
                p.register_hook(lambda g, m=m: g * m.to(g.device, g.dtype))
    elif init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    else:
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:  # peft's word for targets the model does not have
            raise TaskError(f"{base_dir}: cannot add the LoRA adapter ({exc}); check target_modules") from None
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for batch in batch_schedule(len(examples), batch_size, steps, seed):
        mine = batch[accelerator.process_index :: accelerator.num_processes]
        ids, labels = (t.to(accelerator.device) for t in collate([examples[i] for i in mine], pad))
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(accelerator.reduce(loss.detach(), "mean")))
        if not math.isfinite(losses[-1]):
            break  # diverged: more steps cannot bring it back
    model.eval()
    return model, losses


FISHER_EXAMPLES = 256  # examples the Fisher is estimated on: enough to rank entries, bounded in time


def fisher_mask(base_dir: str, examples: list[Example], pad: int, accelerator: Any, keep: float) -> tuple[dict, int, int]:
    """The top ``keep`` fraction of the base's weight entries by empirical Fisher on the task's own objective.

    Fisher: the sum over (up to `FISHER_EXAMPLES`) training examples of each
    entry's squared gradient of that example's loss (FishMask). Returns
    (name -> 0/1 mask, entries kept, entries in all).
    """
    import torch

    model = load_model(base_dir).to(accelerator.device)
    model.eval()  # no dropout: the gradients are the model's, not a sample's
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for ex in examples[:FISHER_EXAMPLES]:
        ids, labels = (t.to(accelerator.device) for t in collate([ex], pad))
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.float() ** 2
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    total = flat.numel()
    k = max(1, int(round(keep * total)))
    threshold = flat.kthvalue(total - k + 1).values
    mask = {n: (f >= threshold).to(torch.float32) for n, f in fisher.items()}
    mask = {n: m for n, m in mask.items() if m.any()}
    kept = int(sum(m.sum().item() for m in mask.values()))
    return mask, kept, total


def check_output(output_dir: str, sparse: bool = False) -> None:
    marker = "config.json" if sparse else "adapter_config.json"
    if os.path.isfile(output_dir) or (os.path.isdir(output_dir) and os.listdir(output_dir)
                                      and not os.path.isfile(os.path.join(output_dir, marker))):
        what = "a model" if sparse else "an adapter"
        raise TaskError(f"{output_dir} exists and is not {what} directory; choose another output or remove it")
