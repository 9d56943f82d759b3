"""Provenance of predictions: which training examples are most responsible for what a model answered.

Given a model (optionally with its LoRA adapter), a `fmhub.ml.tasks.Task`, the
rows it was trained on and some queries with the answer to explain (for a
failing example: the wrong answer the model gave), `explain` ranks the
training rows by how much each one pushed the model toward that answer.

**Which rows.** `training_data` reads them off the lineage records
(`fmhub.governance.lineage`): the datasets of every ``finetune`` step behind the model,
following ``merge``/``sparsify``/``patch``/``adapter`` steps back through their
model inputs, so an adapter of a base that was itself fine-tuned counts the
base's data too. A task's eval file, which `fmhub.ml.autotune.train_adapter`
records as an input because it chose the learning rate, is left out when the
adapter's ``fmhub-train.json`` identifies it: nothing was trained on it.

**Answers.** As `fmhub.ml.autotune` trains and scores them: for ``accuracy`` the
prompt is the text and the answer ``" " + class``; for ``exact_match`` the
prompt column and the completion (plus the tokenizer's end-of-sequence token
when it has one); for ``loss`` every token of the text (a query's target is
ignored). Each training row's own answer is its label or completion; a
query's is its target.

**method="gradient"** (TracIn with one checkpoint, Pruthi et al. 2020): the
gradient of each example's answer-token loss (summed NLL) with respect to the
trainable parameters, compressed to ``dim`` numbers by a CountSketch, and
score = cosine(train gradient, query gradient). A positive score means a
gradient step on the training row lowers the loss of the query's target: the
row is a *proponent* of the (wrong) prediction. Rows are ranked by score.

* Parameters: with an adapter, the ones it trains (the LoRA matrices), which
  is what fine-tuning moved. Without one, the last transformer block and the
  output embedding (when it is not tied to the input embedding: a tied one
  would need the gradient of every layer below): the late layers carry most of
  what is specific to an answer, their gradients are cheap (the backward pass
  stops below the last block) and they are a bounded share of any model.
* CountSketch: each parameter entry (numbered across the chosen parameters in
  name order) goes to a bucket and gets a sign, both from seeded arithmetic
  hashes of its number, computed a chunk at a time on the fly; a gradient's
  sketch is the signed sum per bucket. Inner products (so cosines) are
  preserved in expectation, nothing of a parameter's size is stored, and the
  training rows take ``rows x dim`` float32 in memory, whatever the model.
* Per-example gradients come from ``torch.func`` (vmap over a batch, as
  `fmhub.models.fisher` does), or one backward pass per example when the model cannot
  be vmapped; batches are shrunk so their gradients stay under
  `GRAD_BUDGET` numbers.

**method="embedding"**: cosine similarity of the prompts' mean-pooled
last-layer hidden states (padding excluded), restricted to the training rows
whose own answer is the query's target (label equal; completion equal after
``strip()``; every row for ``loss``): those are the rows that support the
prediction, and among them the most similar inputs. A query whose target no
training row has gets an empty list. Cheaper than gradients, and blind to what
the model learned from a row.

Deterministic: dropout off (``model.eval()``), seeded hashes, ties ranked by
row position. On the CPU two calls give identical scores; on a GPU summation
order (atomics) can change the last bits.
"""

from __future__ import annotations

import os
import random
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from fmhub.ml import autotune, identity, tasks
from fmhub.base import boundedjson
from fmhub.data import texts as datasets_io
from fmhub.governance import gate, lineage
from fmhub.ml.scoring import embeddings
from fmhub.ml.tasks import Task
from fmhub.base.errors import FmhubError
from fmhub.models.fisher import load_model, sequence_log_likelihood

if TYPE_CHECKING:
    import torch

METHODS = ("gradient", "embedding")
MODEL_STEPS = ("finetune", "merge", "sparsify", "patch", "adapter", "rebase")  # steps whose output is a model, followed to its inputs
CHUNK = 1 << 20  # parameter entries hashed at a time: the sketch's working memory, whatever the model's size
GRAD_BUDGET = 1 << 27  # most gradient numbers held at once (B examples x chosen parameters): 512 MiB of float32
_PRIME = (1 << 31) - 1  # the hashes work mod this Mersenne prime: every product fits in an int64


