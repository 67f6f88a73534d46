"""Build per-chunk dask arrays over a store's model-aligned filter chunks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import getitem

import numpy as np
from dask.array import Array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer


@dataclass(frozen=True)
class ChunkMap:
    """One per-chunk kernel of a pass: ``func(x_i, *per_chunk_args[i], *common_args)``
    returns a tuple with one array per entry of ``outputs`` (see :func:`map_chunks`)."""

    func: Callable
    per_chunk_args: Sequence[tuple]
    outputs: Sequence[tuple[tuple, tuple, np.dtype]]
    name: str
    common_args: tuple = ()


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

    A block made by a plain store read is read inside the task (see
    :func:`_source_tasks`): several kernels computed together on the same chunks
    would each read them; give them to :func:`map_together` instead.

    Returns
    -------
    list of dask arrays, one per output.
    """
    return map_together(filters, [ChunkMap(func, per_chunk_args, outputs, name,
                                           common_args)])[0]


class _Calls:
    """The kernels one task runs on its chunk: ``(func, args)`` pairs. An object of
    its own, so Dask passes it through as it is (a tuple would be taken for a task)."""

    def __init__(self, calls):
        self.calls = tuple(calls)

    def __dask_tokenize__(self):
        return tokenize(self.calls)


def _run_together(x, calls: _Calls) -> tuple:
    out = ()
    for func, args in calls.calls:
        out += tuple(func(x, *args))
    return out


def map_together(filters: Array, maps: Sequence[ChunkMap]) -> list[list[Array]]:
    """Several :func:`map_chunks` kernels in one task per chunk: each chunk is read
    once and handed to every kernel in turn (pass 1's moments, sparsity sweep and
    orthogonality), rather than read once per kernel, or read by a task of its own
    whose 36 MB result waits in memory for the others.

    Returns
    -------
    for each map, its list of dask arrays (one per output).
    """
    maps = list(maps)
    n = len(maps[0].per_chunk_args)
    if any(len(m.per_chunk_args) != n for m in maps):
        raise ValueError("the kernels of one pass need one argument set per chunk each")
    token = tokenize(filters.name, [(m.func, m.per_chunk_args, m.common_args, m.outputs)
                                    for m in maps])
    raw = "-".join(m.name for m in maps) + f"-raw-{token}"
    if len(maps) == 1:
        m = maps[0]
        dsk, sources = _chunk_tasks(m.func, filters, m.per_chunk_args, m.common_args, raw)
    else:
        per_chunk = [(_Calls((m.func, (*m.per_chunk_args[i], *m.common_args)) for m in maps),)
                     for i in range(n)]
        dsk, sources = _chunk_tasks(_run_together, filters, per_chunk, (), raw)
    # one output in all: the block is made inside the chunk task, no getitem task per
    # chunk (each small task costs a worker a scheduling round trip; pass 1 of 20 M
    # filters ran 26 of them per worker)
    inline = sum(len(m.outputs) for m in maps) == 1
    reads = set() if sources is not None else {filters.name}
    layers = {} if inline else {raw: dsk}
    deps = {} if inline else {raw: reads}
    specs = []
    j = 0
    for m in maps:
        arrays = []
        for k, (first, rest, dtype) in enumerate(m.outputs):
            out_name = f"{m.name}-{k}-{token}"
            zeros = (0,) * len(rest)
            layers[out_name] = {
                (out_name, i, *zeros): (getitem, dsk[(raw, i)] if inline else (raw, i), j)
                for i in range(n)
            }
            deps[out_name] = reads if inline else {raw}
            arrays.append((out_name, (tuple(first), *((r,) for r in rest)), dtype))
            j += 1
        specs.append(arrays)
    graph = HighLevelGraph(layers, deps)
    if sources is None:
        graph = HighLevelGraph.merge(graph, filters.dask)
    return [[Array(graph, nm, chunks=ch, dtype=dt) for nm, ch, dt in arrays]
            for arrays in specs]


