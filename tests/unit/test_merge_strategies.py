"""The built-in merge strategies: the maths against torch references and peft, found through the plugin host."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft.utils.merge_utils import dare_linear, dare_ties, task_arithmetic, ties

from fmhub.plugin import host
from fmhub.models import merge_math
from fmhub.base.errors import MergeConflict
from fmhub.models.merge_math import seed_for

SHAPES = [(), (0,), (7,), (4, 5), (2, 3, 4), (16, 33)]
CLOSE = dict(rtol=1e-5, atol=1e-6)


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def model(shape, n=3, seed=0, dtype=torch.float32):
    """A base and n sides that each moved away from it."""
    base = rand(shape, seed, dtype)
    return base, [(base.float() + 0.1 * rand(shape, seed + 1 + i)).to(dtype) for i in range(n)]


def strategy(name):
    return host.lookup("merge-strategy", name)


def run(name, base, sides, tensor="layer.weight", **options):
    """Call a strategy the way fmhub does: lazy loaders and parsed options."""
    return strategy(name).merge(
        tensor, None if base is None else (lambda: base), lambda i: sides[i], len(sides), options
    )


def weights_for(n):
    return [0.5 + 0.25 * i for i in range(n)]


# ------------------------------------------------------------------ references written directly in torch


def ref_prune(t, density):
    if density >= 1:
        return t
    k = int(density * t.numel())
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = 1
    return (flat * keep).reshape(t.shape)


def ref_elect_and_merge(taus, w, method):
    votes = sum(taus) if method == "total" else sum(t.sign() for t in taus)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    num = sum(wi * t * (t.sign() == elected) for wi, t in zip(w, taus))
    count = sum((t.sign() == elected).float() for t in taus)
    return num / torch.clamp(count, min=1)


def ref_dare_taus(base, sides, density, seed, name):
    g = torch.Generator().manual_seed(seed_for(seed, name))
    out = []
    for s in sides:
        tau = s - base
        mask = torch.bernoulli(torch.full_like(tau, density), generator=g)
        out.append(tau * mask / density)
    return out


def ref_slerp(a, b, t, threshold=0.9995):
    """mergekit's slerp, in float64."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    dot = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(dot) > threshold:
        return ((1 - t) * a.double() + t * b.double())
    theta = math.acos(dot)
    s0 = math.sin(theta - theta * t) / math.sin(theta)
    s1 = math.sin(theta * t) / math.sin(theta)
    return s0 * a.double() + s1 * b.double()


# ------------------------------------------------------------------ registration


def test_strategies_are_found_through_the_plugin_host():
    expected = {
        "linear": False, "task-arithmetic": True, "ties": True,
        "dare-linear": True, "dare-ties": True, "fisher": False, "slerp": False,
    }
    for name, needs_base in expected.items():
        s = host.lookup("merge-strategy", name)
        assert s.name == name and s.needs_base is needs_base


def test_plugin_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import fmhub_plugins.merge_linear, fmhub_plugins.merge_ties_dare, fmhub_plugins.merge_fisher, fmhub_plugins.merge_slerp\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------ linear / task arithmetic


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_is_the_weighted_mean(shape):
    _, sides = model(shape)
    w = weights_for(3)
    out = run("linear", None, sides, weights=w)
    assert out.dtype == torch.float32 and out.shape == torch.Size(shape)
    torch.testing.assert_close(out, sum(wi * s for wi, s in zip(w, sides)) / sum(w), **CLOSE)
    torch.testing.assert_close(run("linear", None, sides), sum(sides) / 3, **CLOSE)


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_matches_reference_and_peft(shape):
    base, sides = model(shape)
    w, scale = weights_for(3), 0.7
    out = run("task-arithmetic", base, sides, weights=w, scale=scale)
    taus = [s - base for s in sides]
    torch.testing.assert_close(out, base + scale * sum(wi * t for wi, t in zip(w, taus)), **CLOSE)
    torch.testing.assert_close(out, base + scale * task_arithmetic(taus, torch.tensor(w)), **CLOSE)
    # defaults: weights 1, scale 1 -> every side's change is added
    torch.testing.assert_close(run("task-arithmetic", base, sides), base + sum(taus), **CLOSE)


