"""`fmhub commit --sparse K%`: keep a fine-tune's top-K% updates (FishMask) and commit them as sparse deltas.

The file in the work tree is a dense fine-tune of the version committed at
``--base`` (HEAD). It is replaced, atomically, by its sparse update
(`fmhub.models.sparse_update.sparse_update`), staged with delta storage on (so each
changed tensor is stored as the changed elements only) and committed. With
``--data`` the evaluation loss of base, dense fine-tune and sparse update is
measured first, so the quality given up is reported next to what was stored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from fmhub.base.errors import FmhubError
from fmhub.core.manifest import Manifest
from fmhub.core.repo import blob_at, git, toplevel


@dataclass
class CommitReport:
    files: list[str]
    commit: str
    kept_fraction: float
    changed_bytes: int = 0  # full size of the tensors that changed
    stored_bytes: int = 0  # what the new version added to the store for them
    losses: dict[str, float] = field(default_factory=dict)  # "base", "dense", "sparse" -> eval loss


def _weights_file(path: str) -> tuple[str, str | None]:
    """(the safetensors file to sparsify, its model directory when it is a save_pretrained one)."""
    if os.path.isdir(path):
        f = os.path.join(path, "model.safetensors")
        if not os.path.isfile(f):
            raise FmhubError(f"{path}: no model.safetensors here; give the weights file (sharded models: commit each shard's file)")
        return f, path
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise FmhubError(f"{path}: not a .safetensors file or a model directory")
    return path, None


def sparse_commit(path: str, message: str, fisher: str, keep: float, data: str | None = None, base_rev: str = "HEAD",
                  cwd: str | None = None) -> CommitReport:
    from fmhub.models import sparse_update as su

    top = toplevel(cwd)
    weights, model_dir = _weights_file(path)
    rel = os.path.relpath(os.path.abspath(weights), top).replace(os.sep, "/")
    if git("ls-tree", base_rev, "--", rel, cwd=top, check=False).strip() == "":
        raise FmhubError(f"{rel} is not committed at {base_rev}; commit the base model first, then the fine-tune with --sparse")
    if data is not None and model_dir is None:
        raise FmhubError("--data needs a model directory (config.json beside model.safetensors) to evaluate")
    tmpdir = tempfile.mkdtemp(prefix=".fmhub-sparse-", dir=os.path.dirname(os.path.abspath(weights)))
    try:
        out = os.path.join(tmpdir, "model.safetensors")
        rep = su.sparse_update(f"{base_rev}:{rel}", weights, fisher, out, keep)
        losses = {}
        if data is not None:
            base_dir = os.path.join(tmpdir, "base")
            os.makedirs(base_dir)
            su.copy_side_files(model_dir, base_dir)
            _materialize(f"{base_rev}:{rel}", os.path.join(base_dir, "model.safetensors"), top)
            su.copy_side_files(model_dir, tmpdir)
            losses = {"base": su.eval_loss(base_dir, data), "dense": su.eval_loss(model_dir, data), "sparse": su.eval_loss(tmpdir, data)}
        os.replace(out, weights)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    from fmhub.governance import lineage

    inputs = [lineage.describe_input(f"{base_rev}:{rel}", "model", top), lineage.describe_input(fisher, "model", os.getcwd())]
    record = os.path.relpath(lineage.record(rel, "sparsify", inputs, {"keep": keep, "fisher": fisher}, cwd=top), top)
    git("-c", "fmhub.deltas=true", "add", "--", rel, record, cwd=top)
    git("commit", "-q", "-m", message, "--", rel, record, cwd=top)
    report = CommitReport([rel], git("rev-parse", "HEAD", cwd=top).strip(), rep.kept_fraction, losses=losses)
    new = Manifest.from_bytes(blob_at("HEAD", rel, top), rel)
    old = Manifest.from_bytes(blob_at(base_rev, rel, top), rel).by_name()
    for t in new.tensors:
        if old.get(t.name) is None or old[t.name].oid != t.oid:
            report.changed_bytes += t.size
            report.stored_bytes += t.stored_size
    return report


def _materialize(spec: str, out: str, top: str) -> None:
    """Write ``REV:PATH`` (a committed checkpoint) to ``out`` (what `fmhub extract` does, with no tensor filter)."""
    from fmhub.models.extract import extract
    from fmhub.models.views import open_view

    extract(open_view(spec, cwd=top), ["*"], out)

