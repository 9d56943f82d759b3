"""Continuous multi-adapter batching: one base model, rows of many adapters decoding in one batch.

One engine thread owns the model. Each turn of its loop it

1. admits waiting requests, oldest first, into the free rows of the batch:
   a request whose adapter is on the device joins at once; one whose adapter
   is warm is copied into free pages of the adapter pool (sized by memory,
   so every client's adapter usually fits); one whose adapter is cold starts
   a load in the loader thread and waits, without holding up anyone behind it
   (see `fmhub.serving.cache.DeviceSlots` for who leaves a full pool, and
   the ``cycle_time`` rule that keeps any adapter from starving);
2. prefills the admitted prompts together and joins them to the batch;
3. runs one decode step for every row at once, each row through its own
   adapter (`fmhub.serving.multilora`), and streams each row's token to its
   request; finished, cancelled and disconnected rows leave the batch.

Requests are submitted from any thread (`Engine.submit`) and read back as a
stream of events (`Request.events`).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterator

import torch

from fmhub.serving import sampling
from fmhub.serving.batch import Forward, RunningBatch
from fmhub.base.errors import ServeError
from fmhub.serving.cache import AdapterCache, DeviceSlots, Entry, Slot
from fmhub.serving.config import ServeConfig
from fmhub.serving.metrics import Metrics
from fmhub.serving.model import Loaded, load_base
from fmhub.serving.multilora import Pages, adapter_pool, factors_from, rank_of
from fmhub.serving.sources import AdapterSpec, check_recorded_base

log = logging.getLogger("fmhub.serve")
MAX_PREFILL_TOKENS = 8192  # per engine turn, so a burst of long prompts cannot stall the decoding rows for long


@dataclass
class GenParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_ids: frozenset[int] = frozenset()
    # OpenAI's logits processing (fmhub.serving.sampling): checked by the API before they get here
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely tokens' log-probabilities


@dataclass
class Request:
    """One generation: submitted by a client thread, decoded by the engine, read back through ``events``."""

    id: str
    prompt: list[int]
    params: GenParams
    adapter: str  # the name the client asked for
    entry: Entry | None  # None: the bare base model
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    slot: Slot | None = None
    first_token: float | None = None
    finish_reason: str | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    logprob: tuple | None = None  # the last sampled token's (logprob, top), when params.logprobs asks; see _emit

    def cancel(self) -> None:
        """Stop generating (client gone, or a stop string seen); the engine drops the row at its next turn."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def stream(self, timeout: float | None = None) -> Iterator[tuple]:
        """``("token", id, logprob)`` events (logprob: ``(logprob, [(id, logprob), ...])`` when ``params.logprobs`` asks,
        else None), then one ``("done", finish_reason)`` or ``("error", ServeError)``."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if event[0] != "token":
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """All tokens and the finish reason (raises the request's ServeError)."""
        out = []
        for event in self.stream(timeout):
            if event[0] == "token":
                out.append(event[1])
            elif event[0] == "error":
                raise event[1]
            else:
                return out, event[1]
        raise AssertionError("unreachable")


class Engine:
    """The serving engine of the built-in backend; see the module doc."""

    def __init__(self, config: ServeConfig, loaded: Loaded | None = None, metrics: Metrics | None = None) -> None:
        self.config = config.check()
        self.metrics = metrics or Metrics()
        self.cache_dir = config.cache_dir or _default_cache_dir(config)
        self.loaded = loaded or load_base(config.base, self.cache_dir, config.device, config.dtype, config.max_model_len)
        self.model, self.device = self.loaded.model, self.loaded.device
        self.bank = adapter_pool(self.model, config, self.device)
        self.slots = DeviceSlots(self.bank, config.cycle_time, config.eviction, limit=config.gpu_slots)
        self.cache = AdapterCache(os.path.join(self.cache_dir, "adapters"), config.cpu_cache_mb, config.disk_cache_mb,
                                  config.eviction, self._load_factors, self._wake, self.metrics)
        self.cache.in_use = self._keys_in_use
        self.cache.set_adapters(config.adapters, replace=True)
        self.forward = Forward(self.model)
        self.batch = RunningBatch()
        self.waiting: list[Request] = []
        self.vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._stop = False
        self._declare_gauges()
        self._thread = threading.Thread(target=self._run, name="fmhub-engine", daemon=True)
        self._thread.start()

    # -- client side ------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: GenParams, adapter: str | None = None) -> Request:
        """Queue a generation; raises `ServeError` for what can be refused at once (unknown adapter, over-long prompt)."""
        if self._stop:
            raise ServeError(503, "the server is shutting down", "server_error")
        name = adapter or self.config.base_name
        entry = None if name == self.config.base_name else self.cache.get(name)
        if entry is not None and entry.state == "error":
            if entry.error.status >= 500 and entry.error.status != 507:
                self.cache.retry(entry)  # maybe passing (a disk or fetch error): the next request tries again
            else:
                raise entry.error
        self.check_prompt(prompt, params.max_tokens)
        req = Request(f"cmpl-{next(self._ids)}", list(prompt), params, name, entry)
        if params.temperature > 0:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little"))
        with self._cv:
            if entry is not None:
                entry.waiters += 1
            self.waiting.append(req)
            self._cv.notify_all()
        self.metrics.inc("fmhub_requests_total", "Requests accepted, by adapter.", adapter=name)
        return req

    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        if not prompt:
            raise ServeError(400, "the prompt is empty", param="prompt")
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ServeError(400, f"token id {bad!r} is outside the model's vocabulary (0..{self.vocab - 1})", param="prompt")
        if max_tokens < 1:
            raise ServeError(400, f"max_tokens must be at least 1, not {max_tokens}", param="max_tokens")
        limit = self.loaded.max_len
        if len(prompt) + max_tokens > limit:
            raise ServeError(400, f"this model's maximum context length is {limit} tokens; the prompt has {len(prompt)} "
                                  f"and max_tokens asks for {max_tokens} more: shorten the prompt or lower max_tokens",
                             param="prompt" if len(prompt) >= limit else "max_tokens")

    def set_adapters(self, specs: list[AdapterSpec], replace: bool = True) -> dict[str, list[str]]:
        """Serve these adapters from now on (a deploy); rows decoding keep the version they started with."""
        with self._cv:
            report = self.cache.set_adapters(specs, replace)
            self._cv.notify_all()
        return report

    def adapters(self) -> list[dict]:
        """Every served adapter: name, version, source, where it is (gpu/cpu/disk/cold) and any load error."""
        on_device = {s.entry.key: s for s in self.slots.slots if s.entry is not None}
        with self._cv:  # a deploy may be changing the set
            current = sorted(self.cache.current.items())
        out = []
        for name, e in current:
            if e.key in on_device:
                tier = "gpu"
            elif e.state == "cpu":
                tier = "cpu"
            elif e.source.rev is None or self.cache.disk.holds(e.version):
                tier = "disk"
            else:
                tier = "store"
            out.append({"name": name, "version": e.version, "source": e.source.label, "tier": tier, "state": e.state,
                        "uses": e.uses, "error": str(e.error) if e.error else None})
        return out

    def health(self) -> dict:
        return {"status": "ok" if self._thread.is_alive() else "stopped", "base": self.config.base.label,
                "device": str(self.device), "adapters": len(self.cache.current), "running": len(self.batch),
                "waiting": len(self.waiting), "slots": [s.entry.name if s.entry else None for s in self.slots.slots]}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self.cache.close()

    # -- engine thread ----------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _keys_in_use(self) -> set[str]:
        keys = {s.entry.key for s in self.slots.slots if s.entry is not None and s.rows}
        keys.update(r.entry.key for r in list(self.waiting) if r.entry is not None)
        return keys

    def _load_factors(self, entry: Entry, path: str) -> dict:
        from fmhub.models import lora
        from fmhub.models.adapters import SIDECAR

        adapter = lora.load_adapter(path)
        side = os.path.join(path, SIDECAR)
        sidecar = Path(side).read_bytes() if os.path.isfile(side) else None
        check_recorded_base(entry.name, sidecar, f"{entry.name}/{SIDECAR}", self.config.base)
        factors = factors_from(adapter, self.loaded.dtype, pin=self.device.type == "cuda")
        self.bank.check(entry.name, factors)
        return factors

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not len(self.batch):
                    self._cv.wait()
                if self._stop:
                    break
            admitted: list[Request] = []
            try:
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                if len(self.batch):
                    self._decode()
                elif not admitted:
                    with self._cv:  # everyone waits for a load: sleep until a loader or a client wakes us
                        self._cv.wait(timeout=0.05)
                self.cache.collect()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, never the server
                log.exception("decode step failed")
                self._fail_running(ServeError(500, f"generation failed: {exc.__class__.__name__}: {exc}", "server_error"), admitted)
        self._fail_running(ServeError(503, "the server is shutting down", "server_error"))
        with self._cv:
            for r in self.waiting:
                r.events.put(("error", ServeError(503, "the server is shutting down", "server_error")))
            self.waiting.clear()

    def _admit(self) -> list[Request]:
        room = self.config.max_batch - len(self.batch)
        budget = MAX_PREFILL_TOKENS
        admitted: list[Request] = []
        want_slot: dict[str, int] = {}  # adapters that wait for room in the pool: key -> rank
        self._prefetch = self._prefetch_room()
        self._parked: set[int] = set()  # warm adapters seen in this turn's queue (they take prefetch room in arrival order)
        with self._cv:
            queue_now = list(self.waiting)
        for r in queue_now:
            if r.cancelled:
                self._leave_queue(r)
                r.events.put(("done", "cancelled"))
                continue
            if r.entry is not None and r.entry.retired and not self._rebind(r):
                continue
            # a request that cannot join now still counts as demand: its adapter is prefetched and may claim a slot
            admit = room > 0 and (not admitted or len(r.prompt) <= budget)
            slot = None
            if r.entry is not None:
                slot = self._slot_for(r, want_slot, admit)
                if slot is None:
                    continue
                slot.rows += 1
                slot.uses += 1
                slot.last_used = time.monotonic()
                r.entry.touch()
            elif not admit:
                continue
            r.slot = slot
            self._leave_queue(r)
            admitted.append(r)
            room -= 1
            budget -= len(r.prompt)
        if want_slot:
            self.slots.drain_for(list(want_slot.values()))
        else:
            self.slots.undrain()
        return admitted

    def _prefetch_room(self) -> int:
        """How many more cold adapters to start loading: as many as could decode at once, and no more than the warm tier
        holds, less those loading. Adapters loaded and still waiting for the device (parked) take their share of it as
        `_slot_for` meets them in the queue: in arrival order, so a parked adapter whose requests are younger never
        keeps an older request's cold adapter from loading (counted up front, two warm adapters taking turns on one
        slot starved every cold one for good)."""
        return min(self.config.gpu_slots or self.config.max_batch, self.cache.holds()) - self.cache.loading

    def _rebind(self, r: Request) -> bool:
        """A queued request for an adapter a deploy replaced gets the new version (or an error, if it was removed)."""
        current = self.cache.current.get(r.adapter)
        with self._cv:
            r.entry.waiters -= 1
            if current is None:
                self.waiting.remove(r)
                r.events.put(("error", ServeError(404, f"adapter {r.adapter!r} was removed by a deploy", param="model")))
                return False
            current.waiters += 1
            r.entry = current
        return True

    def _slot_for(self, r: Request, want_slot: dict[str, int], admit: bool) -> Slot | None:
        """The resident adapter ``r`` decodes with, placed now if ``admit``; else None, noting in ``want_slot`` an adapter
        that waits for room in the pool."""
        e = r.entry
        slot = self.slots.admissible(e)
        if slot is not None:
            if not admit:
                return None
            if slot.rows == 0:
                self.metrics.cache_event("gpu", "hit")
            return slot
        if self.slots.find(e) is not None:  # its turn is over: it waits while others get a slot
            return None
        if e.state == "error":
            with self._cv:
                e.waiters -= 1
                self.waiting.remove(r)
            r.events.put(("error", e.error))
            return None
        if e.state != "cpu":
            if e.state == "cold":
                if self._prefetch <= 0:
                    return None
                self._prefetch -= 1
            self.cache.ensure_warm(e)
            return None
        if id(e) not in self._parked:
            self._parked.add(id(e))
            self._prefetch -= 1
        factors = e.factors
        if factors is None:  # evicted from the warm tier in the meantime: load again
            e.state = "cold"
            self.cache.ensure_warm(e)
            return None
        if not self.slots.can_place(rank_of(factors), [rank for key, rank in want_slot.items() if key != e.key]):
            want_slot[e.key] = rank_of(factors)
            return None
        if not admit:
            return None
        slot = self.slots.place(e, factors)
        if slot is None:  # the free pages are scattered: wait for rows to finish like any adapter without room
            want_slot[e.key] = rank_of(factors)
            return None
        self.metrics.cache_event("gpu", "miss")
        return slot

    def _leave_queue(self, r: Request) -> None:
        with self._cv:
            self.waiting.remove(r)
            if r.entry is not None:
                r.entry.waiters -= 1

    @staticmethod
    def _pages(r: Request) -> Pages | None:
        return r.slot.pages if r.slot is not None else None

    def _prefill(self, rows: list[Request]) -> None:
        ids, mask, positions = RunningBatch.prefill_inputs([r.prompt for r in rows], self.loaded.pad, self.device)
        self.bank.select([self._pages(r) for r in rows], self.device)
        start = time.monotonic()
        logits, kv = self.forward(ids, mask, positions, None)
        self.metrics.observe("fmhub_prefill_seconds", "Time of one prefill of the requests admitted together.", time.monotonic() - start)
        self.batch.join(kv, mask, rows)
        self._emit(self._sample(logits, rows), offset=len(self.batch) - len(rows))

    def _decode(self) -> None:
        rows = self.batch.rows
        last = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long, device=self.device)
        ids, mask, positions = self.batch.step_inputs(last)
        self.bank.select([self._pages(r) for r in rows], self.device)
        start = time.monotonic()
        logits, kv = self.forward(ids, mask, positions, self.batch.kv)
        self.batch.advance(kv, mask)
        self.metrics.observe("fmhub_decode_step_seconds", "Time of one decode step of the whole batch.", time.monotonic() - start)
        self.metrics.inc("fmhub_decode_steps_total", "Decode steps run.")
        self.metrics.inc("fmhub_decode_rows_total", "Rows of all decode steps (over fmhub_decode_steps_total: rows per step).",
                         float(len(rows)))
        self._emit(self._sample(logits, rows), offset=0)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """Each row's next token: greedy rows without processing in one argmax, the others one by one
        (`fmhub.serving.sampling`), noting the log-probabilities a row asked for on the row."""
        out = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature > 0 or sampling.needs_processing(p):
                x = sampling.processed(logits[i], p, r.tokens)
                out[i] = _sample_row(x, p, r.generator) if p.temperature > 0 else int(x.argmax())
                r.logprob = None if p.logprobs is None else sampling.logprob_info(x, out[i], p.logprobs)
        return out

    def _emit(self, tokens: list[int], offset: int) -> None:
        """Hand each row its token; finished and cancelled rows leave the batch."""
        now = time.monotonic()
        keep = list(range(offset))
        rows = self.batch.rows
        for i, tok in enumerate(tokens):
            r = rows[offset + i]
            reason = None
            if r.cancelled:
                reason = "cancelled"
            elif not r.params.ignore_eos and tok in self.loaded.eos or tok in r.params.stop_ids:
                reason = "stop"
            else:
                r.tokens.append(tok)
                r.events.put(("token", tok, r.logprob))
                if r.first_token is None:
                    r.first_token = now
                    self.metrics.observe("fmhub_time_to_first_token_seconds", "Arrival to first token.", now - r.arrival, adapter=r.adapter)
                if len(r.tokens) >= r.params.max_tokens or len(r.prompt) + len(r.tokens) >= self.loaded.max_len:
                    reason = "length"
            if reason is None:
                keep.append(offset + i)
            else:
                self._finish(r, reason, now)
        self.metrics.inc("fmhub_generated_tokens_total", "Tokens generated.", float(len(tokens)))
        self.batch.keep(keep)

    def _finish(self, r: Request, reason: str, now: float) -> None:
        r.finish_reason = reason
        if r.slot is not None:
            r.slot.rows -= 1
        r.events.put(("done", reason))
        self.metrics.inc("fmhub_requests_finished_total", "Requests finished, by reason.", reason=reason)
        self.metrics.observe("fmhub_request_seconds", "Arrival to last token.", now - r.arrival, adapter=r.adapter)

    def _fail_running(self, err: ServeError, admitted: list[Request] = ()) -> None:
        """Fail every row of the batch, and rows admitted but not yet in it (a prefill that raised before joining)."""
        joined = {id(r) for r in self.batch.rows}
        for r in [*self.batch.rows, *(r for r in admitted if id(r) not in joined)]:
            if r.slot is not None:
                r.slot.rows -= 1
            r.events.put(("error", err))
        self.batch = RunningBatch()

    def _declare_gauges(self) -> None:
        m = self.metrics
        m.gauge("fmhub_batch_rows", "Rows decoding now.", lambda: {(): len(self.batch)})
        m.gauge("fmhub_waiting_requests", "Requests queued for a row, a slot or an adapter load.", lambda: {(): len(self.waiting)})
        m.gauge("fmhub_adapter_slots_used", "Adapters resident on the device with rows decoding.",
                lambda: {(): sum(1 for s in self.slots.slots if s.rows)})
        m.gauge("fmhub_adapters_resident", "Adapters resident in the device's adapter pool.", lambda: {(): len(self.slots.slots)})
        m.gauge("fmhub_adapter_pool_bytes", "The device's adapter pool: bytes its resident adapters take, and its budget.",
                lambda: {(("state", "used"),): self.bank.used_bytes, (("state", "budget"),): self.bank.budget_bytes})
        m.gauge("fmhub_adapter_cache_bytes", "Bytes held by each adapter cache tier.",
                lambda: {(("tier", "cpu"),): self.cache.warm_bytes, (("tier", "disk"),): self.cache.disk.used})
        m.gauge("fmhub_adapters_served", "Adapters this server serves.", lambda: {(): len(self.cache.current)})


def _sample_row(logits: torch.Tensor, params: GenParams, gen: torch.Generator | None) -> int:
    if params.temperature < sampling.GREEDY_BELOW:  # logits / T would overflow to inf and nan: take T → 0's limit, greedy
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(0) - sorted_p > params.top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _default_cache_dir(config: ServeConfig) -> str:
    src = config.base
    if src.repo:
        from fmhub.core.repo import common_dir

        return os.path.join(common_dir(src.repo), "fmhub", "serve-cache")
    return os.path.join(tempfile.gettempdir(), "fmhub-serve-cache")
