"""The serving engine: mixed multi-adapter batches equal each adapter alone, continuous batching, the tiered cache, the scheduler."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fmhub.base.errors import ServeError
from fmhub.serving.cache import DeviceSlots, Entry, _victim
from fmhub.serving.config import ServeConfig
from fmhub.serving.engine import Engine, GenParams
from fmhub.serving.multilora import Factors, LoraBank, factors_from
from fmhub.serving.sources import Source, parse_adapters, parse_source
from tests.helpers.serving import finish_order, random_adapter, reference, save_base

PROMPTS = [[5, 6, 7, 8, 9], [17, 3], [40, 41, 42, 43, 44, 45, 46, 47], [100, 200, 300], [7, 7, 7, 7], [250, 11, 64]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_base(root / "base")
    ads = root / "adapters"
    random_adapter(ads / "a0", seed=10, r=4)
    random_adapter(ads / "a1", seed=11, r=8, targets=("q_proj", "v_proj"))
    random_adapter(ads / "a2", seed=12, r=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    random_adapter(ads / "a3", seed=13, r=2, alpha=4)
    return root


def engine(models, **kw) -> Engine:
    config = ServeConfig(parse_source(str(models / "base")), parse_adapters([str(models / "adapters")]),
                         cache_dir=str(models / "cache"), **kw)
    return Engine(config)


def greedy(n: int) -> GenParams:
    return GenParams(max_tokens=n, ignore_eos=True)


def slow_down(eng: Engine, seconds: float) -> None:
    """Make every forward take a while, so orderings a test relies on hold on a loaded machine too."""
    forward = eng.forward
    eng.forward = lambda *a: (time.sleep(seconds), forward(*a))[1]


def test_mixed_batch_equals_each_adapter_alone(models):
    names = ["a0", "a1", "a2", "a3", "base", "a1"]
    expected = [reference(models / "base", None if n == "base" else models / "adapters" / n, p, 10) for p, n in zip(PROMPTS, names)]
    assert len({tuple(e) for e in expected}) == len(set(names)) + 1  # the adapters really change the output
    eng = engine(models, gpu_slots=4)
    try:
        reqs = [eng.submit(p, greedy(10), n) for p, n in zip(PROMPTS, names)]
        got = [r.result(60)[0] for r in reqs]
        assert got == expected
        # they decoded together: far fewer steps than tokens
        assert eng.metrics.value("fmhub_decode_steps_total") < sum(len(g) for g in got) / 2
    finally:
        eng.close()


def test_mixed_batch_logits_match_peft_per_row(models):
    """One forward of a mixed batch through the bank gives, row by row, peft's logits for that row's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fmhub.models import lora

    model = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    bank = LoraBank(model, max_rank=16, pages=48)
    names = ["a0", "a2", "a3"]
    pages = [bank.load(factors_from(lora.load_adapter(str(models / "adapters" / n)), torch.float32)) for n in names]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4], [5, 6, 7, 8]])
    bank.select(pages + [None], "cpu")
    with torch.no_grad():
        mixed = model(ids).logits
    for row, n in enumerate(names + [None]):
        ref_model = AutoModelForCausalLM.from_pretrained(models / "base")
        if n:
            ref_model = PeftModel.from_pretrained(ref_model, models / "adapters" / n)
        with torch.no_grad():
            ref = ref_model.eval()(ids[row:row + 1]).logits[0]
        torch.testing.assert_close(mixed[row], ref, atol=1e-4, rtol=1e-4)


def test_new_requests_join_between_decode_steps(models):
    eng = engine(models, gpu_slots=4)
    slow_down(eng, 0.01)
    try:
        # 30 tokens: a0's 34th greedy token from this prompt is a near tie (top two logits 1.5e-7 apart), which any
        # change of the batch's arithmetic may flip
        long = eng.submit(PROMPTS[0], greedy(30), "a0")
        first = [e for _, e in zip(range(5), long.stream(30))]  # it is decoding
        assert all(e[0] == "token" for e in first)
        short = eng.submit(PROMPTS[1], greedy(4), "a1")
        tokens, reason = short.result(30)
        assert reason == "length"
        assert long.finish_reason is None  # the long one still runs: the short one joined and left its batch
        assert tokens == reference(models / "base", models / "adapters" / "a1", PROMPTS[1], 4)
        rest, _ = long.result(60)
        assert [e[1] for e in first] + rest == reference(models / "base", models / "adapters" / "a0", PROMPTS[0], 30)
    finally:
        eng.close()


