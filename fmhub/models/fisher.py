"""Empirical diagonal Fisher information of a causal LM, saved as a checkpoint-shaped safetensors file.

For a model with parameters θ and examples x₁…x_N (token sequences),

    F = 1/N · Σₙ (∇θ log p(xₙ))²         elementwise,

where log p(xₙ) = Σₜ log p(xₙ,ₜ | xₙ,<ₜ) is the log-likelihood of the
example's labels (its tokens after the first; ``reduction="mean"`` divides it
by the number of label tokens instead). This is the *empirical* Fisher: the
square is taken per example, before averaging, as Matena & Raffel (2022)
and FishMask (Sung et al., 2021) use it. Squaring a batch's summed gradient
instead would add cross terms between examples and is not a Fisher.

Per-example gradients come from ``torch.func`` (``functional_call`` +
``vmap`` + ``grad``): one vectorised pass per batch, whose peak memory is
about ``batch_size`` copies of the model's parameters in float32. When a model
cannot be traced by ``vmap`` (or a batch does not fit in memory),
``method="auto"`` falls back to ``"loop"``: micro-batches of one example,
each its own backward pass (the same numbers, slower, one gradient's memory). The model runs in float32, in eval mode (no dropout), with eager
attention (scaled-dot-product kernels have no ``vmap`` batching rule).

Devices come from `accelerate`: the model is placed on
``Accelerator().device`` (a GPU when there is one). With several processes
(``accelerate launch``) each takes every num_processes-th example, and the
float64 sums are added across processes with ``Accelerator.reduce`` before
dividing by N, so the result does not depend on the number of processes (up
to float rounding). The model is not wrapped in DistributedDataParallel on
purpose: DDP averages gradients across processes, which would mix examples
before they are squared.

Reproducibility: no randomness is involved except which examples are used
when ``max_examples`` is below the data size (a subset drawn with ``seed``,
kept in data order); sums are accumulated in float64 in a fixed order.

The output has exactly the tensors of the model's saved checkpoint
(``model.safetensors`` or the shards named by its index), in file order, with
their shapes, as F32. Tied weights (``lm_head.weight`` sharing
``model.embed_tokens.weight``) are saved once, under the name the checkpoint
uses, with the Fisher of the shared parameter (the gradient sums both uses).
Checkpoint tensors that are buffers, not parameters, get zeros. The header's
``__metadata__`` records ``fmhub_fisher`` ("1"), ``examples``, ``tokens``,
``model``, ``seed``, ``reduction``, ``max_length`` and ``tokenizer``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal

from fmhub.base import boundedjson
from fmhub.data import texts as datasets_io
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.models.views import CheckpointView, open_view

if TYPE_CHECKING:
    import torch

Reduction = Literal["sum", "mean"]
Method = Literal["auto", "vmap", "loop"]
FISHER_FORMAT = "1"
MAX_INDEX_BYTES = 64 << 20  # a model.safetensors.index.json names every tensor once: a few MiB for the largest models


class FisherMismatch(FmhubError):
    """A Fisher file whose tensor names or shapes differ from the model's."""


class BadFisherValues(FmhubError):
    """A Fisher file holding negative, NaN/Inf or non-float values."""


@dataclass
class FisherReport:
    """What `compute_fisher` did."""

    output: str
    examples: int  # N, the examples averaged over
    tokens: int  # label tokens in those examples
    tensors: int
    parameters: int  # elements written
    method: str  # "vmap" or "loop"
    device: str
    seconds: float
    fallback: str | None = None  # why "auto" fell back from vmap to the loop, if it did


# ------------------------------------------------------------------ the model and its checkpoint


def checkpoint_view(path: str) -> CheckpointView:
    """The model checkpoint at ``path``: a ``.safetensors`` file, ``REV:PATH``, or a model directory.

    In a directory saved by ``save_pretrained`` only the model's own files count
    (``model.safetensors`` or the shards its ``model.safetensors.index.json``
    names), so other safetensors files lying there (a Fisher file, an adapter)
    are not mistaken for weights; a directory without them is read whole.
    """
    if os.path.isdir(path):
        files = model_files(path)
        if files:
            return CheckpointView.combine([CheckpointView.from_file(f) for f in files], path)
    return open_view(path)


