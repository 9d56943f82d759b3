"""``fmhub serve`` and ``fmhub deploy``: serving a base model with many adapters through a serving backend
(`fmhub.serving.backends`), and hot-swapping a running server.

Where a serve option comes from, first found wins: the argument given, then the ``serve:`` section of
fmhub.yaml (read when ``spec`` is given, when the current directory has an fmhub.yaml, or when no base is given),
then `fmhub.serving.config.ServeConfig`'s default. Paths from the spec are relative to its directory, unless a
base or adapters are given, which are relative to the current directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from fmhub.base.errors import FmhubError

# the options `serve` takes, as fmhub.yaml's serve: section names them
SERVE_OPTIONS = ("base", "adapters", "declared", "backend", "host", "port", "device", "dtype", "max_batch", "gpu_slots", "adapter_memory_mb",
                 "cpu_cache_mb", "disk_cache_mb", "eviction", "cycle_time", "max_lora_rank", "max_model_len", "cache_dir",
                 "admin_token")


def serve_options(options: dict[str, Any], spec: Optional[str] = None) -> tuple[dict[str, Any], Optional[str]]:
    """The serve options in effect, as (options, the directory their relative paths start from, None for here).

    ``options`` hold what was given (None or absent: not given; ``adapters`` may be empty: not given)."""
    from fmhub.project.spec import SPEC_FILE, load_spec

    unknown = sorted(set(options) - set(SERVE_OPTIONS))
    if unknown:
        raise FmhubError(f"no serve option {unknown[0]!r}; options: {', '.join(SERVE_OPTIONS)}")
    given = {k: v for k, v in options.items() if v is not None and not (k == "adapters" and not v)}
    merged, cwd = {}, None
    if spec or os.path.exists(SPEC_FILE) or given.get("base") is None:
        loaded = load_spec(spec)
        if loaded.spec.serve is not None:
            merged, cwd = loaded.spec.serve.model_dump(), loaded.root
            merged = {k: (loaded.resolve(v) if k == "cache_dir" and v else v) for k, v in merged.items()}
    if "base" in given or "adapters" in given:
        cwd = None  # paths given here are relative to the current directory
    merged.update(given)
    return merged, cwd


def serve_config(spec: Optional[str] = None, **options: Any):
    """The `fmhub.serving.config.ServeConfig` and the backend name that ``fmhub serve`` with these options uses."""
    from fmhub.serving.config import from_options

    merged, cwd = serve_options(options, spec)
    return from_options(merged, cwd)


@dataclass
class Served:
    """A server started by `serve`: its config, backend name and handle (``wait()`` blocks, ``stop()`` stops)."""

    config: Any
    backend: str
    handle: Any

    @property
    def generated_token(self) -> Optional[str]:
        """The admin token the backend made up for this run, when none was given (the local backend's)."""
        return getattr(self.handle, "generated_token", None)


@dataclass
class Exported:
    """What `serve` with ``export_only`` wrote: the directory, the script that starts it, warnings."""

    directory: str
    script: str
    warnings: list[str] = field(default_factory=list)


def serve(spec: Optional[str] = None, export_only: Optional[str] = None, **options: Any) -> Served | Exported:
    """Serve a base model with many adapters over the backend's API (options: `SERVE_OPTIONS`, defaults from fmhub.yaml);
    returns once it answers. ``export_only``: have the backend write what another engine serves to that directory
    instead, starting nothing."""
    from fmhub.serving.backends import backend

    config, name = serve_config(spec, **options)
    chosen = backend(name)
    if export_only:
        if not hasattr(chosen, "export"):
            raise FmhubError(f"the {name} backend has nothing to export; --export-only is for backends that hand serving to another engine")
        plan = chosen.export(config, export_only)
        return Exported(export_only, getattr(plan, "script", export_only), list(getattr(plan, "warnings", [])))
    return Served(config, name, chosen.serve(config))


def deploy(url: str, rev: str = "HEAD", base: Optional[str] = None, adapters: Sequence[str] = (), backend: str = "local",
           token: Optional[str] = None):
    """Make the server at ``url`` serve the adapters declared at ``rev`` (only those of ``base``), or ``adapters``,
    without a restart; `fmhub.serving.deploy.DeployReport`."""
    from fmhub.serving import sources
    from fmhub.serving.backends import backend as by_name

    if adapters:
        specs = sources.parse_adapters(list(adapters))
    else:
        specs = sources.declared_adapters(rev, sources.parse_source(f"{base}@{rev}") if base else None)
    return by_name(backend).deploy(url, specs, token)
