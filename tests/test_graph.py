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
