"""PEFT LoRA adapters: merged into their base model's weights, or combined into one adapter.

An adapter directory is what ``peft`` saves: ``adapter_config.json`` and
``adapter_model.safetensors`` with tensors named
``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight``
(out × r), or ``lora_embedding_A``/``lora_embedding_B`` for embeddings. The
update of module ``<module>`` (base tensor ``<module>.weight``) is

    ΔW = scaling · B @ A        (transposed when fan_in_fan_out, and for embeddings)
    scaling = alpha / r         (alpha / sqrt(r) with use_rslora)

with per-module ``rank_pattern`` / ``alpha_pattern`` overrides matched as peft
matches them. DoRA, LoRA biases and ``modules_to_save`` are refused with a
clear message rather than merged approximately.

* ``into: base`` builds, per adapter, a lazy view of the base model with
  ``W + ΔW`` in place of each targeted weight and merges those views with the
  recipe's strategy (default ``task-arithmetic``: ``W + Σ wᵢ·ΔWᵢ``). Any
  strategy works, TIES and DARE included, because each adapter becomes a model.
* ``into: adapter`` concatenates the adapters (rank r₁+…+rₙ): A stacks
  ``wᵢ·scalingᵢ·Aᵢ``, B stacks ``Bᵢ`` side by side, alpha = r, so the new
  update is exactly ``Σ wᵢ·ΔWᵢ``.

`fmhub.models.merge` runs such a recipe with the pieces here (`load_adapter`,
`patched_view`, `concatenate`); this module does not import it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from fmhub.base import boundedjson
from fmhub.core import tensors
from fmhub.base.errors import FmhubError, MergeConflict
from fmhub.models.views import CheckpointView, TensorRef, from_path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # peft writes a few hundred bytes; a clone's could be a link to /dev/zero
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.weight)?$")


def is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


@dataclass
class Update:
    """One module's low-rank update."""

    module: str  # base tensor name without ".weight"
    a: TensorRef
    b: TensorRef
    scaling: float
    transpose: bool


@dataclass
class Adapter:
    path: str
    config: dict
    updates: dict[str, Update]  # by base tensor name

    @property
    def label(self) -> str:
        return self.path


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for key, value in patterns.items():  # peft: the key matches a suffix of the module path
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise FmhubError(f"alpha_pattern {key[:100]!r} is not a regular expression ({exc})") from None
    return default


def load_adapter(path: str) -> Adapter:
    try:
        with open(os.path.join(path, CONFIG), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # a config is a few hundred bytes: never a whole multi-GB file
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        config = boundedjson.loads(data)  # nesting or a huge number is a ValueError, not a traceback
    except (OSError, ValueError) as exc:
        raise FmhubError(f"{path}: cannot read {CONFIG}: {exc}") from None
    return adapter_from(path, config, from_path(os.path.join(path, WEIGHTS)))


def _check_config(path: str, config: Any) -> None:
    """The fields a merge computes with, as peft writes them: a clone's config is one error line, not a TypeError."""
    if not isinstance(config, dict):
        raise FmhubError(f"{path}: {CONFIG} is not a JSON object")
    patterns = config.get("alpha_pattern") or {}
    alphas = [config.get("lora_alpha", 1), *(patterns.values() if isinstance(patterns, dict) else [None])]
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in alphas):
        raise FmhubError(f"{path}: {CONFIG}: lora_alpha and alpha_pattern's values must be numbers")


def adapter_from(path: str, config: dict, view: CheckpointView) -> Adapter:
    """An adapter from its parsed config and a view of its weights (a file, or a committed version)."""
    _check_config(path, config)
    if config.get("peft_type", "LORA") != "LORA":
        raise FmhubError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise FmhubError(f"{path}: {what} are not supported by fmhub merges yet; merge it with peft's merge_and_unload")
    if config.get("modules_to_save"):
        raise FmhubError(f"{path}: adapters with modules_to_save ({config['modules_to_save']}) are not supported by fmhub merges yet")
    halves: dict[str, dict[str, TensorRef]] = {}
    embedding: set[str] = set()
    for ref in view:
        name = ref.name[len(PREFIX):] if ref.name.startswith(PREFIX) else ref.name
        m = _KEY.match(name)
        if m is None:
            raise FmhubError(f"{path}: tensor {ref.name!r} is not a LoRA A/B matrix; fmhub merges plain LoRA adapters only")
        halves.setdefault(m["module"], {})[m["ab"]] = ref
        if m["emb"]:
            embedding.add(m["module"])
    updates = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise FmhubError(f"{path}: module {module!r} has lora_{''.join(ab)} but not its other half")
        r = ab["A"].shape[0]  # lora_A and lora_embedding_A are both (r, in)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transpose = module in embedding or bool(config.get("fan_in_fan_out"))
        updates[f"{module}.weight"] = Update(module, ab["A"], ab["B"], scaling, transpose)
    return Adapter(path, config, updates)


