"""Many LoRA adapters applied at once, each row of a batch through its own (gathered LoRA).

`LoraBank` wraps the base model's ``nn.Linear`` layers. Each wrapped layer
keeps, per *slot*, the adapter's factors stacked in two buffers::

    A: [slots + 1, R, in]     B: [slots + 1, out, R]     (slot ``slots`` stays zero: "no adapter")

and a forward computes, for row i of the batch with slot s_i::

    y_i = W x_i + B[s_i] (A[s_i] x_i)

by gathering each row's factors and two batched matmuls (what punica's BGMV
kernel does, in plain torch). The scaling (alpha/r) is folded into B when an
adapter is loaded; ranks below R are zero-padded, and only the first
``rank_used`` columns (the largest rank loaded) take part. A batch whose rows
all use one slot takes one plain matmul pair instead.

The engine sets the rows' slots before each forward (`LoraBank.rows`); the
wrapped layers read them, so the base model's own forward code is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmhub.base.errors import FmhubError, ServeError


@dataclass
class Factors:
    """One module's update, ready for a slot: ``A`` (r × in) and ``B`` (out × r) with the scaling folded into B."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


class MultiLoraLinear(nn.Module):
    """A base ``nn.Linear`` plus one LoRA update per batch row, chosen by the bank's row slots."""

    def __init__(self, base: nn.Linear, bank: "LoraBank") -> None:
        super().__init__()
        self.base = base
        self._bank = [bank]  # a list, so the bank is not registered as a submodule
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the model (dtype, device, tied weights) sees the base's
        return self.base.weight

    def allocate(self) -> None:
        bank = self._bank[0]
        w = self.base.weight
        self.a = torch.zeros(bank.slots + 1, bank.max_rank, w.shape[1], dtype=w.dtype, device=w.device)
        self.b = torch.zeros(bank.slots + 1, w.shape[0], bank.max_rank, dtype=w.dtype, device=w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        bank = self._bank[0]
        if self.a is None or bank.row_slots is None:
            return y
        r = bank.rank_used
        if bank.uniform is not None:
            if bank.uniform == bank.slots:
                return y
            a, b = self.a[bank.uniform, :r], self.b[bank.uniform, :, :r]
            return y + (x @ a.t()) @ b.t()
        rows = x.shape[0]
        a = self.a[:, :r].index_select(0, bank.row_slots)  # [rows, r, in]
        b = self.b[:, :, :r].index_select(0, bank.row_slots)  # [rows, out, r]
        flat = x.reshape(rows, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return y + delta.reshape(y.shape)


class LoraBank:
    """The slots of adapters a model holds on its device, and which slot each row of the next forward uses."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int, skip: tuple[str, ...] = ("lm_head",)) -> None:
        self.slots = slots
        self.max_rank = max_rank
        self.rank_used = 1
        self.row_slots: torch.Tensor | None = None
        self.uniform: int | None = None
        self.modules: dict[str, MultiLoraLinear] = {}
        self.other: dict[str, str] = {}  # module name -> type, for layers LoRA can name but this bank cannot serve
        self._ranks = [0] * (slots + 1)
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

    @property
    def none_slot(self) -> int:
        return self.slots

    def check(self, label: str, updates: dict[str, Factors]) -> None:
        """Refuse an adapter this bank cannot hold, saying why (before any slot changes)."""
        for module, f in updates.items():
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

    def load(self, slot: int, updates: dict[str, Factors]) -> None:
        """Put an adapter's factors into ``slot`` (copied to the device), replacing what the slot held."""
        self.check(f"slot {slot}", updates)
        self.clear(slot)
        rank = 0
        for module, f in updates.items():
            layer = self.modules[module]
            if layer.a is None:
                layer.allocate()
            r = f.a.shape[0]
            layer.a[slot, :r].copy_(f.a, non_blocking=True)
            layer.b[slot, :, :r].copy_(f.b, non_blocking=True)
            rank = max(rank, r)
        self._ranks[slot] = rank
        self.rank_used = max(1, max(self._ranks))

    def clear(self, slot: int) -> None:
        for layer in self.modules.values():
            if layer.a is not None:
                layer.a[slot].zero_()
                layer.b[slot].zero_()
        self._ranks[slot] = 0
        self.rank_used = max(1, max(self._ranks))

    def select(self, slots: list[int], device: Any) -> None:
        """The slot of each row of the next forward (``none_slot`` for the bare base model)."""
        self.uniform = slots[0] if slots and all(s == slots[0] for s in slots) else None
        self.row_slots = torch.tensor(slots, dtype=torch.long, device=device)


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
