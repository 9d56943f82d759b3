"""The arithmetic of fmhub's built-in merge strategies: pure functions on torch tensors.

No I/O and no plugin machinery here, so the maths can be checked on its own
(against peft's ``peft.utils.merge_utils`` and mergekit) and reused by any
strategy plugin.

Conventions shared by every function:

* **Compute dtype.** Inputs may be any floating dtype (bf16, fp16, fp8, ...)
  or integers. Everything is computed in float64 if any input tensor
  (including a base or a Fisher diagonal) is float64, else in float32, and the
  result is returned in that dtype: low-precision dtypes would lose the small
  differences task vectors are made of. The caller casts back to the file's
  dtype.
* **Validation.** Bad arguments raise `fmhub.base.errors.MergeConflict` with a
  one-line message naming the side at fault: shapes that differ, weights of
  the wrong length or not finite, density outside (0, 1], and NaN/Inf in an
  input tensor (a NaN would silently poison every merged element).
* **Sides** are numbered from 0 in the order given (``git merge``: 0 = ours,
  1 = theirs).

torch is imported lazily (see `fmhub.plugin.hookspecs`: plugins must import fast).
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Literal, Sequence

from fmhub.base.errors import MergeConflict
from fmhub.core.tensors import all_finite

if TYPE_CHECKING:
    import torch

SignMethod = Literal["total", "frequency"]

SLERP_DOT_THRESHOLD = 0.9995
"""`slerp` interpolates linearly when the cosine of the angle between the sides exceeds this in absolute value.

Same value as mergekit's ``DOT_THRESHOLD``: close to colinear, sin(θ) is tiny
and dividing by it amplifies rounding error, while slerp and lerp agree to
within about (1 - dot) there anyway.
"""


# --------------------------------------------------------------------------- helpers


def compute_dtype(*tensors: "torch.Tensor | None") -> "torch.dtype":
    """float64 if any given tensor is float64, else float32."""
    import torch

    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(
    tensors: Sequence["torch.Tensor"],
    base: "torch.Tensor | None" = None,
    extra: Sequence["torch.Tensor"] = (),
    extra_label: str = "",
) -> tuple[list["torch.Tensor"], "torch.Tensor | None", list["torch.Tensor"]]:
    """Check shapes and finiteness, then cast everything to the compute dtype."""
    if len(tensors) == 0:
        raise MergeConflict("nothing to merge: no sides given")
    shape = tensors[0].shape
    labelled: list[tuple[str, torch.Tensor]] = [(f"side {i}", t) for i, t in enumerate(tensors)]
    if base is not None:
        labelled.append(("the base", base))
    labelled += [(f"{extra_label} of side {i}", t) for i, t in enumerate(extra)]
    dtype = compute_dtype(*(t for _, t in labelled))
    out: dict[str, torch.Tensor] = {}
    for label, t in labelled:
        if t.shape != shape:
            raise MergeConflict(f"{label} has shape {tuple(t.shape)}, side 0 has {tuple(shape)}; cannot merge")
        t = t.to(dtype)
        if not all_finite(t):
            raise MergeConflict(f"{label} holds NaN or Inf values; fix that checkpoint before merging")
        out[label] = t
    sides = [out[f"side {i}"] for i in range(len(tensors))]
    return sides, out.get("the base"), [out[f"{extra_label} of side {i}"] for i in range(len(extra))]


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Default to all 1.0; refuse a wrong length or non-finite values."""
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeConflict(f"{len(w)} weights given for {n} sides; give exactly one weight per side")
    if not all(math.isfinite(x) for x in w):
        raise MergeConflict(f"weights must be finite numbers, got {w}")
    return w


def _density(density: float | None) -> float:
    if density is None:
        raise MergeConflict("this strategy needs `density` (the fraction of each task vector to keep, in (0, 1])")
    d = float(density)
    if not (0.0 < d <= 1.0):
        raise MergeConflict(f"density must be in (0, 1], got {density}")
    return d


def _scale(scale: float) -> float:
    s = float(scale)
    if not math.isfinite(s):
        raise MergeConflict(f"scale must be a finite number, got {scale}")
    return s


