"""Automated fine-tuning: one PEFT (LoRA) adapter per task, its learning rate chosen by a small search.

The parts: a `fmhub.ml.tasks.Task` (its rows, read through the governance
gate, its held-out split, the token examples trained on), the training loop
(`fmhub.ml.training`) and the metrics (`fmhub.ml.scoring`). This module is
`train_adapter`: the checks, the learning-rate search, the final run, the
saved output and its lineage record. The eval loss the search compares is
the training objective on the held-out rows.

**Sparsity instead of an adapter.** ``train_adapter(..., sparsity=0.99)``
trains no adapter: it estimates the base's empirical Fisher on the task's
own objective (squared per-example gradients, up to `fmhub.ml.training.FISHER_EXAMPLES`),
keeps the top ``1 - sparsity`` of the weight entries, and fine-tunes only
those (masked gradients, AdamW without weight decay, so every other entry
stays bit-exact): FishMask. The output is a full model directory.

**Search.** With ``lrs`` None `train_adapter` tries `DEFAULT_LRS`, each a
short run (``trial_steps``) from the same seed, scores each by eval loss, and
trains the full ``steps`` from scratch at the best one. Every run is
reproducible: the same seeded batch order as `fmhub.models.sparse_update` and
``accelerate.utils.set_seed`` before the adapter is initialised, so on the CPU
two runs with the same inputs save identical adapter bytes.

**Output.** The adapter as ``peft`` saves it, plus ``fmhub-train.json`` (the
hyperparameters, every trial, losses, the metric and the data's sha256),
renamed into place whole; and ``<output>.lineage.json`` as ``fmhub finetune``
writes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

from fmhub.base.atomic import fsync_tree, replace_dir
from fmhub.core.store import file_sha256
from fmhub.data import texts as datasets_io
from fmhub.governance import gate
from fmhub.ml import scoring, tasks, training
from fmhub.ml.tasks import HELD_OUT_EVERY, Task, TaskError
from fmhub.models.fisher import load_model

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
TRAIN_FILE = "fmhub-train.json"


@dataclass
class Trial:
    """One learning-rate trial of the search."""

    lr: float
    eval_loss: float  # inf when the run diverged (NaN/Inf loss)
    seconds: float


@dataclass
class TrainResult:
    """What `train_adapter` did: the adapter in ``output_dir``, trained ``steps`` steps at ``lr``."""

    output_dir: str
    lr: float
    trials: list[Trial]
    train_loss: float  # mean training loss of the last ceil(steps/10) steps
    eval_loss: float  # on the held-out rows, after training
    metric: str
    score: float  # the task metric on the held-out rows, after training
    seconds: float
    steps: int
    base_eval_loss: float = math.nan  # the same eval loss of the base model (an adapter at its zero init)
    losses: list[float] = field(default_factory=list)  # training loss at each step of the final run
    device: str = "cpu"


def train_adapter(
    base_dir: str,
    task: Task,
    output_dir: str,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: Optional[Sequence[str]] = None,
    steps: int = 60,
    batch_size: int = 8,
    lrs: Optional[Sequence[float]] = None,
    trial_steps: Optional[int] = None,
    seed: int = 0,
    max_length: int = 128,
    progress: Optional[Callable[[str], None]] = None,
    sparsity: Optional[float] = None,
    init_adapter: Optional[str] = None,
    weak_labels: bool = False,
) -> TrainResult:
    """Train a LoRA adapter of ``base_dir`` for ``task``, picking the learning rate by a short search, and score it.

    With ``sparsity`` (say 0.99) no adapter is trained: the base's weights are
    fine-tuned where its Fisher on the task is largest, ``1 - sparsity`` of
    their entries, every other entry kept bit-exact (FishMask), and
    ``output_dir`` is a full model directory (which fmhub stores as sparse
    deltas of the base with ``fmhub.deltas``).

    Every check that can fail on the inputs (task, rows, tokens, output
    directory) runs before training, so bad input writes nothing. The adapter
    is saved with ``save_pretrained`` into a temp directory beside
    ``output_dir``, with ``fmhub-train.json`` (hyperparameters, trials, losses,
    metric, data sha256), then renamed into place; ``<output_dir>.lineage.json``
    records the base and data it came from.

    :param base_dir: a ``save_pretrained`` directory of the base causal LM.
    :param task: what to train for and how to score it.
    :param output_dir: the adapter directory to write (an existing adapter there is replaced).
    :param r: LoRA rank.
    :param alpha: LoRA alpha (the update is scaled by alpha / r).
    :param target_modules: module names to adapt; None: peft's default for the architecture (q_proj, v_proj for Llama).
    :param steps: optimizer steps of the final run.
    :param batch_size: examples per step.
    :param lrs: learning rates to choose from (AdamW, constant); None: `DEFAULT_LRS`. One value: no search.
    :param trial_steps: steps of each trial; None: steps // 3 (at least 1).
    :param seed: adapter init, batch order and every RNG.
    :param max_length: examples are cut to this many tokens (prompts lose their start, answers are kept).
    :param progress: called with a line after each trial and at the end.
    :param sparsity: in [0, 1): train only the top ``1 - sparsity`` of the weights' entries by Fisher, no adapter.
    :param init_adapter: continue training this adapter of the base (its r, alpha and targets) instead of a fresh one.
    :param weak_labels: the task's labels came from labelling functions, not people: the log says the score is
        measured on them (a model that learnt wrong labels well scores high there).
    :return: a `TrainResult`.
    :raises TaskError: bad task data (naming file and line), bad hyperparameters, every learning rate diverging.
    """
    from accelerate import Accelerator

    start = time.monotonic()
    base_dir, output_dir = os.fspath(base_dir), os.fspath(output_dir)
    say = progress or (lambda _: None)
    candidates = [float(x) for x in (DEFAULT_LRS if lrs is None else lrs)]
    if not candidates or not all(math.isfinite(x) and x > 0 for x in candidates):
        raise TaskError(f"learning rates must be positive numbers, got {list(lrs or [])}")
    if steps < 1 or batch_size < 1 or r < 1 or alpha <= 0 or (trial_steps is not None and trial_steps < 1):
        raise TaskError(f"steps, batch_size, r, alpha and trial_steps must be >= 1; "
                        f"got {steps}, {batch_size}, {r}, {alpha}, {trial_steps}")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise TaskError(f"sparsity must be in [0, 1) (the fraction of entries left unchanged), got {sparsity}")
    trial_steps = trial_steps or max(1, steps // 3)
    output_dir = os.path.normpath(output_dir)
    training.check_output(output_dir, sparse=sparsity is not None)
    # through the governance gate: the read policy, excluded sources, licences; rows the user may not read are left out
    train_rows, eval_rows = tasks.split(task, new_version=True)
    split = f"held out of data: rows whose line's sha256 is 0 mod {HELD_OUT_EVERY} (the lowest alone if a side is empty)"
    sources = {"data": {"path": task.data, "sha256": file_sha256(task.data)},  # hashed as read, not as it may be later
               "eval": {"path": task.eval, "sha256": file_sha256(task.eval)} if task.eval is not None else {"split": split}}

    base = load_model(base_dir)  # for the vocabulary, the tokenizer and the LoRA targets; each run loads its own
    vocab = int(base.config.vocab_size)
    tokenizer = datasets_io.load_tokenizer(base_dir, vocab)
    pad = datasets_io.pad_id(tokenizer)
    train, held = tasks.examples(task, train_rows, tokenizer, max_length), tasks.examples(task, eval_rows, tokenizer, max_length)
    tasks.check_vocab(train, vocab, train_rows)
    tasks.check_vocab(held, vocab, eval_rows)
    lora = training.lora_config(base, r, alpha, target_modules) if sparsity is None else None

    accelerator = Accelerator()
    if batch_size < accelerator.num_processes:
        raise TaskError(f"batch_size ({batch_size}) must be at least the number of processes ({accelerator.num_processes})")
    base.to(accelerator.device).eval()
    base_loss = scoring.mean_nll(base, held, pad, accelerator, batch_size)
    del base
    mask, kept, entries = (None, 0, 0) if sparsity is None else training.fisher_mask(base_dir, train, pad, accelerator, 1 - sparsity)

    if init_adapter is not None and sparsity is not None:
        raise TaskError("init_adapter continues a LoRA adapter; it cannot be combined with sparsity")
    run = dict(steps=steps, batch_size=batch_size, seed=seed, mask=mask, init_adapter=init_adapter)
    trials: list[Trial] = []
    if len(candidates) > 1:
        for lr in candidates:
            t0 = time.monotonic()
            model, losses = training.train_steps(base_dir, lora, train, pad, accelerator, lr=lr, **{**run, "steps": trial_steps})
            loss = scoring.mean_nll(model, held, pad, accelerator, batch_size) if math.isfinite(losses[-1]) else math.inf
            trials.append(Trial(lr, loss if math.isfinite(loss) else math.inf, time.monotonic() - t0))
            del model
            accelerator.free_memory()  # drop the trial's prepared model and optimizer
            say(f"{task.name}: lr {lr:g}: eval loss {trials[-1].eval_loss:.4f} after {trial_steps} steps ({trials[-1].seconds:.1f} s)")
        best = min(trials, key=lambda t: t.eval_loss)  # min keeps the first of equal losses
        if not math.isfinite(best.eval_loss):
            raise TaskError(f"task {task.name!r}: training diverged at every learning rate {candidates}; try smaller ones")
        lr = best.lr
    else:
        lr = candidates[0]

    model, losses = training.train_steps(base_dir, lora, train, pad, accelerator, lr=lr, **run)
    if not math.isfinite(losses[-1]):
        raise TaskError(f"task {task.name!r}: training diverged at lr {lr:g} (loss {losses[-1]}); try a smaller learning rate")
    eval_loss = scoring.mean_nll(model, held, pad, accelerator, batch_size)
    unwrapped = accelerator.unwrap_model(model)
    score = eval_loss if task.metric == "loss" else scoring.score(unwrapped, task, eval_rows, held, tokenizer, pad, accelerator,
                                                           batch_size, max_length, vocab)
    tail = losses[-math.ceil(len(losses) / 10) :]
    result = TrainResult(output_dir, lr, trials, sum(tail) / len(tail), eval_loss, task.metric, score,
                         time.monotonic() - start, steps, base_loss, losses, str(accelerator.device))
    shape = ({"r": r, "alpha": alpha, "target_modules": sorted(unwrapped.peft_config["default"].target_modules)} if mask is None
             else {"method": "fishmask", "sparsity": sparsity, "entries_trained": kept, "entries": entries})
    params = {"task": task.name, "metric": task.metric, "lr": lr, "lrs": candidates, **shape,
              "steps": steps, "trial_steps": trial_steps if trials else None, "batch_size": batch_size, "seed": seed,
              "max_length": max_length, **({"labels": "weak"} if weak_labels else {})}

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parent = os.path.dirname(os.path.abspath(output_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".fmhub-train-")
        try:
            unwrapped.save_pretrained(tmp)
            if mask is not None:  # a full model: it needs the base's tokenizer and generation files beside it
                from fmhub.models.sparse_update import copy_side_files

                copy_side_files(base_dir, tmp)
            with open(os.path.join(tmp, TRAIN_FILE), "w", encoding="utf-8") as f:
                json.dump(_train_record(result, params, sources), f, indent=2, sort_keys=True)
                f.write("\n")
            fsync_tree(tmp)
            replace_dir(tmp, output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        inputs = [("model", base_dir), ("dataset", task.data)]
        if task.eval is not None:  # it chose the learning rate, so it is an input too
            inputs.append(("dataset", task.eval))
        gate.record_output(gate.Step("finetune", task.name), output_dir, inputs, {**params, "score": score})
    accelerator.wait_for_everyone()
    result.seconds = time.monotonic() - start
    say(f"{task.name}: saved {output_dir}: lr {lr:g}, {steps} steps, eval loss {base_loss:.4f} -> {eval_loss:.4f}, "
        f"{task.metric}{' on weak labels' if weak_labels else ''} {score:.4f} ({result.seconds:.1f} s)")
    return result


def _train_record(result: TrainResult, params: dict[str, Any], sources: dict[str, Any]) -> dict[str, Any]:
    """The contents of ``fmhub-train.json``: what was chosen, what it scored, and which bytes it was trained on."""
    rec = asdict(result)
    keep = ("trials", "train_loss", "eval_loss", "base_eval_loss", "score", "losses", "device", "seconds")
    return {"version": 1, **params, **{k: rec[k] for k in keep}, **sources}
