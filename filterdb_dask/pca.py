"""PCA of the scaled filters from mergeable per-layer moments (docs/method.md §2-3).

Pass 1 computes, per layer, the count, mean and centred D×D scatter (D = K², 9
for 3×3 filters) of the scaled filters (plus the layer-quality statistics, which need
the same pass).
Merging them exactly (Chan et al.) gives the global PCA and the PCA of any
selection of layers without another pass over the filters.

Owner of the PCA result (issue 11.5): :class:`PCA` is the one typed value that the
analysis, the histograms, the result set and the report pass around.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from . import kernels
from ._graph import ChunkMap, map_together
from .engines import get_kernels
from .errors import AnalysisError


@dataclass(frozen=True, eq=False)
class PCA:
    """A PCA of scaled filters (docs/method.md §3): the one type every module passes.

    ``components`` holds one component per row (largest-|entry| positive),
    ``covariance`` is the n−1 covariance of the scaled filters; with fewer than two
    filters every array is NaN.
    """

    n_filters: int
    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    covariance: np.ndarray

    #: the array fields, in the order results.zarr and pca.json list them
    ARRAYS = ("mean", "components", "explained_variance", "explained_variance_ratio",
              "covariance")

    @classmethod
    def from_moments(cls, n: float, mean: np.ndarray, m2: np.ndarray) -> PCA:
        """The PCA of merged moments (count, mean, centred scatter)."""
        return cls(**kernels.pca_finalize(n, mean, m2))

    def to_dict(self) -> dict:
        """Plain dict of the fields (arrays as numpy arrays)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _stats_task(x, bounds, engine):
    return (get_kernels(engine).layer_stats_chunk(x, bounds),)


def layer_stats(store, *, engine: str = "auto"):
    """Lazy per-layer statistics of pass 1.

    Parameters
    ----------
    store : FilterStore
    engine : 'auto', 'numba' or 'numpy'.

    Returns
    -------
    dask array (n_layers, D² + D + 5) float64 (``kernels.stat_layout``; N_STATS for
    3×3), rows in chunk order (put them in meta order with ``store.to_meta_order``).
    """
    ((stats,),) = map_together(store.filters, [layer_stats_map(store, engine=engine)])
    return stats


def layer_stats_map(store, *, engine: str = "auto") -> ChunkMap:
    """The per-chunk kernel of :func:`layer_stats`, to run with others on the same
    reads (:func:`filterdb_dask._graph.map_together`)."""
    get_kernels(engine)  # validate before building
    bounds = store.chunk_bounds()
    width = kernels.stat_layout(store.filters.shape[1]).size
    return ChunkMap(_stats_task, [(b,) for b in bounds],
                    [([len(b) for b in bounds], (width,), np.float64)], "layer-stats",
                    (engine,))


def pca_from_stats(stats: np.ndarray, select: np.ndarray | None = None) -> PCA:
    """PCA of the filters of the selected layers from their pass-1 statistics.

    Parameters
    ----------
    stats : (n_layers, N_STATS) from :func:`layer_stats`, computed.
    select : optional boolean mask or index array of layers.

    Returns
    -------
    PCA
    """
    s = stats if select is None else stats[select]
    lay = kernels.stat_layout(kernels.stats_dim(stats))
    n, mean, m2 = kernels.moments_combine(s[:, lay.n], s[:, lay.mean], s[:, lay.m2])
    return PCA.from_moments(n, mean, m2)


def group_covariances(stats: np.ndarray, codes: np.ndarray, n_groups: int):
    """Count, mean and covariance of the scaled filters of each group of layers."""
    d = kernels.stats_dim(stats)
    lay = kernels.stat_layout(d)
    counts = np.zeros(n_groups)
    means = np.zeros((n_groups, d))
    covs = np.full((n_groups, d, d), np.nan)
    for g in range(n_groups):
        sel = codes == g
        n, mu, m2 = kernels.moments_combine(
            stats[sel, lay.n], stats[sel, lay.mean], stats[sel, lay.m2],
        )
        counts[g], means[g] = n, mu
        if n > 1:
            covs[g] = m2 / (n - 1)
    return counts, means, covs


def validate_pca(pca: PCA) -> None:
    """Refuse a PCA that cannot define coefficients (fewer than two filters)."""
    if pca.n_filters < 2 or not np.all(np.isfinite(pca.components)):
        raise AnalysisError(
            f"the PCA needs at least two filters; the store's layers hold {pca.n_filters}"
        )