def model_files(model_dir: str) -> list[str]:
    """The safetensors files holding a ``save_pretrained`` model's weights ([] when none is there)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        return [os.path.join(model_dir, name) for name in _shards(index)]
    single = os.path.join(model_dir, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def _shards(index: str) -> list[str]:
    """The shard files a sharded checkpoint's index names: plain names beside it; one error line for anything else.

    The index comes with the model, from a clone: it is read within a size and
    nesting bound, and a name such as ``../../x`` or ``/dev/zero`` is refused,
    never opened.
    """
    try:
        with open(index, "rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
        if len(data) > MAX_INDEX_BYTES:
            raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
        doc = boundedjson.loads(data)
    except (OSError, ValueError) as exc:
        raise FmhubError(f"{index}: not a sharded checkpoint's index ({exc})") from None
    weight_map = (doc.get("weight_map") if isinstance(doc, dict) else None) or {}
    if not isinstance(weight_map, dict):
        raise FmhubError(f"{index}: weight_map is not a mapping of tensor names to files")
    for name in weight_map.values():
        if not isinstance(name, str) or name in ("", ".", "..") or name != os.path.basename(name) or "\\" in name:
            raise FmhubError(f"{index}: weight_map names {str(name)[:100]!r}, not a file beside the index")
    return sorted(set(weight_map.values()))


def load_model(model_dir: str, attn_implementation: str | None = None) -> Any:
    """A ``transformers`` causal LM from ``model_dir`` (config + safetensors) in the checkpoint's dtype, on the CPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FmhubError(f"{model_dir}: not a transformers model directory (no config.json)")
    hf_logging.disable_progress_bar()
    import transformers

    # the checkpoint's own dtype, so that what is saved back has the dtypes it had
    # (transformers 4.x loads float32 unless told; 5.x names the argument `dtype`)
    kwargs: dict[str, Any] = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def parameter_names(model: Any) -> dict[str, str]:
    """Every name a parameter goes by (tied ones have several) -> the one ``named_parameters()`` gives."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def match_checkpoint(model: Any, view: CheckpointView) -> dict[str, str | None]:
    """Checkpoint tensor name -> the model parameter it holds, or None for a buffer.

    :raises FmhubError: a checkpoint tensor that is neither a parameter nor
        a buffer of the model, or whose shape differs from it.
    """
    params = parameter_names(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: tuple(b.shape) for n, b in model.named_buffers()}
    out: dict[str, str | None] = {}
    problems = []
    for ref in view:
        want = shapes.get(ref.name, buffers.get(ref.name))
        if want is None:
            problems.append(f"{ref.name} is not a parameter of the loaded model")
        elif want != tuple(ref.shape):
            problems.append(f"{ref.name} is {list(ref.shape)} in the checkpoint, {list(want)} in the model")
        else:
            out[ref.name] = params.get(ref.name)
    if problems:
        raise FmhubError(f"{view.label}: the checkpoint does not match the model its config builds: " + "; ".join(problems[:10]))
    return out


# ------------------------------------------------------------------ log-likelihood


def sequence_log_likelihood(logits: "torch.Tensor", labels: "torch.Tensor", reduction: Reduction = "sum") -> "torch.Tensor":
    """Per example: Σₜ log p(labelₜ₊₁ | ≤ t) over labels that are not -100, ``[B]`` float32.

    ``reduction="mean"`` divides each example's sum by its number of label tokens.
    """
    import torch

    logp = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    target = labels[..., 1:]
    valid = target != datasets_io.IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (picked * valid).sum(dim=-1)
    if reduction == "mean":
        total = total / valid.sum(dim=-1).clamp(min=1)
    return total


def _per_example_vmap(model: Any, params: dict, buffers: dict, ids: "torch.Tensor", labels: "torch.Tensor", reduction: Reduction) -> dict:
    """{parameter name: [B, *shape] gradient of each example's log-likelihood}, by torch.func."""
    from torch.func import functional_call, grad, vmap

    def log_likelihood(p: dict, x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),), {"use_cache": False})
        return sequence_log_likelihood(out.logits, y.unsqueeze(0), reduction)[0]

    return vmap(grad(log_likelihood), in_dims=(None, 0, 0))(params, ids, labels)


def _per_example_loop(model: Any, params: dict, ids: "torch.Tensor", labels: "torch.Tensor", reduction: Reduction) -> Iterator[dict]:
    """One example at a time, unpadded: {parameter name: gradient} per example."""
    import torch

    names = list(params)
    for x, y in zip(ids, labels):
        n = int((y != datasets_io.IGNORE_INDEX).sum())  # right padding: the real tokens come first
        out = model(input_ids=x[:n].unsqueeze(0), use_cache=False)
        ll = sequence_log_likelihood(out.logits, y[:n].unsqueeze(0), reduction)[0]
        grads = torch.autograd.grad(ll, [params[k] for k in names], allow_unused=True)
        yield {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, grads)}


# ------------------------------------------------------------------ compute