def _sign_method(method: str) -> str:
    if method not in ("total", "frequency"):
        raise MergeConflict(f"majority_sign must be 'total' or 'frequency', got {method!r}")
    return method


def _stack_weights(w: list[float], like: "torch.Tensor") -> "torch.Tensor":
    """Weights as a tensor broadcastable against ``torch.stack`` of tensors shaped like ``like``."""
    import torch

    return torch.tensor(w, dtype=like.dtype, device=like.device).view((len(w),) + (1,) * like.dim())


# --------------------------------------------------------------------------- strategies


def linear(tensors: Sequence["torch.Tensor"], weights: Sequence[float] | None = None) -> "torch.Tensor":
    """Weighted mean: Σ wᵢ θᵢ / Σ wᵢ (model soup).

    ``weights`` default to all 1 (plain mean). Weights may be negative, but
    Σ wᵢ must not be 0 (the mean is undefined): that raises MergeConflict.
    """
    ts, _, _ = _prepare(tensors)
    w = _weights(weights, len(ts))
    total = sum(w)
    if total == 0:
        raise MergeConflict(f"weights {w} sum to 0; a weighted mean needs a non-zero total")
    import torch

    return (torch.stack(ts) * _stack_weights(w, ts[0])).sum(dim=0) / total


def task_arithmetic(
    base: "torch.Tensor",
    tensors: Sequence["torch.Tensor"],
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
) -> "torch.Tensor":
    """Task arithmetic (Ilharco et al.): base + scale · Σ wᵢ (θᵢ − base).

    The task vectors τᵢ = θᵢ − base are summed, not averaged (weights default
    to 1, so two sides add both changes); ``Σ wᵢ τᵢ`` equals peft's
    ``task_arithmetic(τ, weights)``.
    """
    import torch

    ts, b, _ = _prepare(tensors, base)
    w = _weights(weights, len(ts))
    tau = torch.stack([t - b for t in ts])
    return b + _scale(scale) * (tau * _stack_weights(w, b)).sum(dim=0)


def magnitude_prune(tau: "torch.Tensor", density: float, inplace: bool = False) -> "torch.Tensor":
    """Keep the k = int(density · numel) entries of largest |τ| and zero the rest.

    The same selection as peft's ``magnitude_based_pruning`` wherever the k-th
    largest magnitude is unique; where several entries share it, the first ones
    in index order are kept (``torch.topk`` leaves that choice unspecified).
    The threshold comes from ``torch.kthvalue``, a linear-time selection: on a
    33M-element tensor with k in the millions it is ~10× faster than topk.
    density >= 1 keeps everything, as peft's ``prune`` does. ``inplace`` zeroes
    ``tau`` itself (for a temporary the caller owns) instead of a copy.
    """
    import torch

    if density >= 1:
        return tau
    flat = tau.abs().reshape(-1)
    n, k = flat.numel(), int(density * tau.numel())
    if k == 0:
        return tau.zero_() if inplace else torch.zeros_like(tau)
    threshold = torch.kthvalue(flat, n - k + 1).values
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:  # entries equal to the threshold fill the rest, first come first kept
        keep[(flat == threshold).nonzero().reshape(-1)[:missing]] = True
    del flat
    return tau.mul_(keep.reshape(tau.shape)) if inplace else tau * keep.reshape(tau.shape)


def _ties_combine(taus: Sequence["torch.Tensor"], w: list[float], majority_sign: str) -> "torch.Tensor":
    """Sign election plus disjoint weighted mean over (already sparsified) task vectors.

    The elected sign per element is sign(Σᵢ τᵢ) ("total") or sign(Σᵢ sign(τᵢ))
    ("frequency"), with 0 counted as +1. Side i contributes wᵢ τᵢ where
    sign(τᵢ) equals the elected sign (a zero τᵢ never agrees); the sum is divided
    by max(1, number of agreeing sides). Same as peft's
    ``calculate_majority_sign_mask`` + ``disjoint_merge``; note the election
    ignores the weights, as in peft. Accumulates side by side instead of
    stacking, so it needs a few tensors of memory whatever the number of sides.
    """
    import torch

    votes = torch.zeros_like(taus[0])
    for t in taus:
        votes.add_(t if majority_sign == "total" else t.sign())
    positive = votes.ge_(0).bool()
    del votes
    mixed = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for wi, t in zip(w, taus):
        agree = torch.where(positive, t > 0, t < 0)
        mixed.add_(t.mul(wi).mul_(agree))
        count.add_(agree)
        del agree
    return mixed.div_(count.clamp_(min=1.0))


