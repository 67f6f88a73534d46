"""The graph builders: map_reduce_chunks's tree keeps chunk order and reduces every
output alike for any fan-in, and a pass over a store is one task per chunk."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from filterdb_dask._graph import concat, map_chunks, map_reduce_chunks, span, total


def _task(x, offset, scale):
    rows = (x.sum(axis=1) + offset) * scale
    return rows, np.array([[len(x)]], dtype=np.int64), np.array([[x.min(), x.max()]])


@pytest.mark.parametrize("split_every", [2, 3, 8, 100])
@pytest.mark.parametrize("sizes", [(5,), (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5), (7,) * 17])
def test_tree_reduction_equals_numpy(split_every, sizes):
    rng = np.random.default_rng(len(sizes) * split_every)
    x = rng.normal(size=(sum(sizes), 9))
    xd = da.from_array(x, chunks=(sizes, 9))
    offsets = [(float(i),) for i in range(len(sizes))]
    rows, count, rng_ = map_reduce_chunks(
        _task, xd, offsets, reducers=[concat, total, span],
        outputs=[((len(x),), np.float64), ((1, 1), np.int64), ((2,), np.float64)],
        name="t", common_args=(2.0,), split_every=split_every)
    with dask.config.set(scheduler="sync"):
        rows, count, rng_ = dask.compute(rows, count, rng_)
    off = np.repeat(np.arange(len(sizes), dtype=float), sizes)
    np.testing.assert_array_equal(rows, (x.sum(axis=1) + off) * 2.0)
    assert count.tolist() == [[len(x)]]
    np.testing.assert_array_equal(rng_, [x.min(), x.max()])
    # the same as per-chunk blocks reduced by dask
    (blocks,) = map_chunks(lambda b, o, s: (_task(b, o, s)[0],), xd, offsets,
                           outputs=[(list(sizes), (), np.float64)], name="u",
                           common_args=(2.0,))
    np.testing.assert_array_equal(blocks.compute(scheduler="sync"), rows)


def test_bad_fan_in_and_no_chunks():
    xd = da.zeros((4, 9), chunks=(2, 9))
    with pytest.raises(ValueError, match="split_every"):
        map_reduce_chunks(_task, xd, [(0.0,), (0.0,)], reducers=[concat], outputs=[],
                          name="t", split_every=1)
    with pytest.raises(ValueError, match="argument sets"):
        map_reduce_chunks(_task, xd, [(0.0,)], reducers=[concat], outputs=[], name="t")


def test_kernels_run_together_equal_each_alone():
    from filterdb_dask._graph import ChunkMap, map_together

    sizes = (4, 3, 5)
    x = np.random.default_rng(1).normal(size=(sum(sizes), 9))
    xd = da.from_array(x, chunks=(sizes, 9))

    def sums(b, scale):
        return (b.sum(axis=1) * scale,)

    def extremes(b, i, tag):
        return np.array([[b.min(), b.max()]]), np.array([[i]])

    m1 = ChunkMap(sums, [()] * 3, [(list(sizes), (), np.float64)], "sums", (2.0,))
    m2 = ChunkMap(extremes, [(i,) for i in range(3)],
                  [([1] * 3, (2,), np.float64), ([1] * 3, (1,), np.int64)], "ext", ("t",))
    (s,), (e, i) = map_together(xd, [m1, m2])
    with dask.config.set(scheduler="sync"):
        s, e, i = dask.compute(s, e, i)
        (s1,) = map_together(xd, [m1])[0]
        e1, i1 = map_together(xd, [m2])[0]
        np.testing.assert_array_equal(s, s1.compute())
        np.testing.assert_array_equal(e, e1.compute())
        np.testing.assert_array_equal(i, i1.compute())
    np.testing.assert_array_equal(s, x.sum(axis=1) * 2.0)
    assert i.ravel().tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one argument set per chunk"):
        map_together(xd, [m1, ChunkMap(sums, [()] * 2, m1.outputs, "bad", (1.0,))])


@pytest.mark.parametrize("split_every", [2, 8])
def test_concat_outputs_with_chunk_rows_skip_the_tree(split_every):
    sizes = (3, 1, 4, 1, 5, 9, 2, 6)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(sum(sizes), 9))
    xd = da.from_array(x, chunks=(sizes, 9))
    args = [(float(i),) for i in range(len(sizes))]
    outputs = [((len(x),), np.float64), ((1, 1), np.int64), ((2,), np.float64)]
    kw = dict(reducers=[concat, total, span], outputs=outputs, name="t",
              common_args=(2.0,), split_every=split_every)
    tree = map_reduce_chunks(_task, xd, args, **kw)
    blocks = map_reduce_chunks(_task, xd, args, chunk_rows=sizes, **kw)
    assert blocks[0].chunks == (sizes,) and blocks[0].npartitions == len(sizes)
    assert blocks[1].npartitions == blocks[2].npartitions == 1
    with dask.config.set(scheduler="sync"):
        want = dask.compute(*tree)
        got = dask.compute(*blocks)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="chunk_rows"):
        map_reduce_chunks(_task, xd, args, chunk_rows=sizes[:-1], **kw)
    with pytest.raises(ValueError, match="sum to"):
        map_reduce_chunks(_task, xd, args, chunk_rows=(1,) * len(sizes), **kw)


def _counted(x, i):
    return _task(x, float(i), 1.0)


def test_distributed_compute_gathers_blocks_and_runs_a_shared_task_once():
    """Execution.compute on a client: a many-block output (joined in this process) and a
    tree-reduced one from the same chunk tasks, each chunk task run once, the values
    those of the synchronous scheduler; also as the ambient scheduler of a library call
    (``ensure``)."""
    from distributed import Client, LocalCluster, get_task_stream

    from filterdb_dask.cluster import Execution, ensure

    sizes = (4, 2, 7, 3, 5)
    x = np.random.default_rng(9).normal(size=(sum(sizes), 9))
    xd = da.from_array(x, chunks=(sizes, 9))
    rows, count, rng_ = map_reduce_chunks(
        _counted, xd, [(i,) for i in range(len(sizes))], reducers=[concat, total, span],
        outputs=[((len(x),), np.float64), ((1, 1), np.int64), ((2,), np.float64)],
        name="c", split_every=2, chunk_rows=sizes)
    want = dask.compute(rows, count, rng_, scheduler="sync")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        for ex in (Execution("test", client=client, verbosity=0), ensure(None, 0)):
            assert ex.client is client
            with get_task_stream(client) as ts:
                got = ex.compute(rows, count, rng_)
            ran = [t["key"] for t in ts.data if str(t["key"][0]).startswith("c-raw-")]
            assert sorted(k[1] for k in ran) == list(range(len(sizes)))  # each chunk once
            for a, b in zip(want, got, strict=True):
                assert isinstance(b, np.ndarray)
                np.testing.assert_array_equal(a, b)
        with dask.config.set(scheduler="sync"):  # a client, but not dask's scheduler
            assert ensure(None, 0).client is None


@pytest.mark.parametrize("seed", range(8))
def test_chunk_workers_gives_each_worker_its_share_mostly_in_runs(seed):
    """Chunks go to workers in runs of consecutive chunks (worker order) but for at
    most two moved per worker, and each worker's rows differ from its share (rows x
    its threads / all threads) by at most the largest chunk, on chunks as uneven as a
    store's (one layer can fill a chunk)."""
    from filterdb_dask.cluster import chunk_workers

    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 1_000_000, size=int(rng.integers(2, 300)))
    rows[rng.integers(len(rows))] = 5_000_000
    n_workers = int(rng.integers(2, 6))
    threads = {f"w{j}": int(t) for j, t in enumerate(rng.integers(1, 4, size=n_workers))}
    got = chunk_workers(rows, threads)
    names = list(threads)
    order = [names.index(w) for w in got]
    descents = sum(b < a for a, b in zip(order[:-1], order[1:], strict=True))
    assert descents <= 2 * 2 * n_workers  # a moved chunk breaks a run at most twice
    total, all_threads = rows.sum(), sum(threads.values())
    for w, t in threads.items():
        mine = sum(int(r) for r, g in zip(rows, got, strict=True) if g == w)
        assert abs(mine - total * t / all_threads) <= rows.max()
    assert chunk_workers(rows, threads) == got  # deterministic


