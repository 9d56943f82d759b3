"""A reviewer's overrides of cleaning decisions: the file ``fmhub clean`` respects, and ``fmhub clean review`` writes.

The file is YAML (or JSON)::

    keep:                          # keep these rows whatever the steps decide (edits still apply)
      - row: 9f86d081884c7d65      #   by row hash, as reports show it: follows the row when others move
        reason: not a duplicate
      - position: 12               #   or by position (0-based; jsonl line 13): shifts when lines are added above
    drop:                          # drop these rows before any step runs
      - {row: 3a7bd3e2360a3d29, reason: spam}

A bare string is a row hash and a bare integer a position
(``keep: [9f86d081884c7d65, 12]``). The row hash is the first 16 hex digits
of the sha256 of the input row as canonical JSON (sorted keys), so it names
the row's content: identical rows share it, and an override by hash applies
to each of them. Prefer hashes; positions are for rows a report did not list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

from fmhub.base import boundedjson
from fmhub.base.atomic import atomic_write
from fmhub.base.boundedyaml import YamlLimits, load_file
from fmhub.base.errors import FmhubError

_HASH = re.compile(r"[0-9a-f]{16}")


class OverridesError(FmhubError):
    """An overrides file that cannot be read, or a review that names rows it cannot find."""


# a review's decisions: `- {row: HASH, reason: ...}` under keep/drop, 3 deep; 5 nodes an entry, 400,000 entries
OVERRIDES_LIMITS = YamlLimits(max_bytes=32 << 20, max_depth=8, max_nodes=2_000_000, max_value_chars=64 << 10,
                              finite=False, what="an overrides file")


def row_hash(row: Mapping[str, Any]) -> str:
    """The row's content hash as reports and override files write it (16 hex digits)."""
    canon = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class Overrides:
    """Parsed overrides: positions and row hashes to keep, and to drop, each with the reviewer's reason."""

    keep_positions: Mapping[int, str] = field(default_factory=dict)
    keep_hashes: Mapping[str, str] = field(default_factory=dict)
    drop_positions: Mapping[int, str] = field(default_factory=dict)
    drop_hashes: Mapping[str, str] = field(default_factory=dict)
    path: str | None = None

    def __len__(self) -> int:
        return len(self.keep_positions) + len(self.keep_hashes) + len(self.drop_positions) + len(self.drop_hashes)

    @property
    def by_hash(self) -> bool:
        return bool(self.keep_hashes or self.drop_hashes)

    def keys(self) -> list[tuple[str, str, Any]]:
        """Every entry as (list, kind, value): for reporting the ones that matched no row."""
        return ([("keep", "position", p) for p in sorted(self.keep_positions)] + [("keep", "row", h) for h in sorted(self.keep_hashes)]
                + [("drop", "position", p) for p in sorted(self.drop_positions)] + [("drop", "row", h) for h in sorted(self.drop_hashes)])


def load_overrides(path: str) -> Overrides:
    """Read and check an overrides file; `OverridesError` naming the entry on any problem."""
    try:  # a committed review may come from a clone: read and loaded within bounds, each problem one line
        data = load_file(path, OVERRIDES_LIMITS, OverridesError)
    except FileNotFoundError:
        raise OverridesError(f"overrides file {path} not found; write one with `fmhub clean review REPORT.json --keep ...`") from None
    except OSError as exc:
        raise OverridesError(f"cannot read overrides file {path}: {exc.strerror or type(exc).__name__}") from None
    data = data or {}
    if not isinstance(data, dict) or set(data) - {"keep", "drop"}:
        raise OverridesError(f"{path}: an overrides file is a mapping with 'keep' and/or 'drop' lists")
    parsed: dict[str, dict[Any, str]] = {}
    for section in ("keep", "drop"):
        entries = data.get(section) or []
        if not isinstance(entries, list):
            raise OverridesError(f"{path}: '{section}' must be a list of row hashes or positions")
        parsed[section] = {}
        for i, entry in enumerate(entries):
            key, reason = _entry(entry, f"{path}: {section}[{i}]")
            parsed[section][key] = reason
    both = set(parsed["keep"]) & set(parsed["drop"])
    if both:
        kind, value = sorted(both, key=str)[0]
        raise OverridesError(f"{path}: {kind} {value} is in both keep and drop; remove one")
    return Overrides(
        keep_positions={v: r for (k, v), r in parsed["keep"].items() if k == "position"},
        keep_hashes={v: r for (k, v), r in parsed["keep"].items() if k == "row"},
        drop_positions={v: r for (k, v), r in parsed["drop"].items() if k == "position"},
        drop_hashes={v: r for (k, v), r in parsed["drop"].items() if k == "row"},
        path=path,
    )


