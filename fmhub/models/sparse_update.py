"""Fisher-guided sparse updates (FishMask, Sung et al. 2021): keep the K% of a model that matters most.

Three ways to use a Fisher file (from `fmhub.models.fisher.compute_fisher`):

* `sparse_update`: after a dense fine-tune, keep the update only on the top
  K% of parameters by Fisher value and reset every other entry to the base's
  bits, so the new version differs from the base in few places;
* `fisher_mask`: the same selection as boolean masks, for training;
* `finetune_masked`: fine-tune only the masked entries of a causal LM; every
  other entry stays bit-exact to the base.

`eval_loss` gives a model's mean token NLL on data, to set the quality of a
sparse update beside the dense one.

**Selection.** K = ceil(k_fraction × N) entries, where N counts the elements
of every tensor of the checkpoint (integer and buffer tensors included: their
Fisher is normally 0, so they rank last), and k_fraction is read as the
decimal it prints as (0.01 of 1,000,000 is 10,000, not 10,001). The ranking is
global across tensors by Fisher value, largest first; ties are broken by
position: tensors in the Fisher file's order, elements in C order, earlier
first (whatever order the checkpoint being sparsified lists its tensors in).

**Exact and streaming.** The K-th largest value is found exactly by a radix
select over the Fisher file: Fisher values are non-negative float32, whose
bit patterns sort like the values, so pass 1 counts the top 16 bits of every
value (32768 bins) and finds the bin holding the K-th largest, and pass 2
counts the low 16 bits within that bin. A third pass, over the tensors with
values in that bin only, counts per tensor the values equal to the K-th
largest, to allot the ties. Memory is the histograms plus one chunk
(`fmhub.models.fisher.CHUNK_ELEMS` elements) of one tensor; the selection is then
applied chunk by chunk while writing. Fisher files in other float dtypes are
ranked after conversion to float32.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Mapping

from fmhub.data import texts as datasets_io
from fmhub.core import tensors
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.models.fisher import (
    FisherMismatch,
    check_fisher_matches,
    checkpoint_view,
    fisher_chunks,
    fisher_mismatches,
    iter_chunks,
    load_model,
    parameter_names,
    sequence_log_likelihood,
)
from fmhub.models.views import CheckpointView, open_view

if TYPE_CHECKING:
    import torch

CONFIG_FILES = ("config.json", "generation_config.json")


class SparseUpdateError(FmhubError):
    """A base and a fine-tune that cannot be combined (missing tensors, other dtypes or shapes), or a bad K."""


# ------------------------------------------------------------------ exact global top-K


def k_for(total: int, k_fraction: float) -> int:
    """ceil(k_fraction × total), with k_fraction read as the decimal it prints as."""
    f = float(k_fraction)
    if not (0.0 <= f <= 1.0):
        raise SparseUpdateError(f"k_fraction must be in [0, 1], got {k_fraction}")
    return math.ceil(Fraction(repr(f)) * total)


@dataclass
class Threshold:
    """Where the global top-K cut falls: every entry above ``bits`` is in, and of the entries equal to it,
    the first ``ties[name]`` of each tensor (C order), allotted to tensors in the Fisher file's order."""

    k: int
    total: int
    bits: int  # float32 bit pattern of the K-th largest value (-1 when k == 0: nothing is in)
    ties: dict[str, int]

    @property
    def value(self) -> float:
        """The K-th largest Fisher value (NaN when K is 0)."""
        import struct

        return struct.unpack("<f", struct.pack("<i", self.bits))[0] if self.bits >= 0 else math.nan

    def selector(self) -> "Selector":
        return Selector(self)


class Selector:
    """Applies a `Threshold` to Fisher chunks; each tensor's chunks must come in order (tensors in any order)."""

    def __init__(self, threshold: Threshold) -> None:
        self.threshold = threshold
        self.ties_left = dict(threshold.ties)

    def take(self, name: str, fisher: "torch.Tensor") -> "torch.Tensor":
        """A bool mask over a flat float32 chunk of tensor ``name``: the entries selected."""
        import torch

        if self.threshold.k == 0:
            return torch.zeros(fisher.shape, dtype=torch.bool)
        bits = _bits(fisher)
        keep = bits > self.threshold.bits
        left = self.ties_left.get(name, 0)
        if left > 0:
            equal = bits == self.threshold.bits
            keep |= equal & (equal.cumsum(0) <= left)
            self.ties_left[name] = left - min(int(equal.sum()), left)
        return keep


