"""The result set: what one analysis produced, in memory (:class:`Results`) and on disk.

This module owns the result set's contract; nothing else reads or writes its files::

    DIR/
      results.zarr/        THE result set: one xarray Dataset (Zarr v3, not consolidated)
                           holding the meta table, per-layer statistics and histograms
                           with their bin edges, group labels and codes, KL matrices,
                           fine histograms, ridge densities and the settings
      pca.json  pca_subsets.json  kl/<slug>.csv  kl/drift.csv  quality.csv
      degenerated_layers.csv  model_quality.csv  pairs.csv  pairs_correlation.csv
      drift/<slug>.csv  own_pca.json  out_of_range.csv  (the last two with a basis)
                           exports, derived from results.zarr after it is written
      report.html  plots/  written by :func:`filterdb_dask.report.write_report`

:meth:`Results.open` reads ``results.zarr`` only, so a reopened result set answers
new questions (``kl_matrix("producer")``) exactly as the in-memory one did.
:meth:`Results.write` writes the whole set into a sibling temporary directory and
swaps it in at the end: DIR holds the previous complete set or the new one, never a
mixture; a directory that is not a result set is never written into.

Labels and meta values are stored as Zarr strings with a missing-value mask, never
parsed back from CSV, so ``""``, ``"NA"``, ``"None"``, ``"null"``, HTML and any
unicode survive exactly. JSON exports are strict JSON (NaN is written as ``null``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .groups import Grouping, make_grouping
from .histograms import group_histograms
from .kl import drift_curve, drift_summary, is_numeric_grouping, kl_matrix
from .pca import PCA, group_covariances
from .quality import degenerated_layers, model_summary, quality_table
from .storeformat import pid_alive

#: ``results.zarr``'s schema; a set of another schema is refused (run analyze again)
SCHEMA = 1
ZARR_NAME = "results.zarr"
#: what a result set directory may hold (a non-empty DIR with anything else is refused)
_TOP_ENTRIES = frozenset({
    ZARR_NAME, "pca.json", "pca_subsets.json", "kl", "quality.csv",
    "degenerated_layers.csv", "model_quality.csv", "report.html", "plots",
    "pairs.csv", "pairs_correlation.csv",
    "own_pca.json", "out_of_range.csv", "drift",
})
_SUB_ENTRIES = {"kl": re.compile(r"[0-9a-z_]+\.csv(\.tmp)?"),
                "drift": re.compile(r"[0-9a-z_]+\.csv(\.tmp)?"),
                "plots": re.compile(r"[0-9A-Za-z_]+\.png")}
_PCA_KEYS = PCA.ARRAYS


@dataclass
class Results:
    """Everything one analysis computed; small enough to hold in memory.

    Per-layer arrays are in meta order (one entry per meta row). ``bin_edges`` are
    the edges of ``layer_hist`` and every group histogram; ``fine_edges`` those of
    the fine histograms behind the ridge plots.
    """

    meta: pd.DataFrame
    pca: PCA
    coef_range: np.ndarray
    bin_edges: np.ndarray
    layer_stats: np.ndarray
    layer_hist: np.ndarray
    groupings: list[Grouping]
    group_hist: dict[str, np.ndarray]
    kl: dict[str, pd.DataFrame]
    density: np.ndarray
    density_edges: np.ndarray
    fine_edges: np.ndarray
    fine_hist: dict[str, np.ndarray]
    subsets: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    #: (n_layers, 2E) pass-1 sparsity sweep for ``settings["sparsity_eps"]``, or None
    sweep: np.ndarray | None = None
    #: (n_layers,) pass-1 orthogonality of the raw weights, or None (no shapes recorded)
    orthogonality: np.ndarray | None = None
    #: with a basis (``analyze(..., basis=REF)``): ``pca`` is REF's, this the store's own
    own_pca: PCA | None = None
    #: with a basis: ``[min, max]`` of the store's coefficients in it (``coef_range`` is REF's)
    observed_range: np.ndarray | None = None

    @property
    def basis(self) -> dict | None:
        """The reference basis the coefficients were taken in (REF's path, digest,
        bins, range), or None for the store's own PCA."""
        return self.settings.get("basis")

    @property
    def n_filters(self) -> int:
        """Filters the analysis read (the store's, also in a basis)."""
        return int((self.own_pca or self.pca).n_filters)

    @property
    def out_of_range(self) -> np.ndarray:
        """(n_layers, components) int64: coefficients of each layer and component
        outside ``coef_range``, so not binned; zero without a basis (the range is
        the store's own)."""
        n = np.asarray(self.layer_stats[:, 0], dtype=np.int64)  # kernels.STAT_N
        return n[:, None] - self.layer_hist.sum(axis=2, dtype=np.int64)

    def out_of_range_table(self) -> pd.DataFrame:
        """``out_of_range.csv``: per meta row the id columns of ``quality``, ``n``, the
        count per component, their sum and its share of the layer's coefficients."""
        q = self.quality
        oor = self.out_of_range
        df = q[list(q.columns[:5])].copy()
        for k in range(oor.shape[1]):
            df[f"out_of_range_c{k}"] = oor[:, k]
        df["out_of_range"] = oor.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            df["out_of_range_share"] = df["out_of_range"] / (df["n"] * oor.shape[1])
        return df

    def drift_to(self, by: str, ref: str | None = None) -> pd.DataFrame:
        """Shift of every group of ``by`` to the group ``ref`` (default the first),
        per component and weighted total (:func:`filterdb_dask.kl.drift_curve`), from
        the per-layer histograms (no pass). Also ``n_filters`` and ``out_of_range``
        (coefficients outside ``coef_range``, all components) per group."""
        g, h = self.group_histogram(by)
        out = drift_curve(h, self.bin_edges, self.pca.explained_variance_ratio, g.labels,
                          ref)
        n = np.zeros(g.n_groups, dtype=np.int64)
        oor = np.zeros(g.n_groups, dtype=np.int64)
        ok = g.codes >= 0
        np.add.at(n, g.codes[ok], self.layer_stats[ok, 0].astype(np.int64))
        np.add.at(oor, g.codes[ok], self.out_of_range[ok].sum(axis=1))
        out.insert(1, "n_filters", n)
        out.insert(2, "out_of_range", oor)
        out.index.name = g.name
        return out

    def drift_reference(self, grouping: Grouping) -> str:
        """The reference group of a grouping's drift curve in exports and the report:
        ``settings["drift_ref"]`` where it is one of its labels, else the first."""
        want = self.settings.get("drift_ref")
        return want if want is not None and str(want) in grouping.labels \
            else grouping.labels[0]

    def drift_groupings(self) -> list[Grouping]:
        """The groupings by a numeric meta column, which get a drift curve."""
        return [g for g in self.groupings if is_numeric_grouping(g)]

    @property
    def kernel(self) -> int:
        """K of the KxK filters analysed (the PCA has K² components)."""
        import math

        return math.isqrt(len(self.pca.mean))

    @property
    def bins(self) -> int:
        """Bins of the KL histograms."""
        return len(self.bin_edges) - 1

    @property
    def quality(self) -> pd.DataFrame:
        """Layer quality, one row per meta row (docs/method.md §7)."""
        return quality_table(self.meta, self.layer_stats, self.sweep,
                             self.settings.get("sparsity_eps") or (),
                             orthogonality=self.orthogonality)

    # ---------------------------------------------------------------- derived
    def grouping(self, by: str) -> Grouping:
        """The grouping ``by`` (a meta column or 'depth decile'): one of the result
        set's own, or computed now from the meta table (no new pass)."""
        for g in self.groupings:
            if g.name == by:
                return g
        return make_grouping(self.meta, by)

    def group_histogram(self, by: str) -> tuple[Grouping, np.ndarray]:
        """The grouping ``by`` and its (G, D, bins) histograms, summed over layers."""
        g = self.grouping(by)
        return g, group_histograms(self.layer_hist, g.codes, g.n_groups)

    def kl_matrix(self, by: str) -> pd.DataFrame:
        """Shift matrix (docs/method.md §5) of any grouping, from the per-layer histograms."""
        g, h = self.group_histogram(by)
        return kl_matrix(h, self.bin_edges, self.pca.explained_variance_ratio, g.labels)

    def drift(self) -> pd.DataFrame:
        """Box-plot statistics of the upper triangle of every grouping's matrix."""
        return drift_summary({g.name: self.kl[g.slug] for g in self.groupings})

    def degenerated_sweep(self) -> pd.DataFrame | None:
        """Share of degenerated layers per depth decile for each swept ε and entropy
        cutoff (``settings``), or None when nothing was swept; see
        :func:`filterdb_dask.quality.degenerated_sweep`."""
        from .quality import degenerated_sweep

        eps = self.settings.get("sparsity_eps") or ()
        cut = self.settings.get("entropy_cutoffs") or ()
        return degenerated_sweep(self.quality, eps, cut) if eps or cut else None

    def pair_table(self) -> pd.DataFrame | None:
        """Paired differences per depth bin (``settings["pairs"]``), or None;
        see :func:`filterdb_dask.pairs.pair_table`."""
        from .pairs import pair_table

        p = self.settings.get("pairs")
        return pair_table(self.quality, p) if p else None

    def pair_correlation(self) -> pd.DataFrame | None:
        """Spearman's ρ per depth bin and metric with ``settings["correlate"]``, or
        None; see :func:`filterdb_dask.pairs.pair_correlation`."""
        from .pairs import pair_correlation

        p, col = self.settings.get("pairs"), self.settings.get("correlate")
        return pair_correlation(self.quality, self.meta, p, col) if p and col else None

    def degenerated(self, **kw) -> pd.DataFrame:
        """Degenerated layers; see :func:`filterdb_dask.quality.degenerated_layers`."""
        return degenerated_layers(self.quality, **kw)

    def models(self, **kw) -> pd.DataFrame:
        """Per-model quality summary; see :func:`filterdb_dask.quality.model_summary`."""
        return model_summary(self.quality, self.degenerated(**kw))

    def ridge(self, slug: str) -> dict:
        """Binned-KDE densities per group and component for one grouping.

        See :func:`filterdb_dask.kernels.ridge_densities` (KDEpy's Silverman rule with
        exact counts and standard deviations from the pass-1 moments, percentiles from
        the fine histogram).

        Returns dict with ``x`` (F,), ``density`` (G, D, F), ``bandwidth`` (G, D),
        ``labels``.
        """
        from . import kernels

        g = next(gr for gr in self.groupings if gr.slug == slug)
        n, _, covs = group_covariances(self.layer_stats, g.codes, g.n_groups)
        comps = self.pca.components
        var = np.einsum("kf,gfh,kh->gk", comps, np.nan_to_num(covs), comps)
        std = np.sqrt(np.clip(np.where(n[:, None] > 1, var, 0.0), 0.0, None))
        edges = self.fine_edges
        dens, bw = kernels.ridge_densities(self.fine_hist[slug], edges, n, std)
        return {"x": (edges[:-1] + edges[1:]) / 2, "density": dens, "bandwidth": bw,
                "labels": g.labels}

    # ------------------------------------------------------------ the Dataset
    def to_dataset(self):
        """Everything as one xarray Dataset (what ``results.zarr`` holds)."""
        import xarray as xr

        p = self.pca
        comp = np.arange(len(p.mean))
        data, coords, meta_spec = _encode_meta(self.meta)
        data.update({
            "mean": (("feature",), p.mean),
            "components": (("component", "feature"), p.components),
            "explained_variance": (("component",), p.explained_variance),
            "explained_variance_ratio": (("component",), p.explained_variance_ratio),
            "covariance": (("feature", "feature_b"), p.covariance),
            "coef_covariance": (("component", "component_b"),
                                p.components @ p.covariance @ p.components.T),
            "coef_range": (("bound",), np.asarray(self.coef_range, dtype=np.float64)),
            "layer_stats": (("layer", "stat"), self.layer_stats),
            **({} if self.sweep is None else
               {"layer_sweep": (("layer", "sweep_stat"), self.sweep)}),
            **({} if self.orthogonality is None else
               {"layer_orthogonality": (("layer",), self.orthogonality)}),
            "layer_hist": (("layer", "component", "bin"), self.layer_hist),
            "out_of_range": (("layer", "component"), self.out_of_range),
            "density_counts": (("density_c0", "density_c1"), self.density),
            "density": (("density_c0", "density_c1"),
                        self.density / max(self.density.max(), 1)),
        })
        names = list(self.subsets)
        for key in _PCA_KEYS:
            dims = {"mean": ("feature",), "components": ("component", "feature"),
                    "explained_variance": ("component",),
                    "explained_variance_ratio": ("component",),
                    "covariance": ("feature", "feature_b")}[key]
            stack = np.array([getattr(self.subsets[n], key) for n in names],
                             dtype=np.float64)
            data[f"subset_{key}"] = (("subset", *dims),
                                     stack.reshape(len(names), *([len(comp)] * len(dims))))
        data["subset_n_filters"] = (("subset",), np.array(
            [self.subsets[n].n_filters for n in names], dtype=np.int64))
        if self.own_pca is not None:
            for key in _PCA_KEYS:
                dims = ("feature",) if key == "mean" else (
                    ("feature", "feature_b") if key == "covariance" else
                    ("component", "feature") if key == "components" else ("component",))
                data[f"own_{key}"] = (dims, np.asarray(getattr(self.own_pca, key),
                                                             dtype=np.float64))
        if self.observed_range is not None:
            data["observed_range"] = (("bound",), np.asarray(self.observed_range,
                                                             dtype=np.float64))
        q = self.quality
        for col in q.columns[4:]:
            data[f"quality_{col}"] = (("layer",), q[col].to_numpy(dtype=np.float64))
        data.update(_table_vars("degenerated_sweep", "degenerated_sweep_row",
                                self.degenerated_sweep()))
        data.update(_table_vars("pairs", "pair_row", self.pair_table()))
        data.update(_table_vars("pair_correlation", "pair_correlation_row",
                                self.pair_correlation()))
        coords.update({
            "component": comp, "component_b": comp, "feature": comp, "feature_b": comp,
            "bound": np.array(["lo", "hi"], dtype=object),
            "bin_edges": (("bin_edge",), np.asarray(self.bin_edges, dtype=np.float64)),
            "density_edges": (("density_edge",), self.density_edges),
            "fine_edges": (("fine_edge",), self.fine_edges),
            "fine_centres": (("fine_bin",), (self.fine_edges[:-1] + self.fine_edges[1:]) / 2),
        })
        if names:  # a string coordinate of length 0 does not survive Zarr
            coords["subset"] = np.array(names, dtype=object)
        for g in self.groupings:
            dim = f"group_{g.slug}"
            labels = np.array(g.labels, dtype=object)
            coords[dim] = labels
            coords[dim + "_b"] = labels
            data[f"codes_{g.slug}"] = (("layer",), np.asarray(g.codes, dtype=np.int64))
            data[f"hist_{g.slug}"] = ((dim, "component", "bin"), self.group_hist[g.slug])
            data[f"kl_{g.slug}"] = ((dim, dim + "_b"), self.kl[g.slug].to_numpy())
            if g.slug in self.fine_hist:
                data[f"fine_hist_{g.slug}"] = ((dim, "component", "fine_bin"),
                                               self.fine_hist[g.slug])
                rd = self.ridge(g.slug)
                data[f"ridge_{g.slug}"] = ((dim, "component", "fine_bin"), rd["density"])
                data[f"ridge_bandwidth_{g.slug}"] = ((dim, "component"), rd["bandwidth"])
        ds = xr.Dataset(data, coords=coords)
        ds.attrs.update({
            "title": "CNN Filter DB analysis (filterdb_dask)",
            "filterdb_results": SCHEMA,
            "n_filters": int(p.n_filters),
            "bins": int(self.bins),
            "groupings": _dumps([{"name": g.name, "slug": g.slug} for g in self.groupings]),
            "subsets": _dumps(names),
            "meta": _dumps(meta_spec),
            "settings": _dumps(self.settings),
        })
        if self.own_pca is not None:
            ds.attrs["own_n_filters"] = int(self.own_pca.n_filters)
        return ds

    @classmethod
    def from_dataset(cls, ds) -> Results:
        """The Results a Dataset of :meth:`to_dataset` holds (exact inverse)."""
        try:
            return cls._from_dataset(ds)
        except (KeyError, ValueError, TypeError) as exc:
            raise AnalysisError(
                f"the result set is damaged or incomplete ({type(exc).__name__}: {exc}); "
                "run analyze again"
            ) from exc

    @classmethod
    def _from_dataset(cls, ds) -> Results:
        if ds.attrs.get("filterdb_results") != SCHEMA:
            raise AnalysisError(
                f"the result set has schema {ds.attrs.get('filterdb_results')!r}, this "
                f"version reads {SCHEMA}: run analyze again"
            )
        meta = _decode_meta(ds, json.loads(ds.attrs["meta"]))
        pca = PCA(n_filters=int(ds.attrs["n_filters"]),
                  **{k: ds[k].values.astype(np.float64) for k in _PCA_KEYS})
        names = json.loads(ds.attrs["subsets"])
        subsets = {}
        for i, name in enumerate(names):
            subsets[name] = PCA(
                n_filters=int(ds["subset_n_filters"].values[i]),
                **{k: ds[f"subset_{k}"].values[i].astype(np.float64) for k in _PCA_KEYS})
        groupings, group_hist, kl, fine_hist = [], {}, {}, {}
        for item in json.loads(ds.attrs["groupings"]):
            slug = item["slug"]
            labels = tuple(str(v) for v in ds[f"group_{slug}"].values)
            g = Grouping(item["name"], slug, labels, ds[f"codes_{slug}"].values.astype(np.int64))
            groupings.append(g)
            group_hist[slug] = ds[f"hist_{slug}"].values
            idx = pd.Index(list(labels), dtype=object)
            kl[slug] = pd.DataFrame(ds[f"kl_{slug}"].values.astype(np.float64), index=idx,
                                    columns=idx.copy())
            if f"fine_hist_{slug}" in ds:
                fine_hist[slug] = ds[f"fine_hist_{slug}"].values
        own_pca = None
        if "own_mean" in ds:
            own_pca = PCA(n_filters=int(ds.attrs["own_n_filters"]),
                          **{k: ds[f"own_{k}"].values.astype(np.float64) for k in _PCA_KEYS})
        return cls(
            own_pca=own_pca,
            observed_range=(ds["observed_range"].values.astype(np.float64)
                            if "observed_range" in ds else None),
            meta=meta,
            pca=pca,
            coef_range=ds["coef_range"].values.astype(np.float64),
            bin_edges=ds["bin_edges"].values.astype(np.float64),
            layer_stats=ds["layer_stats"].values.astype(np.float64),
            sweep=(ds["layer_sweep"].values.astype(np.float64)
                   if "layer_sweep" in ds else None),
            orthogonality=(ds["layer_orthogonality"].values.astype(np.float64)
                           if "layer_orthogonality" in ds else None),
            layer_hist=ds["layer_hist"].values,
            groupings=groupings,
            group_hist=group_hist,
            kl=kl,
            density=ds["density_counts"].values,
            density_edges=ds["density_edges"].values.astype(np.float64),
            fine_edges=ds["fine_edges"].values.astype(np.float64),
            fine_hist=fine_hist,
            subsets=subsets,
            settings=json.loads(ds.attrs["settings"]),
        )

    @classmethod
    def open(cls, path: str | os.PathLike) -> Results:
        """Reopen a result set from its directory (reads ``results.zarr`` only).

        Raises
        ------
        AnalysisError
            ``path`` does not exist, holds no ``results.zarr``, or it is damaged or of
            another schema.
        """
        import xarray as xr

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise AnalysisError(f"result directory {path!r} does not exist"
                                if not os.path.exists(path) else
                                f"{path!r} is not a directory")
        zpath = os.path.join(path, ZARR_NAME)
        if not os.path.isdir(zpath):
            raise AnalysisError(f"{path!r} is not an analysis directory (no {ZARR_NAME}); "
                                "run analyze --out on it first")
        try:
            ds = xr.open_zarr(zpath, consolidated=False).load()
        except Exception as exc:  # zarr/xarray raise many types for a damaged store
            raise AnalysisError(
                f"cannot read {zpath!r} ({type(exc).__name__}: {exc}); run analyze again"
            ) from exc
        return cls.from_dataset(ds)

    # ---------------------------------------------------------------- exports
    def pca_json(self) -> dict:
        """``pca.json``: the global PCA and the coefficient range (strict JSON)."""
        return _strict({**_pca_export(self.pca),
                        "coef_range": [float(v) for v in self.coef_range]})

    def export(self, out: str) -> dict[str, str]:
        """Write the CSV/JSON exports of this result set into the directory ``out``."""
        paths: dict[str, str] = {}

        def put(rel, writer):
            path = os.path.join(out, rel)
            writer(path)
            paths[rel] = path

        put("pca.json", lambda p: _write_json(p, self.pca_json()))
        put("pca_subsets.json", lambda p: _write_json(
            p, _strict({n: _pca_export(sp) for n, sp in self.subsets.items()})))
        os.makedirs(os.path.join(out, "kl"), exist_ok=True)
        for g in self.groupings:
            mat = self.kl[g.slug]
            put(os.path.join("kl", f"{g.slug}.csv"),
                lambda p, mat=mat, g=g: mat.to_csv(p, index_label=g.name, float_format="%.17g"))
        put(os.path.join("kl", "drift.csv"),
            lambda p: self.drift().to_csv(p, index=False, float_format="%.17g"))
        put("quality.csv", lambda p: self.quality.to_csv(p, index=False, float_format="%.17g"))
        put("degenerated_layers.csv",
            lambda p: self.degenerated().to_csv(p, index=False, float_format="%.17g"))
        put("model_quality.csv", lambda p: self.models().to_csv(p, float_format="%.17g"))
        for name, table in (("pairs.csv", self.pair_table()),
                            ("pairs_correlation.csv", self.pair_correlation())):
            if table is not None:
                put(name, lambda p, t=table: t.to_csv(p, index=False, float_format="%.17g"))
        drifting = self.drift_groupings()
        if drifting:
            os.makedirs(os.path.join(out, "drift"), exist_ok=True)
        for g in drifting:
            put(os.path.join("drift", f"{g.slug}.csv"),
                lambda p, g=g: self.drift_to(g.name, self.drift_reference(g)).to_csv(
                    p, float_format="%.17g"))
        if self.own_pca is not None:
            put("own_pca.json", lambda p: _write_json(p, _strict(_pca_export(self.own_pca))))
        if self.basis is not None:
            put("out_of_range.csv", lambda p: self.out_of_range_table().to_csv(
                p, index=False, float_format="%.17g"))
        return paths

    def write(self, out: str | os.PathLike, *, report: bool = False,
              verbosity: int | None = None) -> dict[str, str]:
        """Write the whole result set into the directory ``out``.

        Everything goes into a sibling temporary directory first (``results.zarr``,
        then the exports read back from it, then the report if asked for), which
        replaces ``out`` at the end. ``out`` is checked first
        (:func:`check_out_dir`).

        Returns
        -------
        dict
            Result name (relative path) -> its path under ``out``.

        Raises
        ------
        AnalysisError
            ``out`` is a file, not writable, or a non-empty directory that is not a
            result set.
        """
        out = os.path.abspath(os.fspath(out))
        check_out_dir(out)
        remove_stale_siblings(out)
        tmp = tempfile.mkdtemp(prefix=_sibling_prefix(out, "writing"), dir=os.path.dirname(out))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            self.to_dataset().to_zarr(os.path.join(tmp, ZARR_NAME), mode="w-",
                                      consolidated=False)
            rel = Results.open(tmp).export(tmp)  # the exports derive from results.zarr
            rel[ZARR_NAME] = ZARR_NAME
            if report:
                from .report import write_report

                write_report(tmp, verbosity=verbosity)
                rel["report.html"] = "report.html"
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {k: os.path.join(out, k) for k in rel}


