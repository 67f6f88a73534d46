"""Compiled (numba) twins of the hot kernels in :mod:`filterdb_dask.kernels`.

The filters of a chunk are processed in blocks of ``BLOCK`` rows, transposed to
feature-major scratch arrays so that scaling, projection and bin-index guesses
vectorise across rows. Import fails cleanly when numba is absent; the caller
then uses the numpy kernels.

Exactness
---------
* The projection (``_project_block``) does, for every coefficient, the same
  multiplies and adds in the same order as :func:`kernels.project`, with no
  fast-math (no reassociation, no fused multiply-add), so coefficients are
  bitwise equal to the numpy kernel's and bin counts identical.
* Bin indices start from a guess ``(v - lo) * (bins / (hi - lo))`` and are then
  corrected against the bin edges, exactly as ``np.histogram`` corrects its own
  guess; a guess within one bin of the answer (always, barring a range of a few
  ulps) gives numpy's bin.
* Pass-1 moments use a shifted-data single sweep; sums run in four interleaved
  float64 partial sums (a fixed order: the same bits on every machine, process and
  buffer alignment) and agree with the numpy kernel to rounding (tests: 1e-9).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import N_STATS, STAT_N, STAT_N_CLEAN, STAT_SPARSITY, variance_entropy_from_scatter

BLOCK = 256
_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_OPTS)
def _scale_block(x, r0, n, S, P):
    """Peaks P[:n] and scaled filters S[:, :n] (feature-major) of rows r0..r0+n."""
    d = x.shape[1]
    for r in range(n):
        p = 0.0
        for j in range(d):
            v = abs(np.float64(x[r0 + r, j]))
            if v > p:
                p = v
        P[r] = p
    for j in range(d):
        for r in range(n):
            p = P[r]
            S[j, r] = np.float64(x[r0 + r, j]) / p if p > 0 else 0.0


@njit(**_OPTS)
def _project_block(S, n, mean, comps, C):
    """C[k, :n] = sum_j (S[j] - mean[j]) * comps[k, j], left to right (no fast-math)."""
    d = S.shape[0]
    for k in range(comps.shape[0]):
        m0 = mean[0]
        v0 = comps[k, 0]
        for r in range(n):
            C[k, r] = (S[0, r] - m0) * v0
        for j in range(1, d):
            mj = mean[j]
            vj = comps[k, j]
            for r in range(n):
                C[k, r] = C[k, r] + (S[j, r] - mj) * vj


@njit(**_OPTS)
def _bin_block(C, k, n, edges, scale, idx):
    """Bin indices idx[:n] of C[k, :n] on uniform ``edges`` (numpy rules), -1 outside."""
    nb = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nb]
    for r in range(n):
        v = C[k, r]
        g = (v - lo) * scale
        i = np.intp(g) if g > 0 else 0
        if i > nb - 1:
            i = nb - 1
        idx[r] = i
    for r in range(n):
        v = C[k, r]
        i = idx[r]
        if v < edges[i]:
            i -= 1
        elif i != nb - 1 and v >= edges[i + 1]:
            i += 1
        if not (v >= lo and v <= hi):
            i = -1
        idx[r] = i


@njit(**_OPTS)
def _bin_searchsorted(v, edges, scale):
    nb = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nb]
    if not (v >= lo and v <= hi):
        return -1
    if v == hi:
        return nb - 1
    g = (v - lo) * scale
    i = np.intp(g) if g > 0 else 0
    if i > nb - 1:
        i = nb - 1
    while i > 0 and v < edges[i]:
        i -= 1
    while i < nb - 1 and v >= edges[i + 1]:
        i += 1
    return i


# ---------------------------------------------------------------------- pass 1
@njit(**_OPTS)
def _dot4(a, b, n):
    """sum(a[:n] * b[:n]) in four interleaved partial sums: a fixed order (so the
    result never depends on memory alignment or the machine), yet vectorisable."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    n4 = n - n % 4
    for r in range(0, n4, 4):
        s0 += a[r] * b[r]
        s1 += a[r + 1] * b[r + 1]
        s2 += a[r + 2] * b[r + 2]
        s3 += a[r + 3] * b[r + 3]
    for r in range(n4, n):
        s0 += a[r] * b[r]
    return (s0 + s1) + (s2 + s3)