def _bits(fisher: "torch.Tensor") -> "torch.Tensor":
    """int32 bit patterns of non-negative float32 values, which sort like the values (-0.0 made +0.0)."""
    import torch

    return fisher.to(torch.float32).abs().contiguous().view(torch.int32)


def find_threshold(fisher: CheckpointView, k_fraction: float) -> Threshold:
    """The exact global top-K cut of a Fisher view (streaming histogram passes; see the module docstring).

    Pass 1 histograms the top 16 bits of every value, pass 2 the low 16 bits
    of the values in the bin holding the K-th largest; pass 3 counts, per
    tensor that has values in that bin, the values equal to the K-th largest,
    so that ties can be allotted by position whatever order tensors are later
    visited in.

    :raises BadFisherValues: negative, NaN/Inf or non-float values, naming the tensor.
    :raises SparseUpdateError: k_fraction outside [0, 1].
    """
    import torch

    total = sum(ref.numel for ref in fisher)
    k = k_for(total, k_fraction)
    high = torch.zeros(1 << 15, dtype=torch.int64)  # sign bit is 0: the top 16 bits are < 2**15
    for _, t in fisher_chunks(fisher):
        high += torch.bincount(_bits(t).reshape(-1) >> 16, minlength=1 << 15)
    if k == 0:
        return Threshold(0, total, -1, {})
    at_or_above = high.flip(0).cumsum(0).flip(0)  # [b] = entries whose top bits are >= b
    hb = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[hb] - high[hb])
    low = torch.zeros(1 << 16, dtype=torch.int64)
    in_bin: set[str] = set()
    for ref, t in fisher_chunks(fisher):
        b = _bits(t).reshape(-1)
        here = b[(b >> 16) == hb] & 0xFFFF
        if here.numel():
            in_bin.add(ref.name)
            low += torch.bincount(here, minlength=1 << 16)
    need = k - above
    low_at_or_above = low.flip(0).cumsum(0).flip(0)
    lb = int((low_at_or_above >= need).nonzero().max())
    threshold = (hb << 16) | lb
    ties_left = k - (above + int(low_at_or_above[lb] - low[lb]))
    equal = dict.fromkeys((ref.name for ref in fisher), 0)
    for ref, t in fisher_chunks(CheckpointView({n: r for n, r in fisher.tensors.items() if n in in_bin}, None, fisher.path)):
        equal[ref.name] += int((_bits(t) == threshold).sum())
    ties = {}
    for name, n in equal.items():  # file order: earlier tensors take their ties first
        ties[name] = min(n, ties_left)
        ties_left -= ties[name]
    return Threshold(k, total, threshold, ties)


def fisher_mask(fisher: str | CheckpointView, k_fraction: float) -> dict[str, "torch.Tensor"]:
    """Boolean masks of the top ``k_fraction`` of entries by Fisher value, global across tensors.

    :param fisher: a Fisher ``.safetensors`` file (or ``REV:PATH``), or an open view of one.
    :param k_fraction: the fraction of all entries to select, in [0, 1]; exactly
        ceil(k_fraction × N) entries are True (ties broken by position).
    :return: {tensor name: bool tensor of its shape}, in file order.
    """
    import torch

    view = open_view(fisher) if isinstance(fisher, (str, os.PathLike)) else fisher
    threshold = find_threshold(view, k_fraction)
    select = threshold.selector()
    pieces: dict[str, list] = {ref.name: [] for ref in view}
    for ref, t in fisher_chunks(view):
        pieces[ref.name].append(select.take(ref.name, t))
    return {
        ref.name: (torch.cat(pieces[ref.name]) if pieces[ref.name] else torch.zeros(0, dtype=torch.bool)).reshape(ref.shape)
        for ref in view
    }


# ------------------------------------------------------------------ sparsify a dense update


@dataclass
class SparseReport:
    """What `sparse_update` kept."""

    output: str
    k_fraction: float
    total: int  # entries ranked (every element of the checkpoint)
    kept: int  # entries taking the fine-tune's value: ceil(k_fraction × total)
    changed: int  # of those, entries whose bits differ from the base's
    update_size: int  # entries where the fine-tune differs from the base at all (the dense update)
    threshold: float  # the K-th largest Fisher value (NaN when K is 0)
    fisher_norm_retained: float  # Σ_kept F·Δ² / Σ_all F·Δ², Δ = fine-tune − base (1.0 for a zero update)
    kept_per_tensor: dict[str, int] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0


