"""The chunk plan: boundaries on model boundaries, layers never split (Hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterdb_dask.convert.plan import chunk_layers, plan_chunks
from filterdb_dask.errors import InputError


@st.composite
def databases(draw):
    n_models = draw(st.integers(1, 12))
    starts, stops, models = [], [], []
    pos = 0
    for m in range(n_models):
        if draw(st.booleans()) and draw(st.booleans()):
            pos += draw(st.integers(1, 30))  # rows no layer references
        for _ in range(draw(st.integers(1, 8))):
            size = draw(st.one_of(st.integers(1, 20), st.integers(50, 400)))
            starts.append(pos)
            stops.append(pos + size)
            models.append(m)
            pos += size
    n = pos + draw(st.integers(0, 20))
    perm = draw(st.permutations(range(len(starts))))
    idx = np.asarray(perm)
    return (np.asarray(starts)[idx], np.asarray(stops)[idx], np.asarray(models)[idx], n)


@settings(max_examples=300, deadline=None)
@given(db=databases(), target=st.integers(1, 1500))
def test_plan_alignment_property(db, target):
    starts, stops, models, n = db
    plan = plan_chunks(starts, stops, models, n, target)
    # covers [0, N) contiguously
    assert plan[0, 0] == 0 and plan[-1, 1] == n
    assert np.all(plan[1:, 0] == plan[:-1, 1]) and np.all(plan[:, 1] > plan[:, 0])
    # no layer is split
    chunk = chunk_layers(plan, starts, stops)
    assert np.all(stops <= plan[chunk, 1]) and np.all(starts >= plan[chunk, 0])
    # model extents (referenced rows only)
    ext = {m: (starts[models == m].min(), stops[models == m].max()) for m in set(models)}
    size = {m: (stops[models == m] - starts[models == m]).sum() for m in set(models)}
    for b in plan[1:, 0]:
        inside = [m for m, (a, e) in ext.items() if a < b < e]
        for m in inside:  # a cut inside a model only when the model exceeds the target
            assert size[m] > target
    for a, b in plan:
        if b - a > target:  # an oversized chunk is one layer (or nothing else fits)
            in_chunk = (starts >= a) & (stops <= b)
            assert in_chunk.sum() == 1 and (stops - starts)[in_chunk][0] == b - a


def test_small_models_share_chunks():
    starts = np.array([0, 10, 20, 30])
    stops = np.array([10, 20, 30, 40])
    plan = plan_chunks(starts, stops, np.array([0, 1, 2, 3]), 40, 25)
    assert plan.tolist() == [[0, 20], [20, 40]]


def test_big_layer_alone():
    plan = plan_chunks(np.array([0, 5, 105]), np.array([5, 105, 110]),
                       np.array([0, 0, 0]), 110, 30)
    assert plan.tolist() == [[0, 5], [5, 105], [105, 110]]


def test_target_must_be_positive():
    with pytest.raises(InputError, match="chunk target must be at least 1 filter"):
        plan_chunks(np.array([0]), np.array([1]), np.array([0]), 1, 0)


def test_layer_spanning_chunks_is_detected():
    with pytest.raises(InputError, match="spans a chunk boundary"):
        chunk_layers(np.array([[0, 5], [5, 10]]), np.array([3]), np.array([7]))
