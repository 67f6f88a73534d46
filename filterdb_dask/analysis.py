"""The whole CNN Filter DB analysis in three passes over the filters.

Pass 1: per-layer moments of the scaled filters + layer quality -> global PCA,
        subset PCAs, quality tables.
Pass 2: coefficient range + 2-D density of coefficients 0 vs 1 (needs the PCA).
Pass 3: per-layer histograms (layers x 9 x bins) + fine per-group histograms
        (needs the range) -> group histograms of any grouping, KL matrices, ridges.

Each pass is one ``compute`` of all its outputs, so the data is read three times.
Everything after the passes is small numpy work on per-layer results.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import cluster, config, kernels
from .errors import AnalysisError
from .groups import Grouping, default_by, make_grouping, make_groupings
from .histograms import (
    bin_edges,
    coef_range_density,
    density_edges,
    group_histograms,
    layer_histograms,
)
from .kl import drift_summary, kl_matrix
from .pca import group_covariances, layer_stats, pca_from_stats, validate_pca
from .quality import (
    degenerated_layers,
    model_summary,
    normalize_sparsity_eps,
    quality_table,
    sparsity_sweep,
)

#: groupings with at most this many groups get fine histograms (ridge plots)
MAX_RIDGE_GROUPS = 40


@dataclass
class Results:
    """Everything the analysis computed; small enough to hold in memory.

    Per-layer arrays are in meta order (one entry per meta row).
    """

    meta: pd.DataFrame
    pca: dict
    coef_range: np.ndarray
    bins: int
    layer_stats: np.ndarray
    layer_hist: np.ndarray
    groupings: list[Grouping]
    group_hist: dict[str, np.ndarray]
    kl: dict[str, pd.DataFrame]
    density: np.ndarray
    density_edges: np.ndarray
    fine_edges: np.ndarray
    fine_hist: dict[str, np.ndarray]
    quality: pd.DataFrame
    subsets: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- derived
    def grouping(self, by: str) -> Grouping:
        """A grouping computed now from the per-layer histograms (no new pass)."""
        return make_grouping(self.meta, by)

    def group_histogram(self, by: str) -> tuple[Grouping, np.ndarray]:
        g = self.grouping(by)
        return g, group_histograms(self.layer_hist, g.codes, g.n_groups)

    def kl_matrix(self, by: str) -> pd.DataFrame:
        """Shift matrix of any grouping, from the per-layer histograms."""
        g, h = self.group_histogram(by)
        return kl_matrix(h, self.coef_range, self.pca["explained_variance_ratio"], g.labels)

    def drift(self) -> pd.DataFrame:
        return drift_summary({g.name: self.kl[g.slug] for g in self.groupings})

    def degenerated(self, **kw) -> pd.DataFrame:
        return degenerated_layers(self.quality, **kw)

    def models(self, **kw) -> pd.DataFrame:
        return model_summary(self.quality, self.degenerated(**kw))

    def ridge(self, slug: str) -> dict:
        """Binned-KDE densities per group and component for one grouping.

        See :func:`filterdb_dask.kernels.ridge_densities` (KDEpy's Silverman rule with
        exact counts and standard deviations from the pass-1 moments, percentiles from
        the fine histogram).

        Returns dict with ``x`` (F,), ``density`` (G, 9, F), ``bandwidth`` (G, 9),
        ``labels``.
        """
        g = next(gr for gr in self.groupings if gr.slug == slug)
        n, _, covs = group_covariances(self.layer_stats, g.codes, g.n_groups)
        comps = self.pca["components"]
        var = np.einsum("kf,gfh,kh->gk", comps, np.nan_to_num(covs), comps)
        std = np.sqrt(np.clip(np.where(n[:, None] > 1, var, 0.0), 0.0, None))
        edges = self.fine_edges
        dens, bw = kernels.ridge_densities(self.fine_hist[slug], edges, n, std)
        return {"x": (edges[:-1] + edges[1:]) / 2, "density": dens, "bandwidth": bw,
                "labels": g.labels}

    # ---------------------------------------------------------------- output
    def pca_json(self) -> dict:
        p = self.pca
        return {
            "n_filters": int(p["n_filters"]),
            "mean": p["mean"].tolist(),
            "components": p["components"].tolist(),
            "explained_variance": p["explained_variance"].tolist(),
            "explained_variance_ratio": p["explained_variance_ratio"].tolist(),
            "coef_range": [float(v) for v in self.coef_range],
        }

    def to_dataset(self):
        """Everything as one xarray Dataset (written to ``results.zarr``)."""
        import xarray as xr

        comp = np.arange(9)
        edges = kernels.histogram_edges(self.bins, *self.coef_range)
        m = self.meta
        layer_coords = {
            "model_id": ("layer", m["model_id"].to_numpy()),
            "conv_depth": ("layer", m["conv_depth"].to_numpy()),
            "conv_depth_norm": ("layer", m["conv_depth_norm"].to_numpy(dtype=np.float64)),
            "start": ("layer", m["start"].to_numpy()),
            "stop": ("layer", m["stop"].to_numpy()),
        }
        if "model" in m:
            layer_coords["model"] = ("layer", m["model"].astype(str).to_numpy(dtype=object))
        p = self.pca
        data = {
            "mean": (("feature",), p["mean"]),
            "components": (("component", "feature"), p["components"]),
            "explained_variance": (("component",), p["explained_variance"]),
            "explained_variance_ratio": (("component",), p["explained_variance_ratio"]),
            "coef_covariance": (("component", "component_b"),
                                p["components"] @ p["covariance"] @ p["components"].T),
            "coef_range": (("bound",), np.asarray(self.coef_range, dtype=np.float64)),
            "layer_hist": (("layer", "component", "bin"), self.layer_hist),
            "density_counts": (("density_c0", "density_c1"), self.density),
            "density": (("density_c0", "density_c1"),
                        self.density / max(self.density.max(), 1)),
        }
        for col in self.quality.columns[4:]:
            data[f"quality_{col}"] = (("layer",), self.quality[col].to_numpy())
        coords = {
            "component": comp, "component_b": comp, "feature": comp,
            "bound": np.array(["lo", "hi"], dtype=object),
            "bin_edges": (("bin_edge",), edges),
            "density_edges": (("density_edge",), self.density_edges),
            "fine_edges": (("fine_edge",), self.fine_edges),
            "fine_centres": (("fine_bin",), (self.fine_edges[:-1] + self.fine_edges[1:]) / 2),
            **layer_coords,
        }
        for g in self.groupings:
            dim = f"group_{g.slug}"
            coords[dim] = np.asarray(g.labels, dtype=object)
            data[f"hist_{g.slug}"] = ((dim, "component", "bin"), self.group_hist[g.slug])
            data[f"kl_{g.slug}"] = ((dim, dim + "_b"), self.kl[g.slug].to_numpy())
            coords[dim + "_b"] = np.asarray(g.labels, dtype=object)
            if g.slug in self.fine_hist:
                data[f"fine_hist_{g.slug}"] = ((dim, "component", "fine_bin"),
                                               self.fine_hist[g.slug])
                rd = self.ridge(g.slug)
                data[f"ridge_{g.slug}"] = ((dim, "component", "fine_bin"), rd["density"])
                data[f"ridge_bandwidth_{g.slug}"] = ((dim, "component"), rd["bandwidth"])
        ds = xr.Dataset(data, coords=coords)
        ds.attrs.update({
            "title": "CNN Filter DB analysis (filterdb_dask)",
            "n_filters": int(p["n_filters"]),
            "bins": int(self.bins),
            "settings": json.dumps(self.settings),
        })
        return ds

    def write(self, out: str) -> dict[str, str]:
        """Write every result file into ``out``; files appear only when complete.

        Returns a mapping of result name -> path.
        """
        os.makedirs(out, exist_ok=True)
        paths: dict[str, str] = {}

        def _atomic(path, writer):
            tmp = path + ".tmp"
            writer(tmp)
            os.replace(tmp, path)
            paths[os.path.relpath(path, out)] = path

        def _json(obj):
            def write(p):
                with open(p, "w") as fh:
                    fh.write(json.dumps(obj, indent=2) + "\n")

            return write

        _atomic(os.path.join(out, "pca.json"), _json(self.pca_json()))
        subsets = {
            name: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in sp.items()
                   if k != "covariance"}
            for name, sp in self.subsets.items()
        }
        _atomic(os.path.join(out, "pca_subsets.json"), _json(subsets))
        os.makedirs(os.path.join(out, "kl"), exist_ok=True)
        for g in self.groupings:
            mat = self.kl[g.slug]
            _atomic(os.path.join(out, "kl", f"{g.slug}.csv"),
                    lambda p, mat=mat, g=g: mat.to_csv(p, index_label=g.name,
                                                       float_format="%.17g"))
        _atomic(os.path.join(out, "kl", "drift.csv"),
                lambda p: self.drift().to_csv(p, index=False, float_format="%.17g"))
        _atomic(os.path.join(out, "quality.csv"),
                lambda p: self.quality.to_csv(p, index=False, float_format="%.17g"))
        _atomic(os.path.join(out, "degenerated_layers.csv"),
                lambda p: self.degenerated().to_csv(p, index=False, float_format="%.17g"))
        _atomic(os.path.join(out, "model_quality.csv"),
                lambda p: self.models().to_csv(p, float_format="%.17g"))
        zpath = os.path.join(out, "results.zarr")
        tmp = zpath + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.to_dataset().to_zarr(tmp, mode="w", consolidated=False)
        shutil.rmtree(zpath, ignore_errors=True)
        os.replace(tmp, zpath)
        paths["results.zarr"] = zpath
        return paths


def _normalize_subsets(meta: pd.DataFrame, subsets) -> dict[str, np.ndarray]:
    """Subset specs -> boolean masks over meta rows.

    A spec is a boolean mask, a ``"COLUMN=VALUE"`` string, or a
    ``pandas.DataFrame.query`` string.
    """
    out = {}
    for name, spec in (subsets or {}).items():
        if isinstance(spec, str) and "=" in spec and "==" not in spec:
            col, val = spec.split("=", 1)
            col, val = col.strip(), val.strip()
            if col not in meta.columns:
                raise AnalysisError(f"subset {name!r}: {col!r} is not a meta column")
            mask = meta[col].astype(str).to_numpy() == val
        elif isinstance(spec, str):
            try:
                mask = meta.eval(spec).to_numpy(dtype=bool)
            except Exception as exc:
                raise AnalysisError(f"subset {name!r}: cannot evaluate {spec!r}: {exc}") from exc
        else:
            mask = np.asarray(spec, dtype=bool)
            if mask.shape != (len(meta),):
                raise AnalysisError(
                    f"subset {name!r}: mask of shape {mask.shape} for {len(meta)} meta rows"
                )
        out[str(name)] = mask
    return out


def default_subsets(meta: pd.DataFrame) -> dict[str, str]:
    """One subset per Visual Category value (the paper's eigenimage comparison)."""
    if "Visual Category" not in meta.columns:
        return {}
    vals = sorted(meta["Visual Category"].dropna().astype(str).unique())
    return {f"Visual Category={v}": f"Visual Category={v}" for v in vals}


def analyze(
    store,
    *,
    by=None,
    bins: int | None = None,
    subsets=None,
    fine_bins: int | None = None,
    engine: str | None = None,
    verbosity: int | None = None,
    execution: cluster.Execution | None = None,
    sparsity_eps=None,
) -> Results:
    """Run the analysis of docs/method.md on a store, in three passes.

    Parameters
    ----------
    store : FilterStore or path of a store.
    by : groupings: meta column names and/or 'depth decile'.
    bins : histogram bins for the KL matrices.
    subsets : name -> subset spec (mask, "COLUMN=VALUE" or a query string) for
        subset PCAs; default one per Visual Category.
    fine_bins : at least this many fine bins behind the ridge plots (each of the
        ``bins`` coarse bins cut in equal parts; see ``histograms.bin_edges``).
    engine : per-chunk kernels: 'auto', 'numba' or 'numpy'.
    ``by``, ``bins``, ``fine_bins``, ``engine`` left as None take the package
    config's values (``filterdb_dask.analysis.*``: Task, Visual Category, depth
    decile, model; 70; 256; auto).
    verbosity : progress output (0 quiet) when no ``execution`` is given.
    execution : where to compute (:func:`filterdb_dask.cluster.execution`);
        default: dask's current scheduler.
    sparsity_eps : thresholds ε in (0, 1] swept in pass 1 (``quality.csv`` gains
        ``sparsity@ε`` and clean variance entropy per ε); default the configured
        ``analysis.sparsity-eps`` (none).

    Returns
    -------
    Results

    Raises
    ------
    AnalysisError
        Unknown grouping column, bad bins, or too few filters.
    """
    from .engines import resolve_engine
    from .histograms import _validate_bins
    from .store import open_store

    if isinstance(store, str | os.PathLike):
        store = open_store(store)
    # None takes the package config's value (filterdb_dask.yaml, via dask.config)
    by = default_by() if by is None else by
    bins = _validate_bins(config.get("analysis.bins") if bins is None else bins)
    fine_bins = config.get("analysis.fine-bins") if fine_bins is None else fine_bins
    engine = config.get("analysis.engine") if engine is None else engine
    # resolved once here: workers run exactly this engine (or fail), so it is the one recorded
    engine = resolve_engine(engine)
    ex = cluster.ensure(execution, verbosity)
    fine_bins = _validate_bins(fine_bins, "fine_bins")
    if sparsity_eps is None:
        sparsity_eps = config.get("analysis.sparsity-eps")
    sparsity_eps = normalize_sparsity_eps(sparsity_eps)
    meta = store.meta
    groupings = make_groupings(meta, by)
    subset_masks = _normalize_subsets(
        meta, default_subsets(meta) if subsets is None else subsets
    )
    # pass 1
    pass1 = [layer_stats(store, engine=engine)]
    if sparsity_eps:  # same chunks, same compute: no further read of the filters
        pass1.append(sparsity_sweep(store, sparsity_eps, engine=engine))
    stats_sorted, *sweep_sorted = ex.compute(*pass1, label="pass 1/3 moments+quality")
    stats = store.to_meta_order(stats_sorted)
    sweep = store.to_meta_order(sweep_sorted[0]) if sweep_sorted else None
    pca = pca_from_stats(stats)
    validate_pca(pca)
    subset_pcas = {name: pca_from_stats(stats, mask) for name, mask in subset_masks.items()}

    # pass 2
    rng_lazy, dens_lazy = coef_range_density(store, pca, engine=engine)
    coef_range, density = ex.compute(rng_lazy, dens_lazy, label="pass 2/3 range+density")

    # pass 3
    ridge = [g for g in groupings if g.n_groups <= MAX_RIDGE_GROUPS]
    offsets = np.cumsum([0] + [g.n_groups for g in ridge])
    lg = np.full((len(meta), len(ridge)), -1, dtype=np.int64)
    for j, g in enumerate(ridge):
        lg[:, j] = g.codes + offsets[j]
    hist_lazy, fine_lazy = layer_histograms(
        store, pca, coef_range, bins=bins, layer_groups=lg, n_groups=int(offsets[-1]),
        fine_bins=fine_bins, engine=engine,
    )
    hist_sorted, fine = ex.compute(hist_lazy, fine_lazy, label="pass 3/3 histograms")
    layer_hist = store.to_meta_order(hist_sorted)
    group_hist = {g.slug: group_histograms(layer_hist, g.codes, g.n_groups) for g in groupings}
    kl = {
        g.slug: kl_matrix(group_hist[g.slug], coef_range, pca["explained_variance_ratio"],
                          g.labels)
        for g in groupings
    }
    fine_hist = {g.slug: fine[offsets[j]: offsets[j + 1]] for j, g in enumerate(ridge)}
    return Results(
        meta=meta,
        pca=pca,
        coef_range=np.asarray(coef_range, dtype=np.float64),
        bins=bins,
        layer_stats=stats,
        layer_hist=layer_hist,
        groupings=groupings,
        group_hist=group_hist,
        kl=kl,
        density=np.asarray(density),
        density_edges=density_edges(),
        fine_edges=bin_edges(coef_range, bins=bins, fine_bins=fine_bins)[1],
        fine_hist=fine_hist,
        quality=quality_table(meta, stats, sweep, sparsity_eps),
        subsets=subset_pcas,
        settings={
            "bins": bins, "by": [g.name for g in groupings], "fine_bins": fine_bins,
            "engine": engine, "store": getattr(store, "path", None),
            "sparsity_eps": list(sparsity_eps),
            "n_chunks": store.n_chunks, "n_layers": len(meta),
        },
    )
