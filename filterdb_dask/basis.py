"""A fixed reference basis: the PCA, range, bins and KL weights of an earlier result set.

``analyze(store, basis=REF)`` projects the store's filters on REF's mean and
components, bins the coefficients on REF's ``[lo, hi]`` and bin edges and weights the
KL terms by REF's explained-variance ratio, so that histograms and shift values of
different DBs or runs are directly comparable (docs/method.md §3, §5). This module
reads and checks REF (:func:`load_basis`); the passes are in :mod:`analysis`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import AnalysisError
from .pca import PCA

#: the arrays of REF that define the basis, in the order they enter its digest
DIGEST_KEYS = ("mean", "components", "explained_variance_ratio", "coef_range", "bin_edges",
               "fine_edges")


@dataclass(frozen=True)
class Basis:
    """REF's basis: its PCA, coefficient range and the edges of its histograms."""

    pca: PCA
    coef_range: np.ndarray
    bin_edges: np.ndarray
    fine_edges: np.ndarray
    #: the fine_bins setting that rebuilds ``fine_edges`` from ``bin_edges``
    fine_bins: int
    path: str | None
    digest: str

    @property
    def bins(self) -> int:
        return len(self.bin_edges) - 1

    def record(self) -> dict:
        """What the settings of a result set made in this basis record."""
        return {"path": self.path, "digest": self.digest, "bins": self.bins,
                "coef_range": [float(v) for v in self.coef_range],
                "n_filters": int(self.pca.n_filters)}


def basis_digest(arrays: dict) -> str:
    """SHA-256 (hex) of the basis arrays (:data:`DIGEST_KEYS`) as little-endian float64,
    each preceded by its shape: two result sets with the same digest bin and weight
    alike, bit for bit."""
    h = hashlib.sha256(b"filterdb_dask basis v1")
    for key in DIGEST_KEYS:
        a = np.ascontiguousarray(arrays[key], dtype="<f8")
        h.update(key.encode() + repr(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def load_basis(ref, n_features: int) -> Basis:
    """REF (a :class:`~filterdb_dask.resultset.Results` or the path of a result
    directory) as a :class:`Basis` for filters of ``n_features`` values.

    Raises
    ------
    AnalysisError
        REF is not a result directory (or is damaged), or its PCA, range or bins are
        inconsistent: not ``n_features``-dimensional, not finite, bin edges that are
        not the equal-width edges of its range, fine edges that do not subdivide them.
    """
    from .resultset import Results

    if isinstance(ref, Basis):
        if ref.pca.components.shape != (n_features, n_features):
            raise AnalysisError(f"`basis` {ref.path!r}: its components have shape "
                                f"{ref.pca.components.shape}, the store's filters have "
                                f"{n_features} values")
        return ref
    path = None
    if isinstance(ref, str | os.PathLike):
        path = os.path.abspath(os.fspath(ref))
        try:
            ref = Results.open(path)
        except AnalysisError as exc:
            raise AnalysisError(f"`basis`: {exc}") from exc
    if not isinstance(ref, Results):
        raise AnalysisError(f"`basis` must be a result directory or Results, "
                            f"not {type(ref).__name__}")
    where = f"`basis` {path!r}" if path else "`basis`"
    p = ref.pca
    d = int(n_features)
    shapes = {"mean": (d,), "components": (d, d), "explained_variance_ratio": (d,)}
    for key, shape in shapes.items():
        a = np.asarray(getattr(p, key), dtype=np.float64)
        if a.shape != shape:
            raise AnalysisError(f"{where}: its {key} has shape {a.shape}, the store's filters "
                                f"have {d} values (expected {shape})")
        if not np.all(np.isfinite(a)):
            raise AnalysisError(f"{where}: its {key} is not finite (a PCA of fewer than "
                                "two filters?)")
    if np.any(np.asarray(p.explained_variance_ratio) < 0):
        raise AnalysisError(f"{where}: its explained_variance_ratio has negative values, "
                            "which cannot weight the KL terms")
    coef_range = np.asarray(ref.coef_range, dtype=np.float64)
    edges = np.asarray(ref.bin_edges, dtype=np.float64)
    fine = np.asarray(ref.fine_edges, dtype=np.float64)
    if coef_range.shape != (2,) or not np.all(np.isfinite(coef_range)) \
            or coef_range[0] > coef_range[1]:
        raise AnalysisError(f"{where}: its coefficient range {coef_range.tolist()!r} is not "
                            "a finite [lo, hi]")
    bins = len(edges) - 1
    if bins < 1 or not np.array_equal(
            edges, kernels.histogram_edges(bins, coef_range[0], coef_range[1])):
        raise AnalysisError(f"{where}: its {bins} bin edges are not the equal-width bins of "
                            f"its coefficient range {coef_range.tolist()!r}")
    try:
        sub = kernels.validate_fine_edges(edges, fine)
    except AnalysisError as exc:
        raise AnalysisError(f"{where}: {exc}") from exc
    if not np.array_equal(fine, kernels.fine_edges(edges, sub)):
        raise AnalysisError(f"{where}: its fine bin edges are not its bins cut in {sub} "
                            "equal parts")
    fine_bins = ref.settings.get("fine_bins")
    usable = (isinstance(fine_bins, int) and not isinstance(fine_bins, bool)
              and fine_bins >= 1 and -(-fine_bins // bins) == sub)
    if not usable:  # the setting is only a record: the edges decide
        fine_bins = bins * sub
    pca = PCA(n_filters=int(p.n_filters),
              **{k: np.array(getattr(p, k), dtype=np.float64) for k in PCA.ARRAYS})
    arrays = {"mean": pca.mean, "components": pca.components,
              "explained_variance_ratio": pca.explained_variance_ratio,
              "coef_range": coef_range, "bin_edges": edges, "fine_edges": fine}
    return Basis(pca=pca, coef_range=coef_range, bin_edges=edges, fine_edges=fine,
                 fine_bins=int(fine_bins), path=path, digest=basis_digest(arrays))
