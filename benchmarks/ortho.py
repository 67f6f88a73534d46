"""Pass-1 cost of orthogonality and of a five-threshold sparsity sweep (issue 13
items 3 and 4): pass 1 alone, with the per-layer orthogonality, with the sweep of
five ε, and with both, on the same store of ingested models, in one run.

python -m benchmarks.ortho [--models 2] [--repeat 3] [--engine auto]

The models are ONNX files built here with the 3x3 conv shapes of a ResNet-18
(64 to 512 channels; 1.1 M filters each, random weights: the cost does not depend on
the values), ingested, so the store records every layer's weight shape. One thread
(synchronous scheduler, Blosc on one thread); the variants alternate and the
minimum of the repeats is reported (wall and CPU time of this process).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from benchmarks import time_variants

#: the five thresholds of issue 13 item 4
EPS = (0.001, 0.005, 0.01, 0.05, 0.1)

#: (c_out, c_in) of the 3x3 convolutions of a ResNet-18, in order
RESNET18_3X3 = ([(64, 64)] * 4 + [(128, 64)] + [(128, 128)] * 3 + [(256, 128)]
                + [(256, 256)] * 3 + [(512, 256)] + [(512, 512)] * 3)


def resnet18_like(path: str, seed: int) -> str:
    """An ONNX chain of ResNet-18's 3x3 convolutions with random weights."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (co, ci) in enumerate(RESNET18_3X3):
        w = rng.normal(size=(co, ci, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 64, 8, 8])],
                          [helper.make_tensor_value_info(prev, 1, None)], inits)
    onnx.save(helper.make_model(g, producer_name="bench"), path)
    return path


def main(argv=None) -> int:
    import numcodecs.blosc

    from filterdb_dask.convert.ingest import ingest
    from filterdb_dask.convert.write import convert
    from filterdb_dask.engines import resolve_engine
    from filterdb_dask.pca import layer_stats
    from filterdb_dask.quality import orthogonality, sparsity_sweep
    from filterdb_dask.store import open_store

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--engine", default="auto", choices=("auto", "numba", "numpy"))
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = p.parse_args(argv)
    numcodecs.blosc.set_nthreads(1)
    d = args.dir or tempfile.mkdtemp(prefix="fdb-ortho-")
    path = os.path.join(d, f"resnet18x{args.models}.zarr")
    if not os.path.exists(path):
        h5 = os.path.join(d, f"resnet18x{args.models}.h5")
        models = [resnet18_like(os.path.join(d, f"r{i}.onnx"), i) for i in range(args.models)]
        ingest(models, h5)
        convert(h5, path, verbosity=0)
    store = open_store(path)
    engine = resolve_engine(args.engine)
    variants = {
        "pass1": lambda: (layer_stats(store, engine=engine),),
        "pass1+orthogonality": lambda: (layer_stats(store, engine=engine),
                                        orthogonality(store, engine=engine)),
        "pass1+sweep5": lambda: (layer_stats(store, engine=engine),
                                 sparsity_sweep(store, EPS, engine=engine)),
        "pass1+orthogonality+sweep5": lambda: (layer_stats(store, engine=engine),
                                               orthogonality(store, engine=engine),
                                               sparsity_sweep(store, EPS, engine=engine)),
    }
    times = time_variants(variants, args.repeat)
    wall, best, best_cpu = times["wall_s_all"], times["wall_s_min"], times["cpu_s_min"]
    print(json.dumps({
        "models": args.models, "filters": store.n_filters, "chunks": store.n_chunks,
        "layers": len(store.meta), "engine": engine, "repeat": args.repeat,
        "wall_s_min": best, "wall_s_all": wall, "cpu_s_min": best_cpu,
        "overhead_cpu_pct": {k: 100 * (v / best_cpu["pass1"] - 1)
                             for k, v in best_cpu.items() if k != "pass1"},
        "overhead_wall_pct": {k: 100 * (v / best["pass1"] - 1)
                              for k, v in best.items() if k != "pass1"},
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
