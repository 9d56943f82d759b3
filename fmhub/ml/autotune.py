"""Automated fine-tuning: one PEFT (LoRA) adapter per task, its learning rate chosen by a small search.

A `Task` names its training data (a ``.jsonl`` file), its held-out rows and
the metric it is scored by:

* ``loss``: mean NLL per token of the ``text`` column (nats; lower is better);
* ``accuracy``: rows have ``text`` and ``label``; the prompt is the text, each
  class's verbalization is ``" " + class``, and the prediction is the class
  whose tokens get the highest total log-probability (ties: the first class);
* ``exact_match``: rows have ``prompt`` and ``completion``; greedy generation
  from the prompt must equal the completion after ``strip()``.

**What is trained on.** For ``loss`` every token of the text; for the other
two only the answer (``" " + label``, or the completion followed by the
tokenizer's end-of-sequence token when it has one) given the prompt, which is
what the metric asks of the model. The eval loss the search compares is the
same quantity on the held-out rows.

**Sparsity instead of an adapter.** ``train_adapter(..., sparsity=0.99)``
trains no adapter: it estimates the base's empirical Fisher on the task's
own objective (squared per-example gradients, up to `FISHER_EXAMPLES`),
keeps the top ``1 - sparsity`` of the weight entries, and fine-tunes only
those (masked gradients, AdamW without weight decay, so every other entry
stays bit-exact): FishMask. The output is a full model directory.

**Held-out rows.** ``Task.eval`` when given, else every row of ``data`` whose
line hashes (sha256) to 0 mod 10 (the lowest hash alone when that leaves a
side empty): a split that depends on each row's content only, so appending
rows never moves an old row across it, and duplicate rows land on the same
side. Training uses the other rows (all of ``data`` when ``eval`` is given).

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

Tokenization is `fmhub.data.texts`'s: the model directory's tokenizer, or its
byte fallback for tiny models that ship none (which has no end-of-sequence
token, so ``exact_match`` cuts each generation at the reference's length).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from fmhub.data import texts as datasets_io
from fmhub.governance import lineage
from fmhub.base.atomic import fsync_tree, replace_dir
from fmhub.base.errors import FmhubError
from fmhub.core.rows import parse_row, row_problem
from fmhub.models.fisher import load_model, sequence_log_likelihood
from fmhub.models.sparse_update import _schedule as batch_schedule  # the one seeded batch order fmhub trains with
from fmhub.core.store import file_sha256

if TYPE_CHECKING:
    import torch

    from fmhub.project.spec import LoadedSpec

METRICS = ("loss", "accuracy", "exact_match")
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
HELD_OUT_EVERY = 10  # one row in this many (by hash) is held out when a task gives no eval file
TRAIN_FILE = "fmhub-train.json"
EXACT_MATCH_SLACK = 4  # tokens generated past a row's reference length, so trailing whitespace can still strip away


class TaskError(FmhubError):
    """A task or its data that cannot be trained or scored (bad metric, missing column, unknown label)."""


@dataclass
class Task:
    """What an adapter is for: its data, its held-out rows and the metric that scores it (see the module docstring)."""

    name: str
    data: str
    eval: Optional[str] = None
    metric: str = "loss"
    classes: Optional[list[str]] = None
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    label: str = "label"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise TaskError(f"task {self.name!r}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.metric == "accuracy":
            if not self.classes:
                raise TaskError(f"task {self.name!r}: metric accuracy needs classes, the label values "
                                "(e.g. classes: [negative, positive])")
            if len(set(self.classes)) != len(self.classes) or not all(isinstance(c, str) and c for c in self.classes):
                raise TaskError(f"task {self.name!r}: classes must be distinct non-empty strings, got {self.classes!r}")

    def columns(self) -> tuple[str, ...]:
        """The columns each row needs for this metric."""
        return {"loss": (self.text,), "accuracy": (self.text, self.label), "exact_match": (self.prompt, self.completion)}[self.metric]


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


# ------------------------------------------------------------------ rows


@dataclass(frozen=True)
class _Row:
    where: str  # "path:line", for error messages
    values: dict[str, Any]
    key: int  # stable hash of the line, for the held-out split


def _read_rows(path: str, task: Task) -> list[_Row]:
    """Every non-blank row of ``path`` (.jsonl objects, or for metric loss any other file's lines as ``text``), checked."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise TaskError(f"task {task.name!r}: no such data file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    jsonl = path.endswith(".jsonl")
    if not jsonl and task.metric != "loss":
        raise TaskError(f"{path}: metric {task.metric} needs a .jsonl file with columns {', '.join(task.columns())}")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if jsonl:
            try:
                obj = parse_row(line)
            except ValueError as exc:  # nesting or a huge number too: one line, not a RecursionError
                raise TaskError(f"{where}: {row_problem(exc)}") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{where}: each line must be a JSON object with columns {', '.join(task.columns())}")
        else:
            obj = {task.text: line}
        for col in task.columns():
            if not isinstance(obj.get(col), str):
                what = "no" if col not in obj else f"a non-string ({type(obj[col]).__name__})"
                raise TaskError(f"{where}: {what} {col!r} column; task {task.name!r} (metric {task.metric}) needs string "
                                f"columns {', '.join(task.columns())} (rename them with the task's column options)")
        if task.metric == "accuracy" and obj[task.label] not in (task.classes or ()):
            raise TaskError(f"{where}: label {obj[task.label]!r} is not one of task {task.name!r}'s classes {task.classes}; "
                            "fix the row or add the class")
        key = int.from_bytes(hashlib.sha256(line.encode("utf-8")).digest()[:8], "big")
        rows.append(_Row(where, obj, key))
    if not rows:
        raise TaskError(f"{path}: no rows; task {task.name!r} needs at least one")
    return rows


def _split(task: Task) -> tuple[list[_Row], list[_Row]]:
    """(training rows, held-out rows): see the module docstring."""
    rows = _read_rows(task.data, task)
    if task.eval is not None:
        return rows, _read_rows(task.eval, task)
    if len(rows) < 2:
        raise TaskError(f"{task.data}: one row cannot be split into training and held-out rows; add rows or give the task an eval file")
    held = [r.key % HELD_OUT_EVERY == 0 for r in rows]
    if not any(held) or all(held):  # a few rows can miss the 1-in-10 (or all hit it): hold out the lowest hash alone
        lowest = min(range(len(rows)), key=lambda i: rows[i].key)
        held = [i == lowest for i in range(len(rows))]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class _Example:
    ids: list[int]
    start: int  # tokens before ``start`` are context: not trained on, not scored


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids; ``special`` adds the tokenizer's BOS and the like (prompts do, answers appended to them do not)."""
    if isinstance(tokenizer, datasets_io.ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=special))


