"""Benchmark suite: filterdb_dask against what a researcher would use instead.

    python -m benchmarks [--filters 20M,200M] --out bench/ [--scaling 2M,20M,200M]

First each pass kernel alone in one thread (``benchmarks.kernels``, next to a stated
per-core limit). Then, per size in ``--filters``, one synthetic data set (the
project's ``synth``, converted once, timed against a plain read), every contender
on the same data, the same machine and the same local cluster (one worker process
per core, one thread each), repetitions interleaved, medians and min-max: the read
floor on threads and on the cluster, each pass, the whole analysis, the peers. Each
contender is checked against the float64 in-memory reference before its time
counts. The targets of issue 12 are in the JSON with pass/fail. Writes
``OUT/bench.json`` and ``OUT/bench.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np

FULL_DB = 1_464_797_156


class MemorySampler:
    """Peak RSS of this process and all its children (the cluster's workers)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak_total = 0
        self.peak_child = 0
        self.peak_self = 0
        self.peak_watched = 0
        self.watched = None
        self._stop = threading.Event()

    def watch(self, pid: int) -> None:
        """Also track the peak RSS of one process tree (e.g. a CLI subprocess)."""
        import psutil

        self.watched = psutil.Process(pid)

    def _sample(self):
        import psutil

        total, child_max = 0, 0
        try:
            total = self.proc.memory_info().rss
            self.peak_self = max(self.peak_self, total)
            for c in self.proc.children(recursive=True):
                try:
                    r = c.memory_info().rss
                except psutil.Error:
                    continue
                total += r
                child_max = max(child_max, r)
        except psutil.Error:
            pass
        self.peak_total = max(self.peak_total, total)
        self.peak_child = max(self.peak_child, child_max)
        if self.watched is not None:
            try:
                w = self.watched.memory_info().rss + sum(
                    c.memory_info().rss for c in self.watched.children(recursive=True))
                self.peak_watched = max(self.peak_watched, w)
            except psutil.Error:
                pass

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._sample()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.t.join()
        self._sample()


def machine() -> dict:
    import importlib.metadata as md

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    versions = {}
    for pkg in ["numpy", "dask", "distributed", "zarr", "numba", "scikit-learn", "dask-ml",
                "flox", "xhistogram", "h5py", "pandas", "filterdb-dask"]:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / 2**30,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "versions": versions}


