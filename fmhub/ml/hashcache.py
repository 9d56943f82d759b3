"""sha256 of big files, remembered by their stat: identifying a 13.5 GB model must not read 13.5 GB each time.

`sha256` keys each answer by the file's real path and ``(size, mtime_ns,
inode, ctime_ns)`` and keeps it in ``<git dir>/fmhub/sha256-cache.json``. An
entry is used only when the key matches exactly, and only if its hash began
more than `RACY_NS` after the file last changed: git's racy-clean rule (on a
filesystem with coarse timestamps, a write in the same tick as the hash
leaves the stat unchanged, so such an entry is hashed again). Rewriting bytes
and restoring the mtime does not fool it: the ctime cannot be set back.

The file is an optimisation, never a source of truth: one that cannot be read,
is too big or is not what this module writes is ignored (and replaced); it is
written atomically (temp, fsync, rename), and holds at most `MAX_ENTRIES`
entries, the most recently hashed kept. Two processes may race: the last
rename wins and the other's entries are hashed again next time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable, Optional

from fmhub.base import boundedjson
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.core.store import file_sha256

VERSION = 1
NAME = "sha256-cache.json"
MAX_ENTRIES = 4096
MAX_BYTES = 4 << 20  # 4096 entries of a path, a stat and a hash fit with room to spare
RACY_NS = 2_000_000_000  # git's rule, widened: filesystems with 1 s (or 2 s, FAT) timestamps


def _now_ns() -> int:
    return time.time_ns()


def _key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _load(path: str) -> dict[str, list]:
    """The cache's entries ``{realpath: [size, mtime_ns, ino, ctime_ns, sha256, hashed_ns]}``; {} for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        doc = boundedjson.loads(data) if len(data) <= MAX_BYTES else None  # bounded: a deep nest is a ValueError
    except (OSError, ValueError):
        return {}
    entries = doc.get("entries") if isinstance(doc, dict) and doc.get("v") == VERSION else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and _well_formed(v)}


def _well_formed(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 6 and all(type(x) is int for x in v[:4] + v[5:])
            and isinstance(v[4], str) and len(v[4]) == 64)


def _fresh(entry: list, key: list[int]) -> Optional[str]:
    """The entry's sha256 when its stat key is ``key`` and it was hashed well after the file last changed."""
    if entry[:4] != key or entry[5] - max(key[1], key[3]) <= RACY_NS:
        return None
    return entry[4]


def sha256(paths: Iterable[str], cache_dir: Optional[str]) -> dict[str, str]:
    """``{path: sha256}`` of each file; unchanged files answered from the cache under ``cache_dir`` (None: no cache).

    :raises FmhubError: a file that cannot be read (naming it).
    """
    cache_file = os.path.join(cache_dir, NAME) if cache_dir else None
    entries = _load(cache_file) if cache_file else {}
    out: dict[str, str] = {}
    changed = False
    for path in paths:
        try:
            out[path], added = lookup(entries, path)
        except OSError as exc:  # a dangling link (a half-downloaded Hub snapshot), a file removed under us
            raise FmhubError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        changed = changed or added
    if changed and cache_file:
        _save(cache_file, entries)
    return out


def lookup(entries: dict, path: str) -> tuple[str, bool]:
    """The sha256 of ``path`` from ``entries`` (a cache's ``{realpath: entry}``, any other value ignored) when its
    entry is fresh, else read from the file and recorded there; and whether ``entries`` changed.

    :raises OSError: the file cannot be stat'ed or read.
    """
    real = os.path.realpath(path)
    # the time before the file is looked at: a write after it gives the file a later mtime and ctime, unless the
    # filesystem's tick is coarse and the file changed within a tick of it, which `_fresh` counts as racy
    started = _now_ns()
    key = _key(os.stat(real))
    entry = entries.get(real)
    hit = _fresh(entry, key) if _well_formed(entry) else None
    if hit is not None:
        return hit, False
    hit = file_sha256(real)
    if _key(os.stat(real)) != key:  # written to while it was read, as far as the stat tells: not remembered
        return hit, False
    entries[real] = [*key, hit, started]
    return hit, True


def _save(path: str, entries: dict[str, list]) -> None:
    """Write the newest `MAX_ENTRIES` entries atomically; a cache that cannot be written is only slower next time."""
    kept = dict(sorted(entries.items(), key=lambda kv: kv[1][5])[-MAX_ENTRIES:])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump({"v": VERSION, "entries": kept}, f, separators=(",", ":"))
    except OSError:
        pass
