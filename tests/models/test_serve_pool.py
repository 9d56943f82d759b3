"""The adapter pool: sized by memory, many adapters resident and decoding in one step, the gather paths, fairness when full."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from fmhub.base.errors import ServeError
from fmhub.serving.config import ServeConfig
from fmhub.serving.engine import Engine, GenParams
from fmhub.serving.multilora import Factors, LoraBank
from fmhub.serving.sources import parse_adapters, parse_source
from tests.helpers.serving import finish_order, random_adapter, reference, save_base

RANKS = (2, 4, 8, 3, 6, 2, 5, 8, 4, 1, 7, 2)  # twelve adapters: more than the eight slots the server had by default


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    save_base(root / "base")
    for i, r in enumerate(RANKS):
        targets = ("q_proj", "v_proj") if i % 3 == 0 else ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
        random_adapter(root / "adapters" / f"m{i:02d}", seed=100 + i, r=r, targets=targets)
    return root


def engine(root, **kw) -> Engine:
    config = ServeConfig(parse_source(str(root / "base")), parse_adapters([str(root / "adapters")]), cache_dir=str(root / "cache"), **kw)
    return Engine(config)


def greedy(n: int) -> GenParams:
    return GenParams(max_tokens=n, ignore_eos=True)


def watch(eng: Engine, seconds: float = 0.0) -> dict:
    """Record, at every forward, the pool's bytes in use and its largest storage; each forward also takes ``seconds``."""
    seen = {"used": 0, "storage": 0, "resident": 0}
    forward = eng.forward

    def wrapped(*a):
        time.sleep(seconds)
        pool = eng.bank
        seen["used"] = max(seen["used"], pool.used_bytes)
        seen["storage"] = max([seen["storage"]] + [m.a.shape[0] - 1 for m in pool.modules.values() if m.a is not None])
        seen["resident"] = max(seen["resident"], len(eng.slots.slots))
        return forward(*a)

    eng.forward = wrapped
    return seen


def test_twelve_adapters_decode_together_and_equal_peft(many):
    """With defaults, every client's adapter is resident at once: one batch, a row per adapter, peft's tokens per row."""
    prompts = [[5 + i, 6, 7 + 2 * i, 8] for i in range(len(RANKS))]
    names = [f"m{i:02d}" for i in range(len(RANKS))]
    eng = engine(many)
    seen = watch(eng, 0.005)
    try:
        for n in names:  # warm: the timed part below is the steady state, every adapter in host memory
            eng.submit([1], greedy(1), n).result(30)
        reqs = [eng.submit(p, greedy(8), n) for p, n in zip(prompts, names)]
        got = [r.result(60)[0] for r in reqs]
        assert seen["resident"] == len(names)
        m = eng.metrics
        assert m.value("fmhub_decode_rows_total") / m.value("fmhub_decode_steps_total") > 8  # not capped at 8 rows
    finally:
        eng.close()
    for p, n, g in zip(prompts, names, got):
        assert g == reference(many / "base", many / "adapters" / n, p, 8), n


def _naive(x: torch.Tensor, factors: list[Factors | None]) -> torch.Tensor:
    return torch.stack([torch.zeros(x.shape[1], 5) if f is None else x[i] @ f.a.t() @ f.b.t() for i, f in enumerate(factors)])