class ProvenanceError(FmhubError):
    """Provenance that cannot be computed: no lineage to find the training data, or bad rows, targets or options."""


@dataclass
class Influence:
    """One training row's share in a query's prediction: higher ``score`` pushed the model more toward the target."""

    index: int  # position in train_rows
    score: float  # cosine similarity in [-1, 1]
    row: dict


# ------------------------------------------------------------------ which rows


def training_data(model_or_adapter: str, cwd: str = ".", rev: Optional[str] = None) -> list[str]:
    """The datasets ``model_or_adapter`` was trained on, from its lineage records and those of the models it came from.

    Paths are relative to ``cwd`` (so they open from there); a dataset a
    record pins to a revision is given as ``REV:PATH`` (repo-relative), as
    `fmhub.governance.lineage` names inputs. Order: as found walking back from the model,
    each once.

    :raises ProvenanceError: no record, or records naming no training dataset.
    """
    root = lineage.repo_root(cwd)
    start = lineage._rel(os.path.join(cwd, os.fspath(model_or_adapter)), root)
    found: list[str] = []
    seen: set[tuple[str, Optional[str]]] = set()
    first = (start, rev)  # ``rev``: the model as committed there (its record read at that revision)
    todo: list[tuple[str, Optional[str]]] = [first]
    while todo:
        path, rev = todo.pop(0)
        if (path, rev) in seen:
            continue
        seen.add((path, rev))
        rec = lineage.read(path, rev, root)
        if rec is None and (path, rev) == first:
            raise ProvenanceError(f"{model_or_adapter} has no lineage record ({model_or_adapter}{lineage.SUFFIX}) to find its "
                                  "training data in; record lineage by training with fmhub finetune/run, or pass --train")
        if rec is None or rec.get("step") not in MODEL_STEPS:
            continue
        held_out = _eval_sha256(path, rev, root) if rec.get("step") == "finetune" else None
        for inp in rec.get("inputs", []):
            ipath, irev = str(inp.get("path")), inp.get("rev") or rev
            kind = inp.get("kind") or lineage._kind(os.path.join(root, ipath))
            if kind == "model":
                todo.append((ipath, irev))
            elif kind == "dataset":
                if held_out is not None and irev is None and _sha256(os.path.join(root, ipath)) == held_out:
                    continue  # the eval file that chose the learning rate: not trained on
                name = f"{irev}:{ipath}" if irev else os.path.relpath(os.path.join(root, ipath), cwd)
                if name not in found:
                    found.append(name)
    if not found:
        raise ProvenanceError(f"{model_or_adapter}: no training data in its lineage ({model_or_adapter}{lineage.SUFFIX} "
                              "names no fine-tuning dataset); record lineage by training with fmhub finetune/run, or pass --train")
    return found


def _eval_sha256(path: str, rev: Optional[str], root: str) -> Optional[str]:
    """The sha256 of the eval file `fmhub.ml.autotune` recorded in ``path``'s fmhub-train.json, when it used one apart from its data."""
    if rev is not None:
        return None  # a committed record: its eval file is not in the work tree to compare with
    try:
        with open(os.path.join(root, path, autotune.TRAIN_FILE), "rb") as f:  # a clone's record: bounded
            rec = boundedjson.loads(f.read(lineage.MAX_RECORD_BYTES + 1), allow_nan=True)  # cut: not JSON, so None
        data, held = rec["data"]["sha256"], rec["eval"].get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return held if isinstance(held, str) and held != data else None


def _sha256(path: str) -> Optional[str]:
    from fmhub.core.store import file_sha256

    return file_sha256(path) if os.path.isfile(path) else None


# ------------------------------------------------------------------ rows -> examples


