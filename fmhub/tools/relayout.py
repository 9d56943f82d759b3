"""One-off: move fmhub's flat modules into layer packages and rewrite every reference (kept for branches to rebase).

``python -m fmhub.tools.relayout FILE...`` rewrites references to the old flat
module names (``fmhub.spec``, ``from fmhub import clean``, ``fmhub/clean.py``)
into the new ones in the files given; it is idempotent.
"""

from __future__ import annotations

import re
import sys

MOVES = {
    # base: no domain knowledge
    "errors": "fmhub.base.errors", "atomic": "fmhub.base.atomic", "boundedjson": "fmhub.base.boundedjson",
    "boundedyaml": "fmhub.base.boundedyaml", "units": "fmhub.base.units", "progress": "fmhub.base.progress",
    "prefetch": "fmhub.base.prefetch",
    # project: what fmhub.yaml declares
    "spec": "fmhub.project.spec",
    # plugin: the contract and the host
    "records": "fmhub.plugin.records", "hookspecs": "fmhub.plugin.hookspecs", "interfaces": "fmhub.plugin.interfaces",
    "host": "fmhub.plugin.host",
    # core: storage
    "store": "fmhub.core.store", "manifest": "fmhub.core.manifest", "chunking": "fmhub.core.chunking",
    "planes": "fmhub.core.planes", "sparse_index": "fmhub.core.sparse_index", "floats": "fmhub.core.floats",
    "lowrank": "fmhub.core.lowrank", "lowrank_fixed": "fmhub.core.lowrank_fixed", "deltas": "fmhub.core.deltas",
    "tensorio": "fmhub.core.tensorio", "checkpoint": "fmhub.core.checkpoint", "datafile": "fmhub.core.datafile",
    "tensors": "fmhub.core.tensors", "rows": "fmhub.core.rows", "repo": "fmhub.core.repo",
    # governance
    "policy": "fmhub.governance.policy", "access": "fmhub.governance.access", "audit": "fmhub.governance.audit",
    "lineage": "fmhub.governance.lineage", "licences": "fmhub.governance.licences",
    # git: the repository's side of things
    "install": "fmhub.git.install", "worktree": "fmhub.git.worktree", "gc": "fmhub.git.gc", "repack": "fmhub.git.repack",
    "fsck": "fmhub.git.fsck", "sync": "fmhub.git.sync", "transfer": "fmhub.git.transfer", "remote": "fmhub.git.endpoint",
    "hub": "fmhub.git.hub",
    # data pipelines
    "datasets_io": "fmhub.data.texts", "data_at": "fmhub.data.revision", "data_diff": "fmhub.data.rowdiff",
    "join": "fmhub.data.join",
    "clean": "fmhub.data.clean.pipeline", "cleaners": "fmhub.data.clean.cleaners",
    "clean_overrides": "fmhub.data.clean.overrides", "clean_report": "fmhub.data.clean.report",
    "labelling": "fmhub.data.label.pipeline", "labelers": "fmhub.data.label.labelers",
    "label_model": "fmhub.data.label.model", "label_report": "fmhub.data.label.report",
    "label_suggest": "fmhub.data.label.suggest", "label_votes": "fmhub.data.label.votes",
    # model operations
    "diff": "fmhub.models.diff", "merge": "fmhub.models.merge", "merge_math": "fmhub.models.merge_math",
    "lora": "fmhub.models.lora", "adapters": "fmhub.models.adapters", "fisher": "fmhub.models.fisher",
    "sparse_update": "fmhub.models.sparse_update", "rebase": "fmhub.ml.rebase", "views": "fmhub.models.views",
    "extract": "fmhub.models.extract", "commit": "fmhub.models.sparse_commit",
    # serving
    "router": "fmhub.serving.router",
    # ML workflows
    "autotune": "fmhub.ml.autotune", "select": "fmhub.ml.selection", "evaluation": "fmhub.ml.evaluation",
    "eval_report": "fmhub.ml.eval_report", "slices": "fmhub.ml.slices", "provenance": "fmhub.ml.explain",
    "patch": "fmhub.ml.patch",
    # declarative runs
    "dag": "fmhub.run.dag", "run": "fmhub.run.plan", "example": "fmhub.run.example", "demo": "fmhub.run.demo",
    # the commands git runs
    "gitcmd": "fmhub_filters.commands",
}
PATHS = {"fmhub_filters": "filters", "fmhub_plugins": "plugins"}

# new names that begin with an old one's (fmhub.run -> fmhub.run.plan): not rewritten again
_NEW_TAILS = {old: tuple(n[len("fmhub.") + len(old):] for n in MOVES.values() if n.startswith(f"fmhub.{old}."))
              for old in MOVES}


def _path_of(dotted: str) -> str:
    top, _, rest = dotted.partition(".")
    return "/".join([PATHS.get(top, top), *rest.split(".")]) + ".py"


def _from_import(m: re.Match) -> str:
    indent, body = m.group(1), m.group(2)
    names = [n.strip() for n in body.strip("()").replace("\n", " ").split(",") if n.strip()]
    keep, lines = [], []
    for n in names:
        name, _, alias = n.partition(" as ")
        name, alias = name.strip(), alias.strip()
        if name not in MOVES:
            keep.append(n)
            continue
        pkg, _, base = MOVES[name].rpartition(".")
        local = alias or name
        lines.append(f"{indent}from {pkg} import {base}" + (f" as {local}" if local != base else ""))
    if keep:
        lines.insert(0, f"{indent}from fmhub import {', '.join(keep)}")
    return "\n".join(lines)


_FROM = re.compile(r"^([ \t]*)from fmhub import (\([^)]*\)|[^\n#]*[^\s#])", re.M)


# git config keys that read like module names: left alone
_CONFIG = re.compile(r"fmhub\.(?:lowrank\.(?:tolerance|strict)|hub\.(?:repo|revision)|audit\.path|merge\.strategy)\b"
                     r"|(?<=[\"'])fmhub\.(?:deltas|remote|audit)(?=[\"'=])|(?<=config )fmhub\.(?:deltas|remote|audit)\b"
                     r"|(?<=``)fmhub\.(?:deltas|remote|audit)(?=``)|(?<=`)fmhub\.remote(?=`)|fmhub\.deltas(?==)")


def rewrite(text: str) -> str:
    kept: list[str] = []
    text = _CONFIG.sub(lambda m: kept.append(m.group(0)) or f"\0{len(kept) - 1}\0", text)
    text = _FROM.sub(_from_import, text)
    for old, new in MOVES.items():
        tails = "".join(f"(?!{re.escape(t)}\\b)" for t in _NEW_TAILS[old] if t)
        subs = [n.rpartition(".")[2] for n in MOVES.values() if n.startswith(f"fmhub.{old}.")]
        tails += "".join(f"(?! import {s}\\b)" for s in subs)
        text = re.sub(rf"(?<![\w./])fmhub\.{old}\b(?![\w-]){tails}", new, text)
        text = re.sub(rf"(?<![\w.])fmhub/{old}\.py\b", _path_of(new), text)
    return re.sub("\0(\\d+)\0", lambda m: kept[int(m.group(1))], text)


def main(paths: list[str]) -> None:
    for p in paths:
        with open(p, encoding="utf-8") as f:
            text = f.read()
        new = rewrite(text)
        if new != text:
            with open(p, "w", encoding="utf-8") as f:
                f.write(new)


if __name__ == "__main__":
    main(sys.argv[1:])