def _eos(tokenizer: Any) -> Optional[int]:
    value = getattr(tokenizer, "eos_token_id", None)
    return value if isinstance(value, int) else None


def _answer(task: Task, row: _Row) -> str:
    return " " + row.values[task.label] if task.metric == "accuracy" else row.values[task.completion]


def _with_prompt(prompt: list[int], answer: list[int], max_length: int, where: str) -> _Example:
    """prompt + answer in ``max_length`` tokens: the prompt loses its start, never the answer (what is scored)."""
    room = max_length - len(answer)
    if not answer:
        raise TaskError(f"{where}: the answer is empty after tokenization; give it some text")
    if room < 1:
        raise TaskError(f"{where}: the answer is {len(answer)} tokens, too long for max_length {max_length}; raise max_length")
    if not prompt:
        raise TaskError(f"{where}: the prompt is empty after tokenization; the model needs a token to predict the answer from")
    prompt = prompt[-room:]
    return _Example(prompt + answer, len(prompt))


def _examples(task: Task, rows: Sequence[_Row], tokenizer: Any, max_length: int) -> list[_Example]:
    """What is trained on and what the eval loss scores, one per row."""
    out = []
    for row in rows:
        if task.metric == "loss":
            ids = _encode(tokenizer, row.values[task.text], True)[:max_length]
            if len(ids) < 2:
                raise TaskError(f"{row.where}: the text is {len(ids)} token(s); a causal LM needs at least 2 to predict one")
            out.append(_Example(ids, 0))
            continue
        prompt_col = task.text if task.metric == "accuracy" else task.prompt
        answer = _encode(tokenizer, _answer(task, row), False)
        eos = _eos(tokenizer)
        if task.metric == "exact_match" and eos is not None:
            answer = answer + [eos]  # so the model learns where the completion ends
        out.append(_with_prompt(_encode(tokenizer, row.values[prompt_col], True), answer, max_length, row.where))
    return out