def _check_rows(task: Task, train_rows: Sequence[dict], queries: Sequence[dict], targets: Sequence[str]) -> None:
    if not train_rows:
        raise ProvenanceError("no training rows to rank; give the rows the model was trained on (see training_data)")
    if len(queries) != len(targets):
        raise ProvenanceError(f"{len(queries)} queries but {len(targets)} targets; give one target (the answer to explain) per query")
    prompt = task.prompt if task.metric == "exact_match" else task.text
    for i, row in enumerate(train_rows):
        for col in task.columns():
            if not isinstance(row, dict) or not isinstance(row.get(col), str):
                raise ProvenanceError(f"training row {i}: no string {col!r} column; task {task.name!r} (metric {task.metric}) "
                                      f"needs {', '.join(task.columns())}")
        if task.metric == "accuracy" and row[task.label] not in (task.classes or ()):
            raise ProvenanceError(f"training row {i}: label {row[task.label]!r} is not one of the classes {task.classes} "
                                  f"of task {task.name!r}")
    for i, (row, target) in enumerate(zip(queries, targets)):
        if not isinstance(row, dict) or not isinstance(row.get(prompt), str):
            raise ProvenanceError(f"query {i}: no string {prompt!r} column, which task {task.name!r} prompts with")
        if task.metric == "accuracy" and target not in (task.classes or ()):
            raise ProvenanceError(f"query {i}: target {target!r} is not one of the classes {task.classes} of task {task.name!r}; "
                                  "give the class the model predicted")
        if task.metric == "exact_match" and not isinstance(target, str):
            raise ProvenanceError(f"query {i}: the target must be the completion to explain (a string), got {type(target).__name__}")


def _to_examples(task: Task, rows: Sequence[dict], what: str, tokenizer: Any, vocab: int, max_length: int) -> list[tasks.Example]:
    """`fmhub.ml.autotune`'s training examples of ``rows`` (prompt + answer, only the answer scored)."""
    wrapped = [tasks.TaskRow(f"{what} {i}", dict(r), 0) for i, r in enumerate(rows)]
    try:
        examples = tasks.examples(task, wrapped, tokenizer, max_length)
        tasks.check_vocab(examples, vocab, wrapped)
    except tasks.TaskError as exc:
        raise ProvenanceError(str(exc)) from None
    return examples


def _with_targets(task: Task, queries: Sequence[dict], targets: Sequence[str]) -> list[dict]:
    """Each query with its target as its answer (the text itself for ``loss``)."""
    if task.metric == "accuracy":
        return [{**q, task.label: t} for q, t in zip(queries, targets)]
    if task.metric == "exact_match":
        return [{**q, task.completion: t} for q, t in zip(queries, targets)]
    return [dict(q) for q in queries]


# ------------------------------------------------------------------ CountSketch


def _coefficients(seed: int) -> list[int]:
    """Six hash coefficients in [1, p): three for the bucket, three for the sign."""
    rng = random.Random(f"fmhub.ml.explain:{seed}")  # a str seed is hashed the same in every process
    return [rng.randrange(1, _PRIME) for _ in range(6)]