def test_chunk_workers_cuts_by_rows_then_evens_the_cut():
    from filterdb_dask.cluster import chunk_workers

    assert chunk_workers([10] * 8, {"a": 1, "b": 1}) == ["a"] * 4 + ["b"] * 4
    assert chunk_workers([5, 1, 1, 1, 1, 1], {"a": 1, "b": 1}) == ["a"] + ["b"] * 5
    assert chunk_workers([1] * 9, {"a": 1, "b": 2}) == ["a"] * 3 + ["b"] * 6
    # the cut leaves 4 / 8; moving the 3 (nearest to the 2 that evens them) gives 7 / 5
    assert chunk_workers([4, 4, 3, 1], {"a": 1, "b": 1}) == ["a", "b", "a", "b"]
    # nothing moves that would take a worker further from its share
    assert chunk_workers([12, 1, 1, 1, 1, 1, 1, 1, 1, 2], {"a": 1, "b": 1}) == (
        ["a"] + ["b"] * 9)
    assert chunk_workers([0, 0, 0], {"a": 1, "b": 1}) == ["a", "a", "b"]


def test_compute_with_chunk_filters_places_each_chunk_task_on_its_worker():
    """Execution.compute(chunk_filters=...) on a cluster: every chunk task of a store-like
    graph (reads nested in the chunk tasks) runs on the worker chunk_workers names,
    the tree and the blocks follow, and the values are the synchronous scheduler's;
    the graph of the arrays handed in is left unannotated."""
    from dask.array import Array
    from dask.highlevelgraph import HighLevelGraph
    from distributed import Client, LocalCluster, get_task_stream

    from filterdb_dask.cluster import Execution, chunk_workers

    sizes = (12, 1, 1, 1, 1, 1, 1, 1, 1, 2)
    name = "fake-store-filters"
    dsk = {(name, i, 0): (np.full, (n, 9), float(i)) for i, n in enumerate(sizes)}
    xd = Array(HighLevelGraph.from_collections(name, dsk), name, chunks=(sizes, (9,)),
               dtype=np.float64)
    outs = map_reduce_chunks(
        _counted, xd, [(i,) for i in range(len(sizes))], reducers=[concat, total, span],
        outputs=[((sum(sizes),), np.float64), ((1, 1), np.int64), ((2,), np.float64)],
        name="p", split_every=3, chunk_rows=sizes)
    want = dask.compute(*outs, scheduler="sync")
    with dask.config.set({"distributed.scheduler.work-stealing": False}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        nthreads = {a: w["nthreads"] for a, w in
                    sorted(client.scheduler_info(n_workers=-1)["workers"].items())}
        where = chunk_workers(sizes, nthreads)
        assert len(set(where)) == 2 and where[0] != where[1]  # the big chunk alone
        with get_task_stream(client) as ts:
            got = Execution("test", client=client, verbosity=0).compute(
                *outs, chunk_filters=sizes)
        ran = {t["key"][1]: t["worker"] for t in ts.data
               if str(t["key"][0]).startswith("p-raw-")}
        assert ran == dict(enumerate(where))
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
    for layer in outs[0].__dask_graph__().layers.values():
        assert not layer.annotations
