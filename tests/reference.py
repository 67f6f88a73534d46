"""An in-memory reference of docs/method.md written straight from the text.

numpy / scipy / scikit-learn only, whole arrays in memory, loops where the text
loops. It shares no code with filterdb_dask, so the two can check each other.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats
from sklearn.decomposition import PCA

EPS = np.finfo(np.float32).eps


def scale(x):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), 9)
    peak = np.abs(x).max(axis=1, keepdims=True)
    return np.divide(x, peak, out=np.zeros_like(x), where=peak != 0)


def pca(xs):
    p = PCA(n_components=9, svd_solver="full").fit(xs)
    return {
        "mean": p.mean_,
        "components": p.components_,
        "explained_variance": p.explained_variance_,
        "explained_variance_ratio": p.explained_variance_ratio_,
        "coefs": p.transform(xs),
    }


def decile_labels(depth_norm):
    cats = pd.cut(
        pd.Series(depth_norm), bins=[i / 10 for i in range(11)], right=True,
        include_lowest=True,
        labels=["[0.0, 0.1]"] + [f"({i / 10:.1f}, {(i + 1) / 10:.1f}]" for i in range(1, 10)],
    )
    return cats.astype(str).to_numpy()


def row_labels(meta, by):
    """Group label of every filter row referenced by meta, and the row indices."""
    rows, labels = [], []
    for i in range(len(meta)):
        a, b = (int(v) for v in str(meta["filter_ids"].iloc[i]).split(":"))
        if by == "depth decile":
            lab = decile_labels([meta["conv_depth_norm"].iloc[i]])[0]
        else:
            v = meta[by].iloc[i]
            lab = "nan" if pd.isna(v) else str(v)
            if by == "Task" and "Segmentation" in lab:
                lab = "Segmentation"
        rows.append(np.arange(a, b + 1))
        labels.append(np.full(b - a + 1, lab, dtype=object))
    return np.concatenate(rows), np.concatenate(labels)


def kl_matrix(coefs, labels, lo, hi, ratio, bins=70):
    groups = sorted(set(labels), key=str)
    width = (hi - lo) / bins
    probs = {}
    for g in groups:
        sel = labels == g
        ps = []
        for k in range(9):
            c, _ = np.histogram(coefs[sel, k], bins=bins, range=(lo, hi))
            n = c.sum()
            d = c / (n * width)
            d[c == 0] = EPS
            ps.append(d / d.sum())
        probs[g] = ps
    m = np.zeros((len(groups), len(groups)))
    for i, g in enumerate(groups):
        for j, h in enumerate(groups):
            if i == j:
                continue
            m[i, j] = sum(
                ratio[k] * (scipy.stats.entropy(probs[g][k], probs[h][k])
                            + scipy.stats.entropy(probs[h][k], probs[g][k]))
                for k in range(9)
            )
    return groups, m


def layer_quality(w, eps=0.01):
    """(sparsity, variance_entropy, variance_entropy_clean, n_clean) of one layer."""
    w = np.asarray(w, dtype=np.float64).reshape(len(w), 9)
    t = eps * np.abs(w).max()
    if t == 0:
        t = 1.0
    sparse = np.all(np.abs(w) < t, axis=1)

    def ve(a):
        if len(a) < 2:
            return np.nan
        s = np.linalg.svd(a - a.mean(axis=0), compute_uv=False)
        v = s**2 / (len(a) - 1)
        if v.sum() == 0:
            return 0.0
        return scipy.stats.entropy(v / v.sum(), base=10)

    return sparse.mean(), ve(w), ve(w[~sparse]), int((~sparse).sum())


def entropy_norm(n):
    ll, x0, k, b = 1.2618047, 2.30436435, 0.88767525, -0.31050834
    with np.errstate(divide="ignore"):
        return ll / (1 + np.exp(-k * (np.log2(n) - x0))) + b
