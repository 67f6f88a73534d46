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