def check_fits(adapter: Adapter, base_view: CheckpointView, base_label: str) -> None:
    """Refuse (`MergeConflict`) an adapter that does not fit a base model: every weight it targets must exist in
    ``base_view`` with the shape of its update (``base_label`` names the base in the message)."""
    for name, up in adapter.updates.items():
        w = base_view.tensors.get(name)
        if w is None:
            raise MergeConflict(f"{adapter.path}: targets {name!r}, which {base_label} does not have; is this adapter for another base model?")
        out_dim, in_dim = up.b.shape[0], up.a.shape[1]
        shape = (in_dim, out_dim) if up.transpose else (out_dim, in_dim)
        if tuple(w.shape) != shape:
            raise MergeConflict(f"{adapter.path}: its update of {name!r} has shape {list(shape)}, {base_label} has {list(w.shape)}")


def patched_view(base: CheckpointView, adapter: Adapter) -> CheckpointView:
    """The base model as it is with ``adapter`` merged in, computed tensor by tensor on demand
    (`fmhub.models.merge` merges these views for ``into: base``)."""
    missing = [n for n in adapter.updates if n not in base.tensors]
    if missing:
        raise MergeConflict(
            f"{adapter.path}: targets {len(missing)} weight(s) the base does not have, e.g. {missing[0]!r}; "
            "is this adapter for another base model?"
        )
    refs = dict(base.tensors)
    for name, up in adapter.updates.items():
        w = base.tensors[name]

        def read(w: TensorRef = w, up: Update = up) -> bytes:
            return merge_with_delta(w, up, adapter.path)[0]

        refs[name] = w.computed(read, adapter.path)
    return CheckpointView(refs, base.metadata, adapter.path)


def merge_with_delta(w: TensorRef, up: Update, label: str) -> tuple[bytes, bytes | None]:
    """``(W + ΔW, its lowrank delta against W)``: float64 products of the factors added element by element and
    rounded once to W's dtype, exactly as the ``lowrank`` codec decodes (`fmhub.core.lowrank`), so the merged weight
    is stored as the adapter's factors with nothing to patch. Other dtypes: rounded through torch, no delta."""
    import torch

    from fmhub.core import lowrank

    a, b = up.a.load().to(torch.float64), up.b.load().to(torch.float64)
    p, f = (a.T, up.scaling * b.T) if up.transpose else (up.scaling * b, a)
    shape = (p.shape[0], f.shape[1])
    if tuple(w.shape) != shape:
        raise MergeConflict(f"{label}: update of {w.name!r} has shape {list(shape)}, the base weight {list(w.shape)}")
    if w.dtype not in lowrank.ITEMSIZE:
        return tensors.to_bytes((w.load().to(torch.float64) + p @ f).to(tensors.torch_dtype(w.dtype))), None
    return lowrank.from_factors(tensors.to_bytes(w.load()), w.dtype, p.numpy(), f.numpy())


def concatenate(adapters: list[Adapter], weights: list[float] | None, output: str, strategy: str | None = None) -> list[str]:
    """One adapter whose update is exactly Σ wᵢ·ΔWᵢ (rank r₁+…+rₙ), written to the directory ``output``
    (``adapter_model.safetensors`` and ``adapter_config.json``); returns the names of the tensors written."""
    import torch
    from safetensors.torch import save_file

    if strategy not in (None, "task-arithmetic", "linear"):
        raise FmhubError(
            f"`into: adapter` concatenates adapters (an exact weighted sum of their updates); strategy {strategy!r} "
            "needs whole weights: merge into the base instead (`into: base`)"
        )
    weights = weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise FmhubError(f"{len(weights)} weights for {len(adapters)} adapters")
    modules = set(adapters[0].updates)
    for a in adapters[1:]:
        if set(a.updates) != modules:
            diff = sorted(modules ^ set(a.updates))
            raise MergeConflict(f"{a.path} and {adapters[0].path} target different modules (e.g. {diff[0]!r}); concatenation needs the same ones")
    out: dict[str, Any] = {}
    rank = None
    for name in sorted(modules):
        ups = [a.updates[name] for a in adapters]
        if len({u.transpose for u in ups}) != 1:
            raise MergeConflict(f"{name}: adapters disagree on fan_in_fan_out")
        dtype = tensors.torch_dtype(ups[0].a.dtype)
        a_parts = [(w * u.scaling) * u.a.load().to(torch.float32) for w, u in zip(weights, ups)]
        b_parts = [u.b.load().to(torch.float32) for u in ups]
        emb = _KEY.match(ups[0].a.name[len(PREFIX):] if ups[0].a.name.startswith(PREFIX) else ups[0].a.name)["emb"] or ""
        out[f"{PREFIX}{ups[0].module}.lora_{emb}A.weight"] = torch.cat(a_parts, 0).to(dtype).contiguous()
        out[f"{PREFIX}{ups[0].module}.lora_{emb}B.weight"] = torch.cat(b_parts, 1).to(dtype).contiguous()
        r = sum(p.shape[0] for p in a_parts)
        if rank is not None and r != rank:
            raise MergeConflict(f"{name}: modules would get different ranks ({rank} and {r}); use adapters of uniform rank")
        rank = r
    config = dict(adapters[0].config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    os.makedirs(output, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output, prefix=".fmhub-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(out, tmp, metadata={"format": "pt"})
        _fsync(tmp)
        cfg_tmp = tmp + ".json"
        with open(cfg_tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(output, WEIGHTS))
        os.replace(cfg_tmp, os.path.join(output, CONFIG))
    except BaseException:
        for p in (tmp, tmp + ".json"):
            if os.path.exists(p):
                os.unlink(p)
        raise
    return sorted(out)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
