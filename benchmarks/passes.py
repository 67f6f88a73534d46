"""Where each pass's time goes on the default local cluster, from Dask's task stream.

python -m benchmarks.passes [--filters 20M] [--dir D] [--rounds 3]

For every pass of each analysis (after one that warms the workers), and for every
worker: the filters its chunk tasks read, the seconds in tasks, the seconds between the
pass's start and its first task, between its tasks, and between its last task and the
pass's end (the wait for the slowest worker and for the results). Printed as JSON; a
line per pass on stderr. The store (``D/synth-N.zarr``, as ``python -m benchmarks``
leaves it) is converted once.

A pass's chunk tasks are the group of tasks named ``(name, i, ...)`` for every chunk
``i`` that took the most time (a pass also runs small tasks per chunk: picking a
block out of a task's outputs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks import cached_store, parse_count


def _chunk_group(events: list[dict], n: int) -> str | None:
    """The key name of the pass's chunk tasks: one task for each of the n chunks, the
    most compute time of such groups."""
    groups: dict[str, dict[int, float]] = {}
    for e in events:
        k = e["key"]
        if isinstance(k, tuple) and len(k) >= 2 and isinstance(k[1], int):
            times = groups.setdefault(str(k[0]), {})
            times[k[1]] = times.get(k[1], 0.0) + e["compute_s"]
    full = {g: sum(v.values()) for g, v in groups.items() if sorted(v) == list(range(n))}
    return max(full, key=full.get) if full else None


def pass_breakdown(stream: list[dict], start: float, end: float, rows) -> dict:
    """One pass from ``client.get_task_stream`` records (``start``/``end``: the pass's
    wall-clock bounds): per worker, its chunk tasks' rows, tasks, busy seconds, the
    seconds before its first task, between its tasks and after its last one."""
    events = []
    for rec in stream:
        spans = [s for s in rec.get("startstops", ()) if s["action"] == "compute"]
        for s in spans:
            events.append({"key": rec["key"], "worker": rec["worker"], "start": s["start"],
                           "stop": s["stop"], "compute_s": s["stop"] - s["start"]})
    chunks = _chunk_group(events, len(rows))
    workers: dict[str, dict] = {}
    for w in sorted({e["worker"] for e in events}):
        mine = sorted((e for e in events if e["worker"] == w), key=lambda e: e["start"])
        gaps = sum(max(0.0, b["start"] - a["stop"]) for a, b in zip(mine[:-1], mine[1:],
                                                                    strict=True))
        read = [e["key"][1] for e in mine if str(e["key"][0]) == chunks]
        workers[w] = {
            "rows": int(sum(int(rows[i]) for i in read)),
            "chunk_tasks": len(read),
            "tasks": len(mine),
            "busy_s": round(sum(e["compute_s"] for e in mine), 4),
            "before_first_s": round(mine[0]["start"] - start, 4),
            "between_s": round(gaps, 4),
            "after_last_s": round(end - mine[-1]["stop"], 4),
        }
    return {"wall_s": round(end - start, 4), "workers": workers}


def _run(path: str, rounds: int) -> list[dict]:
    from distributed import Client, get_task_stream

    from filterdb_dask import cluster as fcluster
    from filterdb_dask.analysis import analyze
    from filterdb_dask.store import open_store

    store = open_store(path)
    rows = [int(r) for r in store.chunk_filters]
    out = []
    with fcluster.local_cluster(fcluster.ExecutionOptions()) as cl, Client(cl) as client:
        ex = fcluster.Execution("benchmarks.passes", client=client, verbosity=0)
        analyze(store, verbosity=0, execution=ex)  # warms the workers (numba, heap)
        plain = fcluster.Execution.compute
        for _ in range(rounds):
            passes = []

            def timed(self, *collections, label="", passes=passes, **kw):
                t0 = time.time()
                with get_task_stream(client) as ts:
                    result = plain(self, *collections, label=label, **kw)
                passes.append((label, pass_breakdown(ts.data, t0, time.time(), rows)))
                return result

            fcluster.Execution.compute = timed
            try:
                t = time.perf_counter()
                analyze(store, verbosity=0, execution=ex)
                wall = time.perf_counter() - t
            finally:
                fcluster.Execution.compute = plain
            out.append({"wall_s": round(wall, 4), "passes": dict(passes)})
            for label, p in passes:
                per = " | ".join(
                    f"{w.rsplit(':', 1)[-1]}: {v['rows'] / 1e6:.2f} M rows, busy "
                    f"{v['busy_s']:.2f} s, between {v['between_s']:.3f}, after "
                    f"{v['after_last_s']:.3f}" for w, v in p["workers"].items())
                print(f"{label}: {p['wall_s']:.2f} s :: {per}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filters", default="20M")
    p.add_argument("--dir", default="bench/data", help="where the synthetic data is cached")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        n = parse_count(args.filters)
    except ValueError as exc:
        p.error(str(exc))
    analyses = _run(cached_store(args.dir, n), args.rounds)
    print(json.dumps({
        "filters": n,
        "median_wall_s": statistics.median(a["wall_s"] for a in analyses),
        "analyses": analyses,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