@njit(**_OPTS)
def _sweep(S, W, P, n, t, ks, kw, acc, DS, DW, DC, c, ones):
    """Add one block's shifted sums and cross products to ``acc``.

    acc rows: 0 sum(ds), 1 sum(dw), 2 sum(dc), then 3, 4, 5: Mss, Mww, Mcc
    (upper triangles, flattened j*9+m); acc[0, 9] counts clean rows. Deterministic:
    no fast-math; sums run in eight interleaved partial sums, a fixed order.
    """
    d = S.shape[0]
    for r in range(n):
        c[r] = 1.0 if P[r] >= t else 0.0
    nc = _dot4(c, ones, n)
    clean = nc == n  # the usual block: the clean products equal the unscaled ones
    for j in range(d):
        for r in range(n):
            DS[j, r] = S[j, r] - ks[j]
            dw = W[j, r] - kw[j]
            DW[j, r] = dw
            DC[j, r] = dw * c[r]
    acc[0, 9] += nc
    for j in range(d):
        acc[0, j] += _dot4(DS[j], ones, n)
        acc[1, j] += _dot4(DW[j], ones, n)
        acc[2, j] += _dot4(DC[j], ones, n)
    n8 = n - n % 8
    for j in range(d):
        sj, wj, cj = DS[j], DW[j], DC[j]
        for m in range(j, d):
            sm, wm, cm = DS[m], DW[m], DC[m]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = 0.0
            for r in range(0, n8, 8):
                a0 += sj[r + 0] * sm[r + 0]
                a1 += sj[r + 1] * sm[r + 1]
                a2 += sj[r + 2] * sm[r + 2]
                a3 += sj[r + 3] * sm[r + 3]
                a4 += sj[r + 4] * sm[r + 4]
                a5 += sj[r + 5] * sm[r + 5]
                a6 += sj[r + 6] * sm[r + 6]
                a7 += sj[r + 7] * sm[r + 7]
                b0 += wj[r + 0] * wm[r + 0]
                b1 += wj[r + 1] * wm[r + 1]
                b2 += wj[r + 2] * wm[r + 2]
                b3 += wj[r + 3] * wm[r + 3]
                b4 += wj[r + 4] * wm[r + 4]
                b5 += wj[r + 5] * wm[r + 5]
                b6 += wj[r + 6] * wm[r + 6]
                b7 += wj[r + 7] * wm[r + 7]
            for r in range(n8, n):
                a0 += sj[r] * sm[r]
                b0 += wj[r] * wm[r]
            acc[3, j * d + m] += ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
            bb = ((b0 + b1) + (b2 + b3)) + ((b4 + b5) + (b6 + b7))
            acc[4, j * d + m] += bb
            if clean:
                acc[5, j * d + m] += bb
            else:
                acc[5, j * d + m] += _dot4(cj, cm, n)


@njit(**_OPTS)
def _stats_core(x, bounds, out, sc_all, sc_clean):
    d = x.shape[1]
    S = np.empty((d, BLOCK))
    W = np.empty((d, BLOCK))
    P = np.empty(BLOCK)
    ks = np.empty(d)
    kw = np.empty(d)
    acc = np.zeros((6, d * d))
    DS = np.empty((d, BLOCK))
    DW = np.empty((d, BLOCK))
    DC = np.empty((d, BLOCK))
    cmask = np.empty(BLOCK)
    ones = np.ones(BLOCK)
    for li in range(bounds.shape[0]):
        a = bounds[li, 0]
        b = bounds[li, 1]
        n = b - a
        out[li, STAT_N] = n
        if n == 0:
            continue
        lmax = 0.0
        for r in range(a, b):
            for j in range(d):
                v = abs(np.float64(x[r, j]))
                if v > lmax:
                    lmax = v
        t = 0.01 * lmax
        if t == 0:
            t = 1.0
        # shift by the layer's first filter: sums of (x - k) stay small
        _scale_block(x, a, 1, S, P)
        for j in range(d):
            ks[j] = S[j, 0]
            kw[j] = np.float64(x[a, j])
        acc[:, :] = 0.0
        for r0 in range(a, b, BLOCK):
            m = min(BLOCK, b - r0)
            _scale_block(x, r0, m, S, P)
            for j in range(d):
                for r in range(m):
                    W[j, r] = np.float64(x[r0 + r, j])
            _sweep(S, W, P, m, t, ks, kw, acc, DS, DW, DC, cmask, ones)
        nc = acc[0, 9]
        out[li, STAT_N_CLEAN] = nc
        out[li, STAT_SPARSITY] = (n - nc) / n
        for j in range(d):
            out[li, 1 + j] = ks[j] + acc[0, j] / n
        for j in range(d):
            for m in range(j, d):
                v = acc[3, j * d + m] - acc[0, j] * acc[0, m] / n
                out[li, 10 + j * d + m] = v
                out[li, 10 + m * d + j] = v
                w = acc[4, j * d + m] - acc[1, j] * acc[1, m] / n
                sc_all[li, j, m] = w
                sc_all[li, m, j] = w
                if nc > 0:
                    c = acc[5, j * d + m] - acc[2, j] * acc[2, m] / nc
                    sc_clean[li, j, m] = c
                    sc_clean[li, m, j] = c