@pytest.mark.parametrize("pattern", ["distinct", "grouped", "skewed"])
def test_every_gather_path_equals_each_rows_own_update(pattern):
    """Rows on distinct adapters, on a few shared ones, and on one crowded adapter take different paths, same result."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5, bias=False)
    model = torch.nn.Sequential(layer)
    bank = LoraBank(model, max_rank=4, pages=64)
    ups = [{"0": Factors(torch.randn(r, 6), torch.randn(5, r))} for r in (1, 4, 2, 3)]
    pages = [bank.load(u) for u in ups]
    choice = {"distinct": [0, 1, 2, 3, None], "grouped": [1, 0, 1, 2, 0, None, 2, 3],
              "skewed": [1, 1, 1, 1, 1, 1, 1, 0, 2, 3, None]}[pattern]
    x = torch.randn(len(choice), 3, 6)
    bank.select([None if c is None else pages[c] for c in choice], "cpu")
    assert {"distinct": 1, "grouped": 2, "skewed": 0}[pattern] == min(bank.plan.size, 2)
    with torch.no_grad():
        got = model(x) - layer(x)
    want = _naive(x, [None if c is None else ups[c]["0"] for c in choice])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pool_pages_are_reused_and_merged():
    bank = LoraBank(torch.nn.Sequential(torch.nn.Linear(4, 4)), max_rank=8, pages=12)
    up = {r: {"0": Factors(torch.ones(r, 4), torch.ones(4, r))} for r in (2, 4, 8)}
    a, b, c = bank.load(up[4]), bank.load(up[4]), bank.load(up[2])
    assert (a.start, b.start, c.start) == (1, 5, 9) and bank.free_pages == 2 and not bank.fits(4)
    bank.release(a)
    bank.release(b)
    assert bank.fits(8) and bank.load(up[8]).start == 1  # the two freed neighbours merged into one range
    assert bank.free_pages == 2 and bank.load(up[4]) is None


def test_pages_scattered_in_gaps_are_compacted_so_a_waiting_adapter_is_placed():
    """Four rank-2 adapters fill 8 pages; two go idle, leaving two gaps of 2: a rank-4 adapter is placed by moving the
    busy ones together (it waited as long as they had rows, nothing draining for it), and their updates stay theirs."""
    from fmhub.serving.cache import DeviceSlots, Entry
    from fmhub.serving.sources import Source

    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5, bias=False)
    model = torch.nn.Sequential(layer)
    slots = DeviceSlots(LoraBank(model, max_rank=8, pages=8), cycle_time=0.0, policy="lru")
    ups = {n: {"0": Factors(torch.randn(r, 6), torch.randn(5, r))} for n, r in zip("XYZWV", (2, 2, 2, 2, 4))}
    placed = {n: slots.place(Entry(n, "v", Source("/x")), ups[n]) for n in "XYZW"}
    placed["X"].rows = placed["Z"].rows = 1  # Y and W are idle: 4 pages could be free, in two gaps
    assert slots.can_place(4)
    placed["V"] = slots.place(Entry("V", "v", Source("/x")), ups["V"])
    assert placed["V"] is not None and {s.entry.name for s in slots.slots} == {"X", "Z", "V"}
    assert slots.bank.used_bytes <= slots.bank.budget_bytes
    x = torch.randn(3, 2, 6)
    slots.bank.select([placed[n].pages for n in "XZV"], "cpu")
    with torch.no_grad():
        got = model(x) - layer(x)
    torch.testing.assert_close(got, _naive(x, [ups[n]["0"] for n in "XZV"]), atol=1e-5, rtol=1e-5)


def _finish_order(eng: Engine, queue: list[str], late: list[str]) -> list[str]:
    """Submit a request for each adapter of ``queue``, then (a moment later) of ``late``; the names in finishing order."""
    reqs = [(f"{n}-{i}", eng.submit([3 + i, 4, 5], greedy(10), n)) for i, n in enumerate(queue)]
    time.sleep(0.05)
    reqs += [(n, eng.submit([9, 10, 11], greedy(6), n)) for n in late]
    order = finish_order(reqs)
    assert len(order) == len(reqs)
    return order


@pytest.mark.parametrize("late", [["m00", "m01", "m09"], ["m02"]])
def test_a_full_pool_lets_every_adapter_run_and_stays_within_its_budget(many, late):
    """A pool of 8 pages: a queue for m02 (rank 8) while small adapters arrive, or queues for three small ones (ranks 2,
    4, 1) while m02 arrives: the late adapters get their turn before the queues are done, within the budget."""
    eng = engine(many, adapter_memory_mb=1.0)  # only to learn what a page of this model takes
    budget = 8 * eng.bank.page_bytes
    eng.close()
    eng = engine(many, cycle_time=0.0, max_batch=4, adapter_memory_mb=budget / (1 << 20))
    seen = watch(eng, 0.01)
    try:
        for n in ("m02", "m00", "m01", "m09"):
            eng.submit([1], greedy(1), n).result(30)  # warm, so only the pool is in question
        queue = ["m02"] * 8 if late != ["m02"] else ["m00", "m01", "m09"] * 4
        order = _finish_order(eng, queue, late)
        last_of_queue = min(max(i for i, name in enumerate(order) if name.startswith(q + "-")) for q in set(queue))
        assert max(order.index(n) for n in late) < last_of_queue, order  # the late ones did not wait for any queue to end
        assert seen["used"] <= eng.bank.budget_bytes and seen["storage"] <= eng.bank.capacity == 8
    finally:
        eng.close()


def _served_while_others_are_busy(eng: Engine, busy: list[str], late: str) -> bool:
    """Clients ask for each of ``busy`` without a pause; does one request for ``late`` get its answer (in 20 s)?"""
    stop = threading.Event()

    def client(name):
        while not stop.is_set():
            eng.submit([3, 4, 5], greedy(4), name).result(60)

    threads = [threading.Thread(target=client, args=(n,)) for n in busy for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        eng.submit([9, 10, 11], greedy(3), late).result(20)
        return True
    except queue.Empty:
        return False
    finally:
        stop.set()
        for t in threads:
            t.join(60)


@pytest.mark.parametrize("late, busy, kw", [
    ("m03", ["m00", "m01", "m09"], {"gpu_slots": 1}),  # cold: warm adapters taking turns on the one slot held its load back
    # rank 8 in a pool of 8 pages, five small adapters (12 pages) taking turns: they took each page as it freed
    ("m02", ["m00", "m01", "m09", "m03", "m05"], {"pages": 8}),
])
def test_no_adapter_starves_while_others_are_asked_for_without_a_pause(many, late, busy, kw):
    if "pages" in kw:
        probe = engine(many, adapter_memory_mb=1.0)
        kw = {"adapter_memory_mb": kw["pages"] * probe.bank.page_bytes / (1 << 20)}
        probe.close()
    eng = engine(many, cycle_time=0.0, **kw)
    try:
        for n in busy:
            eng.submit([1], greedy(1), n).result(30)
        assert _served_while_others_are_busy(eng, busy, late)
    finally:
        eng.close()


def test_an_adapter_larger_than_the_pool_is_refused_and_gpu_slots_still_caps(many):
    eng = engine(many, adapter_memory_mb=1.0)
    pages = eng.bank.capacity
    eng.close()
    small = engine(many, adapter_memory_mb=4 * 1.0 / pages)  # four pages: m02 (rank 8) can never fit
    try:
        with pytest.raises(ServeError) as info:
            small.submit([1, 2], greedy(2), "m02").result(30)
        assert info.value.status == 507 and "--adapter-memory-mb" in str(info.value)
        assert small.submit([1, 2], greedy(2), "m00").result(30)[1] == "length"  # rank 2 fits
    finally:
        small.close()
    capped = engine(many, gpu_slots=2)
    seen = watch(capped)
    try:
        reqs = [capped.submit([1, 2], greedy(3), f"m{i:02d}") for i in range(5)]
        assert all(r.result(60)[1] == "length" for r in reqs)
        assert seen["resident"] <= 2 and capped.bank.capacity == 2 * capped.config.max_lora_rank
    finally:
        capped.close()


def test_the_pool_options_are_checked():
    from fmhub.base.errors import FmhubError
    from fmhub.serving.sources import Source

    assert ServeConfig(Source("/x")).check().gpu_slots is None  # no fixed slot count by default
    for bad in ({"adapter_memory_mb": 0}, {"adapter_memory_mb": -5.0}, {"gpu_slots": 0}):
        with pytest.raises(FmhubError):
            ServeConfig(Source("/x"), **bad).check()
