"""Analysis of the same store on S3 against on disk (issue 14.2).

python -m benchmarks.s3 [--filters 2M] [--repeat 3]

A local S3 server (moto's server mode on 127.0.0.1: a correctness server, not a fast
one) holds the store; the same source is also converted to a local directory. Both are
analysed with dask's threaded scheduler, alternating, and the minimum of the repeats is
reported (the machine may be shared). Needs ``pip install 'filterdb-dask[s3,test]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from benchmarks import parse_count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filters", type=parse_count, default=2_000_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    import fsspec
    from moto.server import ThreadedMotoServer

    from filterdb_dask.analysis import analyze
    from filterdb_dask.convert.synth import synthesize
    from filterdb_dask.convert.write import convert
    from filterdb_dask.store import open_store

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
    out = {"filters": args.filters}
    try:
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "d.h5")
            synthesize(src, n_filters=args.filters, n_models=60, seed=0)
            where = {"local": os.path.join(d, "db.zarr"), "s3": "s3://bench/db.zarr"}
            for name, path in where.items():
                t = time.perf_counter()
                convert(src, path, verbosity=0)
                out[f"convert_{name}_s"] = round(time.perf_counter() - t, 2)
            times = {name: [] for name in where}
            for _ in range(args.repeat):
                for name, path in where.items():
                    t = time.perf_counter()
                    analyze(open_store(path), verbosity=0)
                    times[name].append(round(time.perf_counter() - t, 2))
            for name, ts in times.items():
                out[f"analyze_{name}_s"] = ts
                out[f"analyze_{name}_min_s"] = min(ts)
    finally:
        server.stop()
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
