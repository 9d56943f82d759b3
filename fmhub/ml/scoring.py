"""Scoring a model on a task's rows, in memory: the eval loss, accuracy, exact match, per-row scores, embeddings.

`evaluate` is the task metric of a model directory (and adapter) on the task's
held-out rows (`fmhub.ml.tasks.split`): what `fmhub.ml.autotune` reports after
training, `fmhub.ml.selection` ranks candidates by, and ``fmhub rebase
--check`` compares. The helpers below score a model already loaded, as
training, ``fmhub eval`` (`fmhub.ml.evaluation`) and ``fmhub explain``
(`fmhub.ml.explain`) need:

* ``loss``: mean NLL per scored token (`mean_nll`, per row `row_nll`);
* ``accuracy``: the class whose verbalization gets the highest total
  log-probability (`class_logprobs`);
* ``exact_match``: greedy generation (`completions`) equal to the reference
  after ``strip()``. Without an end-of-sequence token (the byte fallback)
  each generation is cut at the reference's length.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

from fmhub.data import texts as datasets_io
from fmhub.ml import tasks
from fmhub.ml.tasks import Example, Task, TaskError, TaskRow, collate, encode, eos_id, with_prompt
from fmhub.models.fisher import load_model, sequence_log_likelihood

if TYPE_CHECKING:
    import torch

EXACT_MATCH_SLACK = 4  # tokens generated past a row's reference length, so trailing whitespace can still strip away


def mean_nll(model: Any, examples: Sequence[Example], pad: int, accelerator: Any, batch_size: int) -> float:
    """Mean NLL per scored token (Σ NLL / Σ tokens, as `fmhub.models.sparse_update.eval_loss`), over every process's share."""
    import torch

    device = accelerator.device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    mine = list(examples[accelerator.process_index :: accelerator.num_processes])
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            ids, labels = (t.to(device) for t in collate(mine[i : i + batch_size], pad))
            logits = model(input_ids=ids, use_cache=False).logits
            nll -= sequence_log_likelihood(logits, labels, "sum").double().sum()
            count += (labels[:, 1:] != datasets_io.IGNORE_INDEX).sum()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    return float(nll / count)


def class_logprobs(model: Any, task: Task, rows: Sequence[TaskRow], tokenizer: Any, pad: int, device: Any,
                   batch_size: int, max_length: int) -> "torch.Tensor":
    """(rows, classes) float64: each class verbalization's total log-probability given each row's text.

    One prompt cut per row for every class, so all classes are scored on the same context.
    """
    import torch

    classes = list(task.classes or ())
    answers = [encode(tokenizer, " " + c, False) for c in classes]
    longest = max(answers, key=len)
    seqs = []
    for row in rows:
        prompt = with_prompt(encode(tokenizer, row.values[task.text], True), longest, max_length, row.where)
        ctx = prompt.ids[: prompt.start]
        seqs += [Example(ctx + a, len(ctx)) for a in answers]
    scores = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, labels = (t.to(device) for t in collate(seqs[i : i + batch_size], pad))
            scores.append(sequence_log_likelihood(model(input_ids=ids, use_cache=False).logits, labels, "sum").double())
    if not scores:
        return torch.zeros((0, len(classes)), dtype=torch.float64, device=device)
    return torch.cat(scores).reshape(len(rows), len(classes))


