#!/usr/bin/env python3
"""Peak memory of `git clone` from a hostile origin, attack by attack, against an honest origin's, as a ratio.

    python benchmarks/hostile_bench.py              # every attack in tests/git/test_hostile_origin.py, 3 repeats
    python benchmarks/hostile_bench.py --repeat 1

Each attack is the commit tests/git/test_hostile_origin.py builds (a manifest whose
sizes, shapes or digits lie, a zlib-bomb delta, a sparse patch out of range, a
nested header, ...), its objects on the test LFS server (tests/helpers/lfs_server.py),
cloned with real git and fmhub's filter installed globally. The baseline is the
same construction with honest sizes (a 16-byte tensor), cloned in the same run.
Printed per attack: the clone's exit status, the peak RSS of git and its filter
(max over repeats, with the spread), the ratio to the baseline, and the one
error line. Done when every attack fails with one line under 1 GB (issue 21);
the figure to watch is the ratio: the defences refuse before allocating what the
attack declares, so a hostile clone costs about what an honest one does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests: tests.git.test_hostile_origin, tests.helpers.lfs_server


def isolated_git() -> None:
    home = Path(tempfile.mkdtemp(prefix="fmhub-bench-home-"))
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n[user]\n\tname = bench\n\temail = bench@fmhub.invalid\n")
    os.environ.update(HOME=str(home), GIT_CONFIG_GLOBAL=str(home / ".gitconfig"), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")


def clone_once(text: bytes, objects: list[bytes]) -> tuple[int, int, str]:
    """(exit status, peak RSS in MB, first ``fmhub:`` line) of one clone of an origin committing ``text``."""
    from tests.git import test_hostile_origin as t
    from tests.helpers.lfs_server import running_lfs_server

    tmp = Path(tempfile.mkdtemp(prefix="fmhub-hostile-"))
    with running_lfs_server(tmp / "lfs") as server:
        for data in objects:
            server.put(data)
        bare = t.push_hostile(tmp, text, server)
        proc, rss = t.clone_measured(tmp, bare, server.url)
    lines = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.startswith("fmhub:")]
    return proc.returncode, rss, lines[0] if lines else ""


def honest() -> tuple[bytes, list[bytes]]:
    from tests.git import test_hostile_origin as t

    h = t.st_header([("a", "F32", [4], 16)])
    return t.manifest(h, [f'"a" F32 [4] 16 sha256:{t.sha(t.PAYLOAD)}']), [h, t.PAYLOAD]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    isolated_git()
    from tests.git import test_hostile_origin as t

    base = [clone_once(*honest())[1] for _ in range(args.repeat)]
    base_mb = statistics.median(base)
    print(f"{'honest origin (baseline)':34s} rc=0   peak RSS {max(base):4d} MB (spread {max(base) - min(base)} MB)  ratio 1.00")
    for name, make in t.ATTACKS.items():
        text, objects, _ = make()
        runs = [clone_once(text, objects) for _ in range(args.repeat)]
        rss = [r[1] for r in runs]
        rc, line = runs[0][0], runs[0][2]
        print(f"{name:34s} rc={rc:<3d} peak RSS {max(rss):4d} MB (spread {max(rss) - min(rss)} MB)  ratio {max(rss) / base_mb:.2f}  "
              f"{line[:110]}")


if __name__ == "__main__":
    main()
