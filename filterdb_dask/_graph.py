"""Build per-chunk dask arrays over a store's model-aligned filter chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import getitem

import numpy as np
from dask.array import Array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph


def map_chunks(
    func: Callable,
    filters: Array,
    per_chunk_args: Sequence[tuple],
    *,
    outputs: Sequence[tuple[tuple, tuple, np.dtype]],
    name: str,
    common_args: tuple = (),
) -> list[Array]:
    """Apply ``func(x_i, *per_chunk_args[i], *common_args)`` to every chunk.

    ``func`` returns a tuple with one array per entry of ``outputs``; output ``j``
    of chunk ``i`` is a block whose shape is ``outputs[j][0][i]`` (first axis, one
    entry per chunk) followed by ``outputs[j][1]`` (the other axes). The blocks
    are stacked along the first axis. Deterministic names: the same inputs give
    the same keys, so a pass shared by several outputs runs once.

    Returns
    -------
    list of dask arrays, one per output.
    """
    if filters.numblocks[1] != 1:
        raise ValueError("filters must have a single chunk along the K² values")
    n = filters.numblocks[0]
    if len(per_chunk_args) != n:
        raise ValueError(f"{len(per_chunk_args)} argument sets for {n} chunks")
    token = tokenize(func, filters.name, per_chunk_args, common_args, outputs)
    raw = f"{name}-raw-{token}"
    dsk: dict = {}
    for i in range(n):
        dsk[(raw, i)] = (func, (filters.name, i, 0), *per_chunk_args[i], *common_args)
    layers = {raw: dsk}
    deps = {raw: {filters.name}}
    arrays_spec = []
    for j, (first, rest, dtype) in enumerate(outputs):
        out_name = f"{name}-{j}-{token}"
        zeros = (0,) * len(rest)
        layers[out_name] = {
            (out_name, i, *zeros): (getitem, (raw, i), j) for i in range(n)
        }
        deps[out_name] = {raw}
        arrays_spec.append((out_name, (tuple(first), *((r,) for r in rest)), dtype))
    graph = HighLevelGraph.merge(HighLevelGraph(layers, deps), filters.dask)
    return [Array(graph, nm, chunks=ch, dtype=dt) for nm, ch, dt in arrays_spec]
