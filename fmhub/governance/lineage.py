"""Provenance: which inputs and which step produced a model or dataset version.

Every producing command (``fmhub clean``, ``fmhub label``, ``fmhub finetune``,
``fmhub merge``) writes ``<output>.lineage.json`` beside its output (spec:
docs/lineage.md). The sidecar is an ordinary small file, so committing it with
the output ties the record to that version; ``fmhub lineage PATH@REV`` reads
the sidecars as committed at REV and follows each input that has its own
sidecar, so a merged model leads back to the datasets of both parents.
``fmhub unlearn --source S`` walks every committed sidecar to list the model
versions whose lineage includes S, and can exclude S from future pipeline runs.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from fmhub.base import boundedjson
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.base.gitrun import GitError, run, toplevel

VERSION = 1
SUFFIX = ".lineage.json"
MAX_RECORD_BYTES = 16 << 20  # a record names its inputs: a few KiB; a clone's could be a link to /dev/zero
EXCLUDED = os.path.join(".fmhub", "excluded-sources")
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
MODEL_STEPS = ("finetune", "merge", "sparsify", "adapter")


class LineageError(FmhubError):
    """A lineage record that cannot be found or read."""


class ExcludedSource(FmhubError):
    """A pipeline was asked to read a data source that `fmhub unlearn --remove` excluded."""


def _git(args: Sequence[str], cwd: str, limit: Optional[int] = None) -> Optional[str]:
    """git's stdout, or None when git fails (not a repo, path not at that revision): provenance is best effort.
    GitError (`fmhub.base.gitrun.run`'s rule) when it prints more than ``limit`` bytes."""
    done = run(args, cwd=cwd, check=False, text=False, limit=limit)
    return done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else None


def _root(cwd: str) -> str:
    return toplevel(cwd) or os.path.abspath(cwd)


repo_root = _root


def _rel(path: str, root: str) -> str:
    """``path`` relative to the repository root, with /, so records resolve the same from any clone."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, root)
    return full if rel.startswith("..") else rel.replace(os.sep, "/")


def _kind(path: str) -> str:
    return "model" if path.endswith(MODEL_SUFFIXES) or os.path.isdir(path) else "dataset"


def describe_input(spec: str, kind: Optional[str] = None, cwd: str = ".") -> dict[str, Any]:
    """An input as a record names it: ``path`` (repo-relative), ``rev`` (from a REV:PATH input), ``blob`` and ``kind``.

    ``blob`` is the git blob id at ``rev`` or, for a work-tree file, its blob id
    in HEAD when the committed file is the one read (else null): what lets
    ``unlearn`` match a source by content as well as by name.
    """
    root = _root(cwd)
    rev: Optional[str] = None
    path = spec
    if ":" in spec and not os.path.exists(spec) and not (len(spec) > 1 and spec[1] == ":"):
        rev, path = spec.split(":", 1)
    if rev is None:
        path = os.path.join(cwd, path)  # relative to ``cwd``, as a caller in another directory means it
        rel = _rel(path, root)
        blob = None
        if os.path.isfile(path) and not os.path.isabs(rel):
            # status, not hash-object: it trusts the index's stat data instead of running the fmhub filters over the file
            clean = _git(["status", "--porcelain", "--", rel], root) == ""
            blob = _git(["rev-parse", f"HEAD:{rel}"], root) if clean else None
        return {"path": rel, "rev": None, "blob": blob, "kind": kind or _kind(path)}
    commit = _git(["rev-parse", "--verify", f"{rev}^{{commit}}"], root) or rev
    return {"path": path, "rev": commit, "blob": _git(["rev-parse", f"{commit}:{path}"], root), "kind": kind or _kind(path)}


def record(output: str, step: str, inputs: Iterable[Mapping[str, Any] | str], params: Optional[Mapping[str, Any]] = None,
           pipeline: Optional[str] = None, cwd: str = ".") -> str:
    """Write ``<output>.lineage.json`` atomically and return its path; inputs are REV:PATH/path strings or `describe_input` dicts."""
    root = _root(cwd)
    output = os.path.join(cwd, output)
    rec = {
        "v": VERSION,
        "output": _rel(output, root),
        "step": step,
        "inputs": [describe_input(i, cwd=cwd) if isinstance(i, str) else dict(i) for i in inputs],
        "params": dict(params or {}),
        "pipeline": pipeline,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = output.rstrip("/\\") + SUFFIX
    with atomic_write(path, "w") as f:
        json.dump(rec, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def read(path: str, rev: Optional[str] = None, cwd: str = ".") -> Optional[dict[str, Any]]:
    """The record of ``path`` (repo-relative) at ``rev`` (None: the work tree), or None when it has none."""
    root = _root(cwd)
    side = path.rstrip("/") + SUFFIX
    if rev is None:
        full = side if os.path.isabs(side) else os.path.join(root, side)
        if not os.path.exists(full):
            return None
        from fmhub.base.boundedyaml import read_text

        try:
            text = read_text(full, MAX_RECORD_BYTES, LineageError, "a lineage record")
        except OSError as exc:
            raise LineageError(f"{side}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    else:
        try:  # a clone's record could be a huge blob: never read past the limit
            text = _git(["show", f"{rev}:{side}"], root, limit=MAX_RECORD_BYTES)  # type: ignore[assignment]
        except GitError as exc:
            raise LineageError(f"{side}@{rev}: {exc}") from None
        if text is None:
            return None
    try:  # a clone's record: NaN (a diverged run's score) is kept, nesting or a huge number is one ValueError
        rec = boundedjson.loads(text, allow_nan=True)
    except ValueError as exc:
        raise LineageError(f"{side}{'@' + rev if rev else ''}: not valid JSON ({exc}); restore it from git") from None
    if not isinstance(rec, dict) or rec.get("v") != VERSION:
        raise LineageError(f"{side}: unknown lineage record version {rec.get('v') if isinstance(rec, dict) else None!r}; upgrade fmhub")
    return rec


@dataclass
class Graph:
    """Nodes are ``path@rev`` (rev empty for the work tree); an edge goes from an input to what it produced."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: list[dict[str, str]] = field(default_factory=list)
    root: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "nodes": list(self.nodes.values()), "edges": self.edges}

    def sources(self, kind: Optional[str] = None) -> list[str]:
        """Paths of nodes nothing produced (no record): the raw datasets and base models."""
        return sorted({n["path"] for n in self.nodes.values() if n.get("step") is None and (kind is None or n["kind"] == kind)})

    def paths(self, kind: Optional[str] = None) -> list[str]:
        return sorted({n["path"] for n in self.nodes.values() if kind is None or n["kind"] == kind})