def accuracy(model: Any, task: Task, rows: Sequence[TaskRow], tokenizer: Any, pad: int, accelerator: Any,
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


def decode(tokenizer: Any, ids: list[int]) -> str:
    if isinstance(tokenizer, datasets_io.ByteTokenizer):
        return bytes(i if i < 256 else 0xFF for i in ids).decode("utf-8", "replace")  # ids past the bytes decode as U+FFFD
    return tokenizer.decode(ids, skip_special_tokens=True)


def greedy(model: Any, prompts: list[list[int]], limits: list[int], eos: Optional[int], pad: int, device: Any) -> list[list[int]]:
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


def completions(model: Any, task: Task, rows: Sequence[TaskRow], tokenizer: Any, pad: int, device: Any,
                batch_size: int, max_length: int, vocab_size: int) -> list[str]:
    """Each row's greedy completion of its prompt, decoded (not stripped)."""
    import torch

    eos = eos_id(tokenizer)
    if isinstance(tokenizer, datasets_io.ByteTokenizer) and vocab_size < 256:
        raise TaskError(f"task {task.name!r}: exact_match needs a tokenizer that can decode; the byte fallback decodes "
                        f"only with a vocabulary of at least 256 (this model has {vocab_size})")
    refs = [encode(tokenizer, row.values[task.completion], False) for row in rows]
    # without an end-of-sequence token nothing says where a completion ends: cut it at the reference's length
    limits = [len(r) + (0 if eos is None else EXACT_MATCH_SLACK) for r in refs]
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            prompts = []
            for row, limit in zip(rows[i : i + batch_size], limits[i : i + batch_size]):
                ex = with_prompt(encode(tokenizer, row.values[task.prompt], True), [0] * max(limit, 1), max_length, row.where)
                prompts.append(ex.ids[: ex.start])
            out += [decode(tokenizer, got) for got in greedy(model, prompts, limits[i : i + batch_size], eos, pad, device)]
    return out


def exact_match(model: Any, task: Task, rows: Sequence[TaskRow], tokenizer: Any, pad: int, accelerator: Any,
                 batch_size: int, max_length: int, vocab_size: int) -> float:
    """The fraction of rows whose greedy completion equals the reference after strip()."""
    import torch

    device = accelerator.device
    mine = list(rows[accelerator.process_index :: accelerator.num_processes])
    got = completions(model, task, mine, tokenizer, pad, device, batch_size, max_length, vocab_size)
    correct = sum(g.strip() == row.values[task.completion].strip() for g, row in zip(got, mine))
    total = accelerator.reduce(torch.tensor(float(len(mine)), dtype=torch.float64, device=device), "sum")
    return float(accelerator.reduce(torch.tensor(float(correct), dtype=torch.float64, device=device), "sum") / total)


def row_nll(model: Any, examples: Sequence[Example], pad: int, device: Any, batch_size: int) -> list[tuple[float, int]]:
    """Each example's (total NLL of its scored tokens, number of scored tokens)."""
    import torch

    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, labels = (t.to(device) for t in collate(examples[i : i + batch_size], pad))
            logits = model(input_ids=ids, use_cache=False).logits
            nll = (-sequence_log_likelihood(logits, labels, "sum").double()).tolist()
            count = (labels[:, 1:] != datasets_io.IGNORE_INDEX).sum(-1).tolist()
            out += list(zip(nll, count))
    return out


def score(model: Any, task: Task, rows: Sequence[TaskRow], examples: Sequence[Example], tokenizer: Any, pad: int,
           accelerator: Any, batch_size: int, max_length: int, vocab_size: int) -> float:
    if task.metric == "loss":
        return mean_nll(model, examples, pad, accelerator, batch_size)
    if task.metric == "accuracy":
        return accuracy(model, task, rows, tokenizer, pad, accelerator, batch_size, max_length)
    return exact_match(model, task, rows, tokenizer, pad, accelerator, batch_size, max_length, vocab_size)


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
    _, rows = tasks.split(task)
    if adapter_dir is not None and not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise TaskError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    model = load_model(model_dir)
    vocab = int(model.config.vocab_size)
    tokenizer = datasets_io.load_tokenizer(model_dir, vocab)
    examples = tasks.examples(task, rows, tokenizer, max_length)
    tasks.check_vocab(examples, vocab, rows)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.fspath(adapter_dir))
    accelerator = Accelerator()
    model.to(accelerator.device).eval()
    return score(model, task, rows, examples, tokenizer, datasets_io.pad_id(tokenizer), accelerator, batch_size, max_length, vocab)


# what scores mean: `fmhub.ml.selection` keys cached scores by it, so bump it when a metric's definition changes
evaluate.version = "1"  # type: ignore[attr-defined]


# ------------------------------------------------------------------ embeddings


def embeddings(model: Any, prompts: Sequence[list[int]], pad: int, batch_size: int, device: Any) -> "torch.Tensor":
    """[len(prompts), hidden] float32: the mean over real tokens of the last layer's hidden states (cluster slices use it too)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            length = max(len(p) for p in batch)
            ids = torch.full((len(batch), length), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for r, p in enumerate(batch):
                ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
                mask[r, : len(p)] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-1].float()
            m = mask.unsqueeze(-1).float()
            out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)