def test_cold_adapter_loads_while_others_decode(models, monkeypatch):
    eng = engine(models, gpu_slots=2)
    loading = threading.Event()
    release = threading.Event()
    real = eng._load_factors

    def slow(entry, path):
        if entry.name == "a2":
            loading.set()
            release.wait(30)
        return real(entry, path)

    monkeypatch.setattr(eng.cache, "_load_factors", slow)
    try:
        cold = eng.submit(PROMPTS[2], greedy(6), "a2")
        assert loading.wait(10)
        others = [eng.submit(p, greedy(6), n) for p, n in zip(PROMPTS[:2], ["base", "a0"])]
        for r in others:  # served while a2 is still loading
            assert r.result(30)[1] == "length"
        assert cold.tokens == [] and cold.finish_reason is None
        release.set()
        assert cold.result(30)[0] == reference(models / "base", models / "adapters" / "a2", PROMPTS[2], 6)
    finally:
        release.set()
        eng.close()


def test_more_adapters_than_slots_swap_through_the_tiers(models):
    # one slot and a warm tier that holds a2 and little else: switching evicts from the warm tier
    a2_bytes = (models / "adapters" / "a2" / "adapter_model.safetensors").stat().st_size
    eng = engine(models, gpu_slots=1, cpu_cache_mb=a2_bytes * 1.1 / (1 << 20), max_batch=4)
    try:
        order = ["a0", "a2", "a1", "a0", "a2", "a3"]
        reqs = [eng.submit(PROMPTS[i], greedy(5), n) for i, n in enumerate(order)]
        for i, (r, n) in enumerate(zip(reqs, order)):
            assert r.result(60)[0] == reference(models / "base", models / "adapters" / n, PROMPTS[i], 5)
        m = eng.metrics
        assert m.value("fmhub_adapter_cache_events_total", tier="gpu", event="miss") >= 4
        assert m.value("fmhub_adapter_cache_events_total", tier="cpu", event="evict") >= 1
        assert eng.cache.warm_bytes <= eng.cache.cpu_limit
    finally:
        eng.close()


def test_an_adapter_larger_than_the_warm_tier_is_refused_and_others_go_on(models):
    eng = engine(models, cpu_cache_mb=0.05)  # 51 KiB: a3 (14 KiB) fits, a2 (r=16 on six modules, 213 KiB) does not
    try:
        with pytest.raises(ServeError) as info:
            eng.submit(PROMPTS[0], greedy(3), "a2").result(30)
        assert info.value.status == 507 and "--cpu-cache-mb" in str(info.value)
        assert eng.submit(PROMPTS[1], greedy(3), "a3").result(30)[1] == "length"
        with pytest.raises(ServeError) as again:  # the refusal is remembered, not retried on every request
            eng.submit(PROMPTS[0], greedy(3), "a2")
        assert again.value.status == 507
    finally:
        eng.close()


def test_unknown_adapter_and_over_long_prompt_are_refused_at_submit(models):
    eng = engine(models)
    try:
        with pytest.raises(ServeError) as unknown:
            eng.submit([1, 2], greedy(3), "nope")
        assert unknown.value.status == 404 and "nope" in str(unknown.value) and "a0" in str(unknown.value)
        with pytest.raises(ServeError) as long:
            eng.submit(list(range(1, 120)), greedy(20), "a0")  # the tiny Llama's context is 128
        assert long.value.status == 400 and "128" in str(long.value)
        with pytest.raises(ServeError):
            eng.submit([1, 999999], greedy(3), "a0")
    finally:
        eng.close()