# ------------------------------------------------------------------ ties


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_matches_reference_and_peft(shape, density, method):
    base, sides = model(shape, n=3, seed=len(shape))
    w, scale = weights_for(3), 1.3
    out = run("ties", base, sides, weights=w, density=density, scale=scale, majority_sign=method)
    taus = [s - base for s in sides]
    ref = base + scale * ref_elect_and_merge([ref_prune(t, density) for t in taus], w, method)
    torch.testing.assert_close(out, ref, **CLOSE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
        theirs = ties(taus, torch.tensor(w), density, majority_sign_method=method)
    torch.testing.assert_close(out, base + scale * theirs, **CLOSE)


def test_ties_keeps_the_top_density_fraction_and_drops_disagreeing_signs():
    base = torch.zeros(10)
    a = torch.arange(1.0, 11.0)  # all positive
    b = -torch.arange(1.0, 11.0) * 0.5  # all negative, smaller
    out = run("ties", base, [a, b], density=0.3)
    # total sign is positive everywhere: b never agrees; a keeps its 3 largest entries
    expected = torch.where(a >= 8, a, torch.zeros_like(a))
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------ dare


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.3, 0.9, 1.0])
def test_dare_linear_matches_reference_and_peft(shape, density):
    base, sides = model(shape, n=3, seed=5)
    w, seed, name = weights_for(3), 1234, "model.layers.0.mlp.up_proj.weight"
    out = run("dare-linear", base, sides, tensor=name, weights=w, density=density, seed=seed, scale=0.8)
    taus = ref_dare_taus(base, sides, density, seed, name)
    torch.testing.assert_close(out, base + 0.8 * sum(wi * t for wi, t in zip(w, taus)), **CLOSE)
    torch.manual_seed(seed_for(seed, name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dare_linear([s - base for s in sides], torch.tensor(w), density)
    torch.testing.assert_close(out, base + 0.8 * theirs, **CLOSE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.3, 0.9])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_matches_reference_and_peft(shape, density, method):
    base, sides = model(shape, n=3, seed=9)
    w, seed, name = weights_for(3), 7, "lm_head.weight"
    out = run("dare-ties", base, sides, tensor=name, weights=w, density=density, seed=seed, majority_sign=method)
    ref = base + ref_elect_and_merge(ref_dare_taus(base, sides, density, seed, name), w, method)
    torch.testing.assert_close(out, ref, **CLOSE)
    torch.manual_seed(seed_for(seed, name))
    theirs = dare_ties([s - base for s in sides], torch.tensor(w), density, majority_sign_method=method)
    torch.testing.assert_close(out, base + theirs, **CLOSE)


@pytest.mark.parametrize("strategy_name", ["dare-linear", "dare-ties"])
def test_dare_is_reproducible_per_seed_and_tensor_name(strategy_name):
    base, sides = model((32, 32), n=2)
    opts = dict(density=0.5, seed=3)
    first = run(strategy_name, base, sides, tensor="a", **opts)
    torch.manual_seed(999)  # the global RNG plays no part
    assert torch.equal(first, run(strategy_name, base, sides, tensor="a", **opts))
    assert not torch.equal(first, run(strategy_name, base, sides, tensor="a", density=0.5, seed=4))
    assert not torch.equal(first, run(strategy_name, base, sides, tensor="b", **opts))
    # merge order does not matter: "a" after "b" is the same as "a" alone
    run(strategy_name, base, sides, tensor="b", **opts)
    assert torch.equal(first, run(strategy_name, base, sides, tensor="a", **opts))


def test_dare_leaves_the_global_rng_alone():
    base, sides = model((8, 8), n=2)
    state = torch.random.get_rng_state()
    run("dare-linear", base, sides, density=0.5, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_seed_for_is_a_stable_non_negative_63_bit_int():
    s = seed_for(0, "w")
    assert s == seed_for(0, "w") and 0 <= s < 2**63
    assert len({seed_for(0, "w"), seed_for(1, "w"), seed_for(0, "v"), seed_for(0, "w\0")}) == 4
    # the separator keeps (seed, name) pairs apart
    assert seed_for(1, "2w") != seed_for(12, "w")


def test_dare_masks_do_not_depend_on_the_compute_dtype():
    base, sides = model((16, 16), n=2)
    f32 = run("dare-linear", base, sides, density=0.4, seed=2)
    f64 = run("dare-linear", base.double(), [s.double() for s in sides], density=0.4, seed=2)
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), f32, **CLOSE)


# ------------------------------------------------------------------ fisher


