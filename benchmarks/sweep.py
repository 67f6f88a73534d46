"""Pass-1 cost of a sparsity threshold sweep (issue 13 item 4): pass 1 as today
against pass 1 with ``--sparsity-eps 0.001,0.005,0.01,0.05,0.1`` on the same store.

python -m benchmarks.sweep [--filters 2M] [--repeat 3] [--engine auto]

One thread (synchronous scheduler, Blosc on one thread); the two variants alternate
and the minimum of the repeats is reported (wall and CPU time of this process), as
the machine may be shared. Both variants read and decode every chunk once.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from benchmarks import cached_synth, parse_count, time_variants

EPS = (0.001, 0.005, 0.01, 0.05, 0.1)


def main(argv=None) -> int:
    import numcodecs.blosc

    from filterdb_dask.convert.write import convert
    from filterdb_dask.engines import resolve_engine
    from filterdb_dask.pca import layer_stats
    from filterdb_dask.quality import sparsity_sweep
    from filterdb_dask.store import open_store

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filters", default="2M")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--engine", default="auto", choices=("auto", "numba", "numpy"))
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = p.parse_args(argv)
    numcodecs.blosc.set_nthreads(1)
    n = parse_count(args.filters)
    d = args.dir or tempfile.mkdtemp(prefix="fdb-sweep-")
    h5 = cached_synth(d, n)
    path = os.path.join(d, "store.zarr")
    if not os.path.exists(path):
        convert(h5, path, verbosity=0)
    store = open_store(path)
    engine = resolve_engine(args.engine)
    variants = {
        "pass1": lambda: (layer_stats(store, engine=engine),),
        "pass1+sweep5": lambda: (layer_stats(store, engine=engine),
                                 sparsity_sweep(store, EPS, engine=engine)),
    }
    times = time_variants(variants, args.repeat)
    wall, best, best_cpu = times["wall_s_all"], times["wall_s_min"], times["cpu_s_min"]
    print(json.dumps({
        "filters": n, "chunks": store.n_chunks, "layers": len(store.meta), "engine": engine,
        "eps": EPS, "repeat": args.repeat, "wall_s_min": best, "wall_s_all": wall,
        "cpu_s_min": best_cpu,
        "overhead_wall_pct": 100 * (best["pass1+sweep5"] / best["pass1"] - 1),
        "overhead_cpu_pct": 100 * (best_cpu["pass1+sweep5"] / best_cpu["pass1"] - 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
