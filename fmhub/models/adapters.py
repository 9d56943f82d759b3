"""PEFT adapters as versions of a base model (spec: docs/adapters.md).

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
is tracked against the base model revision it belongs to: ``fmhub adapter
add`` checks that the adapter fits the base (every targeted weight exists,
with the shape the update has) and records the base in ``fmhub-adapter.json``
beside it: the base's path, the commit, and the git blob id of each of the
base's manifests at that commit. The adapter's weights are an fmhub-tracked
checkpoint like any other, so its history, diffs and merges work as for a
model. ``fmhub adapter ls`` tells whether each adapter's base has moved since.

``fmhub adapter merge`` merges an adapter into its base in the work tree and
stages the result with delta storage forced on, so each changed weight is
stored as a low-rank delta against the base's version (exact, or within
``--tolerance``); a weight that cannot be stored that way fails the merge
before anything is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from fmhub.base import gitrun
from fmhub.base import boundedjson
from fmhub.models import lora
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest
from fmhub.core.repo import blob_at, git, toplevel

SIDECAR = "fmhub-adapter.json"
SIDECAR_VERSION = 1


@dataclass
class BaseRef:
    """Where an adapter's base model is: a path in the repository at a commit, with its manifests' blob ids."""

    path: str
    revision: str
    files: dict[str, str]  # repo path -> git blob id of its manifest at ``revision``

    def to_json(self) -> dict:
        return {"path": self.path, "revision": self.revision, "files": dict(sorted(self.files.items()))}


@dataclass
class AdapterInfo:
    path: str  # the adapter directory, relative to the repository's top
    base: BaseRef
    rank: int
    alpha: float
    modules: list[str]
    base_now: str = "same"  # "same", "changed", "missing": the base at the revision looked at vs the recorded one
    changed_files: list[str] = field(default_factory=list)


def _rel(path: str, top: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), top)
    if rel == ".." or rel.startswith(".." + os.sep):
        raise FmhubError(f"{path} is outside the repository")
    return rel.replace(os.sep, "/")


def base_files(base: str, rev: str, top: str) -> dict[str, str]:
    """The fmhub manifests under ``base`` (a file or directory in the repo) at ``rev``: path -> blob id."""
    out = {}
    listing = git("ls-tree", "-r", "-z", "--full-tree", rev, "--", base, cwd=top, check=False)
    for rec in filter(None, listing.split("\0")):
        meta, _, path = rec.partition("\t")
        _mode, kind, blob = meta.split()
        if kind == "blob" and path.endswith(".safetensors"):
            try:
                data = gitrun.run(["cat-file", "blob", blob], cwd=top, text=False, limit=MAX_MANIFEST_BYTES).stdout
            except FmhubError:  # over the limit: a raw checkpoint, not a manifest
                continue
            if is_manifest(data):
                out[path] = blob
    return out


def add(adapter_dir: str, base: str, rev: str = "HEAD", cwd: str | None = None) -> AdapterInfo:
    """Record ``adapter_dir``'s base (``base`` at ``rev``), check the adapter fits it, and stage the adapter."""
    from fmhub.models.diffsides import resolve_rev
    from fmhub.core.repo import open_store
    from fmhub.models.views import from_revision

    top = toplevel(cwd)
    adapter_rel, base_rel = _rel(adapter_dir, top), _rel(base, top).rstrip("/")
    sha = resolve_rev(rev, top)
    files = base_files(base_rel, sha, top)
    if not files:
        raise FmhubError(f"{rev}:{base_rel}: no fmhub-tracked checkpoint there; commit the base model first")
    adapter = lora.load_adapter(os.path.join(top, adapter_rel))
    lora.check_fits(adapter, from_revision(sha, base_rel, open_store(top), top), f"the base {base_rel} at {rev}")
    weights = f"{adapter_rel}/{lora.WEIGHTS}"
    attr = git("check-attr", "filter", "--", weights, cwd=top).strip()
    if not attr.endswith(": fmhub"):
        raise FmhubError(f"{weights} is not tracked by fmhub; run `fmhub track \"*.safetensors\"` first")
    ref = BaseRef(base_rel, sha, files)
    body = json.dumps({"version": SIDECAR_VERSION, "base": ref.to_json()}, indent=2, sort_keys=True) + "\n"
    with atomic_write(os.path.join(top, adapter_rel, SIDECAR)) as f:
        f.write(body.encode())
    from fmhub.governance import lineage

    # so `fmhub lineage` / `fmhub unlearn` follow an adapter to its base model (and on to that model's data)
    record = lineage.record(adapter_rel, "adapter", [lineage.describe_input(f"{sha}:{base_rel}", "model", top)],
                            {"rank": int(adapter.config.get("r", 0))}, cwd=top)
    git("add", "--", adapter_rel, os.path.relpath(record, top), cwd=top)
    return _info(adapter_rel, ref, adapter.config, adapter.updates)