def dataset(out: str, n: int, seed: int = 0, rounds: int = 1) -> tuple[str, str, dict]:
    """Synthetic dataset.h5 of n filters and its store (cached under OUT/data); the
    converter timed against a plain read in ``rounds`` alternating runs."""
    from filterdb_dask.convert.synth import synthesize

    d = os.path.join(out, "data")
    os.makedirs(d, exist_ok=True)
    h5 = os.path.join(d, f"synth-{n}.h5")
    store = os.path.join(d, f"synth-{n}.zarr")
    info = {}
    if not os.path.exists(h5):
        t = time.perf_counter()
        synthesize(h5, n_filters=n, n_models=max(8, min(800, n // 500_000)), seed=seed)
        info["synth_s"] = time.perf_counter() - t
    info.update(convert_vs_read(h5, store, rounds))
    return h5, store, info


def evict(path: str) -> None:
    """Drop a file's pages from the OS cache, so the next read comes from disk (a 50 GB
    dataset.h5 does not fit in RAM: cold reads are the realistic case)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(h5: str) -> float:
    """Seconds for a sequential h5py read of the whole filter dataset (32 MiB slices),
    from a cold cache."""
    import h5py

    from filterdb_dask.convert.read import read_source

    evict(h5)
    src = read_source(h5)
    rows = max(1, (32 << 20) // (9 * src.dtype.itemsize))
    t = time.perf_counter()
    with h5py.File(h5, "r", locking=False) as f:
        dset = f[src.name]
        for a in range(0, src.n_filters, rows):
            dset[a: a + rows]
    return time.perf_counter() - t


def convert_vs_read(h5: str, store: str, rounds: int = 3) -> dict:
    """Convert in a subprocess (a fresh target each time, the scheduler the
    ``convert`` command uses), timed and memory-sampled on its own, against a plain
    sequential read; both from a cold cache, ``rounds`` times in turn (read, convert),
    medians compared: this VM's disk reads the same file in anywhere from 0.4 to 2 s."""
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the converter in its own process (memory measured alone), as `filterdb-dask
    # convert` runs it (its execution context: threads, the allocator tuned); time
    # taken inside it, after the imports, so interpreter start-up does not count: zarr
    # and distributed too, which convert imports lazily (0.25 s and 0.4 s here; dask
    # imports distributed to look for a client even under the threads scheduler)
    code = "\n".join([
        "import sys, time, dask, zarr, distributed",
        "from filterdb_dask.cluster import ExecutionOptions, execution",
        "from filterdb_dask.convert.write import convert",
        "t = time.perf_counter()",
        "with execution(ExecutionOptions(), command='convert', verbosity=0) as ex:",
        "    convert(sys.argv[1], sys.argv[2], execution=ex)",
        "print(time.perf_counter() - t)"])
    reads, convs, peaks = [], [], []
    for _ in range(max(1, rounds)):
        reads.append(plain_read(h5))
        shutil.rmtree(store, ignore_errors=True)
        evict(h5)
        with MemorySampler() as mem:
            proc = subprocess.Popen([sys.executable, "-c", code, h5, store], cwd=root,
                                    env=dict(os.environ, PYTHONPATH=root),
                                    stdout=subprocess.PIPE, text=True)
            mem.watch(proc.pid)
            stdout, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"convert of {h5} failed")
        convs.append(float(stdout.strip().splitlines()[-1]))
        peaks.append(mem.peak_watched / 2**20)
    read_s, conv = statistics.median(reads), statistics.median(convs)
    from filterdb_dask.storeformat import read_record

    n = read_record(store).n_filters
    return {"n": n, "convert_s": conv, "plain_read_s": read_s,
            "convert_runs_s": convs, "plain_read_runs_s": reads,
            "convert_filters_per_s": n / conv,
            "convert_vs_read_speed": read_s / conv,
            "convert_peak_rss_mib": max(peaks),
            "h5_bytes": os.path.getsize(h5)}


def _ours(name: str) -> bool:
    """Whether contender ``name`` is filterdb_dask's own (a pass, the whole analysis or a
    read floor) rather than a peer's."""
    return name.startswith(("filterdb_dask", "read floor"))


@contextlib.contextmanager
def _queueing(client, name: str):
    """The peers run with Dask's own root-task queueing
    (``distributed.scheduler.worker-saturation``, 1.1 unless configured), as on any
    cluster: the project's local cluster sends every task at once (``inf``), which
    its own one-task-per-chunk passes need no queueing for, but which lets a graph of
    chunk-sized intermediates (dask-ml's tsqr) fill the workers' memory."""
    if client is None or _ours(name):
        yield
        return
    import dask

    default = dask.config.get("distributed.scheduler.worker-saturation")

    def _set(value, dask_scheduler=None):
        old = dask_scheduler.WORKER_SATURATION
        dask_scheduler.WORKER_SATURATION = value
        return old

    old = client.run_on_scheduler(_set, float(default))
    try:
        yield
    finally:
        client.run_on_scheduler(_set, old)


def run_contenders(ctx: dict, names: list[str], repeat: int) -> dict:
    from benchmarks.contenders import CONTENDERS, errors

    rows = {name: {"times": [], "peak_total_mib": 0.0, "peak_worker_mib": 0.0} for name in names}
    # a peer leaves its freed heap in the workers (glibc keeps it under the local
    # cluster's allocator settings: up to 1 GiB each), which would count as the next
    # contender's RSS: ours take their worker peak from the repetitions before any
    # peer ran on the workers (the first), the later ones go to *_after_peers
    peers_ran = False
    for rep in range(repeat):
        for name in names:
            r = rows[name]
            if "failed" in r:
                continue
            try:
                with MemorySampler() as mem, _queueing(ctx.get("client"), name):
                    t = time.perf_counter()
                    out = CONTENDERS[name](ctx)
                    dt = time.perf_counter() - t
            except Exception as exc:  # a contender that cannot run this size is a result
                r["failed"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                print(f"  {name:<32} failed: {r['failed']}", file=sys.stderr, flush=True)
                continue
            r["times"].append(dt)
            r["peak_total_mib"] = max(r["peak_total_mib"], mem.peak_total / 2**20)
            key = ("peak_worker_mib_after_peers" if _ours(name) and peers_ran
                   else "peak_worker_mib")
            r[key] = max(r.get(key, 0.0), mem.peak_child / 2**20)
            # the in-memory reference runs in this process, not on the workers
            peers_ran = peers_ran or not (_ours(name) or name == "authors' method in memory")
            if rep == 0:
                r["errors"] = errors(out, ctx["reference"]) if ctx["reference"] else {}
            print(f"  {name:<32} {dt:8.2f}s", file=sys.stderr, flush=True)
    n, cores = ctx["n"], ctx["cores"]
    for r in rows.values():
        if not r["times"]:
            continue
        med = statistics.median(r["times"])
        r.update({"median_s": med, "min_s": min(r["times"]), "max_s": max(r["times"]),
                  "filters_per_s": n / med, "filters_per_s_per_core": n / med / cores})
    return rows


def run_size(args, n: int, client) -> dict:
    """Every contender on one synthetic data set of ``n`` filters."""
    from benchmarks.contenders import CONTENDERS, authors_in_memory, fdb_whole
    from filterdb_dask.convert.read import read_source
    from filterdb_dask.groups import make_grouping
    from filterdb_dask.store import open_store

    print(f"data: {n:,} filters", file=sys.stderr)
    h5, store_path, conv = dataset(args.out, n, rounds=args.repeat)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    store = open_store(store_path)
    ctx = {"store": store, "source": read_source(h5), "n": store.n_filters,
           "cores": args.workers, "bins": 70, "grouping": make_grouping(store.meta, "Task"),
           "client": client, "reference": None}
    ctx["fdb"] = fdb_whole(ctx)["results"]  # warm-up (numba compiles) and inputs
    in_memory = n <= args.reference_max
    if in_memory:
        ctx["reference"] = authors_in_memory(ctx)
    names = [k for k in CONTENDERS if k not in skip and
             (in_memory or k != "authors' method in memory")]
    print(f"contenders x {args.repeat}:", file=sys.stderr)
    section = {"n": n, "convert": conv, "contenders": run_contenders(ctx, names, args.repeat)}
    if "dask-histogram grouped histograms" not in skip:
        section["contenders"]["dask-histogram grouped histograms (own venv)"] = \
            run_peer(ctx, args)
    return section


def main(argv=None) -> int:
    from benchmarks import parse_count
    from benchmarks.kernels import kernel_speeds

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--filters", default="20M,200M",
                   help="comma-separated N, each a full run (default 20M,200M)")
    p.add_argument("--out", default="bench", help="output folder (data cached in OUT/data)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scaling", default="", help="comma-separated N for a scaling run of "
                                                  "the read floor and the whole analysis")
    p.add_argument("--reference-max", type=parse_count, default=40_000_000,
                   help="largest N for the in-memory contenders (reference, authors' method)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--kernel-filters", type=parse_count, default=4_000_000,
                   help="filters for the kernels-alone section (in memory)")
    p.add_argument("--skip", default="", help="comma-separated contenders to skip")
    p.add_argument("--peer-venv", default=None,
                   help="virtualenv for dask-histogram (pins an older dask); default "
                        "OUT/peer-venv, created on first use")
    args = p.parse_args(argv)
    sizes = [parse_count(s) for s in args.filters.split(",") if s.strip()]
    os.makedirs(args.out, exist_ok=True)

    from distributed import Client

    from filterdb_dask.cluster import ExecutionOptions, local_cluster, tune_allocator
    from filterdb_dask.groups import make_grouping
    from filterdb_dask.store import open_store

    report = {"machine": machine(), "args": vars(args)}
    print(f"kernels alone: {args.kernel_filters:,} filters, one thread", file=sys.stderr)
    report["kernels"] = kernel_speeds(args.kernel_filters, repeat=5,
                                      engines=("numba", "numpy"))
    # the project's default local cluster (TLS on loopback, the workers' allocator
    # settings), sized here; the threaded contenders get the same allocator settings
    tune_allocator()

    def cluster():
        return local_cluster(ExecutionOptions(workers=args.workers, threads_per_worker=1,
                                              memory_limit="4GiB"))

    report["runs"] = []
    for n in sizes:
        # a fresh cluster for each size: a worker keeps up to its trim threshold of freed
        # heap (1 GiB, local-cluster.pre-spawn-environ), so the memory a peer of the last
        # size used would count as this size's peak. Not client.restart(): distributed's
        # SpecCluster closes a nanny whose worker is still missing 15 s
        # (deploy.lost-worker-timeout) after a removal, and a second restart landing on
        # that moment loses every worker (seen in CI; reproduced here with two restarts
        # 14.6-14.9 s apart; dask/distributed#8534, #7312).
        with cluster() as lc, Client(lc) as client:
            report["runs"].append(run_size(args, n, client))
    report["scaling"] = []
    with cluster() as lc, Client(lc):
        for n in [parse_count(s) for s in args.scaling.split(",") if s.strip()]:
            print(f"scaling: {n:,} filters", file=sys.stderr)
            h5n, sn, convn = dataset(args.out, n)
            st = open_store(sn)
            c = {"store": st, "n": n, "cores": args.workers, "bins": 70,
                 "grouping": make_grouping(st.meta, "Task"), "reference": None}
            rows = run_contenders(c, ["read floor", "filterdb_dask whole analysis"], 1)
            report["scaling"].append({"n": n, "convert": convn, **{
                k: {kk: v[kk] for kk in ("median_s", "filters_per_s_per_core",
                                         "peak_total_mib", "peak_worker_mib")}
                for k, v in rows.items()}})
    for run in report["runs"]:
        run["targets"] = targets(run, report["kernels"])
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=float)
    md = markdown(report)
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


def run_peer(ctx: dict, args) -> dict:
    """dask-histogram in its own virtualenv, same store, same worker count."""
    from benchmarks.contenders import errors
    from benchmarks.peer_dask_histogram import ensure_venv, run_in_venv

    venv = args.peer_venv or os.path.join(args.out, "peer-venv")
    try:
        py = ensure_venv(venv)
    except Exception as exc:  # no network, no wheel: say so in the report
        return {"skipped": f"could not set up {venv}: {exc}"}
    res = ctx["fdb"]
    spec = {"store": ctx["store"].path, "mean": res.pca.mean.tolist(),
            "components": res.pca.components.tolist(),
            "coef_range": [float(v) for v in res.coef_range], "bins": ctx["bins"],
            "n_groups": ctx["grouping"].n_groups, "codes": ctx["grouping"].codes.tolist(),
            "workers": ctx["cores"], "repeat": args.repeat}
    with MemorySampler() as mem:
        out = run_in_venv(py, spec, args.out)
    times = out["times"]
    med = statistics.median(times)
    row = {"times": times, "median_s": med, "min_s": min(times), "max_s": max(times),
           "filters_per_s": ctx["n"] / med, "filters_per_s_per_core": ctx["n"] / med / ctx["cores"],
           "peak_total_mib": mem.peak_total / 2**20, "peak_worker_mib": mem.peak_child / 2**20,
           "versions": out["versions"]}
    if ctx["reference"]:
        row["errors"] = errors({"group_hist": np.asarray(out["group_hist"])}, ctx["reference"])
    print(f"  {'dask-histogram (own venv)':<32} {med:8.2f}s", file=sys.stderr, flush=True)
    return row


#: the targets of issue 12: name -> (threshold, what it measures)
TARGETS = {
    "whole_filters_per_s_per_core": (5e6, "whole analysis, default local cluster"),
    "kernel_pass_1_filters_per_s": (30e6, "pass-1 kernel alone, one thread"),
    "kernel_pass_2_filters_per_s": (30e6, "pass-2 kernel alone, one thread"),
    "kernel_pass_3_filters_per_s": (30e6, "pass-3 kernel alone, one thread"),
    "cluster_read_vs_threads": (0.8, "local-cluster read speed / threaded read speed"),
    "convert_vs_plain_read": (0.8, "converter speed / plain sequential h5py read speed"),
    "speedup_vs_daskml_plus_fastest_peer": (10.0, "(dask-ml PCA + fastest peer's grouped "
                                                  "histograms) time / whole analysis time"),
}

PEERS = ("xhistogram grouped histograms", "flox grouped histograms",
         "dask-histogram grouped histograms (own venv)")


def targets(run: dict, kern: dict | None = None) -> dict:
    """Each target's measured value, threshold and pass/fail (None: not measured)."""
    c = run["contenders"]
    val = {}
    whole = c.get("filterdb_dask whole analysis")
    if whole:
        val["whole_filters_per_s_per_core"] = whole["filters_per_s_per_core"]
        peers = [c[k]["median_s"] for k in PEERS if k in c and "median_s" in c[k]]
        if "median_s" in c.get("dask-ml PCA (tsqr)", {}) and peers:
            val["speedup_vs_daskml_plus_fastest_peer"] = (
                (c["dask-ml PCA (tsqr)"]["median_s"] + min(peers)) / whole["median_s"])
    for k in (1, 2, 3):
        if kern and "numba" in kern:
            val[f"kernel_pass_{k}_filters_per_s"] = kern["numba"][f"pass {k}"]["filters_per_s"]
    if "read floor" in c and "read floor (threads)" in c:
        val["cluster_read_vs_threads"] = (c["read floor (threads)"]["median_s"]
                                          / c["read floor"]["median_s"])
    if run.get("convert", {}).get("convert_vs_read_speed") is not None:
        val["convert_vs_plain_read"] = run["convert"]["convert_vs_read_speed"]
    out = {}
    for name, (threshold, what) in TARGETS.items():
        v = val.get(name)
        out[name] = {"value": v, "target": threshold, "what": what,
                     "pass": None if v is None else bool(v >= threshold)}
    info = {}
    if whole:
        info["extrapolated_full_db_s"] = FULL_DB / whole["filters_per_s"]
        info["extrapolated_full_db_s_64_cores"] = FULL_DB / (whole["filters_per_s_per_core"]
                                                             * 64)
    if "read floor" in c:
        floor = c["read floor"]["median_s"]
        for k in ("filterdb_dask pass 1", "filterdb_dask pass 2", "filterdb_dask pass 3"):
            if k in c:
                info[f"{k} / read floor"] = c[k]["median_s"] / floor
    info["max_worker_peak_mib_filterdb_dask"] = max(
        [v.get("peak_worker_mib", 0) for k, v in c.items() if k.startswith("filterdb_dask")],
        default=0)
    return {"targets": out, "info": info}


def _contender_table(run: dict, args: dict) -> list[str]:
    lines = [f"Data: {run['n']:,} synthetic filters (float32); {args['workers']} worker "
             f"processes x 1 thread; {args['repeat']} repetitions, interleaved.", "",
             "| contender | median s | min–max s | M filters/s/core | peak MiB (all procs) | "
             "peak MiB/worker | error vs float64 reference |",
             "|---|---|---|---|---|---|---|"]
    for name, r in run["contenders"].items():
        if "skipped" in r or "median_s" not in r:
            why = r.get("skipped") and f"skipped: {r['skipped']}" or f"failed: {r.get('failed')}"
            lines.append(f"| {name} | {why} | | | | | |")
            continue
        err = "; ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.get("errors", {}).items()) or "–"
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f}–{r['max_s']:.2f} | "
                     f"{r['filters_per_s_per_core'] / 1e6:.2f} | {r['peak_total_mib']:.0f} | "
                     f"{r['peak_worker_mib']:.0f} | {err} |")
    lines += ["", "Peak MiB/worker: filterdb_dask's rows and the read floors in the repetitions "
              "before any peer ran on the workers (a peer leaves up to 1 GiB of freed heap in "
              "each); the peers' over all repetitions."]
    cv = run["convert"]
    runs = len(cv.get("convert_runs_s", [0]))
    lines += ["", f"Conversion: {cv['convert_s']:.2f} s ({cv['convert_filters_per_s'] / 1e6:.1f} "
                  f"M filters/s), plain sequential h5py read {cv['plain_read_s']:.2f} s "
                  f"(medians of {runs} alternating runs, both from a cold cache): "
                  f"convert runs at {100 * cv['convert_vs_read_speed']:.0f} % of the read's "
                  f"speed; converter peak RSS {cv['convert_peak_rss_mib']:.0f} MiB (its "
                  "process alone)."]
    t = run["targets"]
    lines += ["", "| target | measured | required | pass |", "|---|---|---|---|"]
    for name, r in t["targets"].items():
        v = "–" if r["value"] is None else f"{r['value']:.3g}"
        ok = "–" if r["pass"] is None else ("yes" if r["pass"] else "**no**")
        lines.append(f"| {name} ({r['what']}) | {v} | ≥ {r['target']:.3g} | {ok} |")
    lines += [""] + [f"- {k}: {v:.3g}" for k, v in t["info"].items()]
    return lines


def markdown(rep: dict) -> str:
    from benchmarks.kernels import markdown as kernel_markdown

    m = rep["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB; "
             f"python {m['python']}, dask {m['versions']['dask']}, numba {m['versions']['numba']}",
             "", kernel_markdown(rep["kernels"])]
    for run in rep["runs"]:
        lines += _contender_table(run, rep["args"]) + [""]
    if rep.get("scaling"):
        lines += ["| N | convert s | convert peak MiB | read floor s | whole analysis s | "
                  "M filters/s/core | peak MiB (all) | peak MiB/worker |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in rep["scaling"]:
            w = s["filterdb_dask whole analysis"]
            lines.append(f"| {s['n']:,} | {s['convert']['convert_s']:.1f} | "
                         f"{s['convert']['convert_peak_rss_mib']:.0f} | "
                         f"{s['read floor']['median_s']:.2f} | {w['median_s']:.2f} | "
                         f"{w['filters_per_s_per_core'] / 1e6:.2f} | {w['peak_total_mib']:.0f} | "
                         f"{w['peak_worker_mib']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
