"""The ``elementwise-max`` merge strategy: each element of a tensor takes its largest value among the sides."""

from __future__ import annotations

from typing import Any, Callable, Mapping


class ElementwiseMax:
    name = "elementwise-max"
    needs_base = False  # works on the sides themselves, not on task vectors
    elementwise = True  # each output element depends on the same element only: fmhub may merge in chunks

    def merge(self, name: str, base: Callable[[], Any] | None, load: Callable[[int], Any], sides: int,
              options: Mapping[str, Any]) -> Any:
        import torch

        out = load(0)
        for i in range(1, sides):
            out = torch.maximum(out, load(i))  # a new tensor: the sides may share fmhub's buffers
        return out
