"""Cost of verifying every chunk read on pass 1 (issue 10): the store as written
(crc32c codec, chunk metadata and stored-chunk marks checked in each task) against the
same data in the same chunks and codec without any check (plain Zarr reads).

python -m benchmarks.integrity [--filters 4M] [--repeat 7] [--codec lz4]

One thread (synchronous scheduler, Blosc on one thread); the two variants alternate and
the minimum of the repeats is reported (wall and CPU time of this process), as the
machine may be shared. Also: the read alone (every chunk read once, checked vs plain)
and ``open_store`` (reads and checks every chunk's metadata).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np


def _plain_read(path: str, i: int) -> np.ndarray:
    import zarr

    from filterdb_dask.storeformat import chunk_name

    return zarr.open_array(path, path=chunk_name(i), mode="r")[...]


def unchecked_copy(store, path: str):
    """The store's chunks rewritten without crc32c, read without checks."""
    import dask.array as da
    import zarr
    from dask.highlevelgraph import HighLevelGraph

    from filterdb_dask import storeformat as fmt

    rec = store.record
    for i, (a, b) in enumerate(store.plan):
        x = store.filters.blocks[i].compute(scheduler="synchronous")
        comps = fmt._compressors(rec.codec, np.dtype(rec.dtype).itemsize)[:-1] or None
        arr = zarr.create_array(path, name=fmt.chunk_name(i), shape=x.shape,
                                chunks=(fmt.zarr_chunk_rows(int(b - a)), 9), dtype=x.dtype,
                                compressors=comps, overwrite=True)
        arr[...] = x
    name = "plain-filters-" + os.path.basename(path)
    dsk = {(name, i, 0): (_plain_read, path, i) for i in range(len(store.plan))}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    filters = da.Array(graph, name, chunks=store.filters.chunks, dtype=store.filters.dtype)
    return dataclasses.replace(store, filters=filters)


def main(argv=None) -> int:
    import numcodecs.blosc

    from benchmarks import cached_synth, parse_count
    from filterdb_dask.convert.write import convert
    from filterdb_dask.pca import layer_stats
    from filterdb_dask.store import open_store

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filters", default="4M")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--codec", default="lz4", choices=("lz4", "zstd", "none"))
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = p.parse_args(argv)
    numcodecs.blosc.set_nthreads(1)
    n = parse_count(args.filters)
    d = args.dir or tempfile.mkdtemp(prefix="fdb-integrity-")
    h5 = cached_synth(d, n)
    checked_path = os.path.join(d, f"checked-{args.codec}.zarr")
    convert(h5, checked_path, codec=args.codec, verbosity=0)
    checked = open_store(checked_path)
    plain = unchecked_copy(checked, os.path.join(d, f"plain-{args.codec}.zarr"))
    variants = {"checked": checked, "unchecked": plain}
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    reads = {k: [] for k in variants}
    ref = None
    for st in variants.values():  # warm-up: numba compile, page cache
        out = layer_stats(st).compute(scheduler="synchronous")
        ref = out if ref is None else ref
        np.testing.assert_array_equal(out, ref)
    for _ in range(args.repeat):
        for k, st in variants.items():
            t, c = time.perf_counter(), time.process_time()
            layer_stats(st).compute(scheduler="synchronous")
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
            c = time.process_time()
            for i in range(st.n_chunks):
                st.filters.blocks[i].compute(scheduler="synchronous")
            reads[k].append(time.process_time() - c)
    opens = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        open_store(checked_path)
        opens.append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    best_read = {k: min(v) for k, v in reads.items()}
    result = {
        "filters": n, "chunks": checked.n_chunks, "codec": args.codec,
        "dtype": checked.record.dtype, "repeat": args.repeat,
        "pass1_s_min": best, "pass1_s_all": times,
        "overhead_pct": 100 * (best["checked"] / best["unchecked"] - 1),
        "pass1_cpu_s_min": best_cpu,
        "overhead_cpu_pct": 100 * (best_cpu["checked"] / best_cpu["unchecked"] - 1),
        "read_only_cpu_s_min": best_read,
        "check_cost_vs_pass1_pct": 100 * (best_read["checked"] - best_read["unchecked"])
        / best_cpu["unchecked"],
        "open_store_s_min": min(opens),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
