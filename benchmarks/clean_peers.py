"""The peer side of benchmarks/clean_bench.py: the same four steps with datatrove, and running each side measured.

datatrove (``pip install datatrove``; 0.10 measured) runs its own pipeline
stages with `LocalPipelineExecutor`, each stage reading what the one before
wrote, as its documentation sets dedup up:

1. ``JsonlReader`` → ``LambdaFilter`` (at least 5 words, split on whitespace as
   fmhub's ``length`` counts them) → ``PIIFormatter`` (emails and IP
   addresses: datatrove has no phone, card or secret finder) → ``JsonlWriter``
   → ``ExactDedupSignature``;
2. ``ExactFindDedups``; 3. ``ExactDedupFilter`` → ``JsonlWriter`` → ``MinhashDedupSignature``;
4. ``MinhashDedupBuckets``; 5. ``MinhashDedupCluster``; 6. ``MinhashDedupFilter`` → ``JsonlWriter``.

MinHash parameters are fmhub's: word 3-grams, 20 buckets of 6 hashes (the
120 of 128 values fmhub's bands use). What differs: datatrove normalises the
text first (lower case, punctuation and digits folded) and splits it on
whitespace (its English tokenizer needs NLTK's punkt data, which is not
downloaded here; on this corpus of lower-case words both split the same),
hashes shingles with xxhash to 64 bits, and has no threshold: every pair
sharing a bucket is a duplicate, where fmhub checks the signatures agree on
at least ``threshold`` of their values. The input is split into one file per
worker beforehand (datatrove parallelises over files), outside the timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

try:
    from datatrove.utils.word_tokenizers import WordTokenizer
except ImportError:  # the bench skips datatrove, saying so
    WordTokenizer = object


class SplitTokenizer(WordTokenizer):
    """Words split on whitespace (datatrove has already lower-cased the text and taken punctuation out)."""

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def xxh64(data: str | bytes) -> int:
    """datatrove's own xxhash64, which hands xxhash a str: xxhash 4 refuses one (xxhash 3 encoded it as UTF-8)."""
    import xxhash

    return xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def long_enough(doc: Any) -> bool:
    return len(doc.text.split()) >= 5


def text_of(doc: Any) -> bytes:
    return doc.text.encode("utf-8")  # datatrove's xxhash takes bytes


def available() -> str | None:
    """None when datatrove can run here, else why not."""
    try:
        import datatrove  # noqa: F401
        import xxhash  # noqa: F401
    except ImportError as exc:
        return f"datatrove not measured: {exc.name} is not installed (pip install datatrove)"
    return None


def shard(src: Path, out: Path, parts: int) -> None:
    """``src`` split into ``parts`` files of consecutive lines, so earlier rows sit in lower-numbered files."""
    out.mkdir(parents=True, exist_ok=True)
    lines = src.read_bytes().splitlines(keepends=True)
    size = -(-len(lines) // parts)
    for k in range(parts):
        (out / f"part{k:03d}.jsonl").write_bytes(b"".join(lines[k * size:(k + 1) * size]))


def run_datatrove(work: Path, workers: int) -> dict:
    """The six stages on ``work/dt_in``; returns the ids each dedup stage removed (ids are input positions)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    import datatrove.utils.hashes.xxhash as dt_xxhash

    dt_xxhash.xxhash64 = xxh64  # looked up when each step is built; pickled to the workers by this module's name
    d = work / "dt"
    mh = MinhashConfig(n_grams=3, num_buckets=20, hashes_per_bucket=6, seed=1, hash_config=HashConfig(precision=64))
    ex = ExactDedupConfig(content_getter=text_of)
    tok = SplitTokenizer()

    def stage(pipeline: list, tasks: int, name: str) -> None:
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(tasks, workers), logging_dir=str(d / "logs" / name),
                              skip_completed=False).run()

    def reader(folder: Path):
        return JsonlReader(str(folder), text_key="text", id_key="id", glob_pattern="*.jsonl")

    stage([reader(work / "dt_in"), LambdaFilter(long_enough), PIIFormatter(), JsonlWriter(str(d / "s1"), compression=None),
           ExactDedupSignature(str(d / "ex_sigs"), config=ex)], workers, "s1")
    stage([ExactFindDedups(str(d / "ex_sigs"), str(d / "ex_dups"), config=ex)], 1, "s2")
    stage([reader(d / "s1"), ExactDedupFilter(str(d / "ex_dups"), config=ex), JsonlWriter(str(d / "s3"), compression=None),
           MinhashDedupSignature(str(d / "mh_sigs"), config=mh, language=tok)], workers, "s3")
    stage([MinhashDedupBuckets(str(d / "mh_sigs"), str(d / "mh_buckets"), config=mh)], mh.num_buckets, "s4")
    stage([MinhashDedupCluster(str(d / "mh_buckets"), str(d / "mh_remove"), config=mh)], 1, "s5")
    stage([reader(d / "s3"), MinhashDedupFilter(str(d / "mh_remove")), JsonlWriter(str(d / "out"), compression=None)], workers, "s6")
    ids = {name: _ids(d / name) for name in ("s1", "s3", "out")}
    return {"rows_out": len(ids["out"]), "exact_dropped": len(ids["s1"] - ids["s3"]),
            "near_dropped_positions": sorted(int(i) for i in ids["s3"] - ids["out"])}


def _ids(folder: Path) -> set[str]:
    out: set[str] = set()
    for f in folder.glob("*.jsonl"):
        with open(f, "rb") as fh:
            out.update(str(json.loads(line).get("id", 0)) for line in fh)  # its writer leaves out falsy fields: id 0
    return out


def peak_rss() -> int:
    """Bytes: this process's own peak RSS (``VmHWM``; ``ru_maxrss`` would also count the parent's memory at fork,
    which Linux carries across exec), or, where larger, that of the largest of its finished children (its workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/status") as f:
            own = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    return own


def cpu_seconds() -> dict:
    """CPU seconds (user + system) of this process and of its finished children: where the work ran."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_main": me.ru_utime + me.ru_stime, "cpu_workers": kids.ru_utime + kids.ru_stime}


def measured(cmd: list[str], cwd: str | None = None) -> tuple[dict, float, int]:
    """Run ``cmd`` (its last stdout line is JSON): that JSON, wall seconds, and the peak RSS summed over the
    process and its children (sampled every 0.2 s, bytes)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                root = psutil.Process(proc.pid)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(err.decode(errors="replace")[-4000:])
        raise SystemExit(f"{' '.join(cmd[:4])}... failed with exit code {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1]), wall, peak[0]
