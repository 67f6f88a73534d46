"""Codec choice: encode/decode speed and ratio of candidate Zarr codecs on filters.

python -m benchmarks.codecs [--filters 4M] [--file dataset.h5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def candidates():
    import zarr

    return {
        "none": None,
        "none (warm-up repeat)": None,
        "blosc-lz4-shuffle": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        "blosc-lz4-bitshuffle": zarr.codecs.BloscCodec(cname="lz4", clevel=5,
                                                       shuffle="bitshuffle"),
        "blosc-zstd1-shuffle": zarr.codecs.BloscCodec(cname="zstd", clevel=1,
                                                      shuffle="shuffle"),
        "zstd-1": zarr.codecs.ZstdCodec(level=1),
        "zstd-3": zarr.codecs.ZstdCodec(level=3),
    }


def measure(x: np.ndarray, path: str, reps: int = 3) -> list[dict]:
    """Per-core figures: Blosc and Zarr limited to one thread, the store's chunking."""
    import shutil

    import numcodecs.blosc
    import zarr

    from filterdb_dask.storeformat import ZARR_CHUNK_ROWS

    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})
    rows = []
    for name, comp in candidates().items():
        shutil.rmtree(path, ignore_errors=True)
        a = zarr.create_array(path, shape=x.shape, chunks=(ZARR_CHUNK_ROWS, 9), dtype=x.dtype,
                              compressors=comp, overwrite=True)
        t = time.perf_counter()
        a[...] = x
        enc = time.perf_counter() - t
        stored = sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(path) for f in fs
        )
        dec = []
        for _ in range(reps):
            t = time.perf_counter()
            y = a[...]
            dec.append(time.perf_counter() - t)
        assert np.array_equal(x, y)
        mb = x.nbytes / 1e6
        rows.append({"codec": name, "dtype": str(x.dtype), "ratio": x.nbytes / stored,
                     "encode_MBps": mb / enc, "decode_MBps": mb / min(dec),
                     "decode_Mfilters_per_s": len(x) / min(dec) / 1e6})
    shutil.rmtree(path, ignore_errors=True)
    return rows


def main(argv=None):
    from benchmarks import parse_count as _count

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--filters", type=_count, default=4_000_000)
    p.add_argument("--file", help="an existing dataset.h5 (else a synthetic one)")
    p.add_argument("--tmp", default="/tmp/filterdb-codec-bench.zarr")
    args = p.parse_args(argv)
    import h5py

    if args.file:
        from filterdb_dask.convert.read import read_source

        src = read_source(args.file)
        with h5py.File(args.file, "r") as f:
            x = f[src.name][: args.filters].reshape(-1, 9)
    else:
        from filterdb_dask.convert.synth import iter_filters, model_meta, plan_layers

        layers = plan_layers(args.filters, 40, 0)
        x = np.concatenate(list(iter_filters(layers, model_meta(40, 0), 0)))
    rows = []
    for dt in (np.float32, np.float64):
        rows += measure(np.ascontiguousarray(x, dtype=dt), args.tmp)
    print("| codec | dtype | ratio | encode MB/s | decode MB/s | decode M filters/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['codec']} | {r['dtype']} | {r['ratio']:.3f} | {r['encode_MBps']:.0f} | "
              f"{r['decode_MBps']:.0f} | {r['decode_Mfilters_per_s']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
