"""Pure numpy per-chunk kernels of the CNN Filter DB method (docs/method.md §2-7).

Nothing here knows about Dask: every function takes and returns numpy arrays, so
their composition is the in-memory path and the oracle the graph builders are
tested against. Importing dask in this module is forbidden.

Conventions
-----------
``x``       (n, D) filters of one chunk, float32 or float64, unscaled; D = K² values
            of a K×K kernel (D = 9 for the published 3×3 DB; every kernel works for
            any D >= 2, the 3×3 results are those of the 9-only code bit for bit).
``bounds``  (L, 2) int64 ``[start, stop)`` rows of the chunk's layers, relative
            to the chunk, sorted and non-overlapping. Rows outside every layer
            are ignored (filters no meta row references).
Per-layer outputs follow the order of ``bounds``.

Accumulation is always float64. The compiled twins of these kernels live in
:mod:`filterdb_dask._compiled`; they do the same float operations in the same
order, so their results are the same bits (see tests), whatever the chunking.
"""

from __future__ import annotations

import numpy as np

from .errors import AnalysisError, StoreError

__all__ = [
    "EPS_KL",
    "N_STATS",
    "STAT_N",
    "STAT_MEAN",
    "STAT_M2",
    "STAT_SPARSITY",
    "STAT_VE",
    "STAT_VE_CLEAN",
    "STAT_N_CLEAN",
    "ENTROPY_FIT",
    "StatLayout",
    "stat_layout",
    "stats_dim",
    "scale_filters",
    "project",
    "layer_stats_chunk",
    "moments_combine",
    "pca_finalize",
    "quality_finalize",
    "range_density_chunk",
    "histogram_chunk",
    "histogram_edges",
    "fine_edges",
    "validate_fine_edges",
    "bin_indices",
    "fine_bin_indices",
    "bin_indices_searchsorted",
    "kl_probabilities",
    "symmetric_kl_matrix",
    "shift_matrix",
    "variance_entropy_from_scatter",
    "entropy_norm",
    "silverman_bandwidth",
    "histogram_percentiles",
    "binned_kde",
    "ridge_densities",
    "orthogonality_rows",
    "orthogonality_chunk",
]

#: float32 machine epsilon, the value an empty bin gets before normalising (docs/method.md §5)
EPS_KL = float(np.finfo(np.float32).eps)

# Column layout of the per-layer statistics of pass 1 (``layer_stats_chunk``) for
# D = 9; ``stat_layout(d)`` gives it for any D (same order: n, mean, scatter, ...).
STAT_N = 0
STAT_MEAN = slice(1, 10)
STAT_M2 = slice(10, 91)
STAT_SPARSITY = 91
STAT_VE = 92
STAT_VE_CLEAN = 93
STAT_N_CLEAN = 94
N_STATS = 95


class StatLayout:
    """Columns of pass 1's per-layer statistics for filters of ``d`` values:
    ``n``, ``mean`` (d), ``m2`` (d² centred scatter, row-major), ``sparsity``,
    ``ve``, ``ve_clean``, ``n_clean``; ``size`` columns in all (95 for d = 9)."""

    def __init__(self, d: int):
        self.d = int(d)
        self.n = 0
        self.mean = slice(1, 1 + d)
        self.m2 = slice(1 + d, 1 + d + d * d)
        self.sparsity = 1 + d + d * d
        self.ve = self.sparsity + 1
        self.ve_clean = self.sparsity + 2
        self.n_clean = self.sparsity + 3
        self.size = self.sparsity + 4


def stat_layout(d: int) -> StatLayout:
    """The :class:`StatLayout` of filters of ``d`` values."""
    return StatLayout(d)


