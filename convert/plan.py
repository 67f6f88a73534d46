"""Plan chunks of the filter array whose boundaries lie on model boundaries.

Pure functions, no I/O. Rules (issue 2):

* several small models may share a chunk, up to ``target`` filters;
* a model larger than ``target`` is split only between its layers;
* a layer is never split (a single layer larger than ``target`` is a chunk alone);
* rows no layer references are packed like a model but may be cut anywhere.
"""

from __future__ import annotations

import numpy as np

from filterdb_dask.errors import InputError


def _blocks(starts, stops, models, n_filters):
    """Maximal row runs of one model (with their layer boundaries) or of gap rows.

    Yields ``(begin, end, cuts, is_gap)``; ``cuts`` are the allowed cut positions
    strictly inside the block (layer boundaries), empty for gaps (cut anywhere).
    """
    pos = 0
    i = 0
    n = len(starts)
    while i < n:
        if starts[i] > pos:
            yield pos, int(starts[i]), None, True
        j = i
        cuts = []
        while j + 1 < n and models[j + 1] == models[i] and starts[j + 1] == stops[j]:
            j += 1
            cuts.append(int(starts[j]))
        yield int(starts[i]), int(stops[j]), cuts, False
        pos = int(stops[j])
        i = j + 1
    if pos < n_filters:
        yield pos, n_filters, None, True


def _split_block(begin, end, cuts, target):
    """Cut a block larger than ``target`` at allowed positions, pieces <= target."""
    pieces = []
    a = begin
    if cuts is None:  # gap rows: any position
        while end - a > target:
            pieces.append((a, a + target))
            a += target
        pieces.append((a, end))
        return pieces
    allowed = [*cuts, end]
    k = 0
    while a < end:
        # furthest allowed cut within target; if none, the next one (a big layer)
        best = None
        while k < len(allowed) and allowed[k] - a <= target:
            best = allowed[k]
            k += 1
        if best is None:
            best = allowed[k]
            k += 1
        pieces.append((a, best))
        a = best
    return pieces


def plan_chunks(
    starts: np.ndarray,
    stops: np.ndarray,
    model_ids: np.ndarray,
    n_filters: int,
    target: int,
) -> np.ndarray:
    """Chunk boundaries of the filter array, aligned with models and layers.

    Parameters
    ----------
    starts, stops : (L,) ``[start, stop)`` rows of each layer (any order,
        non-overlapping).
    model_ids : (L,) model of each layer.
    n_filters : N, the length of the filter array.
    target : the largest chunk wanted, in filters.

    Returns
    -------
    (K, 2) int64 ``[begin, end)`` rows of each chunk, covering ``[0, N)`` in order.
    """
    if target < 1:
        raise InputError(f"chunk target must be at least 1 filter, got {target!r}")
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    s, e, m = starts[order], stops[order], np.asarray(model_ids)[order]
    chunks: list[tuple[int, int]] = []
    cur_a = cur_b = None
    for begin, end, cuts, _gap in _blocks(s, e, m, n_filters):
        size = end - begin
        if cur_a is not None and cur_b - cur_a + size <= target:
            cur_b = end
            continue
        if cur_a is not None:
            chunks.append((cur_a, cur_b))
            cur_a = cur_b = None
        if size <= target:
            cur_a, cur_b = begin, end
        else:
            chunks.extend(_split_block(begin, end, cuts, target))
    if cur_a is not None:
        chunks.append((cur_a, cur_b))
    return np.asarray(chunks, dtype=np.int64).reshape(-1, 2)


def chunk_layers(plan: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The chunk of every layer (-1 never happens for a valid plan)."""
    idx = np.searchsorted(plan[:, 1], starts, side="right")
    ok = (idx < len(plan)) & (stops <= plan[np.minimum(idx, len(plan) - 1), 1])
    if not ok.all():
        bad = int(np.nonzero(~ok)[0][0])
        raise InputError(f"layer {bad} ({starts[bad]}:{stops[bad]}) spans a chunk boundary")
    return idx.astype(np.int64)
