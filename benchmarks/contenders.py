"""The contenders of the benchmark suite, each a function ``f(ctx) -> dict``.

Every contender computes (part of) the analysis on the same store / file with the
same workers; the harness times it, samples memory, and checks its output against
the float64 in-memory reference before its time counts.
"""

from __future__ import annotations

import numpy as np

GROUPING = "Task"


# ------------------------------------------------------------------- helpers
def _scale(x):
    x = np.asarray(x, dtype=np.float64)
    p = np.abs(x).max(axis=1, keepdims=True)
    return np.divide(x, p, out=np.zeros_like(x), where=p > 0)


def _row_codes_chunk(x, bounds, codes):
    """Group code of every row of a chunk (-1 for rows of no layer)."""
    out = np.full(len(x), -1, dtype=np.int64)
    for (a, b), c in zip(bounds, codes, strict=True):
        out[a:b] = c
    return out


def row_codes(ctx):
    """Lazy per-row group codes of the benchmark's grouping, aligned with filters."""
    import dask
    import dask.array as da

    store, grouping = ctx["store"], ctx["grouping"]
    blocks = []
    for i, (b, c) in enumerate(zip(store.chunk_bounds(), store.per_chunk(grouping.codes),
                                   strict=True)):
        n = store.filters.chunks[0][i]
        blocks.append(da.from_delayed(
            dask.delayed(_row_codes_chunk)(
                store.filters.blocks[i], b, c), shape=(n,), dtype=np.int64))
    return da.concatenate(blocks)


def _project(x, mean, comps):
    return (_scale(x) - mean) @ comps.T


# ------------------------------------------------------------------- contenders
def _chunk_sum(x):
    return (np.array([x.sum(dtype=np.float64)]),)


def _read_sum(store):
    """Sum of all values, one task per chunk that reads and sums it (the store read
    nested in the task, the partial sums reduced in a tree of eight), as every pass
    of the analysis runs: :func:`filterdb_dask._graph.map_reduce_chunks`."""
    from filterdb_dask._graph import map_reduce_chunks, total

    (s,) = map_reduce_chunks(_chunk_sum, store.filters, [()] * store.filters.numblocks[0],
                             reducers=[total], outputs=[((1,), np.float64)],
                             name="read-floor")
    return s


def read_floor(ctx):
    """One pass that only reads and decompresses the store (sum of all values), on
    the benchmark's local cluster (worker processes)."""
    return {"sum": float(_read_sum(ctx["store"]).compute()[0])}


def read_floor_threads(ctx):
    """The same read in this process on Dask's threaded scheduler (one thread per
    core): the floor the worker processes are measured against."""
    return {"sum": float(_read_sum(ctx["store"]).compute(scheduler="threads")[0])}


def _compute(*collections):
    """Computed as :func:`filterdb_dask.analysis.analyze` computes a pass (its
    :func:`filterdb_dask.cluster.ensure`: on the benchmark's cluster, results gathered
    block by block)."""
    from filterdb_dask.cluster import ensure

    return ensure(None, 0).compute(*collections)


def fdb_pass1(ctx):
    from filterdb_dask.pca import layer_stats, pca_from_stats

    (stats,) = _compute(layer_stats(ctx["store"]))
    return {"pca": pca_from_stats(ctx["store"].to_meta_order(stats))}


def fdb_pass2(ctx):
    from filterdb_dask.histograms import coef_range_density

    rng, dens = _compute(*coef_range_density(ctx["store"], ctx["fdb"].pca))
    return {"coef_range": rng}


def fdb_pass3(ctx):
    from filterdb_dask.histograms import group_histograms, layer_histograms

    res = ctx["fdb"]
    hist, _ = _compute(*layer_histograms(ctx["store"], res.pca, res.coef_range,
                                         bins=ctx["bins"]))
    g = ctx["grouping"]
    return {"group_hist": group_histograms(ctx["store"].to_meta_order(hist), g.codes,
                                           g.n_groups)}


def fdb_whole(ctx):
    from filterdb_dask.analysis import analyze

    res = analyze(ctx["store"], bins=ctx["bins"], verbosity=0)
    slug = ctx["grouping"].slug
    return {"pca": res.pca, "group_hist": res.group_hist[slug], "kl": res.kl[slug].to_numpy(),
            "coef_range": res.coef_range, "results": res}