def _hash(idx: "torch.Tensor", a: int, b: int, c: int) -> "torch.Tensor":
    """A hash of int64 entry numbers into [0, p): linear in their two 31-bit halves, then squared (so not linear)."""
    h = (a * (idx % _PRIME) + b * (idx // _PRIME) + c) % _PRIME
    return (h * h + c) % _PRIME


def _buckets(start: int, end: int, dim: int, coef: Sequence[int], device: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(bucket, sign) of entries ``start``..``end``-1: a function of the entry number alone, not of the chunking."""
    import torch

    idx = torch.arange(start, end, dtype=torch.int64, device=device)
    bucket = _hash(idx, *coef[:3]) % dim
    sign = 1.0 - 2.0 * (_hash(idx, *coef[3:]) & 1).to(torch.float32)
    return bucket, sign


def _sketch(grads: dict[str, "torch.Tensor"], names: Sequence[str], offsets: dict[str, int], dim: int,
            coef: Sequence[int]) -> "torch.Tensor":
    """[B, dim] CountSketch of a batch of per-example gradients ({name: [B, *shape]})."""
    import torch

    first = grads[names[0]]
    out = torch.zeros((first.shape[0], dim), dtype=torch.float32, device=first.device)
    for name in names:
        g = grads[name].reshape(first.shape[0], -1)
        for s in range(0, g.shape[1], CHUNK):
            part = g[:, s : s + CHUNK].float()
            bucket, sign = _buckets(offsets[name] + s, offsets[name] + s + part.shape[1], dim, coef, g.device)
            out.index_add_(1, bucket, part * sign)
    return out


# ------------------------------------------------------------------ gradients


def _choose_parameters(model: Any, adapter: bool) -> dict[str, "torch.Tensor"]:
    """The parameters whose gradients are compared (see the module docstring); every other one stops needing a gradient."""
    import torch

    if adapter:
        chosen = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        if not lists:
            raise ProvenanceError("cannot find the model's transformer blocks (no ModuleList of layers); explain an adapter instead")
        blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
        ids = {id(p) for p in blocks[-1].parameters()}
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and (inp is None or out.weight is not inp.weight):
            ids.add(id(out.weight))
        chosen = {n: p for n, p in model.named_parameters() if id(p) in ids}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
    if not chosen:
        raise ProvenanceError("the model has no trainable parameters to take gradients of; is the adapter a LoRA adapter?")
    return dict(sorted(chosen.items()))


def _per_example_grads(model: Any, params: dict[str, "torch.Tensor"], examples: Sequence[tasks.Example], pad: int,
                       batch_size: int, device: Any, state: dict) -> Iterator[dict[str, "torch.Tensor"]]:
    """{name: [B, *shape]} gradients of each example's answer NLL, a batch at a time (vmap, else a backward pass each)."""
    import torch

    names = list(params)
    for i in range(0, len(examples), batch_size):
        ids, labels = (t.to(device) for t in tasks.collate(examples[i : i + batch_size], pad))
        if state.get("method") != "loop":
            try:
                grads = _vmap_grads(model, {n: params[n].detach() for n in names}, ids, labels)
            except Exception as exc:  # an op vmap cannot batch: the loop computes the same numbers
                state["method"], state["fallback"] = "loop", f"{type(exc).__name__}: {exc}"
            else:
                state["method"] = "vmap"
                yield grads
                continue
        rows: dict[str, list] = {n: [] for n in names}
        with torch.enable_grad():
            for x, y in zip(ids, labels):
                n = int((y != datasets_io.IGNORE_INDEX).nonzero().max()) + 1  # the answer ends each example: unpadded length
                logits = model(input_ids=x[:n].unsqueeze(0), use_cache=False).logits
                nll = -sequence_log_likelihood(logits, y[:n].unsqueeze(0), "sum")[0]
                got = torch.autograd.grad(nll, [params[k] for k in names], allow_unused=True)
                for k, g in zip(names, got):
                    rows[k].append(g.detach() if g is not None else torch.zeros_like(params[k]))
        yield {k: torch.stack(v) for k, v in rows.items()}


def _vmap_grads(model: Any, params: dict[str, "torch.Tensor"], ids: "torch.Tensor", labels: "torch.Tensor") -> dict:
    from torch.func import functional_call, grad, vmap

    def nll(p: dict, x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        out = functional_call(model, p, (x.unsqueeze(0),), {"use_cache": False}, strict=False)
        return -sequence_log_likelihood(out.logits, y.unsqueeze(0), "sum")[0]

    return vmap(grad(nll), in_dims=(None, 0, 0))(params, ids, labels)


def gradient_sketches(model: Any, params: dict[str, "torch.Tensor"], examples: Sequence[tasks.Example], pad: int, *,
                      dim: int, seed: int, batch_size: int, device: Any) -> "torch.Tensor":
    """[len(examples), dim] float32: each example's answer-loss gradient over ``params``, CountSketched (see the module docstring).

    Memory: the result, one batch of per-example gradients (at most
    `GRAD_BUDGET` numbers) and one `CHUNK` of hashes; never a tensor of
    the parameters' size per example kept.
    """
    import torch

    names = list(params)
    offsets, total = {}, 0
    for n in names:
        offsets[n], total = total, total + params[n].numel()
    batch = max(1, min(batch_size, GRAD_BUDGET // max(total, 1)))
    coef = _coefficients(seed)
    out = torch.zeros((len(examples), dim), dtype=torch.float32)
    row = 0
    state: dict = {}
    for grads in _per_example_grads(model, params, examples, pad, batch, device, state):
        sk = _sketch(grads, names, offsets, dim, coef)
        out[row : row + sk.shape[0]] = sk.cpu()
        row += sk.shape[0]
        del grads
    return out


def _prompt_ids(task: Task, ex: tasks.Example) -> list[int]:
    return ex.ids if task.metric == "loss" else ex.ids[: ex.start]


def _same_answer(task: Task, row: dict, target: str) -> bool:
    if task.metric == "accuracy":
        return row[task.label] == target
    if task.metric == "exact_match":
        return row[task.completion].strip() == str(target).strip()
    return True


# ------------------------------------------------------------------ explain


def explain(model_dir: str, adapter_dir: str | None, task: Task, train_rows: Sequence[dict], queries: Sequence[dict],
            targets: Sequence[str], *, method: str = "gradient", k: int = 10, max_length: int = 128, batch_size: int = 16,
            dim: int = 4096, seed: int = 0) -> list[list[Influence]]:
    """For each query, the ``k`` training rows most responsible for the model answering its target, most first.

    :param model_dir: a ``save_pretrained`` directory of the causal LM (the base, when ``adapter_dir`` is given).
    :param adapter_dir: the ``peft`` LoRA adapter that was trained, or None to explain the model itself.
    :param task: how rows become prompts and answers (its metric, classes and columns).
    :param train_rows: the rows the model was trained on (see `training_data`), as dicts with the task's columns.
    :param queries: rows to explain (the task's prompt column is enough).
    :param targets: one per query: the answer to explain (the predicted class; the generated completion; ignored for loss).
    :param method: ``"gradient"`` (TracIn: sketched gradient cosine) or ``"embedding"`` (prompt-embedding cosine among
        rows with the same answer); see the module docstring.
    :param k: rows returned per query (fewer when fewer are eligible).
    :param max_length: examples are cut to this many tokens, as autotune cuts them.
    :param batch_size: examples per forward pass (gradient batches may be smaller, see `GRAD_BUDGET`).
    :param dim: sketch dimensions for ``gradient``; more is closer to the exact cosine.
    :param seed: the sketch's hashes.
    :return: one list of `Influence` per query, by score (ties: lower index first).
    :raises ProvenanceError: bad method or options, no training rows, queries and targets of different lengths,
        a target that is not a class, rows missing the task's columns, a directory that is not an adapter.
    """
    import torch

    if method not in METHODS:
        raise ProvenanceError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if k < 1 or dim < 1 or batch_size < 1 or max_length < 2:
        raise ProvenanceError(f"k, dim and batch_size must be >= 1 and max_length >= 2; got {k}, {dim}, {batch_size}, {max_length}")
    _check_rows(task, train_rows, queries, targets)
    if adapter_dir is not None and not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ProvenanceError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    if not queries:
        return []

    from accelerate import Accelerator

    model_dir = os.fspath(model_dir)
    model = load_model(model_dir, attn_implementation="eager")  # eager attention: vmap has no rule for sdpa kernels
    vocab = int(model.config.vocab_size)
    tokenizer = datasets_io.load_tokenizer(model_dir, vocab)
    pad = datasets_io.pad_id(tokenizer)
    train = _to_examples(task, train_rows, "training row", tokenizer, vocab, max_length)
    asked = _to_examples(task, _with_targets(task, queries, targets), "query", tokenizer, vocab, max_length)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.fspath(adapter_dir), is_trainable=True)  # trainable: its gradients are wanted
    device = Accelerator().device
    model.to(device).eval()  # no dropout: the gradients and embeddings are the model's, not a sample's

    if method == "gradient":
        params = _choose_parameters(model, adapter_dir is not None)
        kw = dict(dim=dim, seed=seed, batch_size=batch_size, device=device)
        left = gradient_sketches(model, params, train, pad, **kw)
        right = gradient_sketches(model, params, asked, pad, **kw)
        eligible = torch.ones((len(asked), len(train)), dtype=torch.bool)
    else:
        left = embeddings(model, [_prompt_ids(task, e) for e in train], pad, batch_size, device)
        right = embeddings(model, [_prompt_ids(task, e) for e in asked], pad, batch_size, device)
        eligible = torch.tensor([[_same_answer(task, r, t) for r in train_rows] for t in targets], dtype=torch.bool)
    del model
    scores = _cosine(right, left)  # [queries, train]
    out = []
    for q in range(len(asked)):
        s = scores[q].masked_fill(~eligible[q], float("-inf"))
        order = torch.sort(s, descending=True, stable=True).indices[: min(k, int(eligible[q].sum()))]
        out.append([Influence(int(i), float(scores[q, i]), train_rows[int(i)]) for i in order])
    return out


def _cosine(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """[len(a), len(b)] cosine similarities (0 against a zero vector), in float64 so that ties are real ties."""
    a, b = a.double(), b.double()
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-30)
    b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return a @ b.T


def precision_at_k(ranked: Sequence[Sequence[int]], relevant: set[int], k: int) -> float:
    """Mean over queries of |top-k ∩ relevant| / k: how much of each top-k is the rows known to matter (e.g. planted ones).

    A ranking shorter than ``k`` counts its missing places as misses.
    """
    if k < 1:
        raise ProvenanceError(f"k must be >= 1, got {k}")
    if not ranked:
        raise ProvenanceError("no rankings to score; give at least one query's ranked row indices")
    return sum(len(set(list(r)[:k]) & relevant) / k for r in ranked) / len(ranked)


# ------------------------------------------------------------------ an eval's failing rows


def explain_eval(loaded: Any, name: Optional[str] = None, *, slice_name: Optional[str] = None, rows: Optional[Sequence[int]] = None,
                 limit: int = 5, k: int = 10, method: str = "gradient", train: Optional[Sequence[str]] = None,
                 model: Optional[str] = None, adapter: Optional[str] = None) -> dict[str, Any]:
    """Explain an eval's failing predictions (``fmhub explain``): its stored predictions, the model that made them, its training data.

    :param loaded: the `fmhub.project.spec.LoadedSpec`.
    :param slice_name: take failing rows of this slice (default: any failing row).
    :param rows: positions in ``predictions.jsonl`` to explain instead (failing or not).
    :param limit: at most this many rows.
    :param train: training data files (default: `training_data` of the eval's model, or its adapter).
    :param model: the model (``PATH`` or ``PATH@REV``) whose predictions to explain, as ``fmhub eval --model`` wrote
        them (default: the eval's declared model); ``adapter`` the same for an adapter.
    :return: ``{"eval", "model", "adapter", "identity", "predictions", "method", "train": [files], "queries": [{"row",
        "where", "text", "target", "prediction", "influences": [{"index", "file", "where", "score", "text", "label"}]}]}``;
        ``index`` counts rows across the training files in order.
    :raises ProvenanceError: no predictions yet, predictions of another model (or other weights or config) than the
        one to explain, a predictions file edited or copied in since eval wrote it, a row or slice that is not there,
        no failing row, no training data.
    """
    from fmhub.ml import evaluation

    p = evaluation.plan(loaded, name, model=model, adapter=adapter, read_rows=False)
    pred_path = os.path.join(p.output, evaluation.PREDICTIONS)
    ident = _checked_identity(loaded, p, pred_path, model, adapter)
    preds = evaluation.load_predictions(pred_path, p.output, loaded.root)
    picked = _pick(p, preds, pred_path, rows, slice_name)[:limit]
    owner = p.adapter or p.model
    files = list(train) if train else training_data(owner.path if owner.rev else identity.place(owner.dir, loaded.root, real=True),
                                                    loaded.root, owner.rev)
    train_rows, where = _training_rows(loaded, p, files)
    queries = [preds[i]["row"] for i in picked]
    targets = [str(preds[i]["prediction"]) if preds[i].get("prediction") is not None else "" for i in picked]
    ranked = explain(p.model.dir, p.adapter.dir if p.adapter else None, p.task, train_rows, queries, targets, method=method, k=k)
    text_col = p.task.prompt if p.task.metric == "exact_match" else p.task.text
    answer_col = {"accuracy": p.task.label, "exact_match": p.task.completion}.get(p.task.metric)
    out = []
    for i, infl in zip(picked, ranked):
        out.append({"row": i, "where": preds[i].get("where"), "text": preds[i]["row"].get(text_col), "target": preds[i].get("target"),
                    "prediction": preds[i].get("prediction"),
                    "influences": [{"index": x.index, "file": where[x.index][0], "where": f"{where[x.index][0]}:{where[x.index][1]}",
                                    "score": x.score, "text": x.row.get(text_col), "label": x.row.get(answer_col) if answer_col else None}
                                   for x in infl]})
    return {"eval": p.name, "model": p.model.given, "adapter": p.adapter.given if p.adapter else None, "identity": ident,
            "described": identity.describe(ident), "predictions": os.path.relpath(pred_path, loaded.root), "method": method,
            "train": files, "queries": out}


def _checked_identity(loaded: Any, p: Any, pred_path: str, model: Optional[str], adapter: Optional[str]) -> dict[str, Any]:
    """The identity of the model to explain, refused unless the predictions were made by exactly it (same path, same weights)."""
    rel = os.path.relpath(pred_path, loaded.root)
    again = shlex.join(["fmhub", "eval", p.name] + (["--model", model] if model else []) + (["--adapter", adapter] if adapter else []))
    if not os.path.isfile(pred_path):
        raise ProvenanceError(f"{rel}: no predictions; run `{again}` first")
    ident = identity.of(p.model, p.adapter, loaded.root)
    there = identity.recorded(pred_path)
    if there is None or identity.who(there) != identity.who(ident) or there.get("id") != ident["id"]:
        raise ProvenanceError(f"{rel} holds predictions of {identity.describe(there)}, not of {identity.describe(ident)}, whose "
                              f"gradients explain would take; run `{again}` first, then explain")
    if not identity.intact(pred_path):  # the record names the model, but these may be another model's rows copied in
        raise ProvenanceError(f"{rel} is not the file fmhub eval wrote for {identity.describe(ident)} (edited or copied in "
                              f"since); run `{again}` first, then explain")
    return ident


def _pick(p: Any, preds: list[dict], pred_path: str, rows: Optional[Sequence[int]], slice_name: Optional[str]) -> list[int]:
    """The positions of the predictions to explain: ``rows``, else the failing ones (of ``slice_name``)."""
    if rows:
        bad = [r for r in rows if not 0 <= r < len(preds)]
        if bad:
            raise ProvenanceError(f"row {bad[0]} is not in {pred_path} ({len(preds)} rows, counted from 0)")
        return list(rows)
    if slice_name is not None and not any(slice_name in r.get("slices", []) for r in preds):
        raise ProvenanceError(f"no row of the predictions is in slice {slice_name!r}; slices: "
                              f"{', '.join(sorted({s for r in preds for s in r.get('slices', [])})) or 'none'}")
    picked = [i for i, r in enumerate(preds) if r.get("correct") is False and (slice_name is None or slice_name in r.get("slices", []))]
    if p.task.metric == "loss":  # no right or wrong: the worst-scored rows
        picked = sorted(range(len(preds)), key=lambda i: -float(preds[i]["score"]))
        picked = [i for i in picked if slice_name is None or slice_name in preds[i].get("slices", [])]
    if not picked:
        raise ProvenanceError(f"no failing prediction{' in slice ' + repr(slice_name) if slice_name else ''} to explain")
    return picked


def _training_rows(loaded: Any, p: Any, files: Sequence[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The training rows of ``files`` (``REV:PATH`` as lineage pins them), through the governance gate, and where each is."""
    train_rows, where = [], []
    for f in files:
        path = f if os.path.isabs(f) else os.path.join(loaded.root, f)
        if ":" in f and not os.path.exists(path):  # REV:PATH, as lineage pins it
            from fmhub.data.revision import materialize

            rev, rel = f.split(":", 1)
            path, governed = materialize(rel, rev, loaded.root), os.path.join(loaded.root, rel)
        else:
            governed = None
        # through the governance gate, as `fmhub eval` reads: rows the user may not read are never candidates
        for r in tasks.read_rows(path, p.task, step=gate.pipeline_step(loaded, "eval", p.name), governed_as=governed):
            train_rows.append(r.values)
            where.append((f, r.where.rsplit(":", 1)[1]))
    return train_rows, where
