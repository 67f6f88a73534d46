"""Coefficient range, 2-D density and per-layer histograms (docs/method.md §3-4, §6).

Pass 2 needs the PCA: it finds the global coefficient range ``[lo, hi]`` and the
2-D density of coefficients 0 vs 1. Pass 3 needs the range: it bins all 9
coefficients of every filter per layer (``layers x components x bins``), so that
any grouping, also one asked for later, is a sum over layers. It also fills fine
per-group histograms for the ridge-plot densities.
"""

from __future__ import annotations

import numpy as np

from . import config, kernels
from ._graph import concat, map_reduce_chunks, span, total
from .engines import get_kernels
from .errors import AnalysisError


def _validate_bins(bins, what="bins") -> int:
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise AnalysisError(f"{what} must be a positive integer, got {bins!r}")
    return int(bins)


def density_edges(density_bins: int | None = None, density_range=None) -> np.ndarray:
    """Edges of the 2-D density's bins on each axis (defaults: package config)."""
    if density_bins is None:
        density_bins = config.get("analysis.density-bins")
    if density_range is None:
        density_range = config.get("analysis.density-range")
    density_bins = _validate_bins(density_bins, "density_bins")
    return np.linspace(float(density_range[0]), float(density_range[1]), density_bins + 1)


def _range_density_task(x, bounds, mean, comps, dedges, engine):
    rng, dens = get_kernels(engine).range_density_chunk(x, bounds, mean, comps, dedges)
    return rng[None, :], dens[None]


def coef_range_density(
    store,
    pca: dict,
    *,
    density_bins: int | None = None,
    density_range: tuple[float, float] | None = None,
    engine: str | None = None,
):
    """Lazy coefficient range and 2-D density counts (pass 2).

    Returns
    -------
    (coef_range, density): dask arrays of shape (2,) ``[lo, hi]`` and
    (density_bins, density_bins) int64 counts (coefficient 0 on axis 0).
    ``None`` options take the package config's values (:mod:`filterdb_dask.config`).
    """
    dedges = density_edges(density_bins, density_range)
    density_bins = len(dedges) - 1
    engine = engine or config.get("analysis.engine")
    get_kernels(engine)
    rng, dens = map_reduce_chunks(
        _range_density_task,
        store.filters,
        [(b,) for b in store.chunk_bounds()],
        reducers=[span, total],
        outputs=[((2,), np.float64), ((density_bins, density_bins), np.int64)],
        name="coef-range-density",
        common_args=(pca.mean, pca.components, dedges, engine),
    )
    return rng, dens


