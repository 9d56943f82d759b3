"""Many LoRA adapters applied at once: a pool of adapter weights sized by memory, rows gathered per adapter.

`LoraBank` wraps the base model's ``nn.Linear`` layers and keeps every
resident adapter in one *pool* per layer, in rank rows ("pages", as S-LoRA
does for its unified pool)::

    A: [pages, in]     B: [pages, out]     (page 0 stays zero: "no update")

An adapter of rank r holds r consecutive pages, the same ones in every layer;
a module it does not target, or targets with a lower rank, keeps zeros there.
When the free pages are enough but scattered in gaps, the resident adapters
are moved together (`LoraBank._compact`), so a free page always counts.
The pool's size is a memory budget (``--adapter-memory-mb``, or a share of
the device's free memory), so how many adapters are resident follows from
their ranks, not from a fixed number of slots. Storage grows on demand (by
doubling) up to the budget. The scaling (alpha/r) is folded into B when an
adapter is loaded.

A forward computes, for row i of the batch with adapter u_i::

    y_i = W x_i + B[u_i]ᵀ (A[u_i] x_i)

as a segmented gather: the factors of each *distinct* adapter of the batch are
gathered from the pool once (``[U, r, in]``), the rows are grouped by adapter
(padded to the largest group) and two batched matmuls run per adapter group
(Punica's SGMV, in plain torch). When every row has its own adapter (the
common case of many clients), B is not gathered at all: each row's update is
a weighted bag of its adapter's B pages (``embedding_bag``). When grouping
would pad too much (one adapter with many rows, many with one), each row
takes its adapter's gathered factors instead. A batch on one adapter takes a plain matmul pair on a view of
its pages; ``r`` is the largest rank among the batch's adapters.

The engine says before each forward which adapter each row uses
(`LoraBank.select`); the wrapped layers read it, so the base model's own
forward code is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmhub.base.errors import FmhubError, ServeError
from fmhub.base.units import human_bytes

GROUP_PAD_LIMIT = 2.0  # grouped matmuls while padded rows stay under this multiple of the batch's rows
MiB = 1 << 20
DEFAULT_GPU_SHARE = 0.10  # of the GPU's free memory once the base is loaded; the rest is for the keys and values
DEFAULT_CPU_MB = 1024
FIRST_PAGES = 256  # storage allocated at the first load; then doubled as needed, up to the budget


@dataclass
class Factors:
    """One module's update, ready for the pool: ``A`` (r × in) and ``B`` (out × r) with the scaling folded into B."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclass(eq=False)
class Pages:
    """Where a resident adapter's factors are in the pool: ``rank`` pages from ``start``. Rows are grouped by this handle."""

    start: int
    rank: int


@dataclass
class _Plan:
    """The gather indices of one forward, computed once for every layer."""

    uniform: Pages | None = None  # every row on this adapter
    table: torch.Tensor | None = None  # [U * r] page of each distinct adapter's rank rows (0: padding)
    groups: int = 0  # U
    rank: int = 1  # r
    size: int = 1  # rows per group: 1 (every row its own adapter), padded (grouped) or 0 (per-row)
    gather: torch.Tensor | None = None  # grouped: [U * size] the batch row at each padded position
    back: torch.Tensor | None = None  # grouped: [rows] each row's padded position; per-row: [rows] each row's group


def rank_of(updates: dict[str, Factors]) -> int:
    """The pages an adapter needs: its largest rank over modules."""
    return max(f.a.shape[0] for f in updates.values())