def authors_in_memory(ctx):
    """numpy + scikit-learn PCA + per-group np.histogram + pairwise scipy KL."""
    import h5py
    import scipy.stats
    from sklearn.decomposition import PCA

    src = ctx["source"]
    with h5py.File(src.path, "r") as f:
        x = f[src.name][...].reshape(-1, 9)
    xs = _scale(x)
    meta = src.meta
    rows = np.concatenate([np.arange(a, b) for a, b in zip(meta["start"], meta["stop"],
                                                           strict=True)])
    labels = np.concatenate([np.full(b - a, c) for a, b, c in
                             zip(meta["start"], meta["stop"], ctx["grouping"].codes, strict=True)])
    pca = PCA(n_components=9).fit(xs[rows])
    coefs = pca.transform(xs[rows])
    lo, hi = coefs.min(), coefs.max()
    bins = ctx["bins"]
    G = ctx["grouping"].n_groups
    hist = np.zeros((G, 9, bins), dtype=np.int64)
    for g in range(G):
        sel = labels == g
        for k in range(9):
            hist[g, k], _ = np.histogram(coefs[sel, k], bins=bins, range=(lo, hi))
    width = (hi - lo) / bins
    eps = np.finfo(np.float32).eps
    p = hist / (hist.sum(-1, keepdims=True) * width)
    p = np.where(hist == 0, eps, p)
    p = p / p.sum(-1, keepdims=True)
    w = pca.explained_variance_ratio_
    kl = np.zeros((G, G))
    for i in range(G):
        for j in range(G):
            if i != j:
                kl[i, j] = sum(w[k] * (scipy.stats.entropy(p[i, k], p[j, k])
                                       + scipy.stats.entropy(p[j, k], p[i, k]))
                               for k in range(9))
    return {"pca": {"explained_variance": pca.explained_variance_,
                    "explained_variance_ratio": pca.explained_variance_ratio_,
                    "components": pca.components_, "mean": pca.mean_},
            "group_hist": hist, "kl": kl, "coef_range": np.array([lo, hi])}


def daskml_pca(ctx):
    """dask-ml PCA(svd_solver='tsqr') on the scaled filters (PCA step only)."""
    from dask_ml.decomposition import PCA

    xs = ctx["store"].filters.map_blocks(_scale, dtype=np.float64)
    pca = PCA(n_components=9, svd_solver="tsqr").fit(xs)
    return {"pca": {"explained_variance": pca.explained_variance_,
                    "explained_variance_ratio": pca.explained_variance_ratio_,
                    "components": pca.components_, "mean": pca.mean_}}


def _lazy_coefs(ctx):
    ref = ctx["fdb"]
    return ctx["store"].filters.map_blocks(_project, ref.pca.mean, ref.pca.components,
                                           dtype=np.float64)


def _edges(ctx):
    from filterdb_dask.kernels import histogram_edges

    return histogram_edges(ctx["bins"], *ctx["fdb"].coef_range)


def xhistogram_groups(ctx):
    """Grouped histograms with xhistogram (2-D histogram of group code x coefficient)."""
    import dask
    from xhistogram.core import histogram

    coefs = _lazy_coefs(ctx)
    codes = row_codes(ctx)
    G = ctx["grouping"].n_groups
    gedges = np.arange(G + 1) - 0.5
    edges = _edges(ctx)
    hs = [histogram(codes, coefs[:, k], bins=[gedges, edges])[0] for k in range(9)]
    hs = dask.compute(*hs)
    return {"group_hist": np.stack(hs, axis=1).astype(np.int64)}


def flox_groups(ctx):
    """Grouped histograms with flox (count by group code and binned coefficient)."""
    import dask
    import flox
    import pandas as pd

    coefs = _lazy_coefs(ctx)
    codes = row_codes(ctx)
    G = ctx["grouping"].n_groups
    edges = _edges(ctx)
    ones = dask.array.ones_like(codes, dtype=np.int64)
    out = []
    for k in range(9):
        res, *_ = flox.groupby_reduce(
            ones, codes, coefs[:, k], func="sum",
            expected_groups=(pd.Index(np.arange(G)),
                             pd.IntervalIndex.from_breaks(edges, closed="left")),
            isbin=(False, True), fill_value=0)
        out.append(res)
    out = dask.compute(*out)
    return {"group_hist": np.stack(out, axis=1).astype(np.int64)}