def _chunk_tasks(func, filters: Array, per_chunk_args, common_args, raw: str):
    """``{(raw, i): func(block i, *per_chunk_args[i], *common_args)}`` and the store
    reads nested in them (:func:`_source_tasks`; None: the tasks depend on
    ``filters``' keys)."""
    if filters.numblocks[1] != 1:
        raise ValueError("filters must have a single chunk along the K² values")
    n = filters.numblocks[0]
    if len(per_chunk_args) != n:
        raise ValueError(f"{len(per_chunk_args)} argument sets for {n} chunks")
    sources = _source_tasks(filters)
    dsk: dict = {}
    for i in range(n):
        block = (filters.name, i, 0) if sources is None else sources[i]
        dsk[(raw, i)] = (func, block, *per_chunk_args[i], *common_args)
    return dsk, sources


def _source_tasks(filters: Array) -> list[tuple] | None:
    """The task making each block of ``filters`` when every one of them depends on no
    other key (a store's chunk reads, :func:`filterdb_dask.store.open_store`); None
    otherwise.

    Such a task is nested inside the consumer's task: the chunk is read and reduced in
    one task, so no chunk-sized result waits in worker memory for a second task
    (which Dask does not fuse when a task has several outputs) and each chunk costs
    one scheduling round, not two.
    """
    layers = filters.dask.layers
    layer = layers.get(filters.name)
    if (len(layers) != 1 or not isinstance(layer, MaterializedLayer)
            or filters.dask.dependencies.get(filters.name)):
        return None
    out = []
    for i in range(filters.numblocks[0]):
        task = layer.get((filters.name, i, 0))
        if not (isinstance(task, tuple) and task and callable(task[0])
                and not any(isinstance(a, tuple) and a and callable(a[0]) for a in task[1:])):
            return None
        out.append(task)
    return out



# ---------------------------------------------------------------- reductions
def concat(parts: list[np.ndarray]) -> np.ndarray:
    """Reducer: the chunks' blocks stacked in chunk order (first axis)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def total(parts: list[np.ndarray]) -> np.ndarray:
    """Reducer: the sum of the chunks' blocks (integer counts: exact in any order)."""
    out = np.array(parts[0], copy=True)
    for p in parts[1:]:
        out += p
    return out


def span(parts: list[np.ndarray]) -> np.ndarray:
    """Reducer: ``[[min of column 0, max of column 1]]`` of (1, 2) ``[lo, hi]`` blocks
    (NaN wins, as np.min/np.max)."""
    a = concat(parts)
    return np.array([[a[:, 0].min(), a[:, 1].max()]])


def _combine(reducers, picks, *parts):
    return tuple(r([p[j] for p in parts]) for r, j in zip(reducers, picks, strict=True))