class MultiLoraLinear(nn.Module):
    """A base ``nn.Linear`` plus one LoRA update per batch row, gathered from the bank's pool."""

    def __init__(self, base: nn.Linear, bank: "LoraBank") -> None:
        super().__init__()
        self.base = base
        self._bank = [bank]  # a list, so the bank is not registered as a submodule
        self.a: torch.Tensor | None = None  # [pages, in]
        self.b: torch.Tensor | None = None  # [pages, out]: B transposed, so a page is one contiguous row

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the model (dtype, device, tied weights) sees the base's
        return self.base.weight

    def grow(self, pages: int) -> None:
        """Make room for ``pages`` pages (page 0 included), keeping what the pool holds."""
        w = self.base.weight
        have = 0 if self.a is None else self.a.shape[0]
        a = torch.zeros(pages, w.shape[1], dtype=w.dtype, device=w.device)
        b = torch.zeros(pages, w.shape[0], dtype=w.dtype, device=w.device)
        if have:
            a[:have].copy_(self.a)
            b[:have].copy_(self.b)
        self.a, self.b = a, b

    def _distinct(self, flat: torch.Tensor, a: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        """Every row on its own adapter (rows in group order): shrink with a batched matmul, expand straight from the
        pool as a weighted bag of B's pages (no gathered copy of B)."""
        rows, seq, _ = flat.shape
        h = torch.bmm(flat, a.transpose(1, 2)).reshape(rows * seq, plan.rank)  # [rows * seq, r]
        pages = plan.table.view(rows, plan.rank)
        if seq > 1:
            pages = pages.repeat_interleave(seq, 0)
        return F.embedding_bag(pages, self.b, per_sample_weights=h, mode="sum")

    def _grouped(self, flat: torch.Tensor, a: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        """Rows grouped by adapter, padded to ``plan.size`` per group: two batched matmuls, one per group."""
        u, seq = plan.groups, flat.shape[1]
        b = self.b.index_select(0, plan.table).view(u, plan.rank, -1)  # [U, r, out]
        xg = flat.index_select(0, plan.gather).view(u, plan.size * seq, -1)
        return torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b).view(u * plan.size, seq, -1).index_select(0, plan.back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self._bank[0].plan
        if self.a is None or plan is None:
            return y
        if plan.uniform is not None:  # one adapter: its pages are a view, no gather
            p = plan.uniform
            return y.add_((x @ self.a[p.start:p.start + p.rank].t()) @ self.b[p.start:p.start + p.rank])  # y is ours: in place
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, seq, in]
        a = self.a.index_select(0, plan.table).view(plan.groups, plan.rank, -1)  # each distinct adapter read once: [U, r, in]
        if plan.size == 1:
            d = self._distinct(flat, a, plan)
        elif plan.size:
            d = self._grouped(flat, a, plan)
        else:  # skewed groups: each row takes its adapter's gathered factors
            b = self.b.index_select(0, plan.table).view(plan.groups, plan.rank, -1)
            d = torch.bmm(torch.bmm(flat, a.index_select(0, plan.back).transpose(1, 2)), b.index_select(0, plan.back))
        return y.add_(d.reshape(y.shape))


class LoraBank:
    """The pool of resident adapters' factors (see the module doc), and which adapter each row of the next forward uses."""

    def __init__(self, model: nn.Module, max_rank: int, budget_bytes: int | None = None, pages: int | None = None,
                 skip: tuple[str, ...] = ("lm_head",)) -> None:
        self.max_rank = max_rank
        self.plan: _Plan | None = None
        self.modules: dict[str, MultiLoraLinear] = {}
        self.other: dict[str, str] = {}  # module name -> type, for layers LoRA can name but this bank cannot serve
        for name, module in list(model.named_modules()):
            if not name or any(name == s or name.endswith("." + s) for s in skip):
                continue
            if type(module) is nn.Linear:
                wrapped = MultiLoraLinear(module, self)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, wrapped)
                self.modules[name] = wrapped
            elif isinstance(module, (nn.Embedding, nn.Conv1d)) or type(module).__name__ == "Conv1D":
                self.other[name] = type(module).__name__
        # a page is one rank row in every wrapped layer: counted for all of them, though a layer no adapter
        # targets never gets storage, so the budget is an upper bound
        self.page_bytes = max(1, sum((m.base.in_features + m.base.out_features) * m.base.weight.element_size()
                                     for m in self.modules.values()))
        self.capacity = pages if pages is not None else int(budget_bytes or 0) // self.page_bytes
        self.allocated = 0  # pages with storage, page 0 aside
        self._free: list[list[int]] = []  # free [start, length] ranges, by start
        self._resident: dict[int, Pages] = {}  # id -> the handle of each loaded adapter, for `_compact` to move

    @property
    def used_bytes(self) -> int:
        return (self.allocated - sum(n for _, n in self._free)) * self.page_bytes

    @property
    def free_pages(self) -> int:
        return self.capacity - self.used_bytes // self.page_bytes

    @property
    def budget_bytes(self) -> int:
        return self.capacity * self.page_bytes

    def check(self, label: str, updates: dict[str, Factors]) -> None:
        """Refuse an adapter this bank cannot hold, saying why (before anything in the pool changes)."""
        for module, f in updates.items():
            self._check_module(label, module, f)
        need = rank_of(updates)
        if need > self.capacity:
            raise ServeError(507, f"adapter {label} needs {human_bytes(need * self.page_bytes)} of adapter memory (rank {need}), "
                                  f"more than the whole pool ({human_bytes(self.budget_bytes)}); restart with a larger "
                                  "--adapter-memory-mb", "server_error", "model")

    def _check_module(self, label: str, module: str, f: Factors) -> None:
        layer = self.modules.get(module)
        if layer is None:
            kind = self.other.get(module)
            if kind:
                raise ServeError(422, f"adapter {label}: targets {module!r}, a {kind}; fmhub serve applies LoRA to Linear layers only",
                                 param="model")
            raise ServeError(409, f"adapter {label}: targets {module!r}, which the served base model does not have; "
                                  "is this adapter for another base model?", param="model")
        w = layer.base.weight
        if tuple(f.a.shape[1:]) != (w.shape[1],) or tuple(f.b.shape[:1]) != (w.shape[0],):
            raise ServeError(409, f"adapter {label}: its update of {module!r} is {f.b.shape[0]}×{f.a.shape[1]}, the served "
                                  f"base's weight is {w.shape[0]}×{w.shape[1]}; is this adapter for another base model?", param="model")
        if f.a.shape[0] > self.max_rank:
            raise ServeError(422, f"adapter {label}: rank {f.a.shape[0]} of {module!r} is above the server's max LoRA rank "
                                  f"{self.max_rank}; restart with a larger --max-lora-rank", param="model")

    # -- pages ------------------------------------------------------------------------------
    def fits(self, rank: int) -> bool:
        """Whether ``rank`` pages are free: consecutive now, or once storage grows or `_compact` closes the gaps."""
        return self.free_pages >= rank

    def _take(self, rank: int) -> int | None:
        if self.free_pages < rank:
            return None
        start = self._first_fit(rank)
        while start is None and self._grow(rank):
            start = self._first_fit(rank)
        if start is None:
            # enough pages, but in gaps between resident adapters (loads and unloads of different ranks): counted as
            # room while no gap is large enough, they would keep an adapter waiting for as long as its neighbours
            # have rows (nothing drains for it), so close the gaps
            self._compact()
            start = self._first_fit(rank)
        return start

    def _first_fit(self, rank: int) -> int | None:
        for i, (start, n) in enumerate(self._free):
            if n >= rank:
                if n == rank:
                    del self._free[i]
                else:
                    self._free[i] = [start + rank, n - rank]
                return start
        return None

    def _compact(self) -> None:
        """Move the resident adapters' pages to the front of the pool, in order, leaving one free range at its end.

        Called between forwards (by the engine thread, as every load is): the moved adapters' handles change in
        place, and the next `select` reads them.
        """
        at = 1
        for p in sorted(self._resident.values(), key=lambda p: p.start):
            if p.start != at:
                for layer in self.modules.values():
                    if layer.a is not None:  # moving down, maybe onto itself: copy out first
                        layer.a[at:at + p.rank] = layer.a[p.start:p.start + p.rank].clone()
                        layer.b[at:at + p.rank] = layer.b[p.start:p.start + p.rank].clone()
                p.start = at
            at += p.rank
        self._free = [[at, self.allocated + 1 - at]] if at <= self.allocated else []

    def _grow(self, rank: int) -> bool:
        if self.allocated >= self.capacity:
            return False
        size = min(self.capacity, max(2 * self.allocated, self.allocated + rank, FIRST_PAGES))
        self.release(Pages(self.allocated + 1, size - self.allocated))
        self.allocated = size
        for layer in self.modules.values():
            if layer.a is not None:
                layer.grow(size + 1)
        return True

    def load(self, updates: dict[str, Factors]) -> Pages | None:
        """Copy an adapter's factors into free pages of the pool; None when no ``rank_of(updates)`` consecutive pages are free."""
        start = self._take(rank_of(updates))
        if start is None:
            return None
        pages = Pages(start, rank_of(updates))
        self._resident[id(pages)] = pages
        for layer in self.modules.values():  # a module it does not target (or with a lower rank) keeps zeros
            if layer.a is not None:
                layer.a[start:start + pages.rank].zero_()
                layer.b[start:start + pages.rank].zero_()
        for module, f in updates.items():
            layer = self.modules[module]
            if layer.a is None:
                layer.grow(self.allocated + 1)
            r = f.a.shape[0]
            layer.a[start:start + r].copy_(f.a, non_blocking=True)
            layer.b[start:start + r].copy_(f.b.t(), non_blocking=True)
        return pages

    def release(self, pages: Pages) -> None:
        """Give an adapter's pages back to the pool (merged with free neighbours)."""
        self._resident.pop(id(pages), None)
        free = sorted(self._free + [[pages.start, pages.rank]])
        merged: list[list[int]] = []
        for start, n in free:
            if merged and sum(merged[-1]) == start:
                merged[-1][1] += n
            else:
                merged.append([start, n])
        self._free = merged

    # -- the next forward -------------------------------------------------------------------
    def select(self, adapters: list[Pages | None], device: Any) -> None:
        """The adapter of each row of the next forward (None: the bare base model): the gather plan of every layer."""
        first = adapters[0] if adapters else None
        if all(a is first for a in adapters):
            self.plan = None if first is None else _Plan(uniform=first)
            return
        group: dict[int, int] = {}
        handles: list[Pages | None] = []
        inv = []
        for a in adapters:
            g = group.setdefault(id(a), len(handles))
            if g == len(handles):
                handles.append(a)
            inv.append(g)
        self.plan = _plan(handles, inv, device)


