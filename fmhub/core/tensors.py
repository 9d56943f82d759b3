"""Raw tensor bytes to and from ``torch.Tensor``, for the dtypes safetensors names.

torch is imported inside the functions: this module is imported by code the git
filter process loads, which must start fast.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs git's filter (which takes DTYPE_BITS from here) ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Any

# safetensors dtype name -> torch dtype attribute name
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
# bits per element of every dtype safetensors names; dtypes not listed here are stored without a size check
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def torch_dtype(dtype: str) -> Any:
    import torch

    name = _TORCH_NAMES.get(dtype)
    if name is None or not hasattr(torch, name):
        raise ValueError(f"dtype {dtype} has no torch equivalent here")
    return getattr(torch, name)


def itemsize(dtype: str) -> int:
    return torch_dtype(dtype).itemsize


def from_bytes(data: bytes | bytearray, dtype: str, shape: tuple[int, ...]) -> Any:
    """A tensor over ``data``: shared when it is a bytearray, else over a writable copy (so torch does not warn)."""
    import torch

    td = torch_dtype(dtype)
    if not data:
        return torch.empty(shape, dtype=td)
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=td).reshape(shape)


def to_bytes(tensor: Any) -> bytes:
    """The tensor's elements in C order, little-endian, as safetensors stores them."""
    return bytes(as_buffer(tensor))


def as_buffer(tensor: Any) -> memoryview:
    """The tensor's bytes without copying them (when it is already contiguous on the CPU)."""
    import torch

    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def all_finite(t: Any) -> bool:
    """No NaN or Inf in ``t``: one float64 reduction, no temporary mask (a NaN or Inf anywhere makes the sum non-finite)."""
    import math

    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(float(torch.sum(t, dtype=torch.float64)))


def cast_like(result: Any, dtype: str) -> Any:
    """A merge result back in the file's dtype (round to nearest for floats)."""
    return result.to(torch_dtype(dtype))