@pytest.mark.parametrize("shape", SHAPES)
def test_fisher_is_the_fisher_weighted_mean(shape):
    _, sides = model(shape)
    fishers = [rand(shape, 50 + i).abs() + 0.1 for i in range(3)]
    w = weights_for(3)
    out = run("fisher", None, sides, weights=w, fisher=lambda i: fishers[i])
    eps = 1e-8
    num = sum(wi * (f + eps) * s for wi, f, s in zip(w, fishers, sides))
    den = sum(wi * (f + eps) for wi, f in zip(w, fishers))
    torch.testing.assert_close(out, num / den, **CLOSE)
    # eps is negligible next to these Fisher values: the paper's formula without it
    paper = sum(wi * f * s for wi, f, s in zip(w, fishers, sides)) / sum(wi * f for wi, f in zip(w, fishers))
    torch.testing.assert_close(out, paper, **CLOSE)


def test_fisher_falls_back_to_the_weighted_mean_where_all_fishers_are_zero():
    _, sides = model((6, 6))
    f0 = rand((6, 6), 70).abs()
    f0[:3] = 0  # rows 0-2: every Fisher is 0
    fishers = [f0, torch.where(torch.arange(6)[:, None] < 3, 0.0, 1.0).expand(6, 6).clone(), f0 * 0]
    w = weights_for(3)
    out = run("fisher", None, sides, weights=w, fisher=lambda i: fishers[i])
    mean = sum(wi * s for wi, s in zip(w, sides)) / sum(w)
    torch.testing.assert_close(out[:3], mean[:3], **CLOSE)
    # a side with a much larger Fisher dominates
    big = [torch.full((6, 6), 1e6), torch.full((6, 6), 1e-3), torch.full((6, 6), 1e-3)]
    torch.testing.assert_close(run("fisher", None, sides, fisher=lambda i: big[i]), sides[0], rtol=1e-5, atol=1e-5)


def test_fisher_without_diagonals_says_what_to_do():
    _, sides = model((3,), n=2)
    with pytest.raises(MergeConflict, match=r"needs Fisher diagonals: give `fisher:` files in the recipe"):
        run("fisher", None, sides)


def test_fisher_refuses_negative_or_nan_fisher_values():
    _, sides = model((3,), n=2)
    neg = [torch.ones(3), -torch.ones(3)]
    with pytest.raises(MergeConflict, match="Fisher diagonal of side 1 has negative"):
        run("fisher", None, sides, fisher=lambda i: neg[i])
    nan = [torch.tensor([1.0, float("nan"), 1.0]), torch.ones(3)]
    with pytest.raises(MergeConflict, match="Fisher diagonal of side 0 holds NaN"):
        run("fisher", None, sides, fisher=lambda i: nan[i])


# ------------------------------------------------------------------ slerp


@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 3, 4), (16, 33)])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_mergekit_reference(shape, t):
    a, b = rand(shape, 80), rand(shape, 81)  # independent: far from colinear, the spherical branch
    out = run("slerp", None, [a, b], t=t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_slerp(a, b, t).float(), **CLOSE)
    if t == 0.0:
        torch.testing.assert_close(out, a, **CLOSE)
    if t == 1.0:
        torch.testing.assert_close(out, b, **CLOSE)


def test_slerp_keeps_unit_vectors_on_the_sphere_and_defaults_to_half_way():
    a, b = rand((64,), 1), rand((64,), 2)
    a, b = a / a.norm(), b / b.norm()
    out = run("slerp", None, [a, b])
    torch.testing.assert_close(out.norm(), torch.tensor(1.0), **CLOSE)
    # half way: equal angle to both ends
    torch.testing.assert_close(out @ a, out @ b, **CLOSE)


@pytest.mark.parametrize("shape", [(), (0,), (5,)])
def test_slerp_falls_back_to_lerp_when_colinear_or_degenerate(shape):
    a = rand(shape, 4)
    for b in (2 * a, a + 1e-4 * rand(shape, 5), torch.zeros(shape)):
        torch.testing.assert_close(run("slerp", None, [a, b], t=0.3), 0.7 * a + 0.3 * b, **CLOSE)


