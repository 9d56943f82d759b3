"""The vllm serving backend: export to plain directories + vLLM arguments, launch, and deploys over vLLM's LoRA API.

vLLM itself needs a GPU, so here a small fake speaking vLLM's protocol
(``/health``, ``/v1/models``, ``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``) stands in for it; the one test with the real
engine runs only where vLLM and CUDA are both present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, git, sha256_file

IDS = [[1, 5, 9, 42, 7, 300, 11]]


# ---------------------------------------------------------------------------------------------- a fake vLLM


class FakeVllm:
    """vLLM's LoRA serving protocol, in memory: which adapters are loaded, from where, and every call made."""

    def __init__(self, base_name: str, base_root: str, loras: dict[str, str] | None = None, token: str | None = None,
                 runtime: bool = True, refuse: set[str] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.base_name, self.base_root, self.token, self.runtime = base_name, base_root, token, runtime
        self.loras = dict(loras or {})
        self.refuse = set(refuse or ())  # names whose load fails as vLLM fails on a bad adapter
        self.calls: list[tuple[str, str, dict | None]] = []
        self.loaded_versions: dict[str, str] = {}  # name -> .fmhub-version of the path at load time
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, ctype="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if fake.token and self.path.startswith("/v1") and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._send(401, {"error": "Unauthorized"})
                    return False
                return True

            def do_GET(self):
                fake.calls.append(("GET", self.path, None))
                if self.path == "/health":
                    return self._send(200, "", "text/plain")
                if not self._authorized():
                    return
                if self.path == "/v1/models":
                    data = [{"id": fake.base_name, "object": "model", "root": fake.base_root, "parent": None}]
                    data += [{"id": n, "object": "model", "root": p, "parent": fake.base_name} for n, p in fake.loras.items()]
                    return self._send(200, {"object": "list", "data": data})
                self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                fake.calls.append(("POST", self.path, body))
                if not self._authorized():
                    return
                if not fake.runtime or self.path not in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                    return self._send(404, {"detail": "Not Found"})
                name = body.get("lora_name")
                if self.path == "/v1/unload_lora_adapter":
                    if name not in fake.loras:
                        return self._send(404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}})
                    del fake.loras[name]
                    return self._send(200, f"Success: LoRA adapter '{name}' removed successfully.", "text/plain")
                path = body.get("lora_path", "")
                if name in fake.loras:
                    return self._send(400, {"error": {"message": f"The lora adapter '{name}' has already been loaded."}})
                if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                    return self._send(404, {"error": {"message": f"Loading lora {name} failed: No adapter found for {path}"}})
                if name in fake.refuse and path not in fake.refused_paths_ok:
                    return self._send(400, {"error": {"message": f"LoRA rank 64 is greater than max_lora_rank 16 ({name})"}})
                fake.loras[name] = path
                fake.loaded_versions[name] = Path(path, ".fmhub-version").read_text().strip() \
                    if os.path.exists(os.path.join(path, ".fmhub-version")) else ""
                self._send(200, f"Success: LoRA adapter '{name}' added successfully.", "text/plain")

        self.refused_paths_ok: set[str] = set()
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeVllm":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def posts(self) -> list[tuple[str, dict]]:
        return [(p.rsplit("/", 1)[1], b) for m, p, b in self.calls if m == "POST"]


def fake_vllm_main(argv: list[str]) -> None:
    """``vllm serve MODEL ...`` as the fake: what the backend's launcher runs when its executable is this script."""
    if os.environ.get("FAKE_VLLM_FAIL"):
        print("INFO loading model", flush=True)
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr, flush=True)
        sys.exit(1)
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("model")
    p.add_argument("--served-model-name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--lora-modules", nargs="+", default=[])
    args, _ = p.parse_known_args(argv)
    assert args.cmd == "serve" and args.enable_lora
    loras = {m["name"]: m["path"] for m in map(json.loads, args.lora_modules)}
    fake = FakeVllm(args.served_model_name, args.model, loras, os.environ.get("VLLM_API_KEY"),
                    os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True", host=args.host, port=args.port)
    Path(os.environ["FAKE_VLLM_ARGV"]).write_text(json.dumps(argv))
    fake.httpd.serve_forever()


def fake_vllm_executable(tmp_path: Path) -> str:
    script = tmp_path / "fake-vllm"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n"
                      "from tests.models import test_serve_vllm\ntest_serve_vllm.fake_vllm_main(sys.argv[1:])\n")
    script.chmod(0o755)
    return str(script)


