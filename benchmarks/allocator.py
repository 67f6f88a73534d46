"""The worker allocator settings, A/B: the whole analysis with the package's
``local-cluster.pre-spawn-environ`` against the same without one variable.

python -m benchmarks.allocator [--filters 200M] [--dir D] [--without MALLOC_ARENA_MAX]
                               [--runs 2] [--rounds 3] [--scheduler cluster|threads]

Each run is a fresh cluster (``cluster``: the default local one, one worker process per
core) or a fresh process (``threads``: dask's threaded scheduler, the settings applied by
``tune_allocator`` there); the two variants alternate, ``--runs`` times each. A run
computes the analysis ``--rounds`` times; its first round warms the workers (numba,
their heap) and the median of the others is the run's figure. Printed as JSON with every
round's wall time and, on the cluster, the workers' user and system CPU seconds. The
store (``D/synth-N.zarr``, as ``python -m benchmarks`` leaves it) is converted once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import cached_store, parse_count


def _rusage():
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _cluster_run(path: str, env: dict, rounds: int) -> list[dict]:
    import dask
    from distributed import Client

    from filterdb_dask.analysis import analyze
    from filterdb_dask.cluster import ExecutionOptions, local_cluster
    from filterdb_dask.store import open_store

    store = open_store(path)
    out = []
    with dask.config.set({"filterdb_dask.local-cluster.pre-spawn-environ": env}):
        with local_cluster(ExecutionOptions()) as cluster, Client(cluster) as client:
            for _ in range(rounds):
                before = client.run(_rusage)
                t = time.perf_counter()
                analyze(store, verbosity=0)
                wall = time.perf_counter() - t
                after = client.run(_rusage)
                out.append({"wall_s": wall,
                            "workers_user_s": sum(after[w][0] - before[w][0] for w in after),
                            "workers_sys_s": sum(after[w][1] - before[w][1] for w in after)})
    return out


def _threads_run(path: str, env: dict, rounds: int) -> list[dict]:
    import dask

    from filterdb_dask.analysis import analyze
    from filterdb_dask.cluster import tune_allocator
    from filterdb_dask.store import open_store

    with dask.config.set({"filterdb_dask.local-cluster.pre-spawn-environ": env}):
        tune_allocator()
    store = open_store(path)
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        with dask.config.set(scheduler="threads"):
            analyze(store, verbosity=0)
        out.append({"wall_s": time.perf_counter() - t})
    return out


def _fresh_run(path: str, scheduler: str, env: dict, rounds: int) -> list[dict]:
    """One run in a fresh process without MALLOC_ variables of its own: mallopt is set
    once per process, and a nanny copies its pre-spawn environment into its parent's
    ``os.environ``, where the next cluster's workers would inherit it."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--child", path,
                          "--child-env", json.dumps(env), "--rounds", str(rounds),
                          "--scheduler", scheduler],
                         env=child_env, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"benchmarks.allocator: a run failed (exit {res.returncode}): {last}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from filterdb_dask import config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filters", default="200M")
    p.add_argument("--dir", default="bench/data", help="where the synthetic data is cached")
    p.add_argument("--without", default="MALLOC_ARENA_MAX")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scheduler", default="cluster", choices=("cluster", "threads"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-env", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 2 or args.runs < 1:
        p.error("--rounds must be at least 2 (the first warms up), --runs at least 1")
    if args.child:
        run = _cluster_run if args.scheduler == "cluster" else _threads_run
        print(json.dumps(run(args.child, json.loads(args.child_env), args.rounds)))
        return 0
    n = parse_count(args.filters)
    path = cached_store(args.dir, n)
    full = dict(config.get("local-cluster.pre-spawn-environ") or {})
    if args.without not in full:
        p.error(f"{args.without} is not in local-cluster.pre-spawn-environ ({sorted(full)})")
    variants = {"with": full, "without": {k: v for k, v in full.items() if k != args.without}}
    runs = {k: [] for k in variants}
    for _ in range(args.runs):
        for name, env in variants.items():
            rounds = _fresh_run(path, args.scheduler, env, args.rounds)
            runs[name].append(rounds)
            print(f"{name} {args.without}: " + " ".join(f"{r['wall_s']:.2f}" for r in rounds)
                  + " s", file=sys.stderr, flush=True)
    print(json.dumps({
        "filters": n, "scheduler": args.scheduler, "variable": args.without,
        "median_s_per_run": {k: [statistics.median(r["wall_s"] for r in rounds[1:])
                                 for rounds in v] for k, v in runs.items()},
        "runs": runs,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