def test_slerp_needs_two_sides_and_t_in_range():
    _, sides = model((3,), n=3)
    with pytest.raises(MergeConflict, match="exactly 2 sides, got 3"):
        run("slerp", None, sides)
    with pytest.raises(MergeConflict, match=r"t in \[0, 1\]"):
        run("slerp", None, sides[:2], t=1.5)


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("name", ["linear", "task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp", "fisher"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int32])
def test_low_precision_inputs_are_computed_in_float32(name, dtype):
    base, sides = model((8, 8), n=2, dtype=torch.float32)
    if dtype == torch.int32:
        base, sides = (base * 10).to(dtype), [(s * 10).to(dtype) for s in sides]
    else:
        base, sides = base.to(dtype), [s.to(dtype) for s in sides]
    opts = dict(density=0.5, seed=1, fisher=lambda i: torch.ones(8, 8, dtype=dtype))
    out = run(name, base, sides, **opts)
    expected = run(name, base.float(), [s.float() for s in sides], **opts)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, **CLOSE)


def test_fp8_inputs_work():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no fp8 in this torch")
    base, sides = model((8,), n=2)
    f8 = [s.to(torch.float8_e4m3fn) for s in sides]
    out = run("linear", None, f8)
    torch.testing.assert_close(out, (f8[0].float() + f8[1].float()) / 2, **CLOSE)


def test_float64_inputs_are_computed_in_float64():
    base, sides = model((5,), n=2, dtype=torch.float64)
    assert run("ties", base.float(), [sides[0], sides[1].float()], density=0.5).dtype == torch.float64
    assert run("linear", None, sides).dtype == torch.float64


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", ["ties", "dare-linear", "dare-ties"])
def test_density_is_required_and_checked(name):
    base, sides = model((4,), n=2)
    with pytest.raises(MergeConflict, match="needs `density`"):
        run(name, base, sides)
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(MergeConflict, match=r"density must be in \(0, 1\]"):
            run(name, base, sides, density=bad)


@pytest.mark.parametrize("name", ["linear", "task-arithmetic", "ties", "dare-linear", "dare-ties", "fisher"])
def test_weights_must_match_the_sides(name):
    base, sides = model((4,), n=3)
    with pytest.raises(MergeConflict, match="2 weights given for 3 sides"):
        run(name, base, sides, weights=[1.0, 2.0], density=0.5, fisher=lambda i: torch.ones(4))


@pytest.mark.parametrize("name", ["linear", "task-arithmetic", "ties", "dare-linear", "dare-ties", "fisher", "slerp"])
def test_nan_or_inf_inputs_are_refused_naming_the_side(name):
    base, sides = model((4,), n=2)
    bad = sides[1].clone()
    bad[2] = float("nan")
    with pytest.raises(MergeConflict, match="side 1 holds NaN or Inf"):
        run(name, base, [sides[0], bad], density=0.5, fisher=lambda i: torch.ones(4))
    if strategy(name).needs_base:
        inf_base = base.clone()
        inf_base[0] = float("inf")
        with pytest.raises(MergeConflict, match="the base holds NaN or Inf"):
            run(name, inf_base, sides, density=0.5)


@pytest.mark.parametrize("name", ["task-arithmetic", "ties", "dare-linear", "dare-ties"])
def test_task_vector_strategies_need_a_base(name):
    _, sides = model((4,), n=2)
    with pytest.raises(MergeConflict, match="needs a merge base"):
        run(name, None, sides, density=0.5)


def test_other_bad_options_are_refused():
    base, sides = model((4,), n=2)
    with pytest.raises(MergeConflict, match="sum to 0"):
        run("linear", None, sides, weights=[1.0, -1.0])
    with pytest.raises(MergeConflict, match="majority_sign must be 'total' or 'frequency'"):
        run("ties", base, sides, density=0.5, majority_sign="mean")
    with pytest.raises(MergeConflict, match="scale must be a finite number"):
        run("task-arithmetic", base, sides, scale=float("inf"))
    with pytest.raises(MergeConflict, match="has shape"):
        merge_math.linear([torch.zeros(3), torch.zeros(4)])


def test_magnitude_prune_keeps_exactly_k_even_with_ties_at_the_threshold():
    import torch

    from fmhub.models.merge_math import magnitude_prune

    tau = torch.tensor([3.0, -1.0, 1.0, 1.0, -2.0, 1.0, 0.5, -1.0])
    kept = magnitude_prune(tau, 0.5)  # k = 4: 3, -2 and the first two of the four |1|s
    assert torch.equal(kept, torch.tensor([3.0, -1.0, 1.0, 0.0, -2.0, 0.0, 0.0, 0.0]))
    assert int((magnitude_prune(tau, 0.125) != 0).sum()) == 1 and torch.count_nonzero(magnitude_prune(tau, 0.1)) == 0
