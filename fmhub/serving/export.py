"""Hand serving to vLLM: write the base model, its LoRA adapters and vLLM's launch arguments as plain files.

``export(config, out_dir)`` turns a `ServeConfig` into a directory that
``vllm serve`` can run on any machine with a GPU, with nothing of fmhub
installed there::

    out_dir/
      base/                  the base model, byte-identical to the committed files
      adapters/<name>/       one PEFT adapter per served name
      vllm.json              the engine arguments (and where each file came from)
      serve.sh               ``vllm serve ...`` with paths relative to the script

Every exported directory holds a ``.fmhub-version`` file with its source's
version (`Source.version`); a directory that already holds the wanted version
is not written again, and a changed one is replaced whole. The same file tells
`fmhub.serving.vllm_client.deploy` which version a running server holds.

Adapters are checked before anything is written: each must fit the base
(every targeted weight exists with the update's shape), its rank must be at
most ``max_lora_rank``, and it must use only what vLLM's LoRA serves (one
scaling for every module; no DoRA, biases or ``modules_to_save``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from fmhub.models import lora
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.serving.config import ServeConfig
from fmhub.models.adapters import SIDECAR
from fmhub.serving.sources import MODEL_CONFIG, AdapterSpec, Source, check_readable, check_recorded_base, materialize

# The flags, the --lora-modules JSON form, /v1/models' parent/root fields and the
# runtime load/unload endpoints were checked against vLLM's documentation and
# source at this version.
VLLM_CHECKED = "0.22.1"

# vLLM's max_lora_rank is a closed set (vllm.config.lora.MaxLoRARanks, less 1:
# a rank-1 adapter is served fine at 8, and 8 is valid in every version).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

VERSION_FILE = ".fmhub-version"
ENGINE_FILE = "vllm.json"
SCRIPT_FILE = "serve.sh"
RUNTIME_LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # lets `fmhub deploy` load/unload adapters
API_KEY_ENV = "VLLM_API_KEY"  # vLLM reads it like --api-key; kept out of argv and files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")

OPTIONS = {
    "executable": "the vllm command (default: `vllm` on PATH or beside this Python)",
    "timeout": "seconds to wait for vLLM's /health after starting it (default 600)",
    "extra_args": "more `vllm serve` arguments, a list or one string (e.g. --tensor-parallel-size 4)",
    "max_cpu_loras": "adapters vLLM keeps in host memory (default: from cpu_cache_mb)",
    "export_dir": "where `fmhub serve --backend vllm` writes the export (default: <cache_dir>/vllm, .git/fmhub/serve-cache/vllm)",
}


@dataclass
class ExportPlan:
    """What `export` wrote and how to start vLLM on it."""

    out_dir: str
    base_dir: str
    adapters: dict[str, str]  # served name -> exported adapter directory
    ranks: dict[str, int]  # served name -> the adapter's largest module rank
    argv: list[str]  # ``vllm serve ...`` with absolute paths (argv[0] is "vllm")
    env: dict[str, str]  # environment the server needs (secrets excluded)
    engine_args: dict[str, Any]  # vLLM's engine arguments by their Python names, as in vllm.json
    config_path: str  # vllm.json
    script_path: str  # serve.sh
    url: str
    written: list[str] = field(default_factory=list)  # "base" and adapter names materialized this time
    unchanged: list[str] = field(default_factory=list)  # already there at the wanted version
    removed: list[str] = field(default_factory=list)  # exported adapters no longer in the config
    secret_env: list[str] = field(default_factory=list)  # variables the server also needs, not written anywhere
    warnings: list[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        return self.script_path


def export(config: ServeConfig, out_dir: str) -> ExportPlan:
    """Check ``config``'s adapters against its base, write base, adapters, vllm.json and serve.sh under ``out_dir``."""
    config.check()
    opts = backend_options(config)
    out_dir = os.path.abspath(out_dir)
    base = config.base
    files = base.files()
    if MODEL_CONFIG not in files or not any(n.endswith(".safetensors") for n in files):
        raise FmhubError(f"{base.label}: not a transformers model directory ({MODEL_CONFIG} and *.safetensors); "
                         "vLLM needs the base model's directory")
    base_view = base.view()
    ranks, sizes = {}, {}
    for spec in config.adapters:
        check_dir_name(spec.name)
        ranks[spec.name], sizes[spec.name] = check_adapter(spec, base_view, base.label, config.max_lora_rank)
        sidecar = spec.source.read(SIDECAR) if SIDECAR in spec.source.files() else None
        check_recorded_base(f"{spec.name!r} ({spec.source.label})", sidecar, f"{spec.source.label}/{SIDECAR}", base)

    base_dir = os.path.join(out_dir, "base")
    plan_dirs = {a.name: os.path.join(out_dir, "adapters", a.name) for a in config.adapters}
    engine = engine_args(config, base_dir, plan_dirs, ranks, sizes, opts)  # may refuse: before anything is written
    argv = command(engine, opts["extra_args"])

    written, unchanged = [], []
    (written if place(base, base_dir) else unchanged).append("base")
    for spec in config.adapters:
        (written if place(spec.source, plan_dirs[spec.name]) else unchanged).append(spec.name)
    removed = _remove_stale(os.path.join(out_dir, "adapters"), set(plan_dirs))

    env = dict(RUNTIME_LORA_ENV)
    warnings = []
    if config.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = config.device.partition(":")[2]
    elif config.device == "cpu":
        warnings.append("device cpu: vLLM runs on the CPU only in its CPU build (see vLLM's installation docs)")
    if not any(n in files for n in TOKENIZER_FILES):
        warnings.append(f"{base.label} has no tokenizer files; vLLM needs one: commit the tokenizer with the model, "
                        "or pass --tokenizer in the backend option extra_args")
    secret_env = [API_KEY_ENV] if config.admin_token else []
    url = server_url(config.host, config.port)
    doc = {
        "written_by": "fmhub serve --backend vllm",
        "vllm_version_checked": VLLM_CHECKED,
        "url": url,
        "engine_args": engine,
        "extra_args": opts["extra_args"],
        "env": env,
        "secret_env": secret_env,
        "argv": argv,
        "sources": {
            "base": {"source": base.label, "version": read_version(base_dir)},
            "adapters": {a.name: {"source": a.source.label, "version": read_version(plan_dirs[a.name]), "rank": ranks[a.name]}
                         for a in config.adapters},
        },
    }
    config_path = os.path.join(out_dir, ENGINE_FILE)
    with atomic_write(config_path) as f:
        f.write((json.dumps(doc, indent=2) + "\n").encode())
    script_path = os.path.join(out_dir, SCRIPT_FILE)
    with atomic_write(script_path, chmod=0o755) as f:
        f.write(launch_script(argv, out_dir, env, secret_env, config.adapters, config.base_name).encode())
    return ExportPlan(out_dir, base_dir, plan_dirs, ranks, argv, env, engine, config_path, script_path, url,
                      written, unchanged, removed, secret_env, warnings)