def layer_stats_chunk(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Compiled :func:`filterdb_dask.kernels.layer_stats_chunk`."""
    bounds = np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2)
    x = np.ascontiguousarray(x)
    nl = len(bounds)
    out = np.zeros((nl, N_STATS))
    sc_all = np.zeros((nl, 9, 9))
    sc_clean = np.zeros((nl, 9, 9))
    _stats_core(x, bounds, out, sc_all, sc_clean)
    n = out[:, STAT_N]
    out[:, 92] = variance_entropy_from_scatter(sc_all, n)
    out[:, 93] = variance_entropy_from_scatter(sc_clean, out[:, STAT_N_CLEAN])
    empty = n == 0
    out[empty, STAT_SPARSITY] = np.nan
    out[empty, 92] = np.nan
    out[empty, 93] = np.nan
    return out


# ---------------------------------------------------------------------- pass 2
@njit(**_OPTS)
def _range_density_core(x, bounds, mean, comps, dedges, rng, dens):
    d = x.shape[1]
    S = np.empty((d, BLOCK))
    C = np.empty((comps.shape[0], BLOCK))
    P = np.empty(BLOCK)
    nb = dedges.shape[0] - 1
    dscale = nb / (dedges[nb] - dedges[0])
    lo = rng[0]
    hi = rng[1]
    for li in range(bounds.shape[0]):
        for r0 in range(bounds[li, 0], bounds[li, 1], BLOCK):
            m = min(BLOCK, bounds[li, 1] - r0)
            _scale_block(x, r0, m, S, P)
            _project_block(S, m, mean, comps, C)
            for k in range(C.shape[0]):
                for r in range(m):
                    v = C[k, r]
                    if v < lo:
                        lo = v
                    if v > hi:
                        hi = v
            for r in range(m):
                i0 = _bin_searchsorted(C[0, r], dedges, dscale)
                i1 = _bin_searchsorted(C[1, r], dedges, dscale)
                if i0 >= 0 and i1 >= 0:
                    dens[i0, i1] += 1
    rng[0] = lo
    rng[1] = hi


def range_density_chunk(x, bounds, mean, components, density_edges):
    """Compiled :func:`filterdb_dask.kernels.range_density_chunk`."""
    nb = len(density_edges) - 1
    rng = np.array([np.inf, -np.inf])
    dens = np.zeros((nb, nb), dtype=np.int64)
    _range_density_core(
        np.ascontiguousarray(x),
        np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2),
        np.ascontiguousarray(mean, dtype=np.float64),
        np.ascontiguousarray(components, dtype=np.float64),
        np.ascontiguousarray(density_edges, dtype=np.float64),
        rng,
        dens,
    )
    return rng, dens


# ---------------------------------------------------------------------- pass 3
@njit(**_OPTS)
def _histogram_core(x, bounds, mean, comps, edges, groups, fedges, hist, fine):
    d = x.shape[1]
    K = comps.shape[0]
    S = np.empty((d, BLOCK))
    C = np.empty((K, BLOCK))
    P = np.empty(BLOCK)
    idx = np.empty(BLOCK, dtype=np.intp)
    nb = edges.shape[0] - 1
    nf = fedges.shape[0] - 1
    scale = nb / (edges[nb] - edges[0])
    fscale = nf / (fedges[nf] - fedges[0])
    ng = groups.shape[1]
    scratch = np.zeros((K, nf), dtype=np.int64)
    for li in range(bounds.shape[0]):
        any_group = False
        for g in range(ng):
            if groups[li, g] >= 0:
                any_group = True
        for r0 in range(bounds[li, 0], bounds[li, 1], BLOCK):
            m = min(BLOCK, bounds[li, 1] - r0)
            _scale_block(x, r0, m, S, P)
            _project_block(S, m, mean, comps, C)
            for k in range(K):
                _bin_block(C, k, m, edges, scale, idx)
                for r in range(m):
                    i = idx[r]
                    if i >= 0:
                        hist[li, k, i] += 1
                if any_group:
                    _bin_block(C, k, m, fedges, fscale, idx)
                    for r in range(m):
                        i = idx[r]
                        if i >= 0:
                            scratch[k, i] += 1
        if any_group:
            for g in range(ng):
                code = groups[li, g]
                if code >= 0:
                    for k in range(K):
                        for i in range(nf):
                            fine[code, k, i] += scratch[k, i]
            scratch[:, :] = 0


def histogram_chunk(x, bounds, mean, components, edges, layer_groups, n_groups, fine_edges):
    """Compiled :func:`filterdb_dask.kernels.histogram_chunk`."""
    bounds = np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2)
    groups = np.ascontiguousarray(layer_groups, dtype=np.int64).reshape(len(bounds), -1)
    ncomp = components.shape[0]
    hist = np.zeros((len(bounds), ncomp, len(edges) - 1), dtype=np.uint32)
    fine = np.zeros((n_groups, ncomp, len(fine_edges) - 1), dtype=np.int64)
    _histogram_core(
        np.ascontiguousarray(x),
        bounds,
        np.ascontiguousarray(mean, dtype=np.float64),
        np.ascontiguousarray(components, dtype=np.float64),
        np.ascontiguousarray(edges, dtype=np.float64),
        groups,
        np.ascontiguousarray(fine_edges, dtype=np.float64),
        hist,
        fine,
    )
    return hist, fine