def compute_fisher(
    model_dir: str,
    data: datasets_io.Data,
    output: str,
    *,
    batch_size: int = 8,
    max_examples: int | None = None,
    max_length: int = 128,
    seed: int = 0,
    reduction: Reduction = "sum",
    method: Method = "auto",
) -> FisherReport:
    """Compute the empirical diagonal Fisher of the causal LM in ``model_dir`` on ``data`` and save it.

    :param model_dir: a ``save_pretrained`` directory (``config.json`` + safetensors).
    :param data: texts, token-id lists, or a ``.jsonl``/``.txt`` file (see `fmhub.data.texts`);
        texts use the directory's tokenizer, or bytes modulo the vocabulary when it has none.
    :param output: the ``.safetensors`` file to write (atomically: temp file, fsync, rename).
    :param batch_size: examples per vectorised pass (memory ≈ batch_size × the model in float32).
    :param max_examples: use at most this many examples, a subset drawn with ``seed``.
    :param max_length: truncate examples to this many tokens.
    :param seed: picks the subset; recorded in the metadata.
    :param reduction: ``"sum"`` (sequence log-likelihood) or ``"mean"`` (per label token) per example.
    :param method: ``"vmap"``, ``"loop"`` (one example per backward pass), or ``"auto"``
        (vmap, falling back to the loop when the model cannot be vmapped).
    :return: a `FisherReport`.
    :raises FmhubError: no usable data, a model directory that is not one, a bad option.
    """
    import torch
    from accelerate import Accelerator

    if batch_size < 1:
        raise FmhubError(f"batch_size must be at least 1, got {batch_size}")
    if reduction not in ("sum", "mean"):
        raise FmhubError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if method not in ("auto", "vmap", "loop"):
        raise FmhubError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    start = time.monotonic()
    model_dir, output = os.fspath(model_dir), os.fspath(output)
    view = checkpoint_view(model_dir)
    model = load_model(model_dir, attn_implementation="eager").float().eval()
    names = match_checkpoint(model, view)
    vocab = int(model.config.vocab_size)
    examples, tokenizer = datasets_io.prepare(data, model_dir, vocab, max_length)
    examples = subset(examples, max_examples, seed)

    accelerator = Accelerator()
    model.to(accelerator.device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    pad = datasets_io.pad_id(tokenizer)
    used, fallback = method, None
    for i in range(0, len(mine), batch_size):
        ids, labels = (t.to(accelerator.device) for t in datasets_io.collate(mine[i : i + batch_size], pad))
        if used != "loop":
            try:
                grads = _per_example_vmap(model, params, buffers, ids, labels, reduction)
            except Exception as exc:  # an op vmap cannot batch; the loop computes the same numbers
                if method == "vmap":
                    raise FmhubError(f"{model_dir}: per-example gradients with torch.func.vmap failed ({exc}); use method='loop'") from exc
                used, fallback = "loop", f"{type(exc).__name__}: {exc}"
            else:
                used = "vmap"
                for n, g in grads.items():
                    sums[n] += g.double().square().sum(dim=0)
                del grads
                continue
        with torch.enable_grad():
            for g in _per_example_loop(model, dict(model.named_parameters()), ids, labels, reduction):
                for n, t in g.items():
                    sums[n] += t.double().square()
    if used == "auto":  # no examples on this process
        used = "vmap"

    total = len(examples)
    tokens = sum(len(x) - 1 for x in examples)
    for n in sums:
        sums[n] = accelerator.reduce(sums[n], reduction="sum")
    metadata = {
        "fmhub_fisher": FISHER_FORMAT, "examples": str(total), "tokens": str(tokens), "model": os.fspath(model_dir),
        "seed": str(seed), "reduction": reduction, "max_length": str(max_length),
        "tokenizer": datasets_io.tokenizer_name(tokenizer),
    }
    fisher = {}
    for name, param in names.items():
        shape = tuple(view.tensors[name].shape)
        if param is None:
            fisher[name] = torch.zeros(shape, dtype=torch.float32)
        else:
            fisher[name] = (sums[param] / total).to(device="cpu", dtype=torch.float32)
    if accelerator.is_main_process:
        write_fisher(output, fisher, metadata)
    accelerator.wait_for_everyone()
    return FisherReport(
        os.fspath(output), total, tokens, len(fisher), sum(t.numel() for t in fisher.values()),
        used, str(accelerator.device), time.monotonic() - start, fallback,
    )


def subset(examples: list, max_examples: int | None, seed: int) -> list:
    """At most ``max_examples`` of ``examples``, drawn with ``seed``, in their original order."""
    import torch

    if max_examples is None or max_examples >= len(examples):
        return list(examples)
    if max_examples < 1:
        raise FmhubError(f"max_examples must be at least 1, got {max_examples}")
    pick = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:max_examples]
    return [examples[i] for i in sorted(pick.tolist())]