def _check_vocab(examples: Sequence[_Example], vocab_size: int, rows: Sequence[_Row]) -> None:
    for ex, row in zip(examples, rows):
        bad = [t for t in ex.ids if not 0 <= t < vocab_size]
        if bad:
            raise TaskError(f"{row.where}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size}); "
                            "the model directory's tokenizer does not fit its model")


def _collate(batch: Sequence[_Example], pad: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """`datasets_io.collate`, with the context tokens taken out of the labels."""
    ids, labels = datasets_io.collate([e.ids for e in batch], pad)
    for row, e in enumerate(batch):
        labels[row, : e.start] = datasets_io.IGNORE_INDEX
    return ids, labels


# ------------------------------------------------------------------ metrics on a model in memory


def _nll(model: Any, examples: Sequence[_Example], pad: int, accelerator: Any, batch_size: int) -> float:
    """Mean NLL per scored token (Σ NLL / Σ tokens, as `fmhub.models.sparse_update.eval_loss`), over every process's share."""
    import torch

    device = accelerator.device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    mine = list(examples[accelerator.process_index :: accelerator.num_processes])
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            ids, labels = (t.to(device) for t in _collate(mine[i : i + batch_size], pad))
            logits = model(input_ids=ids, use_cache=False).logits
            nll -= sequence_log_likelihood(logits, labels, "sum").double().sum()
            count += (labels[:, 1:] != datasets_io.IGNORE_INDEX).sum()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    return float(nll / count)


def class_logprobs(model: Any, task: Task, rows: Sequence[_Row], tokenizer: Any, pad: int, device: Any,
                   batch_size: int, max_length: int) -> "torch.Tensor":
    """(rows, classes) float64: each class verbalization's total log-probability given each row's text.

    One prompt cut per row for every class, so all classes are scored on the same context.
    """
    import torch

    classes = list(task.classes or ())
    answers = [_encode(tokenizer, " " + c, False) for c in classes]
    longest = max(answers, key=len)
    seqs = []
    for row in rows:
        prompt = _with_prompt(_encode(tokenizer, row.values[task.text], True), longest, max_length, row.where)
        ctx = prompt.ids[: prompt.start]
        seqs += [_Example(ctx + a, len(ctx)) for a in answers]
    scores = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, labels = (t.to(device) for t in _collate(seqs[i : i + batch_size], pad))
            scores.append(sequence_log_likelihood(model(input_ids=ids, use_cache=False).logits, labels, "sum").double())
    if not scores:
        return torch.zeros((0, len(classes)), dtype=torch.float64, device=device)
    return torch.cat(scores).reshape(len(rows), len(classes))


def _accuracy(model: Any, task: Task, rows: Sequence[_Row], tokenizer: Any, pad: int, accelerator: Any,
              batch_size: int, max_length: int) -> float:
    """The fraction of rows whose label is the class with the highest total log-probability."""
    import torch

    classes = list(task.classes or ())
    device = accelerator.device
    correct = torch.zeros((), dtype=torch.float64, device=device)
    mine = list(rows[accelerator.process_index :: accelerator.num_processes])
    if mine:
        predicted = class_logprobs(model, task, mine, tokenizer, pad, device, batch_size, max_length).argmax(-1)  # the first of equal maxima
        truth = torch.tensor([classes.index(row.values[task.label]) for row in mine], device=device)
        correct += (predicted == truth).sum()
    total = accelerator.reduce(torch.tensor(float(len(mine)), dtype=torch.float64, device=device), "sum")
    return float(accelerator.reduce(correct, "sum") / total)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if isinstance(tokenizer, datasets_io.ByteTokenizer):
        return bytes(i if i < 256 else 0xFF for i in ids).decode("utf-8", "replace")  # ids past the bytes decode as U+FFFD
    return tokenizer.decode(ids, skip_special_tokens=True)


def _greedy(model: Any, prompts: list[list[int]], limits: list[int], eos: Optional[int], pad: int, device: Any) -> list[list[int]]:
    """Greedy continuations of left-padded prompts, each up to its limit or its first ``eos`` (not included).

    A loop of our own rather than ``generate``: transformers fills an unset
    end-of-sequence id from the model's generation config, which for a model
    without a tokenizer names a byte like any other.
    """
    import torch

    from fmhub.serving.batch import RunningBatch, cache_kw as cache_arg

    ids, mask, positions = RunningBatch.prefill_inputs(prompts, pad, device)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes the cache on
    cache_kw = cache_arg(hf)
    out: list[list[int]] = [[] for _ in prompts]
    done = [limit <= 0 for limit in limits]
    past = None
    step_ids = ids
    for _ in range(max(limits)):
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **({cache_kw: past} if past is not None else {}))
        past = getattr(result, cache_kw)
        nxt = result.logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t == eos:
                done[i] = True
            else:
                out[i].append(t)
                done[i] = len(out[i]) >= limits[i]
        if all(done):
            break
        step_ids = nxt[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)], dim=1)
    return out


