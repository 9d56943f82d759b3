"""Which model made a result: its path, revision and the object ids of its weights (docs/monitoring.md).

`fmhub eval` records an identity with its predictions (``predictions.jsonl``'s
lineage record and ``report.json``) and every consumer of the predictions
checks it: `fmhub explain` takes gradients of exactly the model that
predicted, or refuses and names the command that makes its predictions again.

An identity is ``{"model": PART, "adapter": PART | None, "id": HEX}`` with
``PART = {"path", "rev", "weights": {file: sha256}, "config": {file: sha256}}``:
``path`` repo-relative (a symlink as named), ``rev`` the commit it was read at
(None: the work tree), ``weights`` the sha256 (the object id fmhub stores it
under) of each weight file, ``config`` that of each file besides the weights
that changes what the model computes (`CONFIG_FILES`). ``id`` hashes those
files alone, so the same bytes are the same model wherever they lie. The
predictions' record also holds their own sha256 (`PREDICTIONS_SHA`), so
predictions edited or copied in from another model's directory are refused too.
Hashes of unchanged files come from a stat-keyed cache (`fmhub.ml.hashcache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Optional

from fmhub.base import boundedjson
from fmhub.core.store import file_sha256
from fmhub.governance import lineage
from fmhub.ml import hashcache

WEIGHT_SUFFIXES = lineage.MODEL_SUFFIXES
# the other files that decide what a model computes: its architecture (config.json's eps, activation, rope; an
# adapter's alpha scales its update), tokenizer and generation settings. Records fmhub writes beside the weights
# (fmhub-train.json, fmhub-patch.json) are left out: they describe the model, they do not change it.
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                "chat_template.jinja", "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
                "preprocessor_config.json")
BY_MODEL = "by-model"  # evals/NAME/by-model/SLUG: predictions of a model other than the eval's declared one
PREDICTIONS_SHA = "predictions_sha256"  # the lineage param binding the identity to the predictions file's bytes


def files(directory: str, root: Optional[str] = None) -> tuple[dict[str, str], dict[str, str]]:
    """``({weight file: sha256}, {config file: sha256})`` under ``directory`` (dotfiles and temp directories left
    out); unchanged files are answered from `fmhub.ml.hashcache`'s cache in ``root``'s git dir, not read again."""
    found: dict[str, str] = {}
    for top, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and (name.endswith(WEIGHT_SUFFIXES) or name in CONFIG_FILES):
                full = os.path.join(top, name)
                found[os.path.relpath(full, directory).replace(os.sep, "/")] = full
    sums = hashcache.sha256(found.values(), _cache_dir(root or directory))
    weights = {rel: sums[full] for rel, full in found.items() if rel.endswith(WEIGHT_SUFFIXES)}
    return weights, {rel: sums[full] for rel, full in found.items() if rel not in weights}


def _cache_dir(where: str) -> Optional[str]:
    """``<git common dir>/fmhub`` of the repository around ``where``; None outside one (no cache, every file read)."""
    from fmhub.base.errors import FmhubError
    from fmhub.core.repo import common_dir

    try:
        return os.path.join(common_dir(where if os.path.isdir(where) else os.path.dirname(where)), "fmhub")
    except (FmhubError, OSError):
        return None


def place(directory: str, root: str, real: bool = False) -> str:
    """Where a work-tree model lies, as identities name it: repo-relative with /, or absolute outside the repository.

    A symlink is a name of its own (``real`` False): the eval of a declared
    ``models/current`` keeps its directory when the link is pointed at another
    version, and its weights' hashes tell the versions apart. ``real`` resolves
    links: where the lineage record beside the real directory is.
    """
    full, top = (os.path.realpath(directory), os.path.realpath(root)) if real else (os.path.abspath(directory), os.path.abspath(root))
    rel = os.path.relpath(full, top)
    return full if rel == ".." or rel.startswith(".." + os.sep) else rel.replace(os.sep, "/")


def part(directory: str, rev: Optional[str], path: Optional[str], root: str) -> dict[str, Any]:
    """One model's (or adapter's) part of an identity: read from ``directory``, named by ``path`` at ``rev``."""
    named = path if rev is not None and path is not None else place(directory, root)
    weighed, config = files(directory, root)
    return {"path": named, "rev": rev, "weights": weighed, "config": config}


def of(model: Any, adapter: Any, root: str) -> dict[str, Any]:
    """The identity of an `fmhub.ml.evaluation.Resolved` model and optional adapter."""
    parts = {k: part(r.dir, r.rev, r.path, root) if r is not None else None for k, r in (("model", model), ("adapter", adapter))}
    h = hashlib.sha256(json.dumps([p and [p["weights"], p["config"]] for p in parts.values()], sort_keys=True).encode())
    return {**parts, "id": h.hexdigest()[:16]}


def who(ident: Optional[dict]) -> Optional[tuple]:
    """What names a model apart from its bytes: (model path, rev, adapter path, rev); a directory holds one such owner."""
    if not ident:
        return None
    m, a = ident.get("model") or {}, ident.get("adapter") or {}
    return (m.get("path"), m.get("rev"), a.get("path"), a.get("rev"))


def describe(ident: Optional[dict]) -> str:
    """``models/base@1a2b3c4d + adapters/x (weights 0123abcd…)``, for messages and the explain header."""
    if not ident:
        return "an unknown model"

    def one(p: dict) -> str:
        return str(p.get("path")) + (f"@{str(p['rev'])[:12]}" if p.get("rev") else "")

    text = one(ident.get("model") or {}) + (f" + {one(ident['adapter'])}" if ident.get("adapter") else "")
    ident_id = ident.get("id")
    return f"{text} (weights {ident_id[:8] if isinstance(ident_id, str) else 'unknown'})"


def _record(predictions: str) -> Optional[dict]:
    """The lineage record beside ``predictions`` (None: no record, or one that is not a JSON object)."""
    try:
        with open(predictions + lineage.SUFFIX, "rb") as f:
            rec = boundedjson.loads(f.read(lineage.MAX_RECORD_BYTES + 1))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _clean(p: Any) -> Optional[dict]:
    """An identity's part as a record holds it, if it has the shape `part` writes (path and rev strings or null)."""
    if not isinstance(p, dict) or not isinstance(p.get("path"), str) or not isinstance(p.get("rev"), (str, type(None))):
        return None
    return p