# ---------------------------------------------------------------------------------------------- models


def lora_adapter(path: Path, seed: int, r: int, base=None, targets=("q_proj", "v_proj"), **cfg):
    import torch
    from peft import LoraConfig, get_peft_model

    from fmhub.run.demo import build_tiny_llama

    base = base if base is not None else build_tiny_llama(seed=0)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **cfg))
    model.save_pretrained(str(path))
    return model.eval()


def logits(model, ids=IDS):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


class History:
    """A repo with a tiny Llama under base/ and adapters ad1 (r=4) and ad2 (r=12), recorded with `fmhub adapter add`
    at ``rev1``; `retrain` makes ad1 v2 (committed as ``rev2``). ``hashes[rev]`` are the committed files' sha256."""

    def retrain(self, commit: bool = True) -> None:
        self.ad1_v2 = lora_adapter(self.repo / "ad1", seed=3, r=4)
        if not commit:
            return
        git(self.repo, "add", "ad1")
        git(self.repo, "commit", "-qm", "ad1 retrained")
        self.rev2 = git(self.repo, "rev-parse", "HEAD").stdout.decode().strip()
        self.hashes[self.rev2] = {"ad1": file_hashes(self.repo / "ad1")}
        assert self.hashes[self.rev2]["ad1"] != self.hashes[self.rev1]["ad1"]


@pytest.fixture
def history(repo) -> History:
    from fmhub.models.adapters import add
    from fmhub.run.demo import build_tiny_llama

    h = History()
    h.repo = repo
    build_tiny_llama(seed=0).save_pretrained(str(repo / "base"))
    h.ad1_v1 = lora_adapter(repo / "ad1", seed=1, r=4)
    h.logits_v1 = logits(h.ad1_v1)
    lora_adapter(repo / "ad2", seed=2, r=12)
    # one `git add` for every checkpoint (one filter process); `adapter add` then finds them staged already
    git(repo, "add", "base", "ad1", "ad2")
    git(repo, "commit", "-qm", "base")
    for ad in ("ad1", "ad2"):
        add(str(repo / ad), str(repo / "base"), cwd=str(repo))
    git(repo, "commit", "-qm", "adapters")
    h.rev1 = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    h.hashes = {h.rev1: {d: file_hashes(repo / d) for d in ("base", "ad1", "ad2")}}
    return h


def config_for(h: History, adapters: list[str], rev: str | None = None, **kw):
    from fmhub.serving.config import ServeConfig
    from fmhub.serving.sources import parse_adapters, parse_source

    return ServeConfig(base=parse_source(f"base@{rev or h.rev1}", cwd=str(h.repo)),
                       adapters=parse_adapters(adapters, cwd=str(h.repo)), **kw)


# ---------------------------------------------------------------------------------------------- export


def test_export_at_a_revision_is_byte_identical_and_peft_serves_it_the_same(history, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fmhub.serving.export import export
    from fmhub.serving.sources import declared_adapters, parse_source

    h = history
    h.retrain(commit=False)  # the work tree holds ad1 v2: the export must read rev1
    base = parse_source(f"base@{h.rev1}", cwd=str(h.repo))
    declared = declared_adapters(h.rev1, base, cwd=str(h.repo))  # what `fmhub adapter add` recorded
    assert [a.name for a in declared] == ["ad1", "ad2"]
    cfg = config_for(h, [])
    cfg.adapters = declared
    out = tmp_path / "export"
    plan = export(cfg, str(out))

    exported = {"base": file_hashes(out / "base"), "ad1": file_hashes(out / "adapters" / "ad1"),
                "ad2": file_hashes(out / "adapters" / "ad2")}
    for d, committed in h.hashes[h.rev1].items():
        version = exported[d].pop(".fmhub-version")
        assert version and exported[d] == committed, d
    assert plan.written == ["base", "ad1", "ad2"] and plan.adapters["ad1"] == str(out / "adapters" / "ad1")
    tree = git(h.repo, "rev-parse", f"{h.rev1}:ad1").stdout.decode().strip()
    assert (out / "adapters" / "ad1" / ".fmhub-version").read_text().strip() == tree

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out / "base")).eval(),
                                      str(out / "adapters" / "ad1")).eval()
    got = logits(model)
    assert torch.allclose(got, h.logits_v1, atol=1e-6)
    assert not torch.allclose(got, logits(h.ad1_v2), atol=1e-3)  # and it is v1, not the work tree's v2
    assert any("tokenizer" in w for w in plan.warnings)  # the tiny model has none; vLLM would need one