def test_a_prefill_that_raises_fails_its_requests_and_the_engine_goes_on(models):
    """Rows admitted to a prefill that raises before they join the batch get an error, not a wait that never ends,
    and their adapter's row count is given back (the next request on it runs)."""
    eng = engine(models)
    try:
        forward, calls = eng.forward, []

        def fail_first(*a):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("device lost")
            return forward(*a)

        eng.forward = fail_first
        failed = eng.submit([1, 2, 3], greedy(3), "a0")
        with pytest.raises(ServeError) as err:
            failed.result(timeout=60)
        assert err.value.status == 500 and "device lost" in str(err.value)
        tokens, _ = eng.submit([1, 2, 3], greedy(3), "a0").result(timeout=60)
        assert len(tokens) == 3
        assert all(s.rows == 0 for s in eng.slots.slots)
    finally:
        eng.close()


def test_cycle_time_lets_a_waiting_adapter_take_a_busy_slot(models):
    """One slot, a queue of a0 requests, then one a1 request: cycle_time decides whether a1 waits for the whole queue."""

    def order_with(cycle_time: float) -> list[str]:
        eng = engine(models, gpu_slots=1, max_batch=2, cycle_time=cycle_time)
        slow_down(eng, 0.01)
        try:
            eng.submit([1], greedy(1), "a1").result(30)  # a1 warm, so only the slot is in question
            reqs = [(f"a0-{i}", eng.submit(PROMPTS[i % 3], greedy(12), "a0")) for i in range(6)]
            time.sleep(0.05)
            reqs.append(("a1", eng.submit(PROMPTS[3], greedy(12), "a1")))
            return finish_order(reqs)
        finally:
            eng.close()

    patient = order_with(1e9)
    assert patient[-1] == "a1"  # a0 kept its slot while it had requests
    eager = order_with(0.0)
    assert eager.index("a1") < len(eager) - 2  # a0's slot drained and a1 got its turn before a0's queue was done


def _pool_of(slots: int) -> DeviceSlots:
    """Room for exactly ``slots`` adapters of rank 2 in a pool of a one-layer model."""
    bank = LoraBank(torch.nn.Sequential(torch.nn.Linear(4, 4)), max_rank=2, pages=2 * slots)
    return DeviceSlots(bank, cycle_time=0.0, policy="lru")


def _rank2() -> dict:
    return {"0": Factors(torch.ones(2, 4), torch.ones(4, 2))}


def test_slot_and_tier_eviction_orders():
    def evicted(pool: DeviceSlots) -> str:
        before = {s.entry.name for s in pool.slots}
        pool.place(Entry("new", "v", Source("/x")), _rank2())
        (gone,) = before - {s.entry.name for s in pool.slots}
        return gone

    slots = _pool_of(3)
    es = [Entry(f"e{i}", "v", Source("/x")) for i in range(3)]
    for e in es:
        slots.place(e, _rank2())
    for s, used, uses in zip(slots.slots, (3.0, 1.0, 2.0), (1, 9, 5)):
        s.last_used, s.uses = used, uses
    assert not slots.bank.fits(2) and slots.can_place(2)  # full, but idle adapters can leave
    assert evicted(slots) == "e1"  # least recently used
    slots = _pool_of(3)
    for e in es:
        slots.place(e, _rank2())
    for s, used, uses in zip(slots.slots, (3.0, 1.0, 2.0), (1, 9, 5)):
        s.last_used, s.uses = used, uses
    slots.policy = "lfu"
    slots.slots[2].rows = 1
    assert evicted(slots) == "e0"  # least frequently used, and one with rows is never taken
    es[0].uses, es[1].uses = 5, 5
    es[0].last_used, es[1].last_used = 2.0, 1.0
    assert _victim(es[:2], "lfu") is es[1]  # equal counts: the older goes


def test_sampling_is_reproducible_with_a_seed(models):
    eng = engine(models)
    try:
        params = GenParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
        a = eng.submit(PROMPTS[0], params, "a0").result(30)[0]
        b = eng.submit(PROMPTS[0], params, "a0").result(30)[0]
        c = eng.submit(PROMPTS[0], GenParams(max_tokens=8, temperature=1.0, seed=8, ignore_eos=True), "a0").result(30)[0]
        assert a == b and a != c
    finally:
        eng.close()