def bin_edges(coef_range, *, bins: int | None = None, fine_bins: int | None = None):
    """Coarse and fine edges of pass 3 on ``coef_range``.

    Coarse: ``bins`` equal bins as np.histogram makes them. Fine: each coarse bin
    cut in ``ceil(fine_bins / bins)`` equal parts (:func:`kernels.fine_edges`), so
    there are at least ``fine_bins`` and every coarse count is a sum of fine ones:
    the kernel does one increment per value for both.

    Returns
    -------
    (edges (bins + 1,), fine_edges (bins * ceil(fine_bins / bins) + 1,)), float64.
    ``None`` takes the package config's value (:mod:`filterdb_dask.config`).
    """
    bins = config.get("analysis.bins") if bins is None else bins
    fine_bins = config.get("analysis.fine-bins") if fine_bins is None else fine_bins
    lo, hi = (float(v) for v in np.asarray(coef_range))
    edges = kernels.histogram_edges(bins, lo, hi)
    return edges, kernels.fine_edges(edges, -(-fine_bins // bins))


def _histogram_task(x, bounds, groups, mean, comps, edges, n_groups, fedges, engine):
    hist, fine = get_kernels(engine).histogram_chunk(
        x, bounds, mean, comps, edges, groups, n_groups, fedges
    )
    return hist, fine[None]


def _pass3_inputs(store, coef_range, bins: int, fine_bins: int, layer_groups):
    """Bin edges of a finite ``[lo, hi]``, chunk bounds, and each chunk's
    ``(bounds, group codes)`` (codes in meta order, (n_meta_rows, G), or None)."""
    lo, hi = (float(v) for v in np.asarray(coef_range))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise AnalysisError(f"coefficient range {[lo, hi]!r} is not finite (no filters?)")
    edges, fedges = bin_edges((lo, hi), bins=bins, fine_bins=fine_bins)
    n_meta = len(store.meta)
    if layer_groups is None:
        layer_groups = np.full((n_meta, 0), -1, dtype=np.int64)
    layer_groups = np.asarray(layer_groups, dtype=np.int64).reshape(n_meta, -1)
    bounds = store.chunk_bounds()
    return edges, fedges, bounds, list(zip(bounds, store.per_chunk(layer_groups), strict=True))


def layer_histograms(
    store,
    pca: dict,
    coef_range,
    *,
    bins: int | None = None,
    layer_groups: np.ndarray | None = None,
    n_groups: int = 0,
    fine_bins: int | None = None,
    engine: str | None = None,
):
    """Lazy per-layer histograms and fine per-group histograms (pass 3).

    Parameters
    ----------
    store : FilterStore
    pca : the global PCA (``mean``, ``components``).
    coef_range : computed ``[lo, hi]``.
    bins : bins on ``[lo, hi]`` (numpy semantics, last bin closed).
    layer_groups : (n_meta_rows, G) group codes of each meta row in G groupings
        (codes unique across groupings, -1 = not in a fine histogram), in meta order.
    n_groups : number of codes.
    fine_bins : at least this many fine bins on ``[lo, hi]`` (see :func:`bin_edges`).

    Returns
    -------
    (hist, fine): dask arrays (n_layers, D, bins) uint32 (D = K² components), rows in
    chunk order (put them in meta order with ``store.to_meta_order``), and
    (n_groups, D, F) int64,
    F = bins * ceil(fine_bins / bins). ``None`` options take the package config's
    values (:mod:`filterdb_dask.config`).
    """
    bins = _validate_bins(config.get("analysis.bins") if bins is None else bins)
    fine_bins = _validate_bins(
        config.get("analysis.fine-bins") if fine_bins is None else fine_bins, "fine_bins")
    engine = engine or config.get("analysis.engine")
    get_kernels(engine)
    edges, fedges, bounds, per_chunk = _pass3_inputs(store, coef_range, bins, fine_bins,
                                                     layer_groups)
    d = store.filters.shape[1]
    rows = [len(b) for b in bounds]  # each chunk's layers: its block of per-layer rows
    n_layers = sum(rows)
    hist, fine = map_reduce_chunks(
        _histogram_task,
        store.filters,
        per_chunk,
        reducers=[concat, total],
        outputs=[((n_layers, d, bins), np.uint32),
                 ((n_groups, d, len(fedges) - 1), np.int64)],
        name="layer-histograms",
        chunk_rows=rows,
        common_args=(pca.mean, pca.components, edges, n_groups, fedges, engine),
    )
    return hist, fine


def group_histograms(layer_hist: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum per-layer histograms into groups.

    Parameters
    ----------
    layer_hist : (n_layers, K, bins) counts, meta order.
    codes : (n_layers,) group code of each layer, -1 = none.
    n_groups : number of groups.

    Returns
    -------
    (n_groups, K, bins) int64.
    """
    out = np.zeros((n_groups, *layer_hist.shape[1:]), dtype=np.int64)
    codes = np.asarray(codes)
    # group by group: a boolean selection and one int64 sum each (integer sums: exact
    # in any order); np.add.at row by row is several times slower on 10^5 layers
    for g in np.unique(codes[codes >= 0]):
        out[g] = layer_hist[codes == g].sum(axis=0, dtype=np.int64)
    return out


def _histogram_density_task(x, bounds, groups, mean, comps, edges, n_groups, fedges,
                            dedges, engine):
    kern = get_kernels(engine)
    hist, fine = kern.histogram_chunk(x, bounds, mean, comps, edges, groups, n_groups, fedges)
    rng, dens = kern.range_density_chunk(x, bounds, mean, comps, dedges)
    return hist, fine[None], rng[None, :], dens[None]


def basis_histograms(
    store,
    pca: dict,
    coef_range,
    *,
    bins: int,
    layer_groups: np.ndarray | None = None,
    n_groups: int = 0,
    fine_bins: int,
    engine: str | None = None,
):
    """Pass 3 in a fixed reference basis, with pass 2's outputs in the same read.

    When the PCA and ``coef_range`` come from an earlier result set
    (``analyze(..., basis=REF)``) no pass is needed to find the range: each chunk is
    read once and its task runs both pass-3 kernels (:func:`layer_histograms`) and
    pass-2 kernels (:func:`coef_range_density`) on it. Coefficients outside
    ``coef_range`` are not binned (np.histogram's ``range`` rule).

    Returns
    -------
    (hist, fine, observed_range, density): as :func:`layer_histograms` and
    :func:`coef_range_density`; ``observed_range`` is the store's own ``[min, max]``
    of all coefficients in this basis.
    """
    bins = _validate_bins(bins)
    fine_bins = _validate_bins(fine_bins, "fine_bins")
    engine = engine or config.get("analysis.engine")
    get_kernels(engine)
    edges, fedges, bounds, per_chunk = _pass3_inputs(store, coef_range, bins, fine_bins,
                                                     layer_groups)
    dedges = density_edges()
    nd = len(dedges) - 1
    ncomp = np.asarray(pca.components).shape[0]
    rows = [len(b) for b in bounds]  # each chunk's layers: its block of per-layer rows
    n_layers = sum(rows)
    hist, fine, rng, dens = map_reduce_chunks(
        _histogram_density_task,
        store.filters,
        per_chunk,
        reducers=[concat, total, span, total],
        outputs=[((n_layers, ncomp, bins), np.uint32),
                 ((n_groups, ncomp, len(fedges) - 1), np.int64),
                 ((2,), np.float64),
                 ((nd, nd), np.int64)],
        name="basis-histograms",
        chunk_rows=rows,
        common_args=(pca.mean, pca.components, edges, n_groups, fedges, dedges, engine),
    )
    return hist, fine, rng, dens
