"""Each pass kernel alone, in one thread, on warm in-memory chunks.

    python -m benchmarks.kernels [--filters 4M] [--repeat 5] [--engine numba,numpy] [--kernel 5]

Synthetic filters from the project's generator (realistic layer sizes, dead and
zero layers) are held in memory as float32 chunks of ``CHUNK`` rows, cut at layer
boundaries as the store's planner would; the PCA, range, bin edges and ridge
groupings come from the data. Each kernel runs over all chunks, ``repeat`` times;
the minimum of the thread's CPU time counts (the least disturbed run; on a shared
machine wall time would measure the neighbours: it is recorded too). Numba
compiles before timing. BLAS is held to one thread.

The per-core limit line states what one core could do at best for each kernel:
pass 1 needs 9 peak-scale divides and 2 x 45 products + sums per filter (scaled
and unscaled scatter), pass 2 81 projection products and 2 bin lookups, pass 3 the
same projection and 9 bin increments; :data:`LIMITS` gives the figures and how
they were derived.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from benchmarks import parse_count

CHUNK = 1 << 20

#: per-core ceilings (filters/s) and the reasoning behind them; see module docstring
LIMITS = {
    "pass 1": (200e6, "memory read 36 B/filter at ~6 GB/s; 2 x 45 FMAs on 8-wide float64 "
                      "vectors ~12 cycles/filter at ~2.5 GHz"),
    "pass 2": (120e6, "81 projection FMAs ~11 cycles/filter vectorised, + 1 scattered "
                      "2-D increment"),
    "pass 3": (60e6, "9 scattered histogram increments per filter; a 1-D histogram "
                     "runs ~250-500 M values/s per core"),
}

TARGET_PER_THREAD = 30e6


def make_inputs(n: int, seed: int = 0, kernel: int = 3) -> dict:
    """In-memory chunks and every argument the three kernels take (KxK filters)."""
    from filterdb_dask import kernels as K
    from filterdb_dask.convert.synth import iter_filters, model_meta, plan_layers
    from filterdb_dask.groups import depth_decile_codes

    n_models = max(8, min(800, n // 500_000))
    layers = plan_layers(n, n_models, seed)
    models = model_meta(n_models, seed)
    x = np.concatenate(list(iter_filters(layers, models, seed, kernel))).astype(np.float32)
    sizes = np.array([lay.n for lay in layers])
    stops = np.cumsum(sizes)
    starts = stops - sizes
    task = models["Task"].astype("category").cat.codes.to_numpy()
    cat = models["Visual Category"].astype("category").cat.codes.to_numpy()
    mids = np.array([lay.model_id for lay in layers])
    dec = depth_decile_codes(np.array([lay.conv_depth_norm for lay in layers]))
    n_task, n_cat = int(task.max()) + 1, int(cat.max()) + 1
    groups = np.stack([task[mids], n_task + cat[mids], n_task + n_cat + dec], axis=1)
    n_groups = n_task + n_cat + 10
    chunks = []
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        sel = (stops > a) & (starts < b)
        bounds = np.stack([np.maximum(starts[sel], a) - a, np.minimum(stops[sel], b) - a], 1)
        chunks.append((x[a:b], bounds.astype(np.int64), groups[sel]))
    stats = np.concatenate([K.layer_stats_chunk(c, bd) for c, bd, _ in chunks])
    lay = K.stat_layout(x.shape[1])
    nn, mu, m2 = K.moments_combine(stats[:, lay.n], stats[:, lay.mean], stats[:, lay.m2])
    pca = K.pca_finalize(nn, mu, m2)
    c = K.project(K.scale_filters(x), pca["mean"], pca["components"])
    lo, hi = float(c.min()), float(c.max())
    return {"n": n, "kernel": kernel, "chunks": chunks, "mean": pca["mean"],
            "components": pca["components"],
            "edges": K.histogram_edges(70, lo, hi),
            "density_edges": np.linspace(-3.3, 3.3, 513), "n_groups": n_groups,
            "fine_per_bin": 4}


def _runners(kern, inp: dict) -> dict:
    from filterdb_dask import kernels as K

    mean, comps, chunks = inp["mean"], inp["components"], inp["chunks"]
    if hasattr(K, "fine_edges"):
        fedges = K.fine_edges(inp["edges"], inp["fine_per_bin"])
    else:  # before the fine/coarse layout
        fedges = K.histogram_edges(256, inp["edges"][0], inp["edges"][-1])

    def p1():
        for x, b, _ in chunks:
            kern.layer_stats_chunk(x, b)

    def p2():
        for x, b, _ in chunks:
            kern.range_density_chunk(x, b, mean, comps, inp["density_edges"])

    def p3():
        for x, b, g in chunks:
            kern.histogram_chunk(x, b, mean, comps, inp["edges"], g, inp["n_groups"], fedges)

    return {"pass 1": p1, "pass 2": p2, "pass 3": p3}


def kernel_speeds(n: int = 4_000_000, *, repeat: int = 5, engines=("numba",),
                  inputs: dict | None = None, kernel: int = 3) -> dict:
    """Single-thread filters/s of each pass kernel, min of ``repeat`` runs.

    Returns
    -------
    dict engine -> pass -> {"best_cpu_s", "filters_per_s" (from CPU time),
    "filters_per_s_wall", ...}, plus "limits" and "target_per_thread".
    """
    from threadpoolctl import threadpool_limits

    from filterdb_dask.engines import get_kernels

    inp = inputs or make_inputs(n, kernel=kernel)
    out = {"n": inp["n"], "kernel": inp.get("kernel", 3), "chunk_rows": CHUNK, "repeat": repeat,
           "limits": {k: {"filters_per_s": v, "why": why} for k, (v, why) in LIMITS.items()},
           "target_per_thread": TARGET_PER_THREAD, "engines": list(engines)}
    with threadpool_limits(1):
        for eng in engines:
            runs = _runners(get_kernels(eng), inp)
            res = {}
            for name, f in runs.items():
                f()  # compile / warm caches
                times, cpu = [], []
                for _ in range(repeat):
                    t, c = time.perf_counter(), time.thread_time()
                    f()
                    cpu.append(time.thread_time() - c)
                    times.append(time.perf_counter() - t)
                best = min(cpu)
                res[name] = {"best_cpu_s": best, "cpu_times": cpu, "wall_times": times,
                             "best_wall_s": min(times),
                             "filters_per_s": inp["n"] / best,
                             "filters_per_s_wall": inp["n"] / min(times),
                             "meets_target": inp["n"] / best >= TARGET_PER_THREAD}
            out[eng] = res
    return out


def markdown(res: dict) -> str:
    engines = res["engines"]
    k = res.get("kernel", 3)
    lines = [f"Kernels alone, one thread, {res['n']:,} float32 {k}x{k} filters in chunks of "
             f"{res['chunk_rows']:,}, min of {res['repeat']} (thread CPU time):", "",
             "| kernel | " + " | ".join(f"{e} M filters/s" for e in engines)
             + " | per-core limit M/s | target M/s |",
             "|---|" + "---|" * (len(engines) + 2)]
    for k in ("pass 1", "pass 2", "pass 3"):
        cells = " | ".join(f"{res[e][k]['filters_per_s'] / 1e6:.1f}" for e in engines)
        lines.append(f"| {k} | {cells} | {res['limits'][k]['filters_per_s'] / 1e6:.0f} | "
                     f"{res['target_per_thread'] / 1e6:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filters", type=parse_count, default=4_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--engine", default="numba", help="comma-separated: numba,numpy")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--kernel", type=int, default=3,
                   help="KxK synthetic filters (default 3; the limits are for 3x3)")
    args = p.parse_args(argv)
    res = kernel_speeds(args.filters, repeat=args.repeat, kernel=args.kernel,
                        engines=[e.strip() for e in args.engine.split(",") if e.strip()])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=float)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