def test_engine_arguments_script_and_json(history, tmp_path):
    from fmhub.base.errors import FmhubError
    from fmhub.serving.export import VLLM_CHECKED, vllm_rank
    from fmhub_plugins.serve_vllm import VllmBackend

    h = history
    assert [vllm_rank(r) for r in (1, 8, 9, 12, 16, 33, 300, 512)] == [8, 8, 16, 16, 16, 64, 320, 512]
    with pytest.raises(FmhubError, match="513"):
        vllm_rank(513)

    cfg = config_for(h, [f"ad1@{h.rev1}", f"support=ad2@{h.rev1}"], gpu_slots=3, max_batch=24, dtype="bfloat16",
                     max_model_len=96, cpu_cache_mb=1.0, port=8123, host="0.0.0.0", base_name="tiny", device="cuda:1",
                     backend_options={"extra_args": "--gpu-memory-utilization 0.8"})
    out = tmp_path / "exp"
    plan = VllmBackend().export(cfg, str(out))  # what `fmhub serve --backend vllm --export-only DIR` runs
    assert plan.script == str(out / "serve.sh")
    a = plan.argv
    flag = lambda name: a[a.index(name) + 1]  # noqa: E731
    assert a[:3] == ["vllm", "serve", str(out / "base")] and "--enable-lora" in a
    assert (flag("--served-model-name"), flag("--host"), flag("--port")) == ("tiny", "0.0.0.0", "8123")
    assert flag("--max-lora-rank") == "16"  # the largest adapter has r=12
    assert flag("--max-loras") == "3" and flag("--max-num-seqs") == "24" and flag("--dtype") == "bfloat16"
    assert flag("--max-model-len") == "96" and a[-2:] == ["--gpu-memory-utilization", "0.8"]
    from safetensors.torch import load_file

    ad2_bytes = sum(t.nbytes for t in load_file(str(out / "adapters/support/adapter_model.safetensors")).values())
    assert int(flag("--max-cpu-loras")) == max(3, (1 << 20) // ad2_bytes)  # 1 MiB of host memory / the largest adapter
    i = a.index("--lora-modules")
    modules = [json.loads(m) for m in a[i + 1:i + 3]]
    assert modules == [{"name": "ad1", "path": str(out / "adapters" / "ad1"), "base_model_name": "tiny"},
                       {"name": "support", "path": str(out / "adapters" / "support"), "base_model_name": "tiny"}]
    assert a[i + 3] == "--max-loras"
    assert plan.env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "CUDA_VISIBLE_DEVICES": "1"}
    assert plan.ranks == {"ad1": 4, "support": 12} and plan.url == "http://127.0.0.1:8123"

    doc = json.loads((out / "vllm.json").read_text())
    assert doc["vllm_version_checked"] == VLLM_CHECKED and doc["argv"] == a
    assert doc["engine_args"]["max_lora_rank"] == 16 and doc["engine_args"]["lora_modules"] == modules
    assert doc["sources"]["adapters"]["support"] == {"source": f"ad2@{h.rev1}", "rank": 12,
                                                     "version": (out / "adapters/support/.fmhub-version").read_text().strip()}

    # serve.sh runs the same command, with paths relative to itself: the directory can be moved to a GPU machine
    moved = tmp_path / 'gpu box $HOME "x"' / "exp"
    shutil.copytree(out, moved.parent / "exp", symlinks=True)
    dump = tmp_path / "argv.json"
    fake = tmp_path / "print-argv"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump([sys.argv[1:], os.environ.get('VLLM_ALLOW_RUNTIME_LORA_UPDATING'),"
                    f" os.environ.get('CUDA_VISIBLE_DEVICES')], open({str(dump)!r}, 'w'))\n")
    fake.chmod(0o755)
    assert os.access(moved / "serve.sh", os.X_OK)
    subprocess.run([str(moved / "serve.sh"), "--seed", "7"], check=True, env={**os.environ, "VLLM": str(fake)})
    argv, runtime, cuda = json.loads(dump.read_text())
    assert runtime == "True" and cuda == "1"
    assert argv[argv.index("--lora-modules") + 1:][:2] == \
        [json.dumps({**m, "path": m["path"].replace(str(out), str(moved))}) for m in modules]
    assert argv[1] == str(moved / "base")
    rest = [w for w in argv if not w.startswith("{")]
    assert rest == [w.replace(str(out), str(moved)) for w in a[1:] if not w.startswith("{")] + ["--seed", "7"]


def test_refuses_adapters_vllm_cannot_serve_naming_them(history, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmhub.base.errors import FmhubError
    from fmhub.serving.export import export

    h = history
    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    lora_adapter(h.repo / "wide", seed=4, r=4, base=other)
    lora_adapter(h.repo / "dora", seed=5, r=4, use_dora=True)
    lora_adapter(h.repo / "patterned", seed=6, r=4, rank_pattern={"q_proj": 8})
    out = tmp_path / "never"

    with pytest.raises(FmhubError) as exc:
        export(config_for(h, ["ad1", "wide"]), str(out))
    msg = str(exc.value)
    assert "'wide'" in msg and "shape" in msg and "q_proj" in msg
    with pytest.raises(FmhubError, match=r"'ad2'.*rank 12 is above max-lora-rank 8"):
        export(config_for(h, [f"ad1@{h.rev1}", f"ad2@{h.rev1}"], max_lora_rank=8), str(out))
    with pytest.raises(FmhubError, match=r"'dora'.*DoRA"):
        export(config_for(h, ["dora"]), str(out))
    with pytest.raises(FmhubError, match=r"'patterned'.*own scaling"):
        export(config_for(h, ["patterned"]), str(out))
    with pytest.raises(FmhubError, match="means nothing to the vllm backend"):
        export(config_for(h, ["ad1"], backend_options={"eviction_policy": "lfu"}), str(out))

    # the base retrained (same shapes, other weights): ad1 as recorded with `fmhub adapter add` no longer belongs on it
    from safetensors.torch import load_file, save_file

    sd = load_file(str(h.repo / "base/model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 2
    save_file(sd, str(h.repo / "base/model.safetensors"), metadata={"format": "pt"})
    git(h.repo, "commit", "-qam", "base retrained")
    with pytest.raises(FmhubError, match=r"'ad1'.*trained on the base base at .*weights differ"):
        export(config_for(h, ["ad1@HEAD"], rev="HEAD"), str(out))
    assert not out.exists()  # refused before anything was written


def test_reexport_skips_unchanged_and_swaps_a_changed_adapter_whole(history, tmp_path, monkeypatch):
    from fmhub.serving import sources
    from fmhub.serving.export import export

    h = history
    h.retrain()
    out = tmp_path / "exp"
    export(config_for(h, [f"ad1@{h.rev1}", f"ad2@{h.rev1}"]), str(out))
    weights = {d: out / d / n for d, n in (("base", "model.safetensors"), ("adapters/ad1", "adapter_model.safetensors"),
                                           ("adapters/ad2", "adapter_model.safetensors"))}
    before = {d: (p.stat().st_ino, p.stat().st_mtime_ns) for d, p in weights.items()}

    plan = export(config_for(h, [f"ad1@{h.rev1}", f"ad2@{h.rev1}"]), str(out))
    assert plan.written == [] and plan.unchanged == ["base", "ad1", "ad2"]
    assert {d: (p.stat().st_ino, p.stat().st_mtime_ns) for d, p in weights.items()} == before

    plan = export(config_for(h, [f"ad1@{h.rev2}", f"ad2@{h.rev1}"]), str(out))
    assert plan.written == ["ad1"] and plan.unchanged == ["base", "ad2"]
    got = file_hashes(out / "adapters" / "ad1")
    got.pop(".fmhub-version")
    assert got == h.hashes[h.rev2]["ad1"]
    assert (weights["adapters/ad2"].stat().st_ino, weights["adapters/ad2"].stat().st_mtime_ns) == before["adapters/ad2"]
    assert not [p for p in (out / "adapters").iterdir() if p.name.startswith(".")]  # no staging left behind

    # a write that fails halfway leaves the version being served whole
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sources, "_write_weights", broken)
    with pytest.raises(OSError):
        export(config_for(h, [f"ad1@{h.rev1}", f"ad2@{h.rev1}"]), str(out))
    monkeypatch.undo()
    got = file_hashes(out / "adapters" / "ad1")
    assert got.pop(".fmhub-version") and got == h.hashes[h.rev2]["ad1"]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["ad1", "ad2"]

    plan = export(config_for(h, [f"ad1@{h.rev2}"]), str(out))  # ad2 no longer served
    assert plan.removed == ["ad2"] and not (out / "adapters" / "ad2").exists()
    assert "--lora-modules" in plan.argv and "ad2" not in " ".join(plan.argv)


# ---------------------------------------------------------------------------------------------- serve


def test_serve_without_vllm_says_how_to_run_it_elsewhere(history, tmp_path, monkeypatch):
    from fmhub.base.errors import FmhubError
    from fmhub_plugins.serve_vllm import VllmBackend

    bin_dir = tmp_path / "bin"  # git, and no vllm, on PATH
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    cfg = config_for(history, [f"ad1@{history.rev1}"], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FmhubError) as exc:
        VllmBackend().serve(cfg)
    msg = str(exc.value)
    assert "pip install vllm" in msg and "--export-only" in msg and "serve.sh" in msg
    assert str(tmp_path / "cache" / "vllm") in msg and (tmp_path / "cache" / "vllm" / "serve.sh").exists()


def test_serve_launches_vllm_waits_for_health_and_stops_it(history, tmp_path, monkeypatch):
    from fmhub.base.errors import FmhubError
    from fmhub.plugin.host import new_plugin_manager, registry
    from fmhub.plugin.interfaces import ServerHandle, ServingBackend
    import fmhub_plugins.serve_vllm as plugin

    pm = new_plugin_manager(load_entry_points=False)
    pm.register(plugin)
    backend = registry("serving-backend", pm)["vllm"]
    assert isinstance(backend, ServingBackend)

    monkeypatch.setenv("FAKE_VLLM_ARGV", str(tmp_path / "argv.json"))
    opts = {"executable": fake_vllm_executable(tmp_path), "timeout": 60}
    cfg = config_for(history, [f"ad1@{history.rev1}", f"ad2@{history.rev1}"], port=0, admin_token="s3cret",
                     cache_dir=str(tmp_path / "cache"), backend_options=opts)
    handle = backend.serve(cfg)
    try:
        assert isinstance(handle, ServerHandle) and handle.url.startswith("http://127.0.0.1:")
        req = urllib.request.Request(handle.url + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        models = {m["id"]: m for m in json.load(urllib.request.urlopen(req, timeout=10))["data"]}
        assert models["ad2"]["parent"] == "base" and models["ad2"]["root"] == str(tmp_path / "cache/vllm/adapters/ad2")
        assert "s3cret" not in (tmp_path / "argv.json").read_text()  # the token travels in the environment only
        assert "s3cret" not in (tmp_path / "cache/vllm/serve.sh").read_text()
    finally:
        handle.stop()
    assert handle.process.poll() is not None
    handle.stop()  # idempotent
    handle.wait()

    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    with pytest.raises(FmhubError, match="exited with status 1.*CUDA out of memory"):
        backend.serve(cfg)


# ---------------------------------------------------------------------------------------------- deploy


def test_deploy_loads_new_reloads_changed_and_unloads_removed(history, tmp_path):
    from fmhub.base.errors import FmhubError
    from fmhub.serving.export import export, read_version
    from fmhub_plugins.serve_vllm import VllmBackend

    h = history
    h.retrain()
    lora_adapter(h.repo / "ad3", seed=7, r=8)
    out = tmp_path / "exp"
    plan = export(config_for(h, [f"ad1@{h.rev1}", f"ad2@{h.rev1}"]), str(out))
    stray = tmp_path / "stray"
    shutil.copytree(out / "adapters" / "ad2", stray)
    # as vLLM started on the export holds it, plus an adapter someone loaded by hand
    served = {**plan.adapters, "stray": str(stray)}
    with FakeVllm("base", plan.base_dir, served, token="tok") as server:
        with pytest.raises(FmhubError, match="wants a token"):
            VllmBackend().deploy(server.url, config_for(h, ["ad1"]).adapters)

        wanted = config_for(h, [f"ad1@{h.rev2}", f"ad2@{h.rev1}", "ad3"]).adapters
        report = VllmBackend().deploy(server.url, wanted, "tok")
        assert (report.added, report.updated, report.removed, report.unchanged, report.failed) == \
            (["ad3"], ["ad1"], ["stray"], ["ad2"], {})
        assert [(kind, b["lora_name"]) for kind, b in server.posts()] == \
            [("unload_lora_adapter", "ad1"), ("load_lora_adapter", "ad1"), ("load_lora_adapter", "ad3"),
             ("unload_lora_adapter", "stray")]
        new_ad1 = Path(server.loras["ad1"])
        assert new_ad1.parent == out / "deployed"  # beside the export the server runs
        assert server.loaded_versions["ad1"] == git(h.repo, "rev-parse", f"{h.rev2}:ad1").stdout.decode().strip()
        got = file_hashes(new_ad1)
        got.pop(".fmhub-version")
        assert got == h.hashes[h.rev2]["ad1"]
        assert server.loras["ad2"] == plan.adapters["ad2"] and stray.exists()  # not ours to delete
        assert (out / "adapters" / "ad1").exists()  # serve.sh still starts from the export

        server.calls.clear()
        again = VllmBackend().deploy(server.url, wanted, "tok")
        assert again.unchanged == ["ad1", "ad2", "ad3"] and not server.posts()

        # back to v1: the deployed v2 directory goes once vLLM has let go of it
        report = VllmBackend().deploy(server.url, config_for(h, [f"ad1@{h.rev1}", f"ad2@{h.rev1}", "ad3"]).adapters, "tok")
        assert report.updated == ["ad1"] and not new_ad1.exists()
        assert read_version(server.loras["ad1"]) == read_version(plan.adapters["ad1"])

        # vLLM refusing the new version: reported, and the old one is loaded back
        server.refuse.add("ad1")
        server.refused_paths_ok.add(server.loras["ad1"])
        held = server.loras["ad1"]
        report = VllmBackend().deploy(server.url, config_for(h, [f"ad1@{h.rev2}", f"ad2@{h.rev1}", "ad3"]).adapters, "tok")
        assert report.updated == [] and "max_lora_rank" in report.failed["ad1"] and "loaded again" in report.failed["ad1"]
        assert server.loras["ad1"] == held
        assert sorted(p.name for p in (out / "deployed").iterdir()) == sorted(Path(server.loras[n]).name for n in ("ad1", "ad3"))


def test_deploy_to_a_vllm_without_runtime_updates_says_how_to_enable_them(history, tmp_path):
    from fmhub_plugins.serve_vllm import VllmBackend

    h = history
    with FakeVllm("base", str(tmp_path / "elsewhere"), {}, runtime=False) as server:
        report = VllmBackend(deploy_dir=str(tmp_path / "dep")).deploy(server.url, config_for(h, ["ad1"]).adapters)
    assert report.added == [] and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in report.failed["ad1"]


# ---------------------------------------------------------------------------------------------- the real engine


def _vllm_and_cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _vllm_and_cuda(), reason="needs vLLM installed and a CUDA GPU")
def test_real_vllm_serves_an_adapter_completion(history, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fmhub_plugins.serve_vllm import VllmBackend

    h = history
    tok = Tokenizer(models.WordLevel({"[UNK]": 0} | {f"w{i}": i for i in range(1, 512)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w2").save_pretrained(str(h.repo / "base"))
    git(h.repo, "add", "base")
    git(h.repo, "commit", "-qm", "tokenizer")
    rev = git(h.repo, "rev-parse", "HEAD").stdout.decode().strip()
    cfg = config_for(h, [f"ad1@{rev}"], rev=rev, port=0, dtype="float32", max_model_len=64, gpu_slots=1,
                     backend_options={"extra_args": ["--enforce-eager", "--gpu-memory-utilization", "0.3"]})
    handle = VllmBackend().serve(cfg)
    try:
        for model in ("base", "ad1"):
            body = json.dumps({"model": model, "prompt": "w5 w9 w42", "max_tokens": 4, "temperature": 0}).encode()
            req = urllib.request.Request(handle.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            doc = json.load(urllib.request.urlopen(req, timeout=120))
            assert doc["model"] == model and doc["choices"][0]["text"] is not None
    finally:
        handle.stop()