def ties(
    base: "torch.Tensor",
    tensors: Sequence["torch.Tensor"],
    weights: Sequence[float] | None,
    density: float,
    scale: float = 1.0,
    majority_sign: SignMethod = "total",
) -> "torch.Tensor":
    """TIES-merging (Yadav et al.): trim, elect sign, disjoint merge; base + scale · merged.

    τᵢ = θᵢ − base, each trimmed with `magnitude_prune` to its top ``density``
    fraction, then combined by `_ties_combine`. Equals
    ``base + scale * peft.utils.merge_utils.ties(τ, weights, density, majority_sign)``.
    """
    ts, b, _ = _prepare(tensors, base)
    w = _weights(weights, len(ts))
    d, s, m = _density(density), _scale(scale), _sign_method(majority_sign)
    taus = []
    for i in range(len(ts)):
        taus.append(magnitude_prune(ts[i] - b, d, inplace=True))
    merged = _ties_combine(taus, w, m)
    del taus
    return merged.mul_(s).add_(b)


def seed_for(seed: int, name: str) -> int:
    """The RNG seed for one tensor's DARE masks: depends only on (seed, tensor name).

    The first 8 bytes of sha256(f"{seed}\\0{name}"), big-endian, with the top
    bit cleared: a non-negative int < 2**63. A per-tensor seed (rather than one
    generator running through the whole checkpoint) makes a tensor's result
    independent of the order tensors are merged in, and of which other tensors
    changed.
    """
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def dare_masks(shape: Sequence[int], n: int, density: float, seed: int) -> list["torch.Tensor"]:
    """The n keep-masks of DARE, float32 0/1 tensors on the CPU.

    One ``torch.Generator`` seeded ``seed``; side after side (0..n-1),
    ``torch.bernoulli(torch.full(shape, density, dtype=float32), generator=g)``.
    Masks are always drawn in float32 on the CPU, whatever the tensors' dtype or
    device, so the same (seed, shape, density) always gives the same masks
    (float64 probabilities would consume the stream differently).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    p = torch.full(tuple(shape), density, dtype=torch.float32)
    return [torch.bernoulli(p, generator=g) for _ in range(n)]


def dare(
    base: "torch.Tensor",
    tensors: Sequence["torch.Tensor"],
    weights: Sequence[float] | None,
    density: float,
    seed: int,
    combine: Literal["linear", "ties"] = "linear",
    scale: float = 1.0,
    name: str = "",
    majority_sign: SignMethod = "total",
) -> "torch.Tensor":
    """DARE (Yu et al., "drop and rescale"): base + scale · combine(τᵢ · maskᵢ / density).

    τᵢ = θᵢ − base; maskᵢ comes from `dare_masks` with seed ``seed_for(seed, name)``
    (density 1 keeps everything and draws nothing). ``combine="linear"`` sums
    Σ wᵢ τᵢ' (peft ``dare_linear``: a sum, not a mean); ``combine="ties"`` applies
    TIES sign election and disjoint weighted mean to the τᵢ' (peft ``dare_ties``).

    Reproducing with peft: on float32 inputs, ``torch.manual_seed(seed_for(seed, name))``
    then ``dare_linear(τ, weights, density)`` / ``dare_ties(τ, weights, density, majority_sign)``
    on the same list τ draws the same masks and returns the same merged task vector.
    """
    import torch

    ts, b, _ = _prepare(tensors, base)
    w = _weights(weights, len(ts))
    d, s = _density(density), _scale(scale)
    if combine not in ("linear", "ties"):
        raise MergeConflict(f"DARE combine must be 'linear' or 'ties', got {combine!r}")
    m = _sign_method(majority_sign)
    taus = [t - b for t in ts]
    if d < 1:
        masks = dare_masks(b.shape, len(ts), d, seed_for(seed, name))
        taus = [t * mask.to(device=t.device, dtype=t.dtype) / d for t, mask in zip(taus, masks)]
    if combine == "linear":
        merged = (torch.stack(taus) * _stack_weights(w, b)).sum(dim=0)
    else:
        merged = _ties_combine(taus, w, m)
    return b + s * merged


def fisher_weighted(
    tensors: Sequence["torch.Tensor"],
    fishers: Sequence["torch.Tensor"],
    weights: Sequence[float] | None = None,
    eps: float = 1e-8,
) -> "torch.Tensor":
    """Fisher-weighted averaging (Matena & Raffel, 2022), elementwise:

        θ* = Σᵢ wᵢ (Fᵢ + eps) θᵢ / Σᵢ wᵢ (Fᵢ + eps)

    where Fᵢ is side i's diagonal Fisher (same shape as θᵢ, must be >= 0) and
    wᵢ the model weights (the paper's λᵢ; default all 1, must be >= 0 with a
    positive sum). ``eps`` is added to every Fisher value, like the paper's
    "Fisher floor": the denominator is then never 0, and where all Fᵢ are 0 the
    result is exactly the plain weighted mean Σ wᵢ θᵢ / Σ wᵢ. Scale Fisher
    values (or lower ``eps``) so that eps is small next to the informative ones.
    """
    import torch

    if len(fishers) != len(tensors):
        raise MergeConflict(f"{len(fishers)} Fisher diagonals given for {len(tensors)} sides; give one per side")
    ts, _, fs = _prepare(tensors, extra=fishers, extra_label="the Fisher diagonal")
    w = _weights(weights, len(ts))
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise MergeConflict(f"Fisher merging needs non-negative weights with a positive sum, got {w}")
    if not (eps > 0 and math.isfinite(eps)):
        raise MergeConflict(f"eps must be a positive number, got {eps}")
    for i, f in enumerate(fs):
        if bool((f < 0).any()):
            raise MergeConflict(f"the Fisher diagonal of side {i} has negative values; Fisher diagonals are >= 0")
    wf = torch.stack(fs).add(eps) * _stack_weights(w, ts[0])
    return (wf * torch.stack(ts)).sum(dim=0) / wf.sum(dim=0)


def slerp(a: "torch.Tensor", b: "torch.Tensor", t: float, eps: float = 1e-8) -> "torch.Tensor":
    """Spherical linear interpolation between two tensors, as mergekit's ``slerp``.

    Both tensors are flattened; the angle θ comes from normalised copies,
    dot = ⟨a/|a|, b/|b|⟩ clamped to [-1, 1], and the result is
    sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b on the *unnormalised* tensors, so
    t = 0 gives a and t = 1 gives b. Falls back to lerp (1−t)·a + t·b when
    |dot| > `SLERP_DOT_THRESHOLD` (0.9995, nearly colinear or opposite) or
    when either norm is <= ``eps`` (no direction: mergekit would leave such a
    vector unnormalised and take θ = 90°; lerp is the sensible answer). This
    covers 0-d and empty tensors. ``t`` must be in [0, 1].
    """
    import torch

    t = float(t)
    if not (0.0 <= t <= 1.0):
        raise MergeConflict(f"slerp needs t in [0, 1], got {t}")
    (x, y), _, _ = _prepare([a, b])
    fx, fy = x.reshape(-1), y.reshape(-1)
    nx, ny = torch.linalg.vector_norm(fx), torch.linalg.vector_norm(fy)
    if nx <= eps or ny <= eps:
        return (1 - t) * x + t * y
    dot = float(torch.clamp((fx / nx) @ (fy / ny), -1.0, 1.0))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return (1 - t) * x + t * y
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * x + (math.sin(t * theta) / sin_theta) * y
