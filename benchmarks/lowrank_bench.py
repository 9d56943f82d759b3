#!/usr/bin/env python3
"""Low-rank deltas: what git stores for a LoRA merged into its base, vs a full copy (what git-lfs stores).

    python benchmarks/lowrank_bench.py                   # 2048 x 2048 float32, r = 16 (~30 s on 2 CPU cores)
    python benchmarks/lowrank_bench.py --size 4096 --rank 16 --json out.json

Nothing is downloaded. A random base weight W (size × size) and a random
rank-r LoRA update (B: size × r, A: r × size, scaling alpha/r = 2) are
merged three ways, and each merged weight is encoded against W by the delta
codecs the clean filter would use:

* **peft-style**: ``(W + scaling * (B @ A))`` in float32, as ``merge_and_unload``
  does; stored exactly (``lowrank`` factors plus a patch of the elements the
  rebuild does not reproduce);
* **fmhub merge**: ``fmhub adapter merge``'s definition (float64, one rounding:
  `fmhub.core.lowrank.from_factors`); stored as the adapter's factors, no patch;
* **peft-style within 1e-6**: the lossy link ``fmhub.lowrank.tolerance 1e-6`` allows.

Each row gives the delta's size as a fraction of the tensor (a full copy, the
baseline, is 1.0), what ``sparse`` and ``xor-zlib`` would have stored, encode
and decode times, and the decode time divided by a plain copy of the tensor's
bytes measured in the same run. Decoding is checked bit-exact (or within the
tolerance).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from fmhub.core.lowrank import LowRank, from_factors
    from fmhub_plugins.delta_codecs import Sparse, XorZlib

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    n, r = args.size, args.rank
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=g) * 0.02
    b, a = torch.randn(n, r, generator=g) * 0.01, torch.randn(r, n, generator=g) * 0.01
    scaling = 2.0
    base = w.numpy().tobytes()
    t = time.perf_counter()
    copy = bytearray(base)
    copy_s = time.perf_counter() - t
    del copy
    peft = (w + scaling * (b @ a)).numpy().tobytes()
    fmhub_new, prepared = from_factors(base, "F32", (scaling * b.double()).numpy(), a.double().numpy())
    codec = LowRank()
    rows = []

    def row(name: str, new: bytes, encode, tolerance: float = 0.0) -> None:
        t0 = time.perf_counter()
        delta, max_err = encode()
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = codec.decode(base, delta, "F32")
        dec = time.perf_counter() - t0
        if tolerance:
            err = float(np.abs(np.frombuffer(bytes(out), "<f4").astype(np.float64) - np.frombuffer(new, "<f4")).max())
            assert err <= tolerance, err
        else:
            assert bytes(out) == new, "not bit-exact"
        others = {c.name: c.encode(base, new, "F32") for c in (Sparse(), XorZlib())}
        rows.append({
            "merge": name, "stored/full": len(delta) / len(new), "max_err": max_err,
            "sparse/full": len(others["sparse"]) / len(new) if others["sparse"] else 1.0,
            "xor-zlib/full": len(others["xor-zlib"]) / len(new), "encode_s": enc, "decode_s": dec, "decode/copy": dec / copy_s,
        })

    row("peft-style", peft, lambda: (codec.encode(base, peft, "F32", (n, n)), 0.0))
    row("fmhub merge", fmhub_new, lambda: (prepared, 0.0))
    row("peft-style within 1e-6", peft, lambda: codec.encode_within(base, peft, "F32", (n, n), 1e-6), tolerance=1e-6)

    print(f"{n} x {n} float32 ({len(base) / 2**20:.0f} MiB), LoRA r = {r}; baseline: a full copy = 1.000 (git-lfs stores one per version)")
    head = f"{'merge':<24} {'stored/full':>11} {'sparse':>7} {'xor-zlib':>8} {'max err':>9} {'encode s':>9} {'decode s':>9} {'decode/copy':>11}"
    print(head)
    for x in rows:
        print(f"{x['merge']:<24} {x['stored/full']:>11.4f} {x['sparse/full']:>7.3f} {x['xor-zlib/full']:>8.3f} {x['max_err']:>9.2g} "
              f"{x['encode_s']:>9.2f} {x['decode_s']:>9.3f} {x['decode/copy']:>11.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": n, "rank": r, "copy_s": copy_s, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