def _info(path: str, ref: BaseRef, config: dict, modules) -> AdapterInfo:
    return AdapterInfo(path, ref, int(config.get("r", 0)), float(config.get("lora_alpha", 0)), sorted(modules))


def read_sidecar(data: bytes, where: str) -> BaseRef:
    try:
        doc = boundedjson.loads(data)  # a clone's sidecar: nesting or a huge number is a ValueError, not a traceback
        if doc.get("version") != SIDECAR_VERSION:
            raise FmhubError(f"{where}: version {doc.get('version')!r} is not one this fmhub reads ({SIDECAR_VERSION}); upgrade fmhub")
        b = doc["base"]
        return BaseRef(str(b["path"]), str(b["revision"]), {str(k): str(v) for k, v in b["files"].items()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FmhubError(f"{where}: malformed ({exc.__class__.__name__}: {exc}); re-run `fmhub adapter add`") from None


def list_adapters(rev: str = "HEAD", cwd: str | None = None) -> list[AdapterInfo]:
    """Every adapter recorded at ``rev`` (or in the work tree for ``None``), with whether its base has moved since."""
    top = toplevel(cwd)
    if rev is None:
        paths = [p for p in git("ls-files", "-z", cwd=top).split("\0") if p.endswith("/" + SIDECAR) or p == SIDECAR]
        sha = None
    else:
        from fmhub.models.diffsides import resolve_rev

        sha = resolve_rev(rev, top)
        paths = [p for p in git("ls-tree", "-r", "-z", "--name-only", "--full-tree", sha, cwd=top).split("\0")
                 if p.endswith("/" + SIDECAR) or p == SIDECAR]
    out = []
    for side in paths:
        where = f"{rev or 'work tree'}:{side}"
        data = _read(side, sha, top)
        ref = read_sidecar(data, where)
        adir = os.path.dirname(side)
        try:
            cfg = boundedjson.loads(_read(f"{adir}/{lora.CONFIG}" if adir else lora.CONFIG, sha, top))
        except (ValueError, OSError) as exc:
            raise FmhubError(f"{where}: its {lora.CONFIG} is not JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise FmhubError(f"{where}: its {lora.CONFIG} is not a JSON object")
        now = base_files(ref.path, sha, top) if sha is not None else _staged_base(ref.path, top)
        changed = sorted(p for p in set(now) | set(ref.files) if now.get(p) != ref.files.get(p))
        info = _info(adir, ref, cfg, cfg.get("target_modules") or [])
        info.base_now = "missing" if not now else ("changed" if changed else "same")
        info.changed_files = changed
        out.append(info)
    return out


def _staged_base(base: str, top: str) -> dict[str, str]:
    out = {}
    for rec in filter(None, git("ls-files", "-s", "-z", "--", base, cwd=top).split("\0")):
        meta, _, path = rec.partition("\t")
        _mode, blob, stage = meta.split()
        if stage == "0" and path.endswith(".safetensors"):
            out[path] = blob
    return out


def _read(path: str, sha: str | None, top: str) -> bytes:
    if sha is None:
        with open(os.path.join(top, path), "rb") as f:
            return f.read()
    return blob_at(sha, path, top)


@dataclass
class StoredTensor:
    name: str
    size: int
    stored: int  # bytes of the objects this version added: its last delta, or the whole tensor
    codec: str | None  # the last link's codec; None when stored whole
    max_error: float | None  # set when stored within a tolerance instead of exactly


@dataclass
class MergeIntoReport:
    adapter: str
    files: list[str]
    tensors: list[StoredTensor]

    @property
    def stored(self) -> int:
        return sum(t.stored for t in self.tensors)

    @property
    def full(self) -> int:
        return sum(t.size for t in self.tensors)


def merge_into_base(adapter_dir: str, tolerance: float = 0.0, cwd: str | None = None) -> MergeIntoReport:
    """Merge the adapter into its recorded base in the work tree and stage it, each changed weight a low-rank delta.

    All-or-nothing: every shard is merged and cleaned into a manifest first;
    only when every targeted weight could be stored within ``tolerance`` are
    the work tree files replaced and the index updated.
    """
    from fmhub.core.checkpoint import clean
    from fmhub.core.deltas import DeltaPolicy
    from fmhub.core.repo import open_store, staged_blob
    from fmhub.models.views import CheckpointView

    top = toplevel(cwd)
    adapter_rel = _rel(adapter_dir, top)
    ref = read_sidecar(_read(f"{adapter_rel}/{SIDECAR}", None, top), f"{adapter_rel}/{SIDECAR}")
    adapter = lora.load_adapter(os.path.join(top, adapter_rel))
    files = sorted(_staged_base(ref.path, top))
    if not files:
        raise FmhubError(f"the base {ref.path} recorded for {adapter_rel} is not in the index; check out the base first")
    dirty = git("diff-files", "--name-only", "-z", "--", *files, cwd=top).split("\0")
    if any(dirty):
        raise FmhubError(f"{', '.join(filter(None, dirty))}: changed in the work tree since staged; commit or restore them first")
    views = {p: CheckpointView.from_file(os.path.join(top, p), p) for p in files}
    base_view = CheckpointView.combine(list(views.values()), ref.path) if len(views) > 1 else next(iter(views.values()))
    lora.check_fits(adapter, base_view, f"the base {ref.path}")
    store = open_store(top)
    staged: list[tuple[str, str, bytes]] = []  # (path, temp file, manifest)
    try:
        for path, view in views.items():
            targets = [n for n in adapter.updates if n in view.tensors]
            if not targets:
                continue
            tmp, prepared = _write_merged(os.path.join(top, path), view, {n: adapter.updates[n] for n in targets}, adapter_rel)
            staged.append((path, tmp, b""))
            policy = DeltaPolicy(tolerance=tolerance, strict=True, prepared=prepared)
            data = staged_blob(path, 64 << 20, top)
            previous = Manifest.from_bytes(data, path) if data and is_manifest(data) else None
            with open(tmp, "rb") as f:
                manifest = clean(f, store, path, previous, policy)
            staged[-1] = (path, tmp, manifest)
        report = MergeIntoReport(adapter_rel, [p for p, _, _ in staged], [])
        for path, tmp, manifest in staged:
            blob = gitrun.run(["hash-object", "-w", "--no-filters", "--stdin"], cwd=top, input=manifest, text=False).stdout.decode().strip()
            os.replace(tmp, os.path.join(top, path))
            git("update-index", "--cacheinfo", f"100644,{blob},{path}", cwd=top)
            report.tensors += _stored(Manifest.from_bytes(manifest, path), adapter.updates)
    finally:
        for _, tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        store.close()
    return report


def _write_merged(path: str, view, updates: dict[str, lora.Update], label: str) -> tuple[str, dict]:
    """A temp file beside ``path``: the checkpoint with ``updates`` merged, other tensors and metadata unchanged;
    and the merged weights' low-rank deltas, for `fmhub.core.deltas.DeltaPolicy.prepared`."""
    import hashlib
    import tempfile

    from safetensors.torch import save_file

    from fmhub.core import tensors

    out, prepared = {}, {}
    for name, ref in view.tensors.items():
        if name in updates:
            merged, delta = lora.merge_with_delta(ref, updates[name], label)
            out[name] = tensors.from_bytes(bytearray(merged), ref.dtype, tuple(ref.shape))
            if delta is not None:
                prepared[hashlib.sha256(merged).hexdigest()] = ("lowrank", hashlib.sha256(tensors.to_bytes(ref.load())).hexdigest(), delta)
        else:
            out[name] = ref.load().clone()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fmhub-merge-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata=dict(view.metadata or {}) or None)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, prepared


def _stored(manifest: Manifest, updates: dict) -> list[StoredTensor]:
    out = []
    for t in manifest.tensors:
        if t.name not in updates:
            continue
        codec = t.deltas[-1].codec if t.deltas else t.root_codec or None
        out.append(StoredTensor(t.name, t.size, t.stored_size, codec, t.approx.max_error if t.approx else None))
    return out


@dataclass
class ModuleChange:
    module: str
    status: str  # "added", "removed", "changed"
    old_norm: float | None  # ‖ΔW‖ of the module's update before
    new_norm: float | None
    change_norm: float | None  # ‖ΔW_new - ΔW_old‖


@dataclass
class AdapterChange:
    path: str
    config: list[tuple[str, object, object]]  # keys of adapter_config.json (and the recorded base) that changed
    modules: list[ModuleChange]


def _update_norm(parts: list[tuple[float, object, object]]) -> float | None:
    """‖Σ cᵢ·Bᵢ@Aᵢ‖_F from the factors, without forming the m × k matrix: ‖P Q‖² = Σ (PᵀP) ∘ (Q Qᵀ).

    None when the access policy withholds a factor's values (`fmhub.models.views.guard`): no number derived from them."""
    import torch

    if any(getattr(f, "denied", None) is not None for _, b, a in parts for f in (b, a)):
        return None

    p = torch.cat([c * b.load().to(torch.float64) for c, b, _ in parts], 1)
    q = torch.cat([a.load().to(torch.float64) for _, _, a in parts], 0)
    return float(((p.T @ p) * (q @ q.T)).sum().clamp_min(0).sqrt())


def diff_adapters(old: dict, new: dict, old_rev: str | None, new_rev: str | None, top: str) -> list[AdapterChange]:
    """The adapters among two sides' checkpoint views (path -> view, as `fmhub.models.diffsides.Side.files`): what changed in
    each one's config and in each module's effective update ``scaling·B@A``. ``None`` revisions mean the work tree."""
    from fmhub.models.diffsides import resolve_rev

    suffix = "/" + lora.WEIGHTS
    paths = sorted(p for p in set(old) | set(new) if p.endswith(suffix) or p == lora.WEIGHTS)
    if not paths:
        return []
    shas = [resolve_rev(rev, top) if rev is not None else None for rev in (old_rev, new_rev)]
    out = []
    for weights in paths:
        adir = os.path.dirname(weights)
        sides = [_adapter_at(adir, files.get(weights), sha, top) for files, sha in zip((old, new), shas)]
        if sides[0][0] is None and sides[1][0] is None:
            continue
        configs = [dict(a.config) if a else {} for a, _ in sides]
        for (_, base), cfg in zip(sides, configs):
            if base is not None:
                cfg["fmhub base"] = f"{base.path}@{base.revision[:12]}"
        keys = sorted(k for k in set(configs[0]) | set(configs[1]) if configs[0].get(k) != configs[1].get(k))
        changes = [(k, configs[0].get(k), configs[1].get(k)) for k in keys]
        a, b = sides[0][0], sides[1][0]
        modules = []
        for name in sorted(set(a.updates if a else {}) | set(b.updates if b else {})):
            ua, ub = (a.updates.get(name) if a else None), (b.updates.get(name) if b else None)
            if ua is not None and ub is not None and (ua.a.oid, ua.b.oid, ua.scaling) == (ub.a.oid, ub.b.oid, ub.scaling) \
                    and ua.a.oid is not None:
                continue
            old_n = _update_norm([(ua.scaling, ua.b, ua.a)]) if ua else None
            new_n = _update_norm([(ub.scaling, ub.b, ub.a)]) if ub else None
            if ua and ub:
                if (ua.transpose, tuple(ua.b.shape)[0], tuple(ua.a.shape)[1]) != (ub.transpose, tuple(ub.b.shape)[0], tuple(ub.a.shape)[1]):
                    modules.append(ModuleChange(name, "changed", old_n, new_n, None))
                    continue
                change = _update_norm([(ub.scaling, ub.b, ub.a), (-ua.scaling, ua.b, ua.a)])
                if change == 0.0:
                    continue
                modules.append(ModuleChange(name, "changed", old_n, new_n, change))
            else:
                modules.append(ModuleChange(name, "added" if ub else "removed", old_n, new_n, None))
        if changes or modules:
            out.append(AdapterChange(adir or ".", changes, modules))
    return out


def _adapter_at(adir: str, view, sha: str | None, top: str) -> tuple[lora.Adapter | None, BaseRef | None]:
    """The adapter in ``adir`` at commit ``sha`` (None: the work tree), and its recorded base; (None, None) if none."""
    if view is None:
        return None, None
    cfg_path = f"{adir}/{lora.CONFIG}" if adir else lora.CONFIG
    try:
        config = boundedjson.loads(_read(cfg_path, sha, top))
    except (OSError, FmhubError, ValueError):
        return None, None  # not an adapter directory on this side: the tensor diff covers it
    side_path = f"{adir}/{SIDECAR}" if adir else SIDECAR
    try:
        base = read_sidecar(_read(side_path, sha, top), side_path)
    except (OSError, FmhubError):
        base = None
    return lora.adapter_from(adir or ".", config, view), base