def _plan(handles: list[Pages | None], inv: list[int], device: Any) -> _Plan:
    u, rows = len(handles), len(inv)
    r = max(1, max(h.rank for h in handles if h is not None))
    starts = torch.tensor([h.start if h else 0 for h in handles])
    ranks = torch.tensor([h.rank if h else 0 for h in handles])
    j = torch.arange(r)
    table = torch.where(j < ranks[:, None], starts[:, None] + j, 0).view(-1).to(device)
    if u == rows:  # every row its own adapter, groups numbered in row order: nothing to regroup
        return _Plan(table=table, groups=u, rank=r, size=1)
    counts = [0] * u
    for g in inv:
        counts[g] += 1
    size = max(counts)
    if u * size > GROUP_PAD_LIMIT * rows:
        return _Plan(table=table, groups=u, rank=r, size=0, back=torch.tensor(inv, device=device))
    gather: list[int] = [-1] * (u * size)
    back, fill = [], [0] * u
    for row, g in enumerate(inv):
        p = g * size + fill[g]
        fill[g] += 1
        gather[p] = row
        back.append(p)
    gather = [v if v >= 0 else gather[i - i % size] for i, v in enumerate(gather)]  # padding repeats its group's first row
    return _Plan(table=table, groups=u, rank=r, size=size, gather=torch.tensor(gather, device=device),
                 back=torch.tensor(back, device=device))


