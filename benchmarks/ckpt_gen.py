"""Llama-shaped bf16 checkpoints and their fine-tuned versions, generated from seeds one tensor at a time.

Shared by scale_bench.py (the 7B-shaped run and the 256 MiB acceptance run) and
filter_bench.py (the safetensors header). Nothing is ever read back: every
version is a pure function of (shape, seed, version), so a benchmark can
regenerate a version instead of keeping it on disk, and every tool sees the
same bytes.

* v0: weights ~ N(0, 0.02), norms ~ 1 + N(0, 0.02), rounded to bf16.
* ``sparse``: 1 % of the elements of every tensor, at random positions, get a
  fresh draw from the tensor's own distribution (forced to differ from the old
  value by at least one ulp, so exactly 1 % change).
* ``finetune``: every element ``w * (1 + 0.01 N(0, 1))``, rounded to bf16 (a
  nudge that small rounds back to the old value for part of the elements, as
  in a real bf16 fine-tune).
* ``lora``: ``W + (alpha / r) B @ A`` on q_proj and v_proj of every layer,
  r = 16, alpha = 32, A ~ N(0, 1/sqrt(in)), B ~ N(0, 0.01) (a trained B, not
  peft's zero init): |ΔW| is about 6 % of |W| per element; computed in float32,
  rounded to bf16; every other tensor unchanged.

Random streams are seeded per tensor (``[seed, i]`` for v0, ``[seed, version, i]``
for an update), so a tensor never depends on the ones before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

MiB = 1 << 20
CHUNK = 4 * MiB  # elements per generator call: bounds float32 temporaries to 16 MiB
BF16_BYTES = 2
INDEX_FILE = "model.safetensors.index.json"

SPARSE_FRACTION = 0.01
FINETUNE_SCALE = 0.01
LORA_RANK, LORA_ALPHA, LORA_B_STD = 16, 32, 0.01
LORA_TARGETS = ("self_attn.q_proj.weight", "self_attn.v_proj.weight")
UPDATES = ("sparse", "finetune", "lora")  # the versions derived from v0, in the order they are committed
VERSIONS = ("v0", *UPDATES)
VERSION_ID = {name: i for i, name in enumerate(VERSIONS)}  # part of each update's seed


@dataclass(frozen=True)
class Shape:
    """Llama dimensions; the defaults are Llama-2-7B's (6.74 B parameters, 13.5 GB in bf16)."""

    vocab: int = 32000
    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes in Hugging Face's order (embeddings, layer by layer, final norm, lm_head)."""
        h, m = self.hidden, self.intermediate
        layer = [("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (h, h)), ("self_attn.v_proj.weight", (h, h)),
                 ("self_attn.o_proj.weight", (h, h)), ("mlp.gate_proj.weight", (m, h)), ("mlp.up_proj.weight", (m, h)),
                 ("mlp.down_proj.weight", (h, m)), ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,))]
        body = [(f"model.layers.{i}.{name}", shape) for i in range(self.layers) for name, shape in layer]
        return [("model.embed_tokens.weight", (self.vocab, h)), *body, ("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    @property
    def payload_bytes(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors()) * BF16_BYTES

    @property
    def largest_tensor_bytes(self) -> int:
        return max(math.prod(s) for _, s in self.tensors()) * BF16_BYTES


def shape_of_size(target_bytes: int, hidden: int, intermediate: int, layers: int) -> Shape:
    """The vocabulary that brings a shape's bf16 payload closest to ``target_bytes`` (embeddings and lm_head absorb the rest)."""
    without = Shape(vocab=0, hidden=hidden, intermediate=intermediate, layers=layers).payload_bytes
    vocab = round((target_bytes - without) / (2 * hidden * BF16_BYTES))
    if vocab < 1:
        raise ValueError(f"{layers} layers of hidden {hidden} already exceed {target_bytes} bytes")
    return Shape(vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layers)


# --------------------------------------------------------------------------- bf16


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; ``x`` is used as scratch (no NaNs here)."""
    u = x.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    u >>= 16
    return u.astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- tensors


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _draw(name: str, n: int, rng: np.random.Generator, buf: np.ndarray) -> np.ndarray:
    """n fresh bf16 values of the tensor's own distribution, CHUNK at a time into a reused float32 buffer."""
    out = np.empty(n, np.uint16)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        f = buf[:m]
        rng.standard_normal(out=f, dtype=np.float32)
        f *= np.float32(0.02)
        if _is_norm(name):
            f += np.float32(1.0)
        out[start:start + m] = to_bf16(f)
    return out


def base_tensor(name: str, shape: tuple[int, ...], seed: int, index: int, buf: np.ndarray) -> np.ndarray:
    return _draw(name, math.prod(shape), np.random.default_rng([seed, index]), buf)


def _sparse(name: str, shape, w: np.ndarray, rng: np.random.Generator, buf: np.ndarray) -> np.ndarray:
    k = max(1, round(w.size * SPARSE_FRACTION))
    pos = rng.choice(w.size, size=k, replace=False)
    new = _draw(name, k, rng, buf)
    new[new == w[pos]] ^= np.uint16(1)  # an unlucky draw equal to the old value: move it one ulp
    out = w.copy()
    out[pos] = new
    return out


def _finetune(name: str, shape, w: np.ndarray, rng: np.random.Generator, buf: np.ndarray) -> np.ndarray:
    out = np.empty_like(w)
    for start in range(0, w.size, CHUNK):
        m = min(CHUNK, w.size - start)
        f = buf[:m]
        rng.standard_normal(out=f, dtype=np.float32)
        f *= np.float32(FINETUNE_SCALE)
        f += np.float32(1.0)
        f *= from_bf16(w[start:start + m])
        out[start:start + m] = to_bf16(f)
    return out


def _lora(name: str, shape, w: np.ndarray, rng: np.random.Generator, buf: np.ndarray) -> np.ndarray:
    if not name.endswith(LORA_TARGETS):
        return w
    out_dim, in_dim = shape
    a = rng.standard_normal((LORA_RANK, in_dim), dtype=np.float32) * np.float32(1 / math.sqrt(in_dim))
    b = rng.standard_normal((out_dim, LORA_RANK), dtype=np.float32) * np.float32(LORA_B_STD)
    merged = from_bf16(w).reshape(shape) + np.float32(LORA_ALPHA / LORA_RANK) * (b @ a)
    return to_bf16(merged.reshape(-1))


UPDATE_FN = {"sparse": _sparse, "finetune": _finetune, "lora": _lora}


@dataclass(frozen=True)
class TensorVersion:
    name: str
    shape: tuple[int, ...]
    base: np.ndarray  # v0's bf16 bits, flat
    new: np.ndarray  # this version's (``base`` itself for v0 and for tensors an update leaves alone)

    @property
    def changed(self) -> int:
        return 0 if self.new is self.base else int(np.count_nonzero(self.new != self.base))


def tensor_versions(shape: Shape, seed: int, version: str) -> Iterator[TensorVersion]:
    """Every tensor of ``version`` with its v0 counterpart, one at a time (the caller holds at most two tensors)."""
    buf = np.empty(CHUNK, np.float32)
    for i, (name, dims) in enumerate(shape.tensors()):
        w = base_tensor(name, dims, seed, i, buf)
        if version == "v0":
            yield TensorVersion(name, dims, w, w)
            continue
        rng = np.random.default_rng([seed, VERSION_ID[version], i])
        yield TensorVersion(name, dims, w, UPDATE_FN[version](name, dims, w, rng, buf))


# --------------------------------------------------------------------------- files


def safetensors_header(entries, dtype: str, itemsize: int, metadata: dict) -> tuple[bytes, list[int]]:
    """A safetensors header for tensors laid out back to back in ``entries`` order, and each one's payload offset."""
    obj: dict = {"__metadata__": metadata}
    offset = 0
    starts = []
    for name, shape in entries:
        size = math.prod(shape) * itemsize
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        starts.append(offset)
        offset += size
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the payload starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw, starts


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def shard_plan(shape: Shape, n: int) -> dict[str, str]:
    """tensor name -> shard file, cutting the tensors (in order) into n runs of about equal bytes, like HF's sharding."""
    names = shard_names(n)
    total, done, plan = shape.payload_bytes, 0, {}
    for name, dims in shape.tensors():
        plan[name] = names[min(n - 1, done * n // total)]
        done += math.prod(dims) * BF16_BYTES
    return plan


def index_json(shape: Shape, plan: dict[str, str]) -> bytes:
    """HF's ``model.safetensors.index.json`` for a sharded checkpoint."""
    return (json.dumps({"metadata": {"total_size": shape.payload_bytes}, "weight_map": plan}, indent=2) + "\n").encode()


@dataclass
class Written:
    """What write_version wrote: file name -> sha256, the payload bytes and how many elements differ from v0."""

    sha256: dict[str, str]
    payload_bytes: int
    elements: int
    changed_elements: int


def write_version(dest: Path, shape: Shape, seed: int, version: str, shards: int) -> Written:
    """Write ``version`` as shards (+ the index JSON when sharded) into ``dest``, streaming, hashing on the way."""
    plan = shard_plan(shape, shards)
    by_shard = {f: [(n, s) for n, s in shape.tensors() if plan[n] == f] for f in shard_names(shards)}
    out = Written({}, shape.payload_bytes, 0, 0)
    stream = tensor_versions(shape, seed, version)
    for fname, entries in by_shard.items():
        header, _ = safetensors_header(entries, "BF16", BF16_BYTES, {"format": "pt"})
        h = hashlib.sha256(header)
        with open(dest / fname, "wb") as f:
            f.write(header)
            for _ in entries:
                t = next(stream)
                h.update(t.new)
                f.write(t.new)
                out.elements += t.new.size
                out.changed_elements += t.changed
        out.sha256[fname] = h.hexdigest()
    if shards > 1:
        data = index_json(shape, plan)
        (dest / INDEX_FILE).write_bytes(data)
        out.sha256[INDEX_FILE] = hashlib.sha256(data).hexdigest()
    return out


def write_tiny(path: Path, seed: int) -> int:
    """A checkpoint of one 8x4 bf16 tensor (~140 bytes): a filter's start-up cost, not its throughput. Returns its size."""
    header, _ = safetensors_header([("w", (8, 4))], "BF16", BF16_BYTES, {"format": "pt"})
    data = header + base_tensor("w", (8, 4), seed, 0, np.empty(32, np.float32)).tobytes()
    path.write_bytes(data)
    return len(data)
