"""Talk to a running vLLM server's LoRA API, and deploy adapters to it without a restart.

vLLM lists every loaded adapter in ``GET /v1/models`` as a model whose
``parent`` is the base model and whose ``root`` is the directory it was
loaded from; ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
change the set (only when the server runs with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, which serve.sh sets). fmhub knows
which version an adapter directory holds from its ``.fmhub-version`` file
(`fmhub.serving.export`), so a deploy reloads only what changed.

vLLM reads adapters from its own file system, so a deploy writes them where
the server can read them: run ``fmhub deploy`` on the server's machine (or
with a directory both share, ``FMHUB_VLLM_DEPLOY_DIR``).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from typing import Any

from fmhub.base import boundedjson
from fmhub.base.errors import FmhubError
from fmhub.serving.deploy import DeployReport
from fmhub.serving.export import API_KEY_ENV, check_adapter, check_dir_name, place, read_version
from fmhub.serving.sources import MODEL_CONFIG, AdapterSpec, Source

MAX_ANSWER = 16 << 20  # the model list or an error: a server's bigger answer is refused, not held
DEPLOY_DIR_ENV = "FMHUB_VLLM_DEPLOY_DIR"


class VllmClient:
    """The parts of vLLM's HTTP API fmhub uses, with the bearer token (vLLM's --api-key) when given."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                answer = resp.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            raise FmhubError(self._explain(path, exc.code, _error_message(exc.read(64 << 10)))) from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            raise FmhubError(f"cannot reach vLLM at {self.url} ({why}); is it running, and is the URL right?") from None
        if len(answer) > MAX_ANSWER:
            raise FmhubError(f"{self.url}{path}: an answer over {MAX_ANSWER >> 20} MiB; is this a vLLM server?")
        return answer

    def _explain(self, path: str, status: int, message: str) -> str:
        where = f"{self.url}{path}: HTTP {status}"
        if status == 401:
            return f"{where}: the server wants a token; pass the admin token (vLLM's --api-key / {API_KEY_ENV})"
        # FastAPI's answer for a route that is not there: vLLM registers these only with runtime updating on
        if path.endswith("_lora_adapter") and message.lower() in ("not found", "method not allowed"):
            return (f"{where}: this vLLM does not take runtime adapter changes; start it with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (serve.sh does)")
        return f"{where}: {message}" if message else where

    def health(self) -> bool:
        try:
            self._call("GET", "/health")
            return True
        except FmhubError:
            return False

    def models(self) -> list[dict[str, Any]]:
        try:
            doc = boundedjson.loads(self._call("GET", "/v1/models"))  # nesting is a ValueError, not a RecursionError
            return [m for m in doc["data"] if isinstance(m, dict) and "id" in m]
        except (ValueError, KeyError, TypeError):
            raise FmhubError(f"{self.url}/v1/models: not the model list an OpenAI-compatible server answers; "
                             "is this a vLLM server?") from None

    def load(self, name: str, path: str) -> None:
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload(self, name: str) -> None:
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})


def _error_message(body: bytes) -> str:
    """vLLM's error text: ``{"error": {"message"}}`` (newer), ``{"message"}`` (older) or plain text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = boundedjson.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if doc.get("message"):
            return str(doc["message"])
        if isinstance(doc.get("detail"), str):
            return doc["detail"]
    return text[:500]


def default_deploy_dir(base_root: str | None) -> str:
    """Where deploys write adapter versions: $FMHUB_VLLM_DEPLOY_DIR, beside an fmhub export the server runs, or the user's cache."""
    if os.environ.get(DEPLOY_DIR_ENV):
        return os.path.abspath(os.environ[DEPLOY_DIR_ENV])
    if base_root and read_version(base_root) is not None:
        return os.path.join(os.path.dirname(os.path.abspath(base_root)), "deployed")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fmhub", "vllm-deploy")


def deploy(url: str, adapters: list[AdapterSpec], token: str | None = None, deploy_dir: str | None = None) -> DeployReport:
    """Make the vLLM server at ``url`` serve exactly ``adapters``: load the new, reload the changed, unload the rest.

    A changed adapter is written to a new directory (``<deploy_dir>/<name>-<version>``)
    before the old one is unloaded, so a failed write leaves the server as it
    was; if vLLM then refuses the new version, the old one is loaded back. One
    adapter's failure is reported and does not stop the others.
    """
    client = VllmClient(url, token)
    models = client.models()
    bases = [m for m in models if not m.get("parent")]
    held = {m["id"]: m for m in models if m.get("parent")}
    base_root = bases[0].get("root") if bases else None
    base_local = bool(base_root) and os.path.isfile(os.path.join(base_root, MODEL_CONFIG))
    target = os.path.abspath(deploy_dir) if deploy_dir else default_deploy_dir(base_root if base_local else None)
    report = DeployReport(url)
    base_view = None
    for spec in adapters:
        name, version = spec.name, spec.source.version
        old_root = held.get(name, {}).get("root")
        if name in held and old_root and read_version(old_root) == version:
            report.unchanged.append(name)
            continue
        path = os.path.join(target, f"{name}-{_short(version)}")
        try:
            check_dir_name(name)
            if base_local:
                # the server's base is on this machine: check the adapter fits it before vLLM sees it
                base_view = base_view or Source(os.path.abspath(base_root)).view()
                check_adapter(spec, base_view, base_root, None)
            place(spec.source, path)
        except FmhubError as exc:
            report.failed[name] = str(exc)
            continue
        if name in held:
            try:
                client.unload(name)
            except FmhubError as exc:
                report.failed[name] = f"could not unload the version being served: {exc}"
                _prune(path, target)
                continue
        try:
            client.load(name, path)
        except FmhubError as exc:
            report.failed[name] = str(exc) + _restore(client, name, old_root)
            _prune(path, target)
            continue
        (report.updated if name in held else report.added).append(name)
        if old_root and os.path.abspath(old_root) != path:
            _prune(old_root, target)
    wanted = {a.name for a in adapters}
    for name, model in held.items():
        if name in wanted:
            continue
        try:
            client.unload(name)
        except FmhubError as exc:
            report.failed[name] = f"could not unload: {exc}"
            continue
        report.removed.append(name)
        if model.get("root"):
            _prune(model["root"], target)
    return report


def _restore(client: VllmClient, name: str, old_root: str | None) -> str:
    """After vLLM refused a new version: serve the old one again, and say how that went."""
    if not old_root:
        return ""
    try:
        client.load(name, old_root)
        return "; the version served before is loaded again"
    except FmhubError as exc:
        return f"; the version served before could not be loaded again either ({exc}), so {name!r} is not served now"


def _short(version: str) -> str:
    return version.removeprefix("wt-")[:16]


def _prune(path: str, target: str) -> None:
    """Remove an adapter directory a deploy wrote (under ``target``) once vLLM no longer uses it; leave others alone."""
    path = os.path.abspath(path)
    if os.path.dirname(path) == target and read_version(path) is not None:
        shutil.rmtree(path, ignore_errors=True)