def adapter_pool(model: nn.Module, config: Any, device: torch.device) -> LoraBank:
    """The bank of a `fmhub.serving.config.ServeConfig`: a pool of ``adapter_memory_mb``; else ``gpu_slots`` adapters of
    ``max_lora_rank``; else 10 % of the GPU's free memory (the rest is for the keys and values), or 1 GiB on the CPU."""
    if config.adapter_memory_mb is not None:
        return LoraBank(model, config.max_lora_rank, budget_bytes=int(config.adapter_memory_mb * MiB))
    if config.gpu_slots is not None:
        return LoraBank(model, config.max_lora_rank, pages=config.gpu_slots * config.max_lora_rank)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return LoraBank(model, config.max_lora_rank, budget_bytes=int(free * DEFAULT_GPU_SHARE))
    return LoraBank(model, config.max_lora_rank, budget_bytes=DEFAULT_CPU_MB * MiB)


def factors_from(adapter: Any, dtype: torch.dtype, pin: bool = False) -> dict[str, Factors]:
    """A `fmhub.models.lora.Adapter`'s updates as `Factors` by base module name, on the CPU (pinned for fast copies)."""
    from fmhub.models.lora import CONFIG

    out = {}
    for name, up in adapter.updates.items():
        if up.transpose:
            raise FmhubError(f"adapter {adapter.path}: {up.module!r} is an embedding or fan_in_fan_out layer; "
                             "fmhub serve applies LoRA to Linear layers only")
        a = up.a.load().to(torch.float32)
        b = up.b.load().to(torch.float32) * up.scaling
        a, b = a.to(dtype).contiguous().clone(), b.to(dtype).contiguous()
        if pin:
            a, b = a.pin_memory(), b.pin_memory()
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        out[module] = Factors(a, b)
    if not out:
        raise FmhubError(f"adapter {adapter.path}: holds no LoRA weights (see its {CONFIG})")
    return out