def _node_id(path: str, rev: Optional[str]) -> str:
    return f"{path}@{rev}" if rev else path


def walk(path: str, rev: Optional[str] = None, cwd: str = ".") -> Graph:
    """The lineage graph of ``path`` at ``rev``: its record, then recursively each input's record.

    An input without a ``rev`` is read at the revision of the record that names
    it (the work tree or ``rev``): a record committed with its output describes
    the inputs as they were committed then.
    """
    root = _root(cwd)
    path = _rel(os.path.join(cwd, path), root) if rev is None else path
    if rev is not None:
        rev = _git(["rev-parse", "--verify", f"{rev}^{{commit}}"], root) or rev
    graph = Graph(root=_node_id(path, rev))
    todo: list[tuple[str, Optional[str], str, dict]] = [(path, rev, "", {})]
    while todo:
        p, r, kind, terms = todo.pop()
        nid = _node_id(p, r)
        if nid in graph.nodes:
            continue
        rec = read(p, r, root)
        if rec is None and nid == graph.root:
            raise LineageError(f"{p}{'@' + r if r else ''} has no lineage record ({p}{SUFFIX}); it was not written by an fmhub pipeline, merge or fine-tune")
        graph.nodes[nid] = {"id": nid, "path": p, "rev": r, "kind": kind or _kind(p),
                            "step": rec.get("step") if rec else None, "params": rec.get("params") if rec else None,
                            "pipeline": rec.get("pipeline") if rec else None, **terms}
        for inp in (rec or {}).get("inputs", []):
            ip, ir = str(inp.get("path")), inp.get("rev") or r
            graph.edges.append({"from": _node_id(ip, ir), "to": nid})
            # a dataset's licence and consent, as the pipeline that read it recorded them, travel with its node
            todo.append((ip, ir, str(inp.get("kind") or ""), {k: inp[k] for k in ("license", "consent") if k in inp}))
    return graph


def records_in_history(rev: Optional[str] = None, cwd: str = ".") -> Iterable[tuple[str, str]]:
    """(commit, output path) for every lineage record added or changed in the history of ``rev`` (None: all refs)."""
    root = _root(cwd)
    out = _git(["log", *(["--all"] if rev is None else [rev]), "--format=@%H", "--name-only", "--diff-filter=AM", "--", f"*{SUFFIX}"], root) or ""
    commit = ""
    for line in out.splitlines():
        if line.startswith("@"):
            commit = line[1:]
        elif line.strip():
            yield commit, line.strip()[: -len(SUFFIX)]


def trained_on(source: str, rev: Optional[str] = None, cwd: str = ".") -> list[dict[str, Any]]:
    """Every committed model version whose lineage includes ``source`` (a path, repo-relative or not)."""
    root = _root(cwd)
    src = _rel(os.path.join(cwd, source), root)
    hits = []
    for commit, out in records_in_history(rev, root):
        rec = read(out, commit, root)
        if rec is None or rec.get("step") not in MODEL_STEPS:
            continue  # datasets derived from the source are not model versions; `--remove` covers them
        graph = walk(out, commit, root)
        if src in graph.paths():
            hits.append({"commit": commit, "path": out, "step": graph.nodes[graph.root]["step"]})
    return hits


def excluded_sources(root: str) -> list[str]:
    """The sources `fmhub unlearn --remove` excluded: one repo-relative path a line in .fmhub/excluded-sources."""
    try:
        with open(os.path.join(root, EXCLUDED), encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        return []


def exclude(source: str, cwd: str = ".") -> str:
    """Add ``source`` to .fmhub/excluded-sources (once) and return the file's path."""
    root = _root(cwd)
    src = _rel(os.path.join(cwd, source), root)
    have = excluded_sources(root)
    path = os.path.join(root, EXCLUDED)
    if src not in have:
        with atomic_write(path, "w") as f:
            f.write("# data sources removed by `fmhub unlearn --remove`; pipelines refuse to read them\n")
            f.writelines(f"{s}\n" for s in [*have, src])
    return path


def check_not_excluded(path: str, root: str) -> None:
    """Refuse to read an excluded source, so no future dataset version can include it."""
    rel = _rel(os.path.join(root, path), _root(root))
    if rel in excluded_sources(_root(root)):
        raise ExcludedSource(f"{rel} was removed with `fmhub unlearn --remove`; delete it from {EXCLUDED} to use it again")