def completions(model: Any, task: Task, rows: Sequence[_Row], tokenizer: Any, pad: int, device: Any,
                batch_size: int, max_length: int, vocab_size: int) -> list[str]:
    """Each row's greedy completion of its prompt, decoded (not stripped)."""
    import torch

    eos = _eos(tokenizer)
    if isinstance(tokenizer, datasets_io.ByteTokenizer) and vocab_size < 256:
        raise TaskError(f"task {task.name!r}: exact_match needs a tokenizer that can decode; the byte fallback decodes "
                        f"only with a vocabulary of at least 256 (this model has {vocab_size})")
    refs = [_encode(tokenizer, row.values[task.completion], False) for row in rows]
    # without an end-of-sequence token nothing says where a completion ends: cut it at the reference's length
    limits = [len(r) + (0 if eos is None else EXACT_MATCH_SLACK) for r in refs]
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            prompts = []
            for row, limit in zip(rows[i : i + batch_size], limits[i : i + batch_size]):
                ex = _with_prompt(_encode(tokenizer, row.values[task.prompt], True), [0] * max(limit, 1), max_length, row.where)
                prompts.append(ex.ids[: ex.start])
            out += [_decode(tokenizer, got) for got in _greedy(model, prompts, limits[i : i + batch_size], eos, pad, device)]
    return out


def _exact_match(model: Any, task: Task, rows: Sequence[_Row], tokenizer: Any, pad: int, accelerator: Any,
                 batch_size: int, max_length: int, vocab_size: int) -> float:
    """The fraction of rows whose greedy completion equals the reference after strip()."""
    import torch

    device = accelerator.device
    mine = list(rows[accelerator.process_index :: accelerator.num_processes])
    got = completions(model, task, mine, tokenizer, pad, device, batch_size, max_length, vocab_size)
    correct = sum(g.strip() == row.values[task.completion].strip() for g, row in zip(got, mine))
    total = accelerator.reduce(torch.tensor(float(len(mine)), dtype=torch.float64, device=device), "sum")
    return float(accelerator.reduce(torch.tensor(float(correct), dtype=torch.float64, device=device), "sum") / total)


def row_nll(model: Any, examples: Sequence[_Example], pad: int, device: Any, batch_size: int) -> list[tuple[float, int]]:
    """Each example's (total NLL of its scored tokens, number of scored tokens)."""
    import torch

    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, labels = (t.to(device) for t in _collate(examples[i : i + batch_size], pad))
            logits = model(input_ids=ids, use_cache=False).logits
            nll = (-sequence_log_likelihood(logits, labels, "sum").double()).tolist()
            count = (labels[:, 1:] != datasets_io.IGNORE_INDEX).sum(-1).tolist()
            out += list(zip(nll, count))
    return out


def _score(model: Any, task: Task, rows: Sequence[_Row], examples: Sequence[_Example], tokenizer: Any, pad: int,
           accelerator: Any, batch_size: int, max_length: int, vocab_size: int) -> float:
    if task.metric == "loss":
        return _nll(model, examples, pad, accelerator, batch_size)
    if task.metric == "accuracy":
        return _accuracy(model, task, rows, tokenizer, pad, accelerator, batch_size, max_length)
    return _exact_match(model, task, rows, tokenizer, pad, accelerator, batch_size, max_length, vocab_size)