def recorded(predictions: str) -> Optional[dict]:
    """The identity ``fmhub eval`` recorded beside ``predictions``; for a record written before identities, its
    model input (path and revision, no weights); None without a record, or with one not in the shape fmhub writes."""
    rec = _record(predictions)
    params = rec.get("params") if rec else None
    if isinstance(params, dict) and "identity" in params:
        ident = params["identity"]
        if not isinstance(ident, dict) or _clean(ident.get("model")) is None:
            return None
        adapter = ident.get("adapter")
        if adapter is not None and _clean(adapter) is None:
            return None
        return {"model": ident["model"], "adapter": adapter, "id": ident.get("id") if isinstance(ident.get("id"), str) else None}
    inputs = rec.get("inputs") if rec else None
    models = [_clean(i) for i in inputs if isinstance(i, dict) and i.get("kind") == "model"] if isinstance(inputs, list) else []
    if not models or None in models:
        return None
    adapter = {"path": models[1]["path"], "rev": models[1]["rev"]} if len(models) > 1 else None
    return {"model": {"path": models[0]["path"], "rev": models[0]["rev"]}, "adapter": adapter, "id": None}


def intact(predictions: str) -> bool:
    """Whether ``predictions`` holds the bytes its record was written for (not edited, nor copied from another model's)."""
    rec = _record(predictions)
    params = rec.get("params") if rec else None
    want = params.get(PREDICTIONS_SHA) if isinstance(params, dict) else None
    try:
        return isinstance(want, str) and file_sha256(predictions) == want
    except OSError:
        return False


# a path every component of which this matches maps to a slug that maps back to it: no "--" inside a component, no
# leading or trailing "-" (so "--" in the slug is always a "/"), no "@", "+", "~" or non-ASCII
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._]*(?:-[A-Za-z0-9._]+)*")
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
MAX_SLUG = 120  # well under a file name's 255 bytes


def slug(ident: dict) -> str:
    """A directory name for a model (and adapter), one per (path, rev, adapter path, rev): ``models--patched``,
    ``models--base@1a2b3c4d5e6f``, ``models--base+adapters--x``. A path that would not map back (``models/a--b``
    beside ``models/a/b``, an absolute path, non-ASCII, a rev that is not a commit id) gets a readable prefix and
    ``~`` and a hash of what names it, which no plain slug contains."""
    def one(p: dict) -> str:
        return str(p.get("path")).strip("/").replace("/", "--") + (f"@{str(p['rev'])[:12]}" if p.get("rev") else "")

    def plain(p: dict) -> bool:
        path, rev = str(p.get("path")), p.get("rev")
        return (all(_PLAIN.fullmatch(c) for c in path.split("/")) and (rev is None or bool(_SHA.fullmatch(str(rev)))))

    parts = [ident["model"]] + ([ident["adapter"]] if ident.get("adapter") else [])
    name = "+".join(one(p) for p in parts)
    if all(plain(p) for p in parts) and len(name) <= MAX_SLUG:
        return name
    tag = hashlib.sha256(json.dumps(who(ident)).encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9._@+-]", "_", name).lstrip(".-")[: MAX_SLUG - 13] + "~" + tag