def write_fisher(output: str, fisher: dict[str, "torch.Tensor"], metadata: dict[str, str]) -> None:
    """Write F32 tensors (in dict order) with ``metadata`` to ``output``, atomically, one tensor at a time."""
    from fmhub.core import tensors
    from fmhub.core.formats import format_named
    from fmhub.plugin.interfaces import TensorInfo

    infos = [TensorInfo(n, "F32", tuple(t.shape), t.numel() * 4) for n, t in fisher.items()]
    header = format_named("safetensors").build_header(infos, metadata)
    with atomic_write(os.fspath(output), prefix=".fmhub-fisher-") as f:
        f.write(header)
        for t in fisher.values():
            f.write(tensors.as_buffer(t.float()))


# ------------------------------------------------------------------ validation


def check_fisher_matches(fisher_path: str, checkpoint_path: str, check_values: bool = True) -> None:
    """Make sure a Fisher file fits a checkpoint before it is used for a merge or a sparse update.

    :param fisher_path: the Fisher ``.safetensors`` file (or ``REV:PATH``).
    :param checkpoint_path: the model: a ``.safetensors`` file, a model directory, or ``REV:PATH``.
    :param check_values: also read the Fisher tensors and refuse negative, NaN
        or Inf values (and non-float dtypes); names and shapes are always checked.
    :raises FisherMismatch: tensors missing from the Fisher file, extra ones, or
        shapes that differ; the message names them (the first 10 of each kind).
    :raises BadFisherValues: see ``check_values``.
    """
    fisher_path, checkpoint_path = os.fspath(fisher_path), os.fspath(checkpoint_path)
    fisher = open_view(fisher_path)
    model = checkpoint_view(checkpoint_path)
    problems = fisher_mismatches(fisher, model)
    if problems:
        raise FisherMismatch(
            f"{fisher_path} does not match {checkpoint_path}: {'; '.join(problems)}; "
            "compute the Fisher file for this model (same architecture and tensor names)"
        )
    if check_values:
        check_fisher_values(fisher)


def fisher_mismatches(fisher: CheckpointView, model: CheckpointView) -> list[str]:
    """Human-readable differences in tensor names and shapes ([] when they match)."""
    missing = [n for n in model.tensors if n not in fisher.tensors]
    extra = [n for n in fisher.tensors if n not in model.tensors]
    shapes = [
        f"{n} (Fisher {list(fisher.tensors[n].shape)}, model {list(ref.shape)})"
        for n, ref in model.tensors.items()
        if n in fisher.tensors and tuple(fisher.tensors[n].shape) != tuple(ref.shape)
    ]
    problems = []
    for what, items in (("missing from the Fisher file", missing), ("not in the model", extra), ("with another shape", shapes)):
        if items:
            more = f", and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{len(items)} tensor(s) {what}: {', '.join(items[:10])}{more}")
    return problems


def check_fisher_values(fisher: CheckpointView) -> None:
    """Refuse a Fisher view with non-float dtypes, negative values or NaN/Inf, naming the tensor."""
    for _ in fisher_chunks(fisher):
        pass


CHUNK_ELEMS = 1 << 22  # elements read at a time from big tensors (16 MiB of float32)


def fisher_chunks(view: CheckpointView, chunk: int | None = None) -> Iterator[tuple[Any, "torch.Tensor"]]:
    """(tensor ref, flat float32 chunk) over every tensor of a Fisher view in order, ``chunk`` elements at a time.

    :raises BadFisherValues: a non-float tensor, negative values, NaN or Inf (checked chunk by chunk).
    """
    from fmhub.core import tensors

    for ref in view:
        if ref.dtype not in tensors.FLOAT_DTYPES:
            raise BadFisherValues(f"{view.label}: tensor {ref.name!r} is {ref.dtype}; Fisher values are floating point")
        for piece in iter_chunks(ref, chunk):
            t = tensors.from_bytes(piece, ref.dtype, (len(piece) // tensors.itemsize(ref.dtype),)).float()
            if bool((t < 0).any()):
                raise BadFisherValues(f"{view.label}: tensor {ref.name!r} has negative values; a Fisher diagonal is >= 0")
            if not tensors.all_finite(t):
                raise BadFisherValues(f"{view.label}: tensor {ref.name!r} has NaN or Inf values")
            yield ref, t


def iter_chunks(ref: Any, chunk: int | None = None) -> Iterator[bytes | bytearray | memoryview]:
    """A tensor's bytes, ``chunk`` (default `CHUNK_ELEMS`) flattened elements at a time, read from its file when it has one."""
    chunk = chunk or CHUNK_ELEMS
    numel = ref.numel
    if numel == 0:
        return
    if ref.opener is not None and numel > chunk:
        for start in range(0, numel, chunk):
            yield ref.slice(start, min(numel, start + chunk)).read()
        return
    data = ref.read()
    item = len(data) // numel
    for start in range(0, numel, chunk):
        yield memoryview(data)[start * item : min(numel, start + chunk) * item]