def sparse_update(base: str, finetuned: str, fisher: str, output: str, k_fraction: float) -> SparseReport:
    """Keep a fine-tune's update on the top ``k_fraction`` of entries by Fisher value; the base's bits elsewhere.

    Every output entry is bit for bit either the fine-tune's (selected) or the
    base's (not selected). The output has the fine-tune's tensors, in its
    order, with its dtypes and ``__metadata__``. Everything that can be
    checked is checked before anything is written (names, shapes and dtypes,
    Fisher values); the file is written tensor by tensor to a temp file,
    fsynced and renamed.

    :param base: the base checkpoint: a ``.safetensors`` file, a model directory, or ``REV:PATH``.
    :param finetuned: the dense fine-tune, same forms.
    :param fisher: a Fisher file with the fine-tune's tensor names and shapes
        (`fmhub.models.fisher.compute_fisher`; usually of the base on the task's data, as FishMask does).
    :param output: a ``.safetensors`` path, or a directory: ``model.safetensors``
        there plus the fine-tune's ``config.json``/tokenizer files, so transformers loads it.
    :param k_fraction: the fraction of entries to keep, in [0, 1] (see the module docstring for K).
    :return: a `SparseReport`.
    :raises FisherMismatch: the Fisher file's names or shapes differ from the fine-tune's.
    :raises BadFisherValues: negative, NaN/Inf or non-float Fisher values.
    :raises SparseUpdateError: base tensors missing or of another dtype/shape; k_fraction outside [0, 1].
    """
    import torch

    base, finetuned, fisher, output = (os.fspath(p) for p in (base, finetuned, fisher, output))
    base_view, ft_view, fisher_view = checkpoint_view(base), checkpoint_view(finetuned), open_view(fisher)
    problems = fisher_mismatches(fisher_view, ft_view)
    if problems:
        raise FisherMismatch(f"{fisher} does not match {finetuned}: {'; '.join(problems)}; nothing was written")
    _check_pair(base_view, ft_view)
    threshold = find_threshold(fisher_view, k_fraction)

    from fmhub.core.formats import format_named
    from fmhub.plugin.interfaces import TensorInfo

    out_file = output if output.endswith(".safetensors") and not os.path.isdir(output) else os.path.join(output, "model.safetensors")
    header = format_named("safetensors").build_header([TensorInfo(r.name, r.dtype, r.shape, r.size) for r in ft_view], ft_view.metadata)
    select = threshold.selector()
    changed = update_size = 0
    kept_norm = total_norm = 0.0
    per_tensor: dict[str, int] = {}
    with atomic_write(out_file, prefix=".fmhub-sparse-") as f:
        f.write(header)
        for ref in ft_view:
            b_ref, f_ref = base_view.tensors[ref.name], fisher_view.tensors[ref.name]
            kept_here = 0
            for b_raw, t_raw, f_raw in zip(iter_chunks(b_ref), iter_chunks(ref), iter_chunks(f_ref)):
                fis = tensors.from_bytes(f_raw, f_ref.dtype, (len(f_raw) // tensors.itemsize(f_ref.dtype),)).float()
                keep = select.take(ref.name, fis)
                # choose by raw bits (same-width integers), so every entry is exactly one side's bytes
                b_bits, t_bits = _raw(b_raw, ref.dtype), _raw(t_raw, ref.dtype)
                f.write(tensors.as_buffer(torch.where(keep, t_bits, b_bits)))
                differs = t_bits != b_bits
                changed += int((keep & differs).sum())
                update_size += int(differs.sum())
                kept_here += int(keep.sum())
                delta = _values(t_raw, ref.dtype) - _values(b_raw, ref.dtype)
                weighted = fis.double() * delta.square()
                total_norm += float(weighted.sum())
                kept_norm += float(weighted[keep].sum())
            per_tensor[ref.name] = kept_here
    if out_file != output:
        copy_side_files(finetuned, output)
    retained = kept_norm / total_norm if total_norm > 0 else 1.0
    return SparseReport(out_file, float(k_fraction), threshold.total, threshold.k, changed, update_size,
                        threshold.value, retained, per_tensor)


def _check_pair(base: CheckpointView, ft: CheckpointView) -> None:
    problems = []
    for ref in ft:
        b = base.tensors.get(ref.name)
        if b is None:
            problems.append(f"{ref.name} is not in the base")
        elif (b.dtype, tuple(b.shape)) != (ref.dtype, tuple(ref.shape)):
            problems.append(f"{ref.name} is {b.dtype}{list(b.shape)} in the base, {ref.dtype}{list(ref.shape)} in the fine-tune")
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SparseUpdateError(
            f"{ft.label} is not a fine-tune of {base.label}: {'; '.join(problems[:10])}{more}; nothing was written"
        )


_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _raw(data: Any, dtype: str) -> "torch.Tensor":
    """A tensor's bytes as integers of the element's width (flat)."""
    import torch

    width = tensors.itemsize(dtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=getattr(torch, _INT_OF_SIZE[width])) if buf else torch.empty(0, dtype=getattr(torch, _INT_OF_SIZE[width]))


def _values(data: Any, dtype: str) -> "torch.Tensor":
    n = len(data) // tensors.itemsize(dtype)
    return tensors.from_bytes(data, dtype, (n,)).double()


def copy_side_files(src: str, dst: str, names: tuple[str, ...] = CONFIG_FILES + datasets_io.TOKENIZER_FILES) -> None:
    """The config and tokenizer files of model directory ``src`` into ``dst`` (so transformers loads ``dst``)."""
    if not os.path.isdir(src):
        return
    os.makedirs(dst, exist_ok=True)
    for name in names:
        path = os.path.join(src, name)
        if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(os.path.join(dst, name)):
            shutil.copyfile(path, os.path.join(dst, name))


# ------------------------------------------------------------------ evaluation


def eval_loss(model_dir: str, data: datasets_io.Data, *, batch_size: int = 8, max_length: int = 128) -> float:
    """Mean token negative log-likelihood of the causal LM in ``model_dir`` on ``data`` (nats per label token).

    Tokens are weighted equally across examples (Σ NLL / Σ label tokens).
    Runs on ``accelerate``'s device; with several processes each takes every
    num_processes-th example and the sums are added up.

    :param model_dir: a ``save_pretrained`` directory.
    :param data: as for `fmhub.models.fisher.compute_fisher` (texts use the directory's tokenizer, or bytes).
    :return: the mean NLL, a float.
    """
    import torch
    from accelerate import Accelerator

    model_dir = os.fspath(model_dir)
    model = load_model(model_dir).eval()
    examples, tokenizer = datasets_io.prepare(data, model_dir, int(model.config.vocab_size), max_length)
    accelerator = Accelerator()
    model.to(accelerator.device)
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    pad = datasets_io.pad_id(tokenizer)
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            ids, labels = (t.to(accelerator.device) for t in datasets_io.collate(mine[i : i + batch_size], pad))
            logits = model(input_ids=ids, use_cache=False).logits
            nll -= sequence_log_likelihood(logits, labels, "sum").double().sum()
            count += (labels[:, 1:] != datasets_io.IGNORE_INDEX).sum()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    return float(nll / count)


# ------------------------------------------------------------------ masked fine-tuning


@dataclass
class FinetuneReport:
    """What `finetune_masked` did."""

    output_dir: str
    steps: int
    trainable: int  # entries allowed to change (the mask's True count; all entries when dense)
    total: int  # entries of the model's parameters
    losses: list[float]  # training loss (mean token NLL of the batch) at each step, before the update
    device: str
    seconds: float


def finetune_masked(
    base_dir: str,
    data: datasets_io.Data,
    output_dir: str,
    *,
    mask: Mapping[str, "torch.Tensor"] | None = None,
    fisher_path: str | None = None,
    k_fraction: float | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 128,
    weight_decay: float = 0.0,
) -> FinetuneReport:
    """Fine-tune only the masked entries of a causal LM; every other entry stays bit-exact to the base.

    The mask is ``mask``, or `fisher_mask` of ``fisher_path`` at ``k_fraction``
    (checked against the base first); with neither, every parameter trains
    (a dense fine-tune, for comparison). Tensors absent from the mask, or all
    False in it, are frozen (no gradient, no optimizer state). For the others
    the gradient is multiplied by the mask before each AdamW step, and after
    the step the entries outside the mask are copied back from the base: with
    zero gradients AdamW already leaves them unchanged, but weight decay would
    not, and the copy makes bit-exactness hold for any optimizer setting.

    Batches are drawn from ``data`` by a ``torch.Generator`` seeded with
    ``seed`` (a fresh permutation each epoch); ``accelerate.utils.set_seed``
    seeds everything else. On the CPU two runs with the same arguments write
    identical bytes; on a GPU, up to its non-deterministic kernels. With
    several processes each global batch is split across them (DDP averages
    the gradients), so ``batch_size`` must be at least the number of processes.

    :param base_dir: a ``save_pretrained`` directory of the base model.
    :param data: training data (see `fmhub.data.texts`).
    :param output_dir: where ``save_pretrained`` writes the model (safetensors
        + config); the base's tokenizer files are copied along.
    :param mask: {name: bool tensor of the tensor's shape}; names as in the
        checkpoint or the model's parameters (tied aliases are OR-ed).
    :param fisher_path: a Fisher file of the base, to build the mask from.
    :param k_fraction: the fraction of entries to train, with ``fisher_path``.
    :param steps: optimizer steps.
    :param lr: AdamW learning rate (constant).
    :param seed: the batch order and all RNGs.
    :param batch_size: examples per step.
    :param max_length: truncate examples to this many tokens.
    :param weight_decay: AdamW weight decay (applies to masked entries only).
    :return: a `FinetuneReport`.
    :raises FmhubError: a mask naming no parameter or of the wrong shape,
        ``mask`` together with ``fisher_path``, a Fisher file not matching the base.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if mask is not None and fisher_path is not None:
        raise FmhubError("give either a mask or a Fisher file (with k_fraction), not both")
    if fisher_path is not None:
        if k_fraction is None:
            raise FmhubError("a Fisher file needs k_fraction: the fraction of entries to train")
        check_fisher_matches(os.fspath(fisher_path), os.fspath(base_dir), check_values=False)  # values are checked by fisher_mask
        mask = fisher_mask(fisher_path, k_fraction)
    if steps < 0 or batch_size < 1:
        raise FmhubError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    start = time.monotonic()
    set_seed(seed)
    base_dir, output_dir = os.fspath(base_dir), os.fspath(output_dir)
    model = load_model(base_dir)
    masks = _param_masks(model, mask) if mask is not None else None
    examples, tokenizer = datasets_io.prepare(data, base_dir, int(model.config.vocab_size), max_length)
    pad = datasets_io.pad_id(tokenizer)

    accelerator = Accelerator()
    if batch_size < accelerator.num_processes:
        raise FmhubError(f"batch_size ({batch_size}) must be at least the number of processes ({accelerator.num_processes})")
    trainable = []
    for name, p in model.named_parameters():
        if masks is not None and (name not in masks or not bool(masks[name].any())):
            p.requires_grad_(False)
        else:
            trainable.append((name, p))
    model.train()
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    # partially masked tensors: (parameter, mask, the base's values) to restore outside the mask
    partial = []
    if masks is not None:
        for name, p in trainable:
            m = masks[name].to(p.device)
            if not bool(m.all()):
                partial.append((p, m, p.detach().clone()))

    losses = []
    for batch in batch_schedule(len(examples), batch_size, steps, seed):
        mine = batch[accelerator.process_index :: accelerator.num_processes]
        ids, labels = (t.to(accelerator.device) for t in datasets_io.collate([examples[i] for i in mine], pad))
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        accelerator.backward(loss)
        for p, m, _ in partial:
            if p.grad is not None:
                p.grad.mul_(m)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m, base in partial:
                p.copy_(torch.where(m, p, base))
        losses.append(float(accelerator.reduce(loss.detach(), "mean")))

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir)
        copy_side_files(base_dir, output_dir, datasets_io.TOKENIZER_FILES)  # save_pretrained wrote the config
    accelerator.wait_for_everyone()
    total = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    allowed = total if masks is None else sum(int(masks[n].sum()) for n, _ in trainable)
    return FinetuneReport(os.fspath(output_dir), steps, allowed, total, losses, str(accelerator.device), time.monotonic() - start)


def _param_masks(model: Any, mask: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Masks keyed by ``named_parameters()`` names (tied aliases OR-ed); buffers' masks are dropped (not trainable)."""
    import torch

    aliases = parameter_names(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    buffers = {n for n, _ in model.named_buffers()}
    out: dict[str, torch.Tensor] = {}
    for name, m in mask.items():
        if name in buffers:
            continue
        param = aliases.get(name)
        if param is None:
            raise FmhubError(f"mask tensor {name!r} is not a parameter of the model; build the mask from this model's Fisher file")
        m = torch.as_tensor(m).to(torch.bool)
        if tuple(m.shape) != shapes[param]:
            raise FmhubError(f"mask tensor {name!r} is {list(m.shape)}, the parameter {list(shapes[param])}")
        out[param] = out[param] | m if param in out else m.clone()
    return out


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of each step's batch: consecutive slices of seeded permutations, one per epoch (the one
    seeded batch order fmhub trains with, `fmhub.ml.autotune` included)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=generator).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
