"""What a serving backend is asked to serve, and how: one object every backend reads.

``fmhub serve`` builds a `ServeConfig` from the ``serve:`` section of
``fmhub.yaml`` (`fmhub.project.spec.ServeSpec`, docs/serving.md) with its command-line
options on top (`from_options`). Backends take what applies to them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any

from fmhub.base.errors import FmhubError
from fmhub.serving.sources import AdapterSpec, Source

EVICTION = ("lru", "lfu")


@dataclass
class ServeConfig:
    """One base model, the adapters to serve on it, and the server's limits.

    Sizes are in MiB. ``adapter_memory_mb`` is the device memory for the
    adapters active at once (the *active set*, a pool of rank rows; on a
    CPU-only machine "gpu" is the compute device): by default 10 % of the GPU's
    free memory once the base model is loaded, or 1024 MiB on the CPU, so how
    many adapters are resident follows from their ranks. ``gpu_slots``, when
    given, caps how many adapters are resident (and, without
    ``adapter_memory_mb``, sizes the pool for that many of ``max_lora_rank``);
    ``cpu_cache_mb`` the warm tier in host memory; ``disk_cache_mb`` the cold
    tier of adapters materialized from the fmhub store. ``cycle_time`` is how
    long (seconds) an adapter keeps its slot while requests for adapters
    outside the active set wait: small swaps often (lower latency for rare
    adapters), large keeps batches full (higher throughput).
    """

    base: Source
    adapters: list[AdapterSpec] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"
    max_batch: int = 32  # rows decoding together
    gpu_slots: int | None = None  # default: as many as adapter_memory_mb holds
    adapter_memory_mb: float | None = None  # default: 10 % of the GPU's free memory, 1024 on the CPU
    cpu_cache_mb: float = 2048.0
    disk_cache_mb: float = 20480.0
    eviction: str = "lru"
    cycle_time: float = 0.5
    max_lora_rank: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_tokens_default: int = 16
    cache_dir: str | None = None  # cold tier; default <git dir>/fmhub/serve-cache or a temp dir
    admin_token: str | None = None  # the admin API's bearer token; the local backend makes one up when none is given
    base_name: str = "base"  # the ``model`` that means "no adapter"
    backend_options: dict[str, Any] = field(default_factory=dict)  # anything backend-specific

    def check(self) -> "ServeConfig":
        if self.eviction not in EVICTION:
            raise FmhubError(f"eviction {self.eviction!r}: use one of {', '.join(EVICTION)}")
        for name in ("max_batch", "gpu_slots", "max_lora_rank", "port"):
            value = getattr(self, name)
            if name == "gpu_slots" and value is None:
                continue
            if not isinstance(value, int) or value < (0 if name == "port" else 1):
                raise FmhubError(f"{name.replace('_', '-')} must be a positive whole number, not {value!r}")
        for name in ("cpu_cache_mb", "disk_cache_mb", "cycle_time"):
            if getattr(self, name) < 0:
                raise FmhubError(f"{name.replace('_', '-')} must not be negative")
        if self.adapter_memory_mb is not None and not self.adapter_memory_mb > 0:
            raise FmhubError(f"adapter-memory-mb must be positive, not {self.adapter_memory_mb!r}")
        names = [a.name for a in self.adapters]
        if self.base_name in names:
            raise FmhubError(f"an adapter is named {self.base_name!r}, the name of the bare base model; rename it")
        return self

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("base", "adapters")]


def from_options(options: dict[str, Any], cwd: str | None = None) -> tuple[ServeConfig, str]:
    """A config (and the backend's name) from ``serve:`` keys: ``base``, ``adapters``, ``declared``, ``backend`` and the fields above.

    Paths are relative to ``cwd``. Keys whose value is None take the defaults.
    """
    from fmhub.serving import sources

    opts = {k: v for k, v in options.items() if v is not None}
    if not opts.get("base"):
        raise FmhubError("no base model: give --base PATH[@REV] or a serve: section with base: in fmhub.yaml")
    base = sources.parse_source(opts.pop("base"), cwd)
    specs = sources.parse_adapters(opts.pop("adapters", None) or [], cwd)
    declared = opts.pop("declared", None)
    if declared:
        known = {a.name for a in specs}
        specs += [a for a in sources.declared_adapters(declared, base, cwd) if a.name not in known]
    backend = opts.pop("backend", "local")
    unknown = sorted(set(opts) - set(ServeConfig.keys()))
    if unknown:
        raise FmhubError(f"unknown serving option(s): {', '.join(unknown)}")
    config = ServeConfig(base, specs, **opts).check()
    if backend == "local":
        check_exposure(config.host, config.admin_token)  # before the model loads, not after
    return config, backend


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1, localhost."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "" (every interface): assume other machines reach it


def check_exposure(host: str, admin_token: str | None) -> None:
    """Refuse to listen beyond this machine with a made-up admin token: a token printed to a log is no secret there."""
    if not admin_token and not is_loopback(host):
        raise FmhubError(f"--host {host or '(every interface)'} is reachable from other machines: give the admin API a token "
                         "of your own (--admin-token or FMHUB_ADMIN_TOKEN), or listen on 127.0.0.1")
