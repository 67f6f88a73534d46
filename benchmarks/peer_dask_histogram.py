"""The dask-histogram contender, run inside its own virtualenv.

dask-histogram pulls dask-awkward, which pins an older dask than this project
uses, so the suite installs it in a separate virtualenv (``ensure_venv``) and runs
this script there (``python -m benchmarks.peer_dask_histogram IN.json OUT.json``)
on the same store with the same number of worker processes. It imports only the
store reader of filterdb_dask (no numba, no kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

PACKAGES = ["dask-histogram", "zarr>=3", "pandas", "distributed", "psutil", "numcodecs"]


def ensure_venv(path: str) -> str:
    """Create the peer virtualenv once; return its python."""
    py = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".filterdb-peer-ok")
    if not os.path.exists(marker):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", *PACKAGES], check=True)
        open(marker, "w").close()
    return py


def run_in_venv(py: str, spec: dict, workdir: str) -> dict:
    """Run the contender in the peer venv; return its timing and counts."""
    inp = os.path.join(workdir, "peer-in.json")
    out = os.path.join(workdir, "peer-out.json")
    with open(inp, "w") as fh:
        json.dump(spec, fh)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run([py, "-m", "benchmarks.peer_dask_histogram", inp, out], check=True,
                   env=env, cwd=root)
    with open(out) as fh:
        return json.load(fh)


def _project(x, mean, comps):
    x = np.asarray(x, dtype=np.float64)
    p = np.abs(x).max(axis=1, keepdims=True)
    xs = np.divide(x, p, out=np.zeros_like(x), where=p > 0)
    return (xs - mean) @ comps.T


def main(argv=None) -> int:
    import dask
    import dask.array as da
    import dask_histogram as dh
    from distributed import Client, LocalCluster

    from benchmarks.contenders import _row_codes_chunk as _codes
    from filterdb_dask.store import open_store

    inp, out = (argv or sys.argv[1:])[:2]
    spec = json.load(open(inp))
    store = open_store(spec["store"])
    mean, comps = np.asarray(spec["mean"]), np.asarray(spec["components"])
    lo, hi = spec["coef_range"]
    bins, G = spec["bins"], spec["n_groups"]
    codes_meta = np.asarray(spec["codes"])
    f = store.filters
    blocks = []
    for i, (b, c) in enumerate(zip(store.chunk_bounds(), store.per_chunk(codes_meta),
                                   strict=True)):
        blocks.append(da.from_delayed(dask.delayed(_codes)(f.blocks[i], b, c),
                                      shape=(f.chunks[0][i],), dtype=np.int64))
    rows = da.concatenate(blocks)
    coefs = f.map_blocks(_project, mean, comps, dtype=np.float64)
    with LocalCluster(n_workers=spec["workers"], threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster):
        times, result = [], None
        for _ in range(spec["repeat"]):
            t = time.perf_counter()
            hs = [dh.histogram2d(rows, coefs[:, k], bins=[G, bins],
                                 range=[(-0.5, G - 0.5), (lo, hi)])[0] for k in range(9)]
            hs = dask.compute(*hs)
            times.append(time.perf_counter() - t)
            result = np.stack([np.asarray(getattr(h, "values", lambda h=h: h)()) for h in hs],
                              axis=1)
    import importlib.metadata as md

    with open(out, "w") as fh:
        json.dump({"times": times, "group_hist": result.astype(np.int64).tolist(),
                   "versions": {p: md.version(p) for p in ("dask", "dask-histogram",
                                                          "boost-histogram")}}, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
