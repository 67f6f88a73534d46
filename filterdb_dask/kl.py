"""Distribution-shift (KL) matrices between groups and the drift summary (docs/method.md §5)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import kernels
from .errors import AnalysisError


def kl_matrix(
    group_hist: np.ndarray, edges: np.ndarray, weights: np.ndarray, labels
) -> pd.DataFrame:
    """The symmetric shift matrix of one grouping as a labelled DataFrame.

    Parameters
    ----------
    group_hist : (G, 9, bins) counts per group.
    edges : (bins + 1,) the equal-width bin edges the counts were made on (the
        result set records them; the width is taken from them, never rebuilt).
    weights : (9,) the global explained-variance ratio.
    labels : G group labels (natural order).

    Returns
    -------
    (G, G) DataFrame, rows and columns labelled.

    Raises
    ------
    AnalysisError
        ``edges`` do not fit the histograms.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if edges.shape != (group_hist.shape[-1] + 1,):
        raise AnalysisError(
            f"{len(edges)} bin edges for histograms of {group_hist.shape[-1]} bins"
        )
    width = edges[1] - edges[0]
    m = kernels.shift_matrix(group_hist, width, np.asarray(weights, dtype=np.float64))
    labels = [str(v) for v in labels]
    return pd.DataFrame(m, index=pd.Index(labels, dtype=object),
                        columns=pd.Index(labels, dtype=object))


def display_order(matrix: pd.DataFrame) -> list[str]:
    """Labels sorted by ascending column mean (the paper's display order)."""
    return list(matrix.mean(axis=0).sort_values(kind="stable").index)


def drift_values(matrix: pd.DataFrame) -> np.ndarray:
    """Upper-triangle values of a shift matrix (the drift distribution)."""
    m = matrix.to_numpy()
    return m[np.triu_indices(len(m), k=1)]


def drift_summary(matrices: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Box-plot statistics of the drift of every grouping."""
    rows = []
    for name, mat in matrices.items():
        v = drift_values(mat)
        if len(v):
            q = np.percentile(v, [0, 25, 50, 75, 100])
        else:
            q = [np.nan] * 5
        rows.append({
            "grouping": name, "groups": len(mat), "pairs": len(v), "min": q[0], "q1": q[1],
            "median": q[2], "q3": q[3], "max": q[4], "mean": v.mean() if len(v) else np.nan,
        })
    return pd.DataFrame(rows)


def drift_curve(
    group_hist: np.ndarray, edges: np.ndarray, weights: np.ndarray, labels, ref=None
) -> pd.DataFrame:
    """Shift of every group to one reference group, per component and in total.

    The terms of :func:`kl_matrix`'s column ``ref``: ``kl_c<k>`` is the symmetric KL
    ``S(p_gk, p_ref,k)`` of component ``k``, ``weighted_c<k>`` is ``w_k`` times it and
    ``total`` their sum ``D(g, ref)`` (docs/method.md §5), the same bits as the
    matrix's entry (same code, same order of additions).

    Parameters
    ----------
    group_hist, edges, weights, labels : as :func:`kl_matrix`.
    ref : the reference group's label; default the first group.

    Returns
    -------
    DataFrame indexed by label (natural order) with ``value`` (the label as a
    number, NaN where it is none), ``total``, ``weighted_c<k>`` and ``kl_c<k>``.

    Raises
    ------
    AnalysisError
        ``ref`` is not one of the labels, or ``edges`` do not fit the histograms.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if edges.shape != (group_hist.shape[-1] + 1,):
        raise AnalysisError(
            f"{len(edges)} bin edges for histograms of {group_hist.shape[-1]} bins"
        )
    labels = [str(v) for v in labels]
    if not labels:
        raise AnalysisError("no groups to compare")
    ref = labels[0] if ref is None else str(ref)
    if ref not in labels:
        shown = ", ".join(map(repr, labels[:20])) + (" ..." if len(labels) > 20 else "")
        raise AnalysisError(f"reference group {ref!r} is not one of the groups: {shown}")
    r = labels.index(ref)
    weights = np.asarray(weights, dtype=np.float64)
    p = kernels.kl_probabilities(np.asarray(group_hist), edges[1] - edges[0])
    n_comp = group_hist.shape[1]
    s = np.empty((len(labels), n_comp))
    total = np.zeros(len(labels))
    for k in range(n_comp):  # shift_matrix's additions, column r
        s[:, k] = kernels.symmetric_kl_matrix(p[:, k, :])[:, r]
        total += weights[k] * s[:, k]
    out = pd.DataFrame({"value": label_values(labels), "total": total},
                       index=pd.Index(labels, dtype=object))
    for k in range(n_comp):
        out[f"weighted_c{k}"] = weights[k] * s[:, k]
    for k in range(n_comp):
        out[f"kl_c{k}"] = s[:, k]
    return out


def label_values(labels) -> np.ndarray:
    """Each label as a finite float, NaN where it does not read as one."""
    out = np.full(len(labels), np.nan)
    for i, v in enumerate(labels):
        try:
            x = float(str(v))
        except (ValueError, OverflowError):
            continue
        if np.isfinite(x):
            out[i] = x
    return out


def is_numeric_grouping(grouping) -> bool:
    """A grouping by a numeric meta column (epoch, step, learning rate): a meta column
    (not the depth decile) whose labels read as at least two finite numbers, with
    only a missing-value group (last) besides. Its drift curve is drawn."""
    from .groups import DEPTH_DECILE, NAN_LABEL

    if grouping.name == DEPTH_DECILE:
        return False
    vals = label_values(grouping.labels)
    bad = np.flatnonzero(np.isnan(vals))
    if len(bad) > 1 or (len(bad) == 1 and not (
            bad[0] == len(vals) - 1 and (grouping.labels[-1] == NAN_LABEL
                                         or grouping.labels[-1].startswith("(missing")))):
        return False
    return int(np.isfinite(vals).sum()) >= 2