VLLM_MAX_LORAS = 8  # vLLM preallocates max_loras adapters of max_lora_rank; fmhub's local backend sizes its pool by memory


def max_loras(config: ServeConfig) -> int:
    """vLLM's --max-loras: ``gpu_slots``, or `VLLM_MAX_LORAS` when it is not given."""
    return config.gpu_slots or VLLM_MAX_LORAS

def backend_options(config: ServeConfig) -> dict[str, Any]:
    """The vllm backend's options from ``config.backend_options``, checked; unknown keys are refused."""
    opts = dict(config.backend_options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
        raise FmhubError(f"backend option {unknown[0]!r} means nothing to the vllm backend (it takes {known})")
    extra = opts.get("extra_args") or []
    if isinstance(extra, str):
        extra = shlex.split(extra)
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise FmhubError("backend option extra_args: give a list of strings or one string of arguments")
    opts["extra_args"] = list(extra)
    try:
        opts["timeout"] = float(opts.get("timeout", 600))
    except (TypeError, ValueError):
        raise FmhubError(f"backend option timeout: {opts.get('timeout')!r} is not a number of seconds") from None
    cpu = opts.get("max_cpu_loras")
    if cpu is not None and (not isinstance(cpu, int) or cpu < max_loras(config)):
        raise FmhubError(f"backend option max_cpu_loras: {cpu!r} must be a whole number ≥ gpu-slots ({max_loras(config)}); "
                         "vLLM refuses fewer")
    return opts


def check_dir_name(name: str) -> None:
    # the served name is also a directory name under adapters/ (the names `check_name` lets through may not be)
    if name.startswith(".") or "\0" in name:
        raise FmhubError(f"adapter name {name!r} cannot be a directory name; rename it (NAME=PATH)")


def check_adapter(spec: AdapterSpec, base_view, base_label: str, max_rank: int | None) -> tuple[int, int]:
    """``(rank, bytes)`` of an adapter vLLM can serve on the base; a clear error naming it otherwise.

    ``max_rank`` None skips the rank limit (the running server enforces its own).
    """
    src = spec.source
    who = f"adapter {spec.name!r} ({src.label})"
    try:
        cfg = src.read_json(lora.CONFIG)
    except FmhubError as exc:
        raise FmhubError(f"{who}: {exc}") from None
    refusal = unsupported_feature(cfg)
    if refusal:
        raise FmhubError(f"{who}: {refusal}")
    try:
        view = src.view()
        adapter = lora.adapter_from(src.label, cfg, view)
        lora.check_fits(adapter, base_view, f"the base {base_label}")
    except FmhubError as exc:
        raise FmhubError(f"{who} cannot be served on {base_label}: {exc}") from None
    if not adapter.updates:
        raise FmhubError(f"{who}: holds no LoRA weights")
    r = max(int(up.a.shape[0]) for up in adapter.updates.values())
    r = max(r, int(cfg.get("r") or 0))  # vLLM checks the config's r too
    if max_rank is not None and r > max_rank:
        raise FmhubError(f"{who}: rank {r} is above max-lora-rank {max_rank}; raise max-lora-rank "
                         f"(vLLM allows up to {VLLM_RANKS[-1]}) or serve a lower-rank adapter")
    if r > VLLM_RANKS[-1]:
        raise FmhubError(f"{who}: rank {r} is above {VLLM_RANKS[-1]}, the largest rank vLLM serves")
    # vLLM applies one scaling, lora_alpha/r (or /sqrt(r)), to every module; per-module patterns would be served wrong
    r0 = int(cfg.get("r") or r)
    alpha = float(cfg.get("lora_alpha", r0))
    scaling = alpha / math.sqrt(r0) if cfg.get("use_rslora") else alpha / r0
    for name, up in sorted(adapter.updates.items()):
        if not math.isclose(up.scaling, scaling, rel_tol=1e-9):
            raise FmhubError(f"{who}: module {up.module!r} has its own scaling {up.scaling:g} (rank_pattern/alpha_pattern), "
                             f"but vLLM scales every module by {scaling:g}; retrain without the patterns, "
                             "or merge it (`fmhub adapter merge`) and serve the merged model")
    return r, sum(t.size for t in view)


def unsupported_feature(cfg: dict) -> str | None:
    """Why vLLM's LoRA cannot serve an adapter with this adapter_config.json, or None."""
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        return f"a {kind} adapter; vLLM serves LoRA adapters only"
    if cfg.get("use_dora"):
        return "a DoRA adapter; vLLM does not serve DoRA: merge it into the base (`fmhub adapter merge`) and serve that"
    if cfg.get("modules_to_save"):
        return (f"has modules_to_save ({cfg['modules_to_save']}), which vLLM's LoRA does not serve: "
                "merge it into the base (`fmhub adapter merge`) and serve that")
    if cfg.get("lora_bias") or cfg.get("bias", "none") not in ("none", None):
        return "trains biases, which vLLM's LoRA does not serve: merge it into the base and serve that"
    return None


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as --max-lora-rank that holds ``rank``."""
    for r in VLLM_RANKS:
        if rank <= r:
            return r
    raise FmhubError(f"rank {rank} is above {VLLM_RANKS[-1]}, the largest rank vLLM serves")


def engine_args(config: ServeConfig, base_dir: str, adapter_dirs: dict[str, str], ranks: dict[str, int],
                sizes: dict[str, int], opts: dict[str, Any]) -> dict[str, Any]:
    """vLLM's engine arguments (Python names) for ``config``."""
    if config.dtype not in VLLM_DTYPES:
        raise FmhubError(f"dtype {config.dtype!r}: vLLM takes one of {', '.join(VLLM_DTYPES)}")
    # without adapters yet, leave room for what `fmhub deploy` may bring, up to max-lora-rank
    rank = vllm_rank(max(ranks.values()) if ranks else config.max_lora_rank)
    cpu = opts.get("max_cpu_loras")
    if cpu is None:
        largest = max(sizes.values(), default=0)
        cpu = max_loras(config) if not largest else max(max_loras(config), int(config.cpu_cache_mb * 2**20 // largest))
    return {
        "model": base_dir,
        "served_model_name": config.base_name,
        "host": config.host,
        "port": config.port,
        "enable_lora": True,
        "lora_modules": [{"name": n, "path": p, "base_model_name": config.base_name} for n, p in adapter_dirs.items()],
        "max_loras": max_loras(config),
        "max_cpu_loras": cpu,
        "max_lora_rank": rank,
        "max_num_seqs": config.max_batch,
        "dtype": VLLM_DTYPES[config.dtype],
        "max_model_len": config.max_model_len,
    }


def command(engine: dict[str, Any], extra: list[str]) -> list[str]:
    """``vllm serve`` argv for ``engine`` (as `engine_args` makes it)."""
    argv = ["vllm", "serve", engine["model"], "--served-model-name", engine["served_model_name"],
            "--host", engine["host"], "--port", str(engine["port"]), "--enable-lora"]
    if engine["lora_modules"]:
        # the JSON form carries base_model_name, so /v1/models names each adapter's parent
        argv += ["--lora-modules", *(json.dumps(m) for m in engine["lora_modules"])]
    argv += ["--max-loras", str(engine["max_loras"]), "--max-cpu-loras", str(engine["max_cpu_loras"]),
             "--max-lora-rank", str(engine["max_lora_rank"]), "--max-num-seqs", str(engine["max_num_seqs"]),
             "--dtype", engine["dtype"]]
    if engine["max_model_len"]:
        argv += ["--max-model-len", str(engine["max_model_len"])]
    return argv + list(extra)


def server_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a server bound to ``host:port``."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _dq(text: str) -> str:
    """``text`` escaped for the inside of a double-quoted sh string."""
    for c in ("\\", '"', "$", "`"):
        text = text.replace(c, "\\" + c)
    return text


def launch_script(argv: list[str], out_dir: str, env: dict[str, str], secret_env: list[str],
                  adapters: list[AdapterSpec], base_name: str) -> str:
    """serve.sh: ``argv`` with every path made relative to the script, so the directory can be copied elsewhere."""
    words = {os.path.join(out_dir, "base"): '"$HERE/base"'}
    for a in adapters:
        inner = json.dumps("/adapters/" + a.name)[1:-1]
        head = '{"name": ' + json.dumps(a.name) + ', "path": "'
        tail = inner + '", "base_model_name": ' + json.dumps(base_name) + "}"
        module = json.dumps({"name": a.name, "path": os.path.join(out_dir, "adapters", a.name), "base_model_name": base_name})
        words[module] = '"' + _dq(head) + "${HERE_JSON}" + _dq(tail) + '"'
    rendered = ['"${VLLM:-vllm}"'] + [words.get(w) or shlex.quote(w) for w in argv[1:]]
    lines = [
        "#!/bin/sh",
        "# Written by `fmhub serve --backend vllm`: serves ./base with the LoRA adapters in ./adapters",
        f"# through vLLM (flags checked against vLLM {VLLM_CHECKED}). Copy this directory to a machine with a GPU",
        "# and vLLM (pip install vllm) and run it there; arguments given to it are passed on to vllm serve.",
        "set -eu",
        'HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)',
        "HERE_JSON=$(printf '%s' \"$HERE\" | sed -e 's/\\\\/\\\\\\\\/g' -e 's/\"/\\\\\"/g')",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    for name in secret_env:
        lines.append(f': "${{{name}:?set {name} to the admin token (vLLM requires it on every /v1 request)}}"')
        lines.append(f"export {name}")
    # one line per flag and its values, for a script people read and edit
    groups: list[list[str]] = [rendered[:3]]
    for word, raw in zip(rendered[3:], argv[3:]):
        if raw.startswith(("--", "{")):
            groups.append([word])
        else:
            groups[-1].append(word)
    body = " \\\n  ".join(" ".join(g) for g in groups)
    return "\n".join(lines) + f"\nexec {body} \\\n  \"$@\"\n"


def read_version(path: str) -> str | None:
    """The source version an exported directory holds (its ``.fmhub-version``), None if not one of ours."""
    try:
        with open(os.path.join(path, VERSION_FILE), encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def place(src: Source, dest: str) -> bool:
    """Make ``dest`` hold ``src`` at its version; False when it already did (nothing written).

    The new directory is complete, version file included, before it replaces
    the old one by rename, so ``dest`` never holds a mix of two versions, and a
    failure leaves the old one as it was. The read policy is checked either way
    (`check_readable`): another user may have exported it.
    """
    version = src.version
    check_readable(src)
    if read_version(dest) == version:
        return False
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(dir=parent, prefix=".fmhub-stage-")
    try:
        new = materialize(src, os.path.join(stage, "new"))
        with open(os.path.join(new, VERSION_FILE), "w", encoding="utf-8") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(new, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from a server running as another user
        if os.path.lexists(dest):
            os.replace(dest, os.path.join(stage, "old"))
        os.replace(new, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return True


def _remove_stale(adapters_dir: str, keep: set[str]) -> list[str]:
    """Remove exported adapters (ours: with a version file) that the config no longer serves."""
    if not os.path.isdir(adapters_dir):
        return []
    gone = []
    for name in sorted(os.listdir(adapters_dir)):
        path = os.path.join(adapters_dir, name)
        if name.startswith(".fmhub-stage-"):
            shutil.rmtree(path, ignore_errors=True)  # left by a crash
        elif name not in keep and read_version(path) is not None:
            shutil.rmtree(path)
            gone.append(name)
    return gone
