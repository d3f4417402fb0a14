"""Operators benchmark: sufficient statistics + fit with Dask over Zarr stores vs plain NumPy on loaded arrays.

Two sizes of synthetic ViT-B-shaped stores (14x14 tokens x 768, float16; b = rotation of a + noise). Each path
runs in a fresh subprocess so its peak RSS is its own. The larger size needs more than the memory budget when
loaded (2 stores as float32), so only the out-of-core Dask path stays inside it.
Run:  .venv/bin/python benchmarks/operators.py [--small 256 --large 2048 --budget-mb 1024]
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.science import operator_fits
from pipeline.stages import operators
from storage import StoreLayout, create
from storage.precision import value_stats

GRID, DIM, SHARD = 14, 768, 64


def make_stores(work: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0].astype(np.float32)
    layout = StoreLayout(n, (GRID, GRID), DIM, 16, SHARD, "float16", "blosc_zstd_shuffle", store_pixels=False)
    attrs = {"encoder": {"name": "synthetic"}}
    a_store = create(work / f"a{n}.zarr", layout, {**attrs, "config_hash": f"a{n}"})
    b_store = create(work / f"b{n}.zarr", layout, {**attrs, "config_hash": f"b{n}"})
    for shard in range(layout.n_shards):
        rows = layout.shard_slice(shard)
        m = rows.stop - rows.start
        a = rng.normal(size=(m, GRID, GRID, DIM)).astype(np.float32)
        b = a @ rotation.T + 0.05 * rng.normal(size=a.shape).astype(np.float32)
        for store, feats in ((a_store, a), (b_store, b)):
            record = {"n_encoded": m, "failures": [], "stats": value_stats(feats[:1])}
            store.write_shard(shard, feats, None, np.arange(rows.start, rows.stop), np.ones(m, bool), record)
    a_store.finalize()
    b_store.finalize()
    return a_store.path, b_store.path


def child(path_a: str, path_b: str, n: int, mode: str) -> None:
    rows = np.arange(n)
    start = time.perf_counter()
    if mode == "dask":
        stats = operators.collect_stats(Path(path_a), Path(path_b), rows, SHARD)
    else:
        stats = operators.numpy_stats(Path(path_a), Path(path_b), rows)
    op, _ = operator_fits.fit(stats, "procrustes")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"seconds": seconds, "peak_rss_mb": peak, "residual": operator_fits.relative_residual(op, stats)}
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--small", type=int, default=256)
    p.add_argument("--large", type=int, default=2048)
    p.add_argument("--budget-mb", type=int, default=1024)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3])
        return
    work = Path(tempfile.mkdtemp(prefix="reconlab-ops-bench-"))
    atexit.register(shutil.rmtree, work, True)  # stores of up to a few GB: not left in /tmp
    print(
        f"# synthetic stores {GRID}x{GRID}x{DIM} float16, shards of {SHARD}; memory budget {args.budget_mb} MB"
    )
    print(
        "\n| images | pairs | in-memory float32 (2 stores) | path | seconds | peak RSS (MB) | within budget | residual |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (args.small, args.large):
        a, b = make_stores(work, n)
        loaded_mb = 2 * n * GRID * GRID * DIM * 4 / 2**20
        timings = {}
        for mode in ("numpy", "dask"):
            out = subprocess.run([sys.executable, __file__, "--child", str(a), str(b), str(n), mode],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            timings[mode] = r["seconds"]
            ok = "yes" if r["peak_rss_mb"] <= args.budget_mb else "no"
            print(f"| {n} | {n * GRID * GRID:,} | {loaded_mb:,.0f} MB | {mode} | {r['seconds']:.1f} | "
                  f"{r['peak_rss_mb']:,.0f} | {ok} | {r['residual']:.3f} |")  # fmt: skip
        print(f"| {n} | | | dask / numpy time | {timings['dask'] / timings['numpy']:.2f} | | | |")


if __name__ == "__main__":
    main()