def _hand_moments(x):
    xs = _scale(x)
    return np.concatenate([[len(xs)], xs.sum(0), (xs.T @ xs).ravel()])[None]


def _hand_hist(x, codes, mean, comps, G, edges):
    codes = codes.ravel()
    c = _project(x, mean, comps)
    out = np.zeros((1, G, 9, len(edges) - 1), dtype=np.int64)
    for g in range(G):
        sel = codes == g
        for k in range(9):
            out[0, g, k], _ = np.histogram(c[sel, k], bins=edges)
    return out


def handrolled(ctx):
    """A competent user's Dask code: map_blocks covariance, then np.histogram per chunk."""
    import dask.array as da

    f = ctx["store"].filters
    mom = f.map_blocks(_hand_moments, chunks=((1,) * f.numblocks[0], (91,)),
                       dtype=np.float64).sum(axis=0).compute()
    n, s, xtx = mom[0], mom[1:10], mom[10:].reshape(9, 9)
    mean = s / n
    cov = (xtx - n * np.outer(mean, mean)) / (n - 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    comps = vecs[:, order].T
    comps *= np.sign(comps[np.arange(9), np.argmax(np.abs(comps), axis=1)])[:, None]
    coefs = f.map_blocks(_project, mean, comps, dtype=np.float64)
    lo, hi = da.compute(coefs.min(), coefs.max())
    from filterdb_dask.kernels import histogram_edges

    edges = histogram_edges(ctx["bins"], lo, hi)
    codes = row_codes(ctx)
    G = ctx["grouping"].n_groups
    h = da.map_blocks(_hand_hist, f, codes[:, None], mean, comps, G, edges,
                      chunks=((1,) * f.numblocks[0], (G,), (9,), (len(edges) - 1,)),
                      new_axis=[2, 3], dtype=np.int64).sum(axis=0).compute()
    return {"pca": {"explained_variance": vals[order], "components": comps, "mean": mean,
                    "explained_variance_ratio": vals[order] / vals.sum()},
            "group_hist": h, "coef_range": np.array([lo, hi])}


CONTENDERS = {
    "read floor (threads)": read_floor_threads,
    "read floor": read_floor,
    "filterdb_dask pass 1": fdb_pass1,
    "filterdb_dask pass 2": fdb_pass2,
    "filterdb_dask pass 3": fdb_pass3,
    "filterdb_dask whole analysis": fdb_whole,
    "authors' method in memory": authors_in_memory,
    "dask-ml PCA (tsqr)": daskml_pca,
    "xhistogram grouped histograms": xhistogram_groups,
    "flox grouped histograms": flox_groups,
    "hand-rolled dask": handrolled,
}


def errors(out: dict, ref: dict) -> dict:
    """Error of a contender's output against the float64 reference."""
    e = {}
    if "pca" in out and ref.get("pca") is not None:
        # filterdb_dask gives a typed PCA, the peers plain dicts of the same names
        p, r = (x.to_dict() if hasattr(x, "to_dict") else x for x in (out["pca"], ref["pca"]))
        ev, rv = np.asarray(p["explained_variance"]), np.asarray(r["explained_variance"])
        e["smallest_eigenvalue_rel_error"] = float(abs(ev[-1] - rv[-1]) / rv[-1])
        e["explained_variance_ratio_max_abs_error"] = float(np.max(np.abs(
            np.asarray(p["explained_variance_ratio"]) - np.asarray(r["explained_variance_ratio"]))))
    if "group_hist" in out and ref.get("group_hist") is not None:
        a, b = np.asarray(out["group_hist"]), ref["group_hist"]
        if a.shape == b.shape:
            e["histogram_cells_differing"] = int((a != b).sum())
            e["histogram_counts_moved"] = int(np.abs(a - b).sum())
        else:
            e["histogram_shape_mismatch"] = f"{a.shape} vs {b.shape}"
    if "kl" in out and ref.get("kl") is not None:
        a, b = np.asarray(out["kl"]), ref["kl"]
        mask = b > 0
        e["kl_max_rel_error"] = float(np.max(np.abs(a[mask] - b[mask]) / b[mask])) if \
            mask.any() else 0.0
    return e