def _entry(entry: Any, where: str) -> tuple[tuple[str, Any], str]:
    reason = "reviewer"
    if isinstance(entry, dict):
        unknown = set(entry) - {"row", "position", "reason"}
        if unknown or ("row" in entry) == ("position" in entry):
            raise OverridesError(f"{where}: an entry is {{row: HASH}} or {{position: N}}, with an optional reason")
        reason = str(entry.get("reason") or reason)
        entry = entry.get("row", entry.get("position"))
    if isinstance(entry, bool):
        raise OverridesError(f"{where}: {entry!r} is neither a row hash nor a position")
    if isinstance(entry, int):
        if entry < 0:
            raise OverridesError(f"{where}: position {entry} is negative")
        return ("position", entry), reason
    if isinstance(entry, str) and _HASH.fullmatch(entry.strip().lower()):
        return ("row", entry.strip().lower()), reason
    raise OverridesError(f"{where}: {entry!r} is neither a row hash (16 hex digits, as reports show) nor a position")


def review(report_path: str, keep: Iterable[str], drop: Iterable[str], reason: str | None, out: str | None) -> tuple[str, int]:
    """Add a reviewer's decisions on a JSON report's rows to an overrides file; returns (its path, entries added).

    ``keep`` and ``drop`` hold positions or row hashes. A position the report
    lists is written as that row's hash (it survives edits to the input); a
    position it does not list is written as a position. The file defaults to
    the overrides file the report's run used.
    """
    report = _read_report(report_path)
    decided: dict[int, dict] = {}
    for d in report.get("decisions", []):
        decided.setdefault(d["position"], d)
    path = out or (report.get("overrides") or {}).get("path")
    if not path:
        raise OverridesError("the report's run used no overrides file; say where to write one with -o overrides.yaml")
    existing = load_overrides(path) if os.path.exists(path) else Overrides()
    entries: dict[str, dict[tuple[str, Any], str]] = {
        "keep": {**{("position", p): r for p, r in existing.keep_positions.items()}, **{("row", h): r for h, r in existing.keep_hashes.items()}},
        "drop": {**{("position", p): r for p, r in existing.drop_positions.items()}, **{("row", h): r for h, r in existing.drop_hashes.items()}},
    }
    added = 0
    for section, items in (("keep", keep), ("drop", drop)):
        other = "drop" if section == "keep" else "keep"
        for item in items:
            key = _resolve(item.strip(), decided, section, report_path)
            entries[other].pop(key, None)
            if key not in entries[section]:
                added += 1
            entries[section][key] = reason or "reviewer"
    _write(path, entries)
    return path, added


def _resolve(item: str, decided: Mapping[int, dict], section: str, report_path: str) -> tuple[str, Any]:
    if _HASH.fullmatch(item.lower()):
        return "row", item.lower()
    try:
        pos = int(item)
    except ValueError:
        raise OverridesError(f"{item!r} is neither a position nor a row hash (16 hex digits)") from None
    d = decided.get(pos)
    if d is None:
        if section == "keep":
            raise OverridesError(f"{report_path} records no decision on position {pos}: nothing to keep it from")
        return "position", pos
    if d.get("row") is None:
        raise OverridesError(f"position {pos} is malformed input ({d.get('reason')}); fix the file instead")
    return "row", d["row"]


def _write(path: str, entries: Mapping[str, Mapping[tuple[str, Any], str]]) -> None:
    data = {}
    for section in ("keep", "drop"):
        items = sorted(entries[section].items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
        if items:
            data[section] = [{kind: value, "reason": reason} for (kind, value), reason in items]
    header = "# fmhub clean overrides: decisions a reviewer made; `fmhub clean` respects them (see README: cleaning)\n"
    with atomic_write(path, "w") as f:
        f.write(header + (yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data else "{}\n"))


def _read_report(path: str) -> dict:
    try:  # rows quoted in a report nest as deep as the data does (`plugins.data_formats` allows 128); NaN is kept
        with open(path, "rb") as f:
            report = boundedjson.loads(f.read(), max_depth=128, allow_nan=True, max_int_digits=1000)
    except FileNotFoundError:
        raise OverridesError(f"report {path} not found; run `fmhub clean --report {path}` first") from None
    except (OSError, ValueError) as exc:
        raise OverridesError(f"cannot read {path} as a JSON report ({exc}); review works on --report *.json") from None
    if not isinstance(report, dict) or "fmhub_clean_report" not in report:
        raise OverridesError(f"{path} is not an fmhub clean report")
    return report