# ------------------------------------------------------------------ evaluate


def evaluate(model_dir: str, adapter_dir: str | None, task: Task, *, batch_size: int = 16, max_length: int = 128) -> float:
    """The task metric of ``model_dir`` (with the PEFT adapter in ``adapter_dir``, if given) on the task's held-out rows.

    Deterministic: no sampling, no dropout, rows in file order. Runs on
    ``accelerate``'s device; with several processes each scores every
    num_processes-th row and the counts are summed.

    :param model_dir: a ``save_pretrained`` directory of the base causal LM.
    :param adapter_dir: a ``peft`` adapter directory for that base, or None for the bare base.
    :param task: the task; its eval file, else the held-out split of its data.
    :return: the metric: mean NLL per token for ``loss`` (lower is better), a fraction in [0, 1] otherwise.
    :raises TaskError: bad task data (naming file and line), or a directory that is not an adapter.
    """
    from accelerate import Accelerator

    model_dir = os.fspath(model_dir)
    _, rows = _split(task)
    if adapter_dir is not None and not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise TaskError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    model = load_model(model_dir)
    vocab = int(model.config.vocab_size)
    tokenizer = datasets_io.load_tokenizer(model_dir, vocab)
    examples = _examples(task, rows, tokenizer, max_length)
    _check_vocab(examples, vocab, rows)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.fspath(adapter_dir))
    accelerator = Accelerator()
    model.to(accelerator.device).eval()
    return _score(model, task, rows, examples, tokenizer, datasets_io.pad_id(tokenizer), accelerator, batch_size, max_length, vocab)


# what scores mean: `fmhub.ml.selection` keys cached scores by it, so bump it when a metric's definition changes
evaluate.version = "1"  # type: ignore[attr-defined]


# ------------------------------------------------------------------ train


