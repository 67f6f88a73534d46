"""Compiled (numba) twins of the hot kernels in :mod:`filterdb_dask.kernels`.

Each function visits the filters of a chunk once per pass, scales, projects and
bins them without temporaries. The arithmetic mirrors the numpy kernels term by
term (no fast-math, so no reassociation or fused multiply-add), which keeps bin
counts identical across engines. Import fails cleanly when numba is absent; the
caller then uses the numpy kernels.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import (
    N_STATS,
    STAT_N,
    STAT_N_CLEAN,
    STAT_SPARSITY,
    variance_entropy_from_scatter,
)


@njit(cache=True, nogil=True)
def _peak(x, r):
    p = 0.0
    for j in range(x.shape[1]):
        v = abs(np.float64(x[r, j]))
        if v > p:
            p = v
    return p


@njit(cache=True, nogil=True)
def _scaled(x, r, buf):
    p = _peak(x, r)
    for j in range(x.shape[1]):
        if p > 0:
            buf[j] = np.float64(x[r, j]) / p
        else:
            buf[j] = 0.0
    return p


@njit(cache=True, nogil=True)
def _project(s, mean, comps, coef):
    d = s.shape[0]
    for k in range(comps.shape[0]):
        acc = (s[0] - mean[0]) * comps[k, 0]
        for j in range(1, d):
            acc = acc + (s[j] - mean[j]) * comps[k, j]
        coef[k] = acc


@njit(cache=True, nogil=True)
def _bin_uniform(v, edges):
    nb = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nb]
    if not (v >= lo and v <= hi):
        return -1
    i = np.intp((v - lo) / (hi - lo) * nb)
    if i == nb:
        i -= 1
    if v < edges[i]:
        i -= 1
    elif i != nb - 1 and v >= edges[i + 1]:
        i += 1
    return i


@njit(cache=True, nogil=True)
def _bin_searchsorted(v, edges):
    nb = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nb]
    if not (v >= lo and v <= hi):
        return -1
    if v == hi:
        return nb - 1
    i = np.intp((v - lo) / (hi - lo) * nb)
    if i > nb - 1:
        i = nb - 1
    if i < 0:
        i = 0
    while i > 0 and v < edges[i]:
        i -= 1
    while i < nb - 1 and v >= edges[i + 1]:
        i += 1
    return i


@njit(cache=True, nogil=True)
def _stats_core(x, bounds, out, sc_all, sc_clean):
    d = x.shape[1]
    s = np.empty(d)
    mean_s = np.empty(d)
    mean_w = np.empty(d)
    mean_c = np.empty(d)
    for li in range(bounds.shape[0]):
        a = bounds[li, 0]
        b = bounds[li, 1]
        n = b - a
        out[li, STAT_N] = n
        if n == 0:
            continue
        mean_s[:] = 0.0
        mean_w[:] = 0.0
        lmax = 0.0
        for r in range(a, b):
            p = _scaled(x, r, s)
            if p > lmax:
                lmax = p
            for j in range(d):
                mean_s[j] += s[j]
                mean_w[j] += x[r, j]
        for j in range(d):
            mean_s[j] /= n
            mean_w[j] /= n
        t = 0.01 * lmax
        if t == 0:
            t = 1.0
        n_clean = 0
        mean_c[:] = 0.0
        for r in range(a, b):
            _scaled(x, r, s)
            for j in range(d):
                dj = s[j] - mean_s[j]
                wj = x[r, j] - mean_w[j]
                for m in range(j, d):
                    out[li, 10 + j * d + m] += dj * (s[m] - mean_s[m])
                    sc_all[li, j, m] += wj * (x[r, m] - mean_w[m])
            if _peak(x, r) >= t:
                n_clean += 1
                for j in range(d):
                    mean_c[j] += x[r, j]
        out[li, STAT_N_CLEAN] = n_clean
        out[li, STAT_SPARSITY] = (n - n_clean) / n
        if n_clean > 0:
            for j in range(d):
                mean_c[j] /= n_clean
            for r in range(a, b):
                if _peak(x, r) >= t:
                    for j in range(d):
                        cj = x[r, j] - mean_c[j]
                        for m in range(j, d):
                            sc_clean[li, j, m] += cj * (x[r, m] - mean_c[m])
        for j in range(d):
            out[li, 1 + j] = mean_s[j]
            for m in range(j + 1, d):
                out[li, 10 + m * d + j] = out[li, 10 + j * d + m]
                sc_all[li, m, j] = sc_all[li, j, m]
                sc_clean[li, m, j] = sc_clean[li, j, m]


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


@njit(cache=True, nogil=True)
def _range_density_core(x, bounds, mean, comps, dedges, rng, dens):
    s = np.empty(x.shape[1])
    c = np.empty(comps.shape[0])
    for li in range(bounds.shape[0]):
        for r in range(bounds[li, 0], bounds[li, 1]):
            _scaled(x, r, s)
            _project(s, mean, comps, c)
            for k in range(c.shape[0]):
                if c[k] < rng[0]:
                    rng[0] = c[k]
                if c[k] > rng[1]:
                    rng[1] = c[k]
            i0 = _bin_searchsorted(c[0], dedges)
            i1 = _bin_searchsorted(c[1], dedges)
            if i0 >= 0 and i1 >= 0:
                dens[i0, i1] += 1


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


@njit(cache=True, nogil=True)
def _histogram_core(x, bounds, mean, comps, edges, groups, fedges, hist, fine):
    s = np.empty(x.shape[1])
    c = np.empty(comps.shape[0])
    ng = groups.shape[1]
    for li in range(bounds.shape[0]):
        any_group = False
        for g in range(ng):
            if groups[li, g] >= 0:
                any_group = True
        for r in range(bounds[li, 0], bounds[li, 1]):
            _scaled(x, r, s)
            _project(s, mean, comps, c)
            for k in range(c.shape[0]):
                i = _bin_uniform(c[k], edges)
                if i >= 0:
                    hist[li, k, i] += 1
                if any_group:
                    f = _bin_uniform(c[k], fedges)
                    if f >= 0:
                        for g in range(ng):
                            code = groups[li, g]
                            if code >= 0:
                                fine[code, k, f] += 1


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
