"""scale_bench's figures: medians over repeats, the markdown table, the RSS goal and the acceptance checks."""

from __future__ import annotations

import statistics
from typing import Any

MiB = 1 << 20
RSS_HEADROOM = 256 * MiB  # the goal: a filter's peak RSS <= largest tensor + 256 MiB

UPDATE_LABEL = {
    "sparse": "1 % of elements",
    "finetune": "full fine-tune",
    "lora": "LoRA r=16 on q,v",
}


# --------------------------------------------------------------------------- repeats


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(runs: list[Any]) -> tuple[Any, Any]:
    """(medians, spreads) of runs of the same shape: numbers -> median and (min, max); flags -> all(); text -> the last."""
    first = runs[-1]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in runs)]
        pairs = {k: aggregate([r[k] for r in runs]) for k in keys}
        return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}
    if all(_is_number(r) for r in runs):
        return statistics.median(runs), (min(runs), max(runs))
    if all(isinstance(r, bool) for r in runs):
        return all(runs), None
    return first, None


def dig(tree: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------- cells


def _fmt(kind: str, v: Any, raw: int) -> str:
    if v is None:
        return "—"
    if kind == "s":
        return f"{v:.2f} s"
    if kind == "frac":
        return f"{v / raw:.3f}"
    if kind == "ratio":
        return f"{v:.3f}"
    if kind == "mib":
        return f"{v / MiB:.0f} MiB"
    if kind == "bool":
        return "yes" if v else "**NO**"
    if kind == "n0":
        return f"{v:.0f}"
    if kind == "flag":
        return "yes" if v else "no"
    return str(v)


def _cell(kind: str, summary: dict, spread: dict, path: tuple | None, raw: int) -> str:
    if path is None:
        return ""
    v = dig(summary, path)
    text = _fmt(kind, v, raw)
    lo_hi = dig(spread, path)
    if isinstance(lo_hi, tuple):
        lo, hi = (_fmt(kind, x, raw) for x in lo_hi)
        text += f" ({lo}–{hi})" if lo != hi else ""
    return text


def _times(kind: str, a: Any, b: Any) -> str:
    r = ratio(b, a) if kind in ("s", "frac", "mib") and _is_number(a) and _is_number(b) else None
    return "—" if r is None else f"{r:.2f}×"


# --------------------------------------------------------------------------- the table


def rows(versions: list[str], steps: set[str]) -> list[tuple]:
    """(label, kind, path in a git tool's results, path in cp's, path in zipnn's)."""
    out = [("add + commit v0", "s", ("add", "v0", "seconds"), ("first_add", "seconds"), None)]
    out += [(f"re-add + commit {v} ({UPDATE_LABEL[v]})", "s", ("add", v, "seconds"), None, None) for v in versions[1:]]
    if "checkout" in steps:
        out += [("checkout of v0 (files removed)", "s", ("checkout", "seconds"), ("checkout", "seconds"), None),
                ("checkout of v0 byte-identical", "bool", ("checkout", "byte_identical"), None, None)]
    if "verify" in steps:
        out += [(f"checkout of {v} byte-identical", "bool", ("verify", v), None, None) for v in versions[1:]]
    if "diff" in steps and "sparse" in versions:
        out += [("git diff v0 sparse", "s", ("diff", "seconds"), None, None), ("git diff v0 sparse: lines", "n", ("diff", "lines"), None, None)]
    if "merge" in steps:
        out += [("fmhub merge sparse finetune --base v0 -s ties", "s", ("merge", "seconds"), None, None),
                ("fmhub merge: peak RSS", "mib", ("merge", "peak_rss_bytes"), None, None),
                ("fmhub merge: output loads", "bool", ("merge", "loads"), None, None)]
    if "tiny" in steps:
        out += [("git add of a tiny checkpoint", "s", ("tiny_add", "seconds"), None, None)]
    if "push" in steps:
        out += [(f"push {ref}: bytes uploaded / checkpoint", "frac", ("push", "per_ref", ref, "uploaded_bytes"), None, None)
                for ref in ("main", *versions[1:])]
        out += [("push, all versions: bytes uploaded / checkpoint", "frac", ("push", "uploaded_bytes"), None, None),
                ("push, all versions: request bytes / checkpoint", "frac", ("push", "request_bytes"), None, None),
                ("push, all versions", "s", ("push", "seconds"), None, None),
                ("git clone (checks out v0)", "s", ("clone", "seconds"), None, None),
                ("git clone byte-identical", "bool", ("clone", "byte_identical"), None, None)]
    for v in versions:
        zip_path = ("v0", "full", "ratio") if v == "v0" else (v, "xor_vs_v0", "ratio")
        out += [(f"stored {v}: .git growth / checkpoint", "frac", ("stored", v, "git_bytes"), None, None),
                (f"stored {v}: LFS store growth / checkpoint", "frac", ("stored", v, "lfs_bytes"), None, zip_path)]
    out += [("filter peak RSS, adds and checkout", "mib", ("filter_peak_rss_bytes",), None, None)]
    return out


def zipnn_rows(versions: list[str]) -> list[tuple]:
    out = []
    for v in versions:
        for kind in ("full", "xor_vs_v0") if v != "v0" else ("full",):
            what = "whole tensors" if kind == "full" else "XOR with v0"
            out.append((f"{v}, {what}", (v, kind)))
    return out


def render(summary: dict, spread: dict, meta: dict) -> str:
    raw, tools = meta["checkpoint"]["payload_bytes"], meta["tools"]
    git_tools = [t for t in ("git-lfs", "fmhub") if t in tools]
    head = ["step", *git_tools, *(["fmhub / git-lfs"] if len(git_tools) == 2 else []), *[t for t in ("cp", "zipnn") if t in tools]]
    lines = [_title(meta), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, kind, path, cp_path, zip_path in rows(meta["versions"], set(meta["steps"])):
        cells = [_cell(kind, summary.get(t, {}), spread.get(t, {}), path, raw) for t in git_tools]
        if len(git_tools) == 2:
            cells.append(_times(kind, dig(summary.get("git-lfs"), path), dig(summary.get("fmhub"), path)))
        if "cp" in tools:
            cells.append(_cell(kind, summary["cp"], spread["cp"], cp_path, raw))
        if "zipnn" in tools:
            cells.append(_cell("ratio", summary["zipnn"], spread["zipnn"], zip_path, raw))
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", *_rss_goal(summary, meta)]
    if "zipnn" in tools:
        lines.append("- zipnn column: compressed / raw, of whole tensors for v0 and of the XOR with v0 for the updates.")
        lines += ["", *_zipnn_table(summary["zipnn"], spread["zipnn"], meta["versions"])]
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _title(meta: dict) -> str:
    ck, shape = meta["checkpoint"], meta["shape"]
    changed = ", ".join(f"{v} {w['changed_elements'] / w['elements']:.1%}" for v, w in meta["written"].items() if v != "v0")
    return (f"### {_size(ck['payload_bytes'])} bf16 Llama-shaped checkpoint ({shape['layers']} layers, hidden {shape['hidden']}, "
            f"intermediate {shape['intermediate']}, vocab {shape['vocab']}; {ck['tensors']} tensors in {ck['shards']} shard(s), "
            f"largest {_size(ck['largest_tensor_bytes'])}); {meta['repeat']} run(s), medians (min–max); "
            f"fmhub config: {meta['fmhub_config'] or 'defaults'}{_load(meta)}\n\nElements changed from v0: {changed}.")


def _load(meta: dict) -> str:
    n = meta.get("load", 0)
    return f"; under load: {n} other process(es) spinning on a core each" if n else ""


def rss_goal(meta: dict) -> int:
    return meta["checkpoint"]["largest_tensor_bytes"] + RSS_HEADROOM


def _rss_goal(summary: dict, meta: dict) -> list[str]:
    goal = rss_goal(meta)
    out = []
    for tool in ("git-lfs", "fmhub"):
        rss = dig(summary, (tool, "filter_peak_rss_bytes"))
        if rss is not None:
            verdict = "PASS" if rss <= goal else "MISS"
            out.append(f"- filter peak RSS, {tool}: {rss / MiB:.0f} MiB against the goal ≤ largest tensor + 256 MiB = {goal / MiB:.0f} MiB: {verdict}")
    return out


def _zipnn_table(summary: dict, spread: dict, versions: list[str]) -> list[str]:
    lines = ["| zipnn (alone) | ratio | encode MB/s | decode MB/s | round trip bit-exact | compress modified its input |", "|---|---|---|---|---|---|"]
    for label, path in zipnn_rows(versions):
        cells = [_cell(k, summary, spread, path + (key,), 1) for k, key in
                 (("ratio", "ratio"), ("n0", "encode_mb_s"), ("n0", "decode_mb_s"), ("bool", "bit_exact"), ("flag", "compress_modified_its_input"))]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


# --------------------------------------------------------------------------- acceptance

ACCEPTANCE = (
    # id, what, target, limit
    ("sparse_stored", "1 %-of-elements update stored (.git growth / full copy)", "≤ 0.04", 0.04),
    ("finetune_stored", "bf16 full fine-tune stored (.git growth / full copy)", "≤ 0.50", 0.50),
    ("finetune_readd", "full fine-tune re-add + commit, fmhub / git-lfs", "≤ 1.5×", 1.5),
    ("checkout", "checkout of v0, fmhub / git-lfs", "≤ 1.2×", 1.2),
    ("tiny_add", "git add of a tiny checkpoint, fmhub / git-lfs", "≤ 3×", 3.0),
)


def _measured(check: str, fm: dict, lfs: dict, raw: int) -> float | None:
    if check.endswith("_stored"):
        v = dig(fm, ("stored", check.split("_")[0], "git_bytes"))
        return None if v is None else v / raw
    path = {"finetune_readd": ("add", "finetune", "seconds"), "checkout": ("checkout", "seconds"), "tiny_add": ("tiny_add", "seconds")}[check]
    return ratio(dig(fm, path), dig(lfs, path))


def _all_identical(res: dict, versions: list[str]) -> bool:
    return bool(dig(res, ("checkout", "byte_identical"))) and all(dig(res, ("verify", v)) for v in versions[1:])


def acceptance(summary: dict, meta: dict) -> list[dict]:
    fm, lfs, raw = summary["fmhub"], summary["git-lfs"], meta["checkpoint"]["payload_bytes"]
    checks = []
    for cid, what, target, limit in ACCEPTANCE:
        v = _measured(cid, fm, lfs, raw)
        checks.append({"id": cid, "check": what, "target": target, "value": v, "pass": v is not None and v <= limit})
    same = {t: _all_identical(summary[t], meta["versions"]) for t in ("fmhub", "git-lfs")}
    checks.append({"id": "identical", "check": f"every version ({', '.join(meta['versions'])}) checks out byte-identical",
                   "target": "yes", "value": same, "pass": same["fmhub"]})
    return checks


def render_acceptance(checks: list[dict], meta: dict) -> str:
    lines = [f"### Acceptance: {meta['checkpoint']['payload_bytes'] / MiB:.1f} MiB bf16, fmhub {meta['fmhub_config'] or 'defaults'}, "
             f"git-lfs in the same run{_load(meta)}", "", "| check | target | measured | result |", "|---|---|---|---|"]
    for c in checks:
        v = c["value"]
        shown = ", ".join(f"{t} {'yes' if ok else 'NO'}" for t, ok in v.items()) if isinstance(v, dict) else _fmt("ratio", v, 1)
        shown += "×" if "×" in c["target"] and v is not None else ""
        lines.append(f"| {c['check']} | {c['target']} | {shown} | {'PASS' if c['pass'] else 'FAIL'} |")
    return "\n".join(lines)