def _lora_config(model: Any, r: int, alpha: int, target_modules: Optional[Sequence[str]]) -> Any:
    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if target_modules is None and getattr(model.config, "model_type", None) not in DEFAULTS:
        raise TaskError(f"peft has no default LoRA target modules for model type {model.config.model_type!r}; "
                        "give target_modules (e.g. the attention projections' names)")
    # no dropout: it is the only randomness left after the seeded init and batch order
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules) if target_modules else None,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def _run(base_dir: str, lora: Any, examples: list[_Example], pad: int, accelerator: Any, *,
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
        ids, labels = (t.to(accelerator.device) for t in _collate([examples[i] for i in mine], pad))
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


def _fisher_mask(base_dir: str, examples: list[_Example], pad: int, accelerator: Any, keep: float) -> tuple[dict, int, int]:
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
        ids, labels = (t.to(accelerator.device) for t in _collate([ex], pad))
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


def _check_output(output_dir: str, sparse: bool = False) -> None:
    marker = "config.json" if sparse else "adapter_config.json"
    if os.path.isfile(output_dir) or (os.path.isdir(output_dir) and os.listdir(output_dir)
                                      and not os.path.isfile(os.path.join(output_dir, marker))):
        what = "a model" if sparse else "an adapter"
        raise TaskError(f"{output_dir} exists and is not {what} directory; choose another output or remove it")


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
    _check_output(output_dir, sparse=sparsity is not None)
    for source in (task.data, task.eval):
        if source is not None:  # a source `fmhub unlearn --remove` took out stays out of new versions
            lineage.check_not_excluded(source, os.getcwd())
    train_rows, eval_rows = _split(task)
    split = f"held out of data: rows whose line's sha256 is 0 mod {HELD_OUT_EVERY} (the lowest alone if a side is empty)"
    sources = {"data": {"path": task.data, "sha256": file_sha256(task.data)},  # hashed as read, not as it may be later
               "eval": {"path": task.eval, "sha256": file_sha256(task.eval)} if task.eval is not None else {"split": split}}

    base = load_model(base_dir)  # for the vocabulary, the tokenizer and the LoRA targets; each run loads its own
    vocab = int(base.config.vocab_size)
    tokenizer = datasets_io.load_tokenizer(base_dir, vocab)
    pad = datasets_io.pad_id(tokenizer)
    train, held = _examples(task, train_rows, tokenizer, max_length), _examples(task, eval_rows, tokenizer, max_length)
    _check_vocab(train, vocab, train_rows)
    _check_vocab(held, vocab, eval_rows)
    lora = _lora_config(base, r, alpha, target_modules) if sparsity is None else None

    accelerator = Accelerator()
    if batch_size < accelerator.num_processes:
        raise TaskError(f"batch_size ({batch_size}) must be at least the number of processes ({accelerator.num_processes})")
    base.to(accelerator.device).eval()
    base_loss = _nll(base, held, pad, accelerator, batch_size)
    del base
    mask, kept, entries = (None, 0, 0) if sparsity is None else _fisher_mask(base_dir, train, pad, accelerator, 1 - sparsity)

    if init_adapter is not None and sparsity is not None:
        raise TaskError("init_adapter continues a LoRA adapter; it cannot be combined with sparsity")
    run = dict(steps=steps, batch_size=batch_size, seed=seed, mask=mask, init_adapter=init_adapter)
    trials: list[Trial] = []
    if len(candidates) > 1:
        for lr in candidates:
            t0 = time.monotonic()
            model, losses = _run(base_dir, lora, train, pad, accelerator, lr=lr, **{**run, "steps": trial_steps})
            loss = _nll(model, held, pad, accelerator, batch_size) if math.isfinite(losses[-1]) else math.inf
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

    model, losses = _run(base_dir, lora, train, pad, accelerator, lr=lr, **run)
    if not math.isfinite(losses[-1]):
        raise TaskError(f"task {task.name!r}: training diverged at lr {lr:g} (loss {losses[-1]}); try a smaller learning rate")
    eval_loss = _nll(model, held, pad, accelerator, batch_size)
    unwrapped = accelerator.unwrap_model(model)
    score = eval_loss if task.metric == "loss" else _score(unwrapped, task, eval_rows, held, tokenizer, pad, accelerator,
                                                           batch_size, max_length, vocab)
    tail = losses[-math.ceil(len(losses) / 10) :]
    result = TrainResult(output_dir, lr, trials, sum(tail) / len(tail), eval_loss, task.metric, score,
                         time.monotonic() - start, steps, base_loss, losses, str(accelerator.device))
    shape = ({"r": r, "alpha": alpha, "target_modules": sorted(unwrapped.peft_config["default"].target_modules)} if mask is None
             else {"method": "fishmask", "sparsity": sparsity, "entries_trained": kept, "entries": entries})
    params = {"task": task.name, "metric": task.metric, "lr": lr, "lrs": candidates, **shape,
              "steps": steps, "trial_steps": trial_steps if trials else None, "batch_size": batch_size, "seed": seed,
              "max_length": max_length}

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
        inputs = [lineage.describe_input(base_dir, "model"), lineage.describe_input(task.data, "dataset")]
        if task.eval is not None:  # it chose the learning rate, so it is an input too
            inputs.append(lineage.describe_input(task.eval, "dataset"))
        lineage.record(output_dir, "finetune", inputs, {**params, "score": score})
    accelerator.wait_for_everyone()
    result.seconds = time.monotonic() - start
    say(f"{task.name}: saved {output_dir}: lr {lr:g}, {steps} steps, eval loss {base_loss:.4f} -> {eval_loss:.4f}, "
        f"{task.metric} {score:.4f} ({result.seconds:.1f} s)")
    return result


def _train_record(result: TrainResult, params: dict[str, Any], sources: dict[str, Any]) -> dict[str, Any]:
    """The contents of ``fmhub-train.json``: what was chosen, what it scored, and which bytes it was trained on."""
    rec = asdict(result)
    keep = ("trials", "train_loss", "eval_loss", "base_eval_loss", "score", "losses", "device", "seconds")
    return {"version": 1, **params, **{k: rec[k] for k in keep}, **sources}


def task_of(loaded: LoadedSpec, task_name: str):
    """A declared task as `fmhub.ml.autotune.Task`, its paths resolved."""
    t = loaded.spec.tasks[task_name]
    return Task(name=task_name, data=loaded.dataset_path(t.data), eval=loaded.dataset_path(t.eval) if t.eval else None,
                metric=t.metric, classes=t.classes, text=t.text, label=t.label, prompt=t.prompt, completion=t.completion)