def map_reduce_chunks(
    func: Callable,
    filters: Array,
    per_chunk_args: Sequence[tuple],
    *,
    reducers: Sequence[Callable[[list[np.ndarray]], np.ndarray]],
    outputs: Sequence[tuple[tuple, np.dtype]],
    name: str,
    common_args: tuple = (),
    split_every: int = 8,
    chunk_rows: Sequence[int] | None = None,
) -> list[Array]:
    """:func:`map_chunks` whose outputs are reduced over all chunks in one tree of
    tasks: each node combines up to ``split_every`` consecutive chunks' tuples with
    ``reducers[j]`` for output ``j`` (:func:`concat`, :func:`total`, :func:`span` or
    any associative, order-keeping function of a list of arrays).

    One task per chunk and about ``n / (split_every - 1)`` small ones in all, where
    one dask reduction per output builds a tree per output (and a getitem per chunk):
    each small task costs a worker a scheduling round trip of milliseconds.

    ``chunk_rows``: each chunk's block length along the first axis of the
    :func:`concat` outputs. Given, those outputs skip the tree: each is an array of
    one block per chunk, which a distributed :meth:`Execution.compute
    <filterdb_dask.cluster.Execution.compute>` gathers straight to the client. Up the
    tree a concatenation grows at every level and crosses between workers each time
    (per-layer histograms of 200 M filters: 80 MB; pass 3 took 7.0-8.0 s that way
    against 5.9-6.0 s gathered block by block, 2 workers).

    Returns
    -------
    list of dask arrays, output ``j`` of shape ``outputs[j][0]``: a single block, or
    one per chunk (a concat output with ``chunk_rows``).
    """
    if split_every < 2:
        raise ValueError("split_every must be at least 2")
    if not per_chunk_args:
        raise ValueError("0 argument sets: no chunks to reduce")
    n = len(per_chunk_args)
    reducers = tuple(reducers)
    direct = set()
    if chunk_rows is not None:
        chunk_rows = tuple(int(r) for r in chunk_rows)
        if len(chunk_rows) != n:
            raise ValueError(f"{len(chunk_rows)} chunk_rows for {n} chunks")
        direct = {j for j, r in enumerate(reducers) if r is concat}
        for j in direct:
            if sum(chunk_rows) != outputs[j][0][0]:
                raise ValueError(f"output {j}: chunk_rows sum to {sum(chunk_rows)}, "
                                 f"not its {outputs[j][0][0]} rows")
    token = tokenize(func, filters.name, per_chunk_args, common_args, outputs, reducers,
                     split_every, chunk_rows)
    raw = f"{name}-raw-{token}"
    dsk, sources = _chunk_tasks(func, filters, per_chunk_args, common_args, raw)
    in_tree = [j for j in range(len(reducers)) if j not in direct]
    root = None
    tree_dsk: dict = {}
    if in_tree:
        tree_reducers = tuple(reducers[j] for j in in_tree)
        # not tuples: no nested tasks; level 0 picks the tree's outputs from a chunk's
        picks = [functools.partial(_combine, tree_reducers, tuple(in_tree)),
                 functools.partial(_combine, tree_reducers, tuple(range(len(in_tree))))]
        level, keys = 0, [(raw, i) for i in range(n)]
        tree = f"{name}-reduce-{token}"
        while len(keys) > 1 or level == 0:
            nxt = []
            for g in range(0, len(keys), split_every):
                key = (tree, level, g // split_every)
                tree_dsk[key] = (picks[min(level, 1)], *keys[g:g + split_every])
                nxt.append(key)
            keys, level = nxt, level + 1
        (root,) = keys
    # the chunk tasks in a layer of their own (its keys are the chunks':
    # :func:`filterdb_dask.cluster.balance_chunks` finds them so), the tree in another
    layers = {raw: dsk}
    deps = {raw: set() if sources is not None else {filters.name}}
    if tree_dsk:
        layers[tree] = tree_dsk
        deps[tree] = {raw}
    specs = []
    for j, (shape, dtype) in enumerate(outputs):
        out_name = f"{name}-{j}-{token}"
        rest = tuple((s,) for s in shape[1:])
        if j in direct:
            zeros = (0,) * (len(shape) - 1)
            layers[out_name] = {(out_name, i, *zeros): (getitem, (raw, i), j)
                                for i in range(n)}
            specs.append((out_name, (chunk_rows, *rest), dtype))
        else:
            layers[out_name] = {(out_name, *((0,) * len(shape))):
                                (_reshape, (getitem, root, in_tree.index(j)), tuple(shape))}
            specs.append((out_name, tuple((s,) for s in shape), dtype))
        deps[out_name] = {raw} if j in direct else {tree}
    graph = HighLevelGraph(layers, deps)
    if sources is None:
        graph = HighLevelGraph.merge(graph, filters.dask)
    return [Array(graph, nm, chunks=ch, dtype=dt) for nm, ch, dt in specs]


def _reshape(a: np.ndarray, shape: tuple) -> np.ndarray:
    return np.asarray(a).reshape(shape)