def stats_dim(stats: np.ndarray) -> int:
    """D of pass-1 statistics from their width ``D² + D + 5``."""
    width = int(np.shape(stats)[-1])
    d = int((np.sqrt(4 * width - 19) - 1) // 2)
    for c in (d - 1, d, d + 1):
        if c >= 1 and c * c + c + 5 == width:
            return c
    raise AnalysisError(f"pass-1 statistics have {width} columns, not D² + D + 5 for any D")

# Fixed summation order of pass 1 (both engines): row r of a layer (counted from its
# first row) feeds running sum ("lane") r % LANES, left to right, the lanes starting
# at 0.0; at the end the lanes are summed pairwise (``_lane_tree``). Long lanes let
# the compiled kernel add a block of LANES rows in one vectorised loop.
LANES = 256
#: the 45 (j, m), j <= m, entries of a 9x9 scatter, in row-major order
PAIRS = tuple(np.ascontiguousarray(a) for a in np.triu_indices(9))


def pairs(d: int) -> tuple[np.ndarray, np.ndarray]:
    """The (j, m), j <= m, entries of a d×d scatter in row-major order (``PAIRS`` for 9)."""
    if d == 9:
        return PAIRS
    return tuple(np.ascontiguousarray(a) for a in np.triu_indices(d))

#: (l, x0, k, b) of the logistic fit T(n) of the maximal variance entropy (docs/method.md §7)
ENTROPY_FIT = (1.2618047, 2.30436435, 0.88767525, -0.31050834)


# --------------------------------------------------------------------------- scaling
def scale_filters(x: np.ndarray) -> np.ndarray:
    """Divide each filter by its absolute peak (docs/method.md §2).

    Parameters
    ----------
    x : (n, D) array
        Unscaled filters.

    Returns
    -------
    (n, D) float64 array; an all-zero filter stays zero.
    """
    x = np.asarray(x, dtype=np.float64)
    peak = np.max(np.abs(x), axis=1, keepdims=True)
    out = np.zeros_like(x)
    np.divide(x, peak, out=out, where=peak > 0)
    return out


def project(xs: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """PCA coefficients ``(xs - mean) @ components.T`` in a fixed summation order.

    The sum over the D inputs runs left to right with one multiply and one add per
    term, exactly as the compiled kernel does, so that the bin a coefficient falls
    into never depends on the engine or on the chunking.

    Parameters
    ----------
    xs : (n, D) float64
        Scaled filters.
    mean : (D,) float64
    components : (D, D) float64, one component per row.

    Returns
    -------
    (n, D) float64 coefficients.
    """
    d = xs - mean
    out = np.empty((d.shape[0], components.shape[0]), dtype=np.float64)
    for k in range(components.shape[0]):
        acc = d[:, 0] * components[k, 0]
        for j in range(1, d.shape[1]):
            acc = acc + d[:, j] * components[k, j]
        out[:, k] = acc
    return out


def _layer_rows(bounds: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the rows of a chunk that belong to some layer."""
    mask = np.zeros(n, dtype=bool)
    for a, b in bounds:
        mask[a:b] = True
    return mask


# --------------------------------------------------------------------------- pass 1
def _lane_tree(v: np.ndarray) -> np.ndarray:
    """Sum over the last axis (LANES, a power of two) in pass 1's fixed pairwise
    order: lane l + lane l + half, halving until one is left."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def _fixed_sums(d: np.ndarray, products: bool = False, slab: int = 64) -> np.ndarray:
    """Pass 1's fixed-order column sums of ``d`` (n, D), or of the D(D+1)/2 products
    ``d[:, j] * d[:, m]`` (:func:`pairs`) when ``products``.

    Row r feeds lane r % LANES, left to right, from 0.0; then the lanes pairwise
    (``_lane_tree``). The same additions as the compiled kernel, so both engines give
    the same bits whatever the chunking. (Padding rows with zeros changes no lane:
    a lane is never -0.0, and x + 0.0 == x otherwise.)
    """
    total = 0.0
    pj, pm = pairs(d.shape[1])
    if products:  # bounded memory for wide filters; blocks add in the same order
        slab = max(1, slab * 45 // len(pj))
    for s0 in range(0, len(d), slab * LANES):  # bounded memory
        part = d[s0 : s0 + slab * LANES]
        if products:
            part = part[:, pj] * part[:, pm]
        rows = -(-len(part) // LANES) * LANES
        if rows != len(part):
            part = np.concatenate([part, np.zeros((rows - len(part), part.shape[1]))])
        # a reduction over the outer axis adds block after block, lane by lane
        blocks = part.reshape(-1, LANES, part.shape[1])
        total = np.concatenate([np.broadcast_to(total, (1, *blocks.shape[1:])), blocks]).sum(
            axis=0)
    return _lane_tree(np.asarray(total).T)


def _scatter_from_sums(sums: np.ndarray, prods: np.ndarray, n: float) -> np.ndarray:
    """Centred D×D scatter from shifted sums and cross products."""
    d = len(sums)
    pj, pm = pairs(d)
    v = prods - sums[pj] * sums[pm] / n
    out = np.empty((d, d))
    out[pj, pm] = v
    out[pm, pj] = v
    return out


def layer_stats_chunk(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per-layer moments of the scaled filters and quality of the unscaled ones.

    Parameters
    ----------
    x : (n, D) array
        The chunk's filters, unscaled.
    bounds : (L, 2) int array
        ``[start, stop)`` rows of each layer within the chunk.

    Returns
    -------
    (L, D² + D + 5) float64 array (:func:`stat_layout`; for D = 9 the columns
    ``STAT_N`` (filter count), ``STAT_MEAN`` (mean of scaled filters), ``STAT_M2``
    (centred scatter of scaled filters, 81 values), ``STAT_SPARSITY``, ``STAT_VE``
    (variance entropy), ``STAT_VE_CLEAN`` (on non-sparse filters), ``STAT_N_CLEAN``).
    """
    bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    dim = int(np.shape(x)[1])
    lay = stat_layout(dim)
    STAT_MEAN, STAT_M2 = lay.mean, lay.m2  # the D = 9 names, for any D
    STAT_SPARSITY, STAT_VE, STAT_VE_CLEAN, STAT_N_CLEAN = (
        lay.sparsity, lay.ve, lay.ve_clean, lay.n_clean)
    out = np.zeros((len(bounds), lay.size), dtype=np.float64)
    # NaN or Inf filters (a store the converter did not write) are refused in one line
    # by variance_entropy_from_scatter; numpy's warnings on the way there are noise
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i, (a, b) in enumerate(bounds):
            w = np.asarray(x[a:b], dtype=np.float64)
            n = w.shape[0]
            out[i, STAT_N] = n
            if n == 0:
                out[i, STAT_MEAN] = 0.0
                out[i, STAT_SPARSITY] = np.nan
                out[i, STAT_VE] = np.nan
                out[i, STAT_VE_CLEAN] = np.nan
                continue
            xs = scale_filters(w)
            peaks = np.max(np.abs(w), axis=1)
            t = 0.01 * peaks.max()
            if t == 0:
                t = 1.0
            clean = peaks >= t  # sparse <=> every |value| < t <=> peak < t
            n_clean = int(clean.sum())
            # shifted by the layer's first filter: sums of (x - k) stay small
            ds = xs - xs[0]
            dw = w - w[0]
            dc = dw * clean[:, None].astype(np.float64)
            s_s, s_w, s_c = _fixed_sums(ds), _fixed_sums(dw), _fixed_sums(dc)
            out[i, STAT_MEAN] = xs[0] + s_s / n
            out[i, STAT_M2] = _scatter_from_sums(s_s, _fixed_sums(ds, True), n).ravel()
            out[i, STAT_SPARSITY] = (n - n_clean) / n
            out[i, STAT_N_CLEAN] = n_clean
            out[i, STAT_VE] = variance_entropy_from_scatter(
                _scatter_from_sums(s_w, _fixed_sums(dw, True), n), n)
            sc_clean = (_scatter_from_sums(s_c, _fixed_sums(dc, True), n_clean) if n_clean
                        else np.zeros((dim, dim)))
            out[i, STAT_VE_CLEAN] = variance_entropy_from_scatter(sc_clean, n_clean)
    return out


def variance_entropy_from_scatter(scatter: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Variance entropy (base 10) from centred D×D scatter matrices (docs/method.md §7).

    The eigenvalues of the scatter are the squared singular values of the centred
    filters, so ``v = eig / (n - 1)`` and the entropy of ``v / sum(v)`` follow.

    Parameters
    ----------
    scatter : (..., D, D) float64
    n : int or (...) array of filter counts.

    Returns
    -------
    (...) float64: NaN where ``n < 2``, 0 where the scatter is zero.

    Raises
    ------
    StoreError
        A scatter is not finite: the filters hold NaN or Inf values, which the
        converter refuses (checked here, on a few values per layer, rather than on
        every filter of every chunk).
    """
    scatter = np.asarray(scatter, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if not np.isfinite(scatter).all():
        raise StoreError(
            "the store's filters hold NaN or Inf values, which the converter refuses: it "
            "was not written by it (or was altered along with its checksums); convert "
            "again from a dataset.h5 with finite values")
    eig = np.linalg.eigvalsh(scatter)
    eig = np.clip(eig, 0.0, None)
    total = eig.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = eig / total[..., None]
        terms = np.where(p > 0, -p * np.log10(np.where(p > 0, p, 1.0)), 0.0)
    ent = np.maximum(terms.sum(axis=-1), 0.0)  # rounding can dip below 0 at rank 1
    ent = np.where(total > 0, ent, 0.0)
    return np.where(n < 2, np.nan, ent)


def entropy_norm(n: np.ndarray | float, d: int = 9) -> np.ndarray:
    """Normaliser of the variance entropy of ``n`` filters of ``d`` values.

    D = 9 (3×3): the published logistic fit ``T(n)`` of the largest variance
    entropy. Any other D: ``log10(min(n - 1, D))``, the largest variance entropy
    ``n`` filters in D dimensions can have (at most ``min(n - 1, D)`` non-zero
    variances, all equal); NaN for n < 3, whose entropy is always 0 (one direction at
    most), so its normalised value is undefined (docs/method.md §7).
    """
    n = np.asarray(n, dtype=np.float64)
    if int(d) != 9:
        rank = np.minimum(n - 1.0, float(d))
        ok = rank >= 2.0
        return np.where(ok, np.log10(np.where(ok, rank, 2.0)), np.nan)
    ll, x0, k, b = ENTROPY_FIT
    with np.errstate(divide="ignore"):
        return ll / (1.0 + np.exp(-k * (np.log2(n) - x0))) + b


# ----------------------------------------------------------------------- merging / PCA
def moments_combine(
    n: np.ndarray, mean: np.ndarray, m2: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Merge K partial (count, mean, scatter) results exactly (Chan et al.).

    Parameters
    ----------
    n : (K,) counts
    mean : (K, D) means
    m2 : (K, D, D) or (K, D²) centred scatter matrices

    Returns
    -------
    (n_total, mean (D,), m2 (D, D)), all float64.
    """
    n = np.asarray(n, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    d = mean.shape[-1] if mean.ndim == 2 else 9
    mean = mean.reshape(len(n), d)
    m2 = np.asarray(m2, dtype=np.float64).reshape(len(n), d, d)
    total = n.sum()
    if total == 0:
        return 0.0, np.zeros(d), np.zeros((d, d))
    mu = (n[:, None] * mean).sum(axis=0) / total
    dev = mean - mu
    # einsum's own loops, not BLAS: the same bits whatever threads BLAS would use
    between = np.einsum("i,ij,ik->jk", n, dev, dev)
    return float(total), mu, m2.sum(axis=0) + between


def pca_finalize(n: float, mean: np.ndarray, m2: np.ndarray) -> dict[str, np.ndarray]:
    """PCA from merged moments: covariance with the n-1 denominator (docs/method.md §3).

    Returns
    -------
    dict with ``n_filters``, ``mean`` (D), ``components`` (D, D; one per row,
    largest-|entry| positive), ``explained_variance``, ``explained_variance_ratio``
    and ``covariance``. With fewer than two filters every array is NaN.
    """
    d = len(mean)
    if n < 2:
        nan = np.full(d, np.nan)
        return {
            "n_filters": int(n),
            "mean": np.asarray(mean, dtype=np.float64) if n == 1 else nan,
            "components": np.full((d, d), np.nan),
            "explained_variance": nan,
            "explained_variance_ratio": nan,
            "covariance": np.full((d, d), np.nan),
        }
    cov = np.asarray(m2, dtype=np.float64) / (n - 1)
    cov = (cov + cov.T) / 2
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals = np.clip(vals[order], 0.0, None)
    comps = vecs[:, order].T.copy()
    idx = np.argmax(np.abs(comps), axis=1)
    signs = np.sign(comps[np.arange(d), idx])
    signs[signs == 0] = 1.0
    comps *= signs[:, None]
    total = vals.sum()
    ratio = vals / total if total > 0 else np.zeros(d)
    return {
        "n_filters": int(n),
        "mean": np.asarray(mean, dtype=np.float64),
        "components": comps,
        "explained_variance": vals,
        "explained_variance_ratio": ratio,
        "covariance": cov,
    }


def quality_finalize(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer quality table columns from pass-1 statistics (docs/method.md §7);
    D is read from the statistics' width."""
    d = stats_dim(stats)
    lay = stat_layout(d)
    n = stats[:, STAT_N]
    n_clean = stats[:, lay.n_clean]
    ve = stats[:, lay.ve]
    vec = stats[:, lay.ve_clean]
    return {
        "n": n.astype(np.int64),
        "sparsity": stats[:, lay.sparsity],
        "variance_entropy": ve,
        "variance_entropy_norm": ve / entropy_norm(n, d),
        "variance_entropy_clean": vec,
        "variance_entropy_clean_norm": vec / entropy_norm(n_clean, d),
    }


# ------------------------------------------------------------------------- binning
def histogram_edges(bins: int, lo: float, hi: float) -> np.ndarray:
    """Bin edges exactly as ``np.histogram(a, bins, range=(lo, hi))`` makes them."""
    lo = float(lo)
    hi = float(hi)
    if lo == hi:  # numpy widens an empty range the same way
        lo -= 0.5
        hi += 0.5
    return np.linspace(lo, hi, bins + 1, endpoint=True, dtype=np.float64)


def bin_indices(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value under ``np.histogram``'s uniform-bin rules, -1 outside.

    Values are float64; the last bin is closed on the right.
    """
    values = np.asarray(values, dtype=np.float64)
    bins = len(edges) - 1
    lo, hi = edges[0], edges[-1]
    keep = (values >= lo) & (values <= hi)
    f = (values - lo) / (hi - lo) * bins
    idx = np.where(keep, f, 0).astype(np.intp)
    idx[idx == bins] -= 1
    dec = values < edges[idx]
    idx[dec] -= 1
    inc = (values >= edges[idx + 1]) & (idx != bins - 1)
    idx[inc] += 1
    idx[~keep] = -1
    return idx


def fine_edges(edges: np.ndarray, per_bin: int) -> np.ndarray:
    """Edges of the fine bins: every coarse bin of ``edges`` cut in ``per_bin`` parts.

    The coarse edges are kept bit for bit (``fine[::per_bin] == edges``), so a value's
    fine bin lies inside its coarse bin and coarse counts are sums of fine counts.

    Parameters
    ----------
    edges : (B + 1,) coarse edges (``histogram_edges``).
    per_bin : positive int.

    Returns
    -------
    (B * per_bin + 1,) float64, non-decreasing.
    """
    edges = np.asarray(edges, dtype=np.float64)
    width = np.diff(edges)
    steps = np.arange(per_bin, dtype=np.float64) / per_bin
    inner = (edges[:-1, None] + width[:, None] * steps[None, :]).ravel()
    return np.append(inner, edges[-1])


def validate_fine_edges(edges: np.ndarray, fine: np.ndarray) -> int:
    """Sub-bins per coarse bin of ``fine`` (from :func:`fine_edges`); raises if ``fine``
    does not subdivide ``edges`` exactly."""
    nb, nf = len(edges) - 1, len(fine) - 1
    sub = nf // nb if nb > 0 else 0
    if sub < 1 or nf != nb * sub or not np.array_equal(fine[::sub], edges):
        raise AnalysisError(
            f"fine edges ({nf} bins) do not subdivide the {nb} coarse bins exactly; "
            "make them with kernels.fine_edges(edges, per_bin)"
        )
    return sub


def fine_bin_indices(values: np.ndarray, edges: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Fine bin of each value, -1 outside: its coarse bin ``c`` under np.histogram's
    rules (:func:`bin_indices`), then the sub-bin ``s`` of ``c`` with
    ``fine[c*sub + s] <= value < fine[c*sub + s + 1]`` (the last one closed).

    So ``fine_index // sub`` is always np.histogram's bin on ``edges``.
    """
    values = np.asarray(values, dtype=np.float64)
    sub = validate_fine_edges(edges, fine)
    c = bin_indices(values, edges)
    s = np.searchsorted(fine, values, side="right") - 1 - c * sub
    out = c * sub + np.clip(s, 0, sub - 1)
    out[c < 0] = -1
    return out


def bin_indices_searchsorted(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value as ``np.histogramdd`` finds it (searchsorted), -1 outside."""
    values = np.asarray(values, dtype=np.float64)
    idx = np.searchsorted(edges, values, side="right")
    idx[values == edges[-1]] -= 1
    out = idx - 1
    out[(idx < 1) | (idx > len(edges) - 1)] = -1
    return out


# --------------------------------------------------------------------------- pass 2
def range_density_chunk(
    x: np.ndarray,
    bounds: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    density_edges: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficient range and 2-D density of coefficients 0 vs 1 of one chunk.

    Returns
    -------
    rng : (2,) float64 ``[min, max]`` over all D coefficients (``[inf, -inf]``
        when the chunk holds no layer rows).
    density : (B, B) int64 counts, ``np.histogram2d`` semantics on ``density_edges``
        for both axes (coefficient 0 on the first axis).
    """
    nb = len(density_edges) - 1
    mask = _layer_rows(np.asarray(bounds, dtype=np.int64).reshape(-1, 2), len(x))
    if not mask.any():
        return np.array([np.inf, -np.inf]), np.zeros((nb, nb), dtype=np.int64)
    c = project(scale_filters(x[mask]), mean, components)
    rng = np.array([c.min(), c.max()])
    i0 = bin_indices_searchsorted(c[:, 0], density_edges)
    i1 = bin_indices_searchsorted(c[:, 1], density_edges)
    ok = (i0 >= 0) & (i1 >= 0)
    dens = np.bincount(i0[ok] * nb + i1[ok], minlength=nb * nb).reshape(nb, nb)
    return rng, dens.astype(np.int64)


# --------------------------------------------------------------------------- pass 3
def histogram_chunk(
    x: np.ndarray,
    bounds: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    edges: np.ndarray,
    layer_groups: np.ndarray,
    n_groups: int,
    fine_edges: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer coefficient histograms and fine per-group histograms of one chunk.

    Parameters
    ----------
    x, bounds : see module docstring.
    mean, components : the global PCA.
    edges : (bins + 1,) edges on the coefficient range (``histogram_edges``).
    layer_groups : (L, G) int, the group code of each layer in each of G groupings,
        codes counted over all groupings together (0 .. n_groups-1); -1 = none.
    n_groups : total number of group codes.
    fine_edges : (F + 1,) edges of the fine histograms, ``fine_edges(edges, per_bin)``:
        each coarse bin cut in ``F / bins`` sub-bins (:func:`fine_bin_indices`).

    Returns
    -------
    hist : (L, D, bins) uint32 counts per layer, component and bin, np.histogram's
        semantics; equal to the fine counts summed over each coarse bin's sub-bins.
    fine : (n_groups, D, F) int64 counts per group code, component and fine bin.
    """
    bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    layer_groups = np.asarray(layer_groups, dtype=np.int64).reshape(len(bounds), -1)
    sub = validate_fine_edges(edges, fine_edges)
    nbins = len(edges) - 1
    nfine = nbins * sub
    ncomp = components.shape[0]
    hist = np.zeros((len(bounds), ncomp, nbins), dtype=np.uint32)
    fine = np.zeros((n_groups, ncomp, nfine), dtype=np.int64)
    for i, (a, b) in enumerate(bounds):
        if b <= a:
            continue
        c = project(scale_filters(x[a:b]), mean, components)
        codes = layer_groups[i][layer_groups[i] >= 0]
        for k in range(ncomp):
            idx = fine_bin_indices(c[:, k], edges, fine_edges)
            counts = np.bincount(idx[idx >= 0], minlength=nfine)
            hist[i, k] = counts.reshape(nbins, sub).sum(axis=1)
            for g in codes:
                fine[g, k] += counts
    return hist, fine


# ------------------------------------------------------------------------------ KL
def kl_probabilities(counts: np.ndarray, bin_width: float) -> np.ndarray:
    """Densities with empty bins set to float32 eps, normalised (docs/method.md §5).

    Parameters
    ----------
    counts : (..., bins) histogram counts.
    bin_width : the common bin width.

    Returns
    -------
    (..., bins) float64 probabilities summing to 1 along the last axis.
    """
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = c / (n * bin_width)
    d = np.where(c == 0, EPS_KL, d)
    return d / d.sum(axis=-1, keepdims=True)


def symmetric_kl_matrix(p: np.ndarray) -> np.ndarray:
    """Symmetric KL ``S(p_g, p_h)`` for all group pairs, natural log.

    ``S(p, q) = sum p log(p/q) + sum q log(q/p) = sum (p - q)(log p - log q)``.

    Parameters
    ----------
    p : (G, bins) strictly positive probabilities.

    Returns
    -------
    (G, G) float64, symmetric with a zero diagonal.
    """
    p = np.asarray(p, dtype=np.float64)
    logp = np.log(p)
    # sum_i p_g log p_g + p_h log p_h - p_g log p_h - p_h log p_g
    self_term = (p * logp).sum(axis=1)
    cross = p @ logp.T  # cross[g, h] = sum_i p_g,i log p_h,i
    s = self_term[:, None] + self_term[None, :] - cross - cross.T
    s = (s + s.T) / 2
    np.fill_diagonal(s, 0.0)
    return np.clip(s, 0.0, None)


def shift_matrix(
    group_counts: np.ndarray, bin_width: float, weights: np.ndarray
) -> np.ndarray:
    """Distribution-shift matrix ``D(g, h) = sum_k w_k S(p_gk, p_hk)`` (docs/method.md §5).

    Parameters
    ----------
    group_counts : (G, K, bins) counts per group, component and bin.
    bin_width : common bin width.
    weights : (K,) weights, the global explained variance ratio.

    Returns
    -------
    (G, G) float64.
    """
    group_counts = np.asarray(group_counts)
    p = kl_probabilities(group_counts, bin_width)
    g = group_counts.shape[0]
    out = np.zeros((g, g))
    for k in range(group_counts.shape[1]):
        out += weights[k] * symmetric_kl_matrix(p[:, k, :])
    return out


# ---------------------------------------------------------------------- ridge / KDE
#: normal quantile spans of Silverman's rule as KDEpy spells them: IQR and 1-99 % range
_IQR_NORMAL = 1.3489795003921634
_P99_NORMAL = 4.6526957480816815


def silverman_bandwidth(std: float, iqr: float, n: float, *, inner_range: float = 0.0) -> float:
    """Silverman's bandwidth exactly as KDEpy's ``FFTKDE(bw='silverman')`` computes it.

    ``min(std, iqr / 1.3489795) * (3n/4) ** (-1/5)``; when that spread is 0, the
    1-99 % inter-percentile range ``inner_range / 4.6526957`` takes its place; when
    that is 0 too, 1. One observation gives 1 (KDEpy's rule), none gives NaN.

    Parameters
    ----------
    std : standard deviation of the data, ``ddof=1``.
    iqr : ``percentile(75) - percentile(25)`` of the data.
    n : number of observations.
    inner_range : ``percentile(99) - percentile(1)`` of the data.

    Returns
    -------
    float, the Gaussian kernel's standard deviation.
    """
    if not n >= 1:
        return float("nan")
    if n == 1:
        return 1.0
    factor = (3.0 * n / 4.0) ** -0.2
    spread = min(std, iqr / _IQR_NORMAL)
    if spread > 0:
        return float(spread * factor)
    spread = inner_range / _P99_NORMAL
    if spread > 0:
        return float(spread * factor)
    return 1.0


def histogram_percentiles(counts: np.ndarray, edges: np.ndarray, q) -> np.ndarray:
    """``np.percentile(data, q)`` (linear method) estimated from a histogram of the data.

    The ``c`` values of a bin are taken as spread evenly across it (the j-th at
    ``left + (j + 0.5) / c * width``); numpy's rank ``q/100 * (n - 1)`` is then
    interpolated between its two neighbouring sorted values. The estimate is off by
    less than one bin width from the exact percentile.

    Parameters
    ----------
    counts : (F,) counts on ``edges``; at least one count.
    edges : (F + 1,) equal-width edges.
    q : percentiles in [0, 100], scalar or array.

    Returns
    -------
    array shaped like ``q``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    cum = np.cumsum(counts)
    n = cum[-1]
    width = edges[1] - edges[0]

    def value(rank):
        b = np.minimum(np.searchsorted(cum, rank, side="right"), len(counts) - 1)
        before = cum[b] - counts[b]
        return edges[b] + (rank - before + 0.5) / np.maximum(counts[b], 1) * width

    rank = np.asarray(q, dtype=np.float64) / 100.0 * (n - 1)
    lo = np.floor(rank)
    frac = rank - lo
    return value(lo) + frac * (value(np.minimum(lo + 1, n - 1)) - value(lo))


def binned_kde(counts: np.ndarray, edges: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian KDE of binned data, evaluated at the bin centres.

    Each bin's count sits at its centre; the kernel is sampled on the bins' grid
    and normalised over the whole line, so the density integrates to 1 less what
    spills past the edges. The output always has as many points as ``counts``,
    whatever the bandwidth (a kernel wider than the grid is cut to it).

    Parameters
    ----------
    counts : (F,) counts on ``edges``.
    edges : (F + 1,) equal-width edges.
    bandwidth : kernel standard deviation, in coefficient units.

    Returns
    -------
    (F,) float64 density (zeros when ``counts`` is empty; the histogram's density
    when the bandwidth is not a positive number).
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    width = float(edges[1] - edges[0])
    if n == 0:
        return np.zeros_like(counts)
    if not np.isfinite(bandwidth) or bandwidth <= 0:
        return counts / (n * width)
    f = len(counts)
    s = bandwidth / width  # kernel sd in bins
    if s > 2:
        # Poisson summation: the sampled Gaussian sums to sqrt(2 pi) s within 1e-34
        norm = np.sqrt(2 * np.pi) * s
    else:
        wide = np.arange(-int(np.ceil(12 * s)) - 1, int(np.ceil(12 * s)) + 2)
        norm = np.exp(-0.5 * (wide / s) ** 2).sum()
    # no grid point is farther than f - 1 bins from another: a wider kernel is cut there
    half = min(int(np.ceil(8 * s)), f - 1)
    offs = np.arange(-half, half + 1)
    kern = np.exp(-0.5 * (offs / s) ** 2) / norm
    full = np.convolve(counts, kern)  # length f + 2 * half
    return full[half:half + f] / (n * width)


def ridge_densities(
    counts: np.ndarray, edges: np.ndarray, n: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge-plot densities: a binned KDE per group and component (docs/method.md §6, §8).

    The bandwidth is :func:`silverman_bandwidth` with each group's exact count ``n``
    and standard deviation ``std`` (``ddof=1``, from the pass-1 moments), and with the
    1, 25, 75 and 99 % percentiles estimated from the fine histogram
    (:func:`histogram_percentiles`, within one fine bin). Two percentiles in the same
    fine bin count as equal: the histogram cannot tell them apart, and a point mass
    (e.g. all-zero filters) is the usual cause, which is when KDEpy falls back too.

    Parameters
    ----------
    counts : (G, K, F) fine histograms on ``edges``.
    edges : (F + 1,) equal-width edges.
    n : (G,) filters per group.
    std : (G, K) standard deviation of each group's coefficient k.

    Returns
    -------
    ``(density (G, K, F) float64, bandwidth (G, K) float64)``; empty groups give
    zeros and a NaN bandwidth.
    """
    counts = np.asarray(counts)
    edges = np.asarray(edges, dtype=np.float64)
    width = edges[1] - edges[0]
    nbins = counts.shape[-1]
    dens = np.zeros(counts.shape, dtype=np.float64)
    bw = np.full(counts.shape[:2], np.nan)
    for g in range(counts.shape[0]):
        for k in range(counts.shape[1]):
            c = counts[g, k]
            if c.sum() == 0:
                continue
            p = histogram_percentiles(c, edges, [1, 25, 75, 99])
            b = np.minimum((p - edges[0]) // width, nbins - 1)
            iqr = 0.0 if b[1] == b[2] else p[2] - p[1]
            inner = 0.0 if b[0] == b[3] else p[3] - p[0]
            bw[g, k] = silverman_bandwidth(float(std[g, k]), iqr, float(n[g]),
                                           inner_range=inner)
            dens[g, k] = binned_kde(c, edges, bw[g, k])
    return dens, bw


# ------------------------------------------------------------- pass 1: ε sweep
#: rows per block of the sweep (as the compiled kernel's BLOCK)
SWEEP_BLOCK = 256


def _lanes4(prod: np.ndarray) -> np.ndarray:
    """Column sums of ``prod`` (n, m) in four interleaved lanes, each summed in row
    order, the tail rows into lane 0, then ``(l0 + l1) + (l2 + l3)``: the order of
    the compiled kernel's ``_dot4``, so both give the same bits."""
    n = prod.shape[0]
    n4 = n - n % 4
    lanes = np.zeros((4, prod.shape[1]))
    for r in range(0, n4, 4):  # row-sequential, vectorised over lanes and columns
        lanes += prod[r:r + 4]
    for r in range(n4, n):
        lanes[0] += prod[r]
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])


def sparsity_sweep_chunk(x: np.ndarray, bounds: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Per-layer clean-filter counts and clean variance entropy for each ε (docs/method.md §7).

    The sparsity threshold of ε is ``t = ε · max|w|`` over the layer (``t = 1``
    when it is 0), exactly as :func:`layer_stats_chunk` does with ε = 0.01; a
    filter is clean when its peak ``|w| >= t``. Each filter falls into the band
    of thresholds its peak lies between; per band the count, sum and cross
    products of ``w - w[first]`` are summed, and the filters clean at ε are the
    bands above it. The additions run in the compiled kernel's order (blocks of
    ``SWEEP_BLOCK`` rows, four lanes): both engines give the same bits.

    Parameters
    ----------
    x : (n, D) array
        The chunk's filters, unscaled.
    bounds : (L, 2) int array
        ``[start, stop)`` rows of each layer within the chunk.
    eps : (E,) float64
        Thresholds, each in (0, 1].

    Returns
    -------
    (L, 2E) float64 array: clean-filter counts per ε, then the clean variance
    entropy per ε (NaN for an empty layer or fewer than 2 clean filters).
    """
    bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    eps = np.asarray(eps, dtype=np.float64).reshape(-1)
    order = np.argsort(eps, kind="stable")
    eps_sorted = eps[order]
    e, nl, d = len(eps), len(bounds), x.shape[1]
    ju, mu = np.triu_indices(d)
    cnt = np.zeros((nl, e + 1))
    s1 = np.zeros((nl, e + 1, d))
    s2 = np.zeros((nl, e + 1, d * d))
    for li, (a, b) in enumerate(bounds):
        if b <= a:
            continue
        w = np.asarray(x[a:b], dtype=np.float64)
        peaks = np.max(np.abs(w), axis=1)
        t = eps_sorted * peaks.max()
        t[t == 0] = 1.0
        band = (peaks[:, None] >= t[None, :]).sum(axis=1)  # e: clean at every ε
        dw_all = w - w[0]
        for r0 in range(0, b - a, SWEEP_BLOCK):
            dw = dw_all[r0:r0 + SWEEP_BLOCK]
            bd = band[r0:r0 + SWEEP_BLOCK]
            c = (bd == e).astype(np.float64)
            cnt[li, e] += c.sum()  # a count: exact in any order
            src = dw * c[:, None]
            for r in np.flatnonzero(bd < e):  # the few sparse rows, one by one
                k = bd[r]
                cnt[li, k] += 1.0
                s1[li, k] += dw[r]
                s2[li, k, ju * d + mu] += dw[r, ju] * dw[r, mu]
            s1[li, e] += _lanes4(src)
            s2[li, e, ju * d + mu] += _lanes4(src[:, ju] * src[:, mu])
        for k in range(e - 1, -1, -1):
            cnt[li, k] += cnt[li, k + 1]
            s1[li, k] += s1[li, k + 1]
            s2[li, k] += s2[li, k + 1]
    return sweep_from_band_sums(bounds, order, cnt, s1, s2)


def sweep_from_band_sums(bounds, order, cnt, s1, s2) -> np.ndarray:
    """The (L, 2E) result of :func:`sparsity_sweep_chunk` from its suffix band sums
    (band k: every filter clean at the k-th smallest ε, band 0 every filter);
    shared by both engines."""
    nl, e1, d = s1.shape
    e = e1 - 1
    c_cnt = cnt[:, 1:]
    c_s1 = s1[:, 1:]
    c_s2 = s2[:, 1:].reshape(nl, e, d, d)
    # neighbouring thresholds share their clean set unless the band between them
    # holds a filter: one eigendecomposition per distinct set (the usual layer: 1)
    need = np.ones((nl, e), dtype=bool)
    need[:, :-1] = c_cnt[:, :-1] > c_cnt[:, 1:]
    li, ki = np.nonzero(need)
    cs2 = c_s2[li, ki]
    full = np.triu(cs2) + np.swapaxes(np.triu(cs2, 1), -1, -2)
    n_c = c_cnt[li, ki]
    s1n = c_s1[li, ki]
    with np.errstate(divide="ignore", invalid="ignore"):
        scatter = full - s1n[:, :, None] * s1n[:, None, :] / n_c[:, None, None]
    scatter = np.where(n_c[:, None, None] > 0, scatter, 0.0)
    ve = np.empty((nl, e))
    ve[li, ki] = variance_entropy_from_scatter(scatter, n_c)
    for k in range(e - 2, -1, -1):
        ve[:, k] = np.where(need[:, k], ve[:, k], ve[:, k + 1])
    n = bounds[:, 1] - bounds[:, 0]
    ve[n == 0] = np.nan
    out = np.empty((nl, 2 * e))
    out[:, order] = c_cnt
    out[:, e + order] = ve
    return out


def sparsity_sweep_finalize(n: np.ndarray, sweep: np.ndarray,
                            d: int = 9) -> dict[str, np.ndarray]:
    """Sparsity and clean variance entropy (and its norm) per ε from the sweep.

    Parameters
    ----------
    n : (L,) filter counts of the layers.
    sweep : (L, 2E) from :func:`sparsity_sweep_chunk`.

    Returns
    -------
    ``{"sparsity": (L, E), "variance_entropy_clean": (L, E),
    "variance_entropy_clean_norm": (L, E)}``; sparsity is computed as in
    :func:`layer_stats_chunk`, so ε = 0.01 gives its column bit for bit.
    """
    n = np.asarray(n, dtype=np.float64)[:, None]
    e = sweep.shape[1] // 2
    n_clean = sweep[:, :e]
    vec = sweep[:, e:]
    with np.errstate(divide="ignore", invalid="ignore"):
        sparsity = np.where(n > 0, (n - n_clean) / n, np.nan)
    return {
        "sparsity": sparsity,
        "variance_entropy_clean": vec,
        "variance_entropy_clean_norm": vec / entropy_norm(n_clean, d),
    }


# --------------------------------------------------------------------- orthogonality
#: Gram entries computed at once by :func:`orthogonality_rows` (bounds its memory)
ORTHO_BLOCK_ENTRIES = 1 << 16


def orthogonality_rows(w: np.ndarray) -> float:
    """Orthogonality of the rows of one layer's weight matrix (docs/method.md §7).

    Each row is divided by its L2 norm (an all-zero row stays zero); with ``Ĝ`` the
    Gram matrix of the normalised rows, the result is
    ``1 - Σ_{i≠j} |Ĝ_ij| / (c (c - 1))``: 1 for mutually orthogonal rows, 0 for
    identical (or sign-flipped) rows, NaN for fewer than two rows.

    Every sum runs in a fixed order that depends only on the layer's shape, never on
    BLAS, threads or memory layout: a norm adds the squares column by column; a Gram
    entry adds its products ``ŵ_ik ŵ_jk`` for k = 0, 1, ... from 0.0; the ``|Ĝ_ij|``,
    i < j, are summed row by row, left to right, into a row sum, and the row sums in
    row order into the total. So a layer gives the same bits in any chunking, and the
    compiled twin (same additions, no fused multiply-add) the same bits as this.
    Memory: the layer plus two blocks of ``ORTHO_BLOCK_ENTRIES`` Gram entries, any c.

    Parameters
    ----------
    w : (c, m) array
        One row per output channel (``c_in / groups · k²`` weights each).

    Returns
    -------
    float
    """
    w = np.asarray(w, dtype=np.float64)
    c = w.shape[0]
    if c < 2:
        return float("nan")
    wt = normalized_columns(w)
    m = wt.shape[0]
    step = max(1, min(c, ORTHO_BLOCK_ENTRIES // c))
    total = 0.0
    for i0 in range(0, c, step):
        i1 = min(c, i0 + step)
        g = np.zeros((i1 - i0, c - i0))  # rows i0:i1, columns i0:c (upper part)
        tmp = np.empty_like(g)
        for k in range(m):
            np.multiply.outer(wt[k, i0:i1], wt[k, i0:], out=tmp)
            g += tmp
        np.abs(g, out=g)
        # j > i only; each row left to right (cumsum is sequential), rows in order
        for v in np.cumsum(np.triu(g, 1), axis=1)[:, -1]:
            total += v
    return ortho_finalize(total, c)


def normalized_columns(w: np.ndarray) -> np.ndarray:
    """``Ŵᵀ`` (m, c) float64, contiguous: the rows of ``w`` (c, m) divided by their
    L2 norms (squares added column by column), all-zero rows left zero."""
    wt = np.ascontiguousarray(np.asarray(w, dtype=np.float64).T)
    sq = np.zeros(wt.shape[1])
    for k in range(wt.shape[0]):
        sq += wt[k] * wt[k]
    norm = np.sqrt(sq)
    np.divide(wt, norm, out=wt, where=norm > 0)
    wt[:, norm == 0] = 0.0
    return wt


def ortho_finalize(upper_abs_sum: float, c: int) -> float:
    """Orthogonality from ``Σ_{i<j} |Ĝ_ij|`` (the sum over i≠j is twice that)."""
    return 1.0 - 2.0 * upper_abs_sum / (c * (c - 1))


def orthogonality_chunk(x: np.ndarray, bounds: np.ndarray, out_channels: np.ndarray,
                        _rows=None) -> np.ndarray:
    """Per-layer orthogonality of one chunk's layers (docs/method.md §7).

    A layer's filters are stored out-channel-major (ingest writes the weight
    ``(c_out, c_in/groups, k, k)`` as ``reshape(-1, k²)``), so its ``c`` rows of W
    are its filters ``x[a:b]`` reshaped to ``(c, (b - a) / c · k²)``.

    Parameters
    ----------
    x : (n, k²) array
        The chunk's filters, unscaled (orthogonality is of the raw weights).
    bounds : (L, 2) int array
        ``[start, stop)`` rows of each layer within the chunk.
    out_channels : (L,) float
        ``c_out`` of each layer, NaN where unknown; a known value divides the
        layer's filter count (the caller checks).

    Returns
    -------
    (L,) float64: NaN for an unknown shape or ``c_out < 2``.
    """
    bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    out_channels = np.asarray(out_channels, dtype=np.float64).reshape(-1)
    out = np.full(len(bounds), np.nan)
    for i, (a, b) in enumerate(bounds):
        c = out_channels[i]
        if not np.isfinite(c) or c < 2 or b <= a:
            continue
        c = int(c)
        out[i] = (_rows or orthogonality_rows)(np.asarray(x[a:b]).reshape(c, -1))
    return out
