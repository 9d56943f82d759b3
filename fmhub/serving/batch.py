"""The rows decoding together: one key/value cache for all of them, rows joining and leaving between steps.

Rows are left-padded to one cache length ``T``: per layer, keys and values
``[rows, heads, T, dim]``, an attention mask ``[rows, T]`` (0 over padding)
and each row's next position id. A new group is prefilled on its own (its
prompts left-padded together) and then joins: whichever side is shorter gets
zero columns on the left. A finished row is dropped by index. Padding
columns that no row needs any more are cut from the left once they are a
quarter of the cache. Masked positions get exactly zero attention weight, so a
row's logits are those it would have alone (up to the arithmetic of a
different batch shape).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kw(model: Any) -> str:
    """The name of the forward's cache argument."""
    # transformers >= 5.x names it ``cache``; earlier versions ``past_key_values``
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]] | None):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()


def _layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in zip(cache.key_cache, cache.value_cache)]  # transformers 4.x


class Forward:
    """Runs the model on ids with an explicit mask, positions and cache; returns last-position logits and the cache."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kw = cache_kw(model)
        params = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[torch.Tensor, list]:
        cache = _make_cache(kv)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **self.extra, **{self.kw: cache})
        new = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return out.logits[:, -1, :], _layers_of(new)


class RunningBatch:
    """Keys/values, mask and positions of the rows decoding; ``rows`` is whatever the engine tracks per row."""

    def __init__(self) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # [rows] next position id
        self.rows: list[Any] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @staticmethod
    def prefill_inputs(prompts: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, their mask and position ids for a group of prompts."""
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(device), mask.to(device), positions.to(device)

    def join(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, rows: list[Any]) -> None:
        """Add prefilled rows (their cache and mask, left-padded) to the batch."""
        keep = mask.bool()[:, None, :, None]
        kv = [(k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)) for k, v in kv]  # padding never carries NaNs into a sum
        pos = mask.sum(-1)
        if self.mask is None:
            self.kv, self.mask, self.pos, self.rows = kv, mask, pos, list(rows)
            return
        t_old, t_new = self.length, mask.shape[1]
        length = max(t_old, t_new)
        old_kv, old_mask = _pad_left(self.kv, self.mask, length - t_old)
        new_kv, new_mask = _pad_left(kv, mask, length - t_new)
        self.kv = [(torch.cat([a, c]), torch.cat([b, d])) for (a, b), (c, d) in zip(old_kv, new_kv)]
        self.mask = torch.cat([old_mask, new_mask])
        self.pos = torch.cat([self.pos, pos])
        self.rows.extend(rows)

    def step_inputs(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of one decode step: each row's last token, the mask with a new column, the rows' positions."""
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        return last[:, None], torch.cat([self.mask, ones], 1), self.pos[:, None]

    def advance(self, kv: list, mask: torch.Tensor) -> None:
        self.kv, self.mask, self.pos = kv, mask, self.pos + 1

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order)."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.__init__()
            return
        idx = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv]
        self.mask, self.pos = self.mask.index_select(0, idx), self.pos.index_select(0, idx)
        self.rows = [self.rows[i] for i in indices]
        used = self.mask.any(0).nonzero()
        cut = int(used[0]) if used.numel() else self.length
        if cut and cut * 4 >= self.length:
            self.kv = [(k[:, :, cut:].contiguous(), v[:, :, cut:].contiguous()) for k, v in self.kv]
            self.mask = self.mask[:, cut:].contiguous()


def _pad_left(kv: list, mask: torch.Tensor, n: int) -> tuple[list, torch.Tensor]:
    if n <= 0:
        return kv, mask
    out = []
    for k, v in kv:
        zk = k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3])
        zv = v.new_zeros(v.shape[0], v.shape[1], n, v.shape[3])
        out.append((torch.cat([zk, k], 2), torch.cat([zv, v], 2)))
    return out, torch.cat([mask.new_zeros(mask.shape[0], n), mask], 1)