# ----------------------------------------------------------- result directories
def _foreign_entries(path: str) -> list[str]:
    """Entries of ``path`` a result set does not hold (relative paths)."""
    out = []
    for name in sorted(os.listdir(path)):
        base = name[:-4] if name.endswith(".tmp") else name
        full = os.path.join(path, name)
        if base not in _TOP_ENTRIES:
            out.append(name)
        elif name in _SUB_ENTRIES and os.path.isdir(full) and not os.path.islink(full):
            out += [f"{name}/{n}" for n in sorted(os.listdir(full))
                    if not _SUB_ENTRIES[name].fullmatch(n)]
    return out


def check_out_dir(out: str | os.PathLike) -> None:
    """Check that a result set can be written to ``out``, before any work is done.

    ``out`` must be absent, an empty directory, or a result set (its files are
    replaced as a whole); its parent must be writable (it is created if missing).

    Raises
    ------
    AnalysisError
        One line saying what is wrong with ``out``.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.islink(out):
        raise AnalysisError(f"result directory {out!r} is a symbolic link; give the "
                            "directory it points to")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise AnalysisError(f"result directory {out!r} is a file, not a directory")
        foreign = _foreign_entries(out)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise AnalysisError(
                f"{out!r} is not empty and not a result set (it holds "
                f"{', '.join(map(repr, foreign[:3]))}{more}); nothing in it is replaced: "
                "give a new or empty directory"
            )
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.probe-", dir=parent))
    except OSError as exc:
        raise AnalysisError(
            f"cannot write the result directory {out!r}: {exc.strerror or exc} "
            f"in {parent!r}"
        ) from exc


def _swap_in(tmp: str, out: str) -> None:
    """Replace ``out`` (absent or a result set) by the complete directory ``tmp``."""
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=_sibling_prefix(out, "old"), dir=os.path.dirname(out))
    moved = os.path.join(old, "set")
    os.rename(out, moved)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(moved, out)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _sibling_prefix(out: str, kind: str) -> str:
    """Name prefix of a temporary sibling of ``out``: who made it (process, host)."""
    return f".{os.path.basename(out)}.{kind}-{os.getpid()}-{_host_tag()}-"


def remove_stale_siblings(out: str | os.PathLike) -> list[str]:
    """Remove the temporary siblings of ``out`` left by a writer that was killed.

    A sibling is stale when it was made on this host by a process that no longer
    runs, is a real directory (not a link) and belongs to this user; siblings of
    live writers, of other hosts (a shared file system) and of other users stay.
    A stale ``old`` sibling is kept while ``out`` is missing (it then holds the only
    copy of the previous result set). Returns the removed paths.
    """
    out = os.path.abspath(os.fspath(out))
    parent, base = os.path.split(out)
    pattern = re.compile(r"\." + re.escape(base)
                         + r"\.(writing|old)-(\d+)-([0-9a-f]{8})-[^/]+")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if not m or m.group(3) != _host_tag() or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.isdir(out):
            continue
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ encoding
def _table_vars(prefix: str, dim: str, table: pd.DataFrame | None) -> dict:
    """A small derived table as Dataset variables ``<prefix>_<column>`` along ``dim``
    (numbers float64, text as strings); the column names stay the table's, so a
    side label from a pairs file keeps its spelling in ``settings["pairs"]``."""
    if table is None or not len(table):  # a string variable of length 0 does not survive Zarr
        return {}
    out = {}
    for j, col in enumerate(table.columns):
        s = table[col]
        vals = (s.to_numpy(dtype=np.float64) if pd.api.types.is_numeric_dtype(s.dtype)
                else np.array([str(v) for v in s], dtype=object))
        key = col if re.fullmatch(r"[0-9A-Za-z_]+", str(col)) else f"col{j}"
        out[f"{prefix}_{key}"] = ((dim,), vals)
    return out


def _encode_meta(meta: pd.DataFrame):
    """Meta columns as Dataset variables ``meta_<j>`` (strings + ``meta_<j>_na``)."""
    data, spec = {}, []
    for j, name in enumerate(meta.columns):
        s = meta[name]
        var = f"meta_{j}"
        if pd.api.types.is_bool_dtype(s.dtype):
            kind, vals = "bool", s.to_numpy(dtype=bool)
        elif pd.api.types.is_integer_dtype(s.dtype):
            kind, vals = "int", s.to_numpy(dtype=np.int64)
        elif pd.api.types.is_float_dtype(s.dtype):
            kind, vals = "float", s.to_numpy(dtype=np.float64)
        else:
            kind = "str"
            na = s.isna().to_numpy()
            vals = np.array(["" if m else str(v) for v, m in zip(s, na, strict=True)],
                            dtype=object)
            data[var + "_na"] = (("layer",), na)
        data[var] = (("layer",), vals)
        spec.append({"name": str(name), "var": var, "kind": kind})
    index = [n for n in meta.index.names if n is not None and n in meta.columns]
    return data, {}, {"columns": spec, "index": index}


def _decode_meta(ds, spec: dict) -> pd.DataFrame:
    cols = {}
    for item in spec["columns"]:
        vals = ds[item["var"]].values
        if item["kind"] == "str":
            vals = np.array([str(v) for v in vals], dtype=object)
            vals[ds[item["var"] + "_na"].values.astype(bool)] = np.nan
        cols[item["name"]] = vals
    n = ds.sizes.get("layer", 0)
    df = pd.DataFrame(cols, index=pd.RangeIndex(n))
    index = spec["index"]
    if index:
        df.index = (pd.MultiIndex.from_frame(df[index]) if len(index) > 1
                    else pd.Index(df[index[0]], name=index[0]))
    return df


def _pca_export(p: PCA) -> dict:
    return {"n_filters": int(p.n_filters),
            **{k: np.asarray(getattr(p, k)).tolist() for k in _PCA_KEYS if k != "covariance"}}


def _strict(obj):
    """``obj`` with NaN/inf as None and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dumps(obj) -> str:
    return json.dumps(_strict(obj), allow_nan=False, ensure_ascii=False)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
