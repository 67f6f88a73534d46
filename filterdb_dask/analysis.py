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

import os

import numpy as np
import pandas as pd

from . import cluster, config
from ._graph import map_together
from .errors import AnalysisError
from .groups import default_by, make_grouping, make_groupings
from .histograms import (
    basis_histograms,
    bin_edges,
    coef_range_density,
    density_edges,
    group_histograms,
    layer_histograms,
)
from .kl import kl_matrix
from .pairs import read_pairs, validate_correlate
from .pca import layer_stats_map, pca_from_stats, validate_pca
from .quality import (
    normalize_entropy_cutoffs,
    normalize_sparsity_eps,
    orthogonality_map,
    sparsity_sweep_map,
)
from .resultset import Results

__all__ = ["MAX_RIDGE_GROUPS", "Results", "analyze", "default_subsets"]

#: groupings with at most this many groups get fine histograms (ridge plots)
MAX_RIDGE_GROUPS = 40


def _normalize_subsets(meta: pd.DataFrame, subsets) -> dict[str, np.ndarray]:
    """Subset specs -> boolean masks over meta rows.

    A spec is a boolean mask, a ``(column, value)`` pair or a ``"COLUMN=VALUE"``
    string (the longest meta column name followed by ``=`` is the column, the rest
    the value). The value is compared with the column's group labels (missing
    values: ``nan``); a spec is never evaluated as code.
    """
    out = {}
    for name, spec in (subsets or {}).items():
        if isinstance(spec, str):
            col, val = _split_spec(meta, name, spec)
        elif isinstance(spec, tuple) and len(spec) == 2:
            col, val = spec
            if col not in meta.columns:
                raise AnalysisError(f"subset {name!r}: {col!r} is not a meta column")
        else:
            mask = np.asarray(spec, dtype=bool)
            if mask.shape != (len(meta),):
                raise AnalysisError(
                    f"subset {name!r}: mask of shape {mask.shape} for {len(meta)} meta rows"
                )
            out[str(name)] = mask
            continue
        g = make_grouping(meta, col)
        if str(val) not in g.labels:
            shown = ", ".join(map(repr, g.labels[:20])) + (" ..." if g.n_groups > 20 else "")
            raise AnalysisError(
                f"subset {name!r}: no layer has {col!r} = {str(val)!r}; its values: {shown}"
            )
        out[str(name)] = g.codes == g.labels.index(str(val))
    return out


def _split_spec(meta: pd.DataFrame, name, spec: str) -> tuple[str, str]:
    cols = [c for c in meta.columns if isinstance(c, str) and spec.startswith(c + "=")]
    if cols:
        col = max(cols, key=len)
        return col, spec[len(col) + 1:]
    if "=" not in spec:
        raise AnalysisError(f"subset {name!r}: {spec!r} is not COLUMN=VALUE")
    col, val = spec.split("=", 1)
    if col.strip() in meta.columns:
        return col.strip(), val.strip()
    raise AnalysisError(f"subset {name!r}: {col.strip()!r} is not a meta column")


def default_subsets(meta: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """One subset per Visual Category value (the paper's eigenimage comparison);
    layers with no Visual Category are in none."""
    if "Visual Category" not in meta.columns:
        return {}
    g = make_grouping(meta, "Visual Category")
    vals = g.labels[:-1] if meta["Visual Category"].isna().any() else g.labels
    return {f"Visual Category={v}": ("Visual Category", v) for v in vals}


def validate_models(meta: pd.DataFrame) -> None:
    """Refuse two different models under one ``model_id`` (they would be merged).

    Raises
    ------
    AnalysisError
        A ``model_id`` has rows of more than one ``model`` (or ``Name``).
    """
    for col in ("model", "Name"):
        if col not in meta.columns or "model_id" not in meta.columns:
            continue
        names = meta[col].astype(object).where(meta[col].notna(), None)
        per_id = pd.DataFrame({"id": meta["model_id"].to_numpy(),
                               "name": names.to_numpy(dtype=object)})
        n = per_id.groupby("id", sort=True, dropna=False)["name"].nunique(dropna=False)
        bad = n[n > 1]
        if len(bad):
            mid = bad.index[0]
            mid = mid.item() if isinstance(mid, np.generic) else mid
            seen = per_id.loc[per_id["id"] == mid, "name"].drop_duplicates().tolist()[:3]
            raise AnalysisError(
                f"model_id {mid!r} holds {int(bad.iloc[0])} different {col} values "
                f"({', '.join(map(repr, seen))}); give each model its own model_id"
            )


def _check_drift_ref(groupings, drift_ref) -> str:
    """``drift_ref`` as a label; refused unless some numeric grouping has it."""
    from .kl import is_numeric_grouping

    drift_ref = str(drift_ref)
    numeric = [g for g in groupings if is_numeric_grouping(g)]
    if not any(drift_ref in g.labels for g in numeric):
        if not numeric:
            raise AnalysisError(
                f"`drift_ref` {drift_ref!r}: no grouping is by a numeric meta column "
                "(group by one with `by`)")
        shown = "; ".join(f"{g.name}: {', '.join(g.labels[:10])}"
                          + (" ..." if g.n_groups > 10 else "") for g in numeric)
        raise AnalysisError(f"`drift_ref` {drift_ref!r} is not a group of any numeric "
                            f"grouping ({shown})")
    return drift_ref


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
    orthogonality: bool | None = None,
    pairs=None,
    correlate: str | None = None,
    entropy_cutoffs=None,
    basis=None,
    drift_ref=None,
) -> Results:
    """Run the analysis of docs/method.md on a store, in three passes.

    Parameters
    ----------
    store : FilterStore or path of a store.
    by : groupings: meta column names and/or 'depth decile'.
    bins : histogram bins for the KL matrices.
    subsets : name -> subset spec (boolean mask over meta rows, ``(column, value)``
        or ``"COLUMN=VALUE"``; never evaluated as code) for subset PCAs; default one
        per Visual Category.
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
    orthogonality : compute each layer's orthogonality in pass 1 where the meta
        table gives its ``out_channels``; default the configured
        ``analysis.orthogonality`` (True). False: the column is NaN.
    entropy_cutoffs : normalised-entropy cutoffs: the report shows the share of
        degenerated layers per depth decile at each (beside each ε); no pass
        needed. Default the configured ``analysis.entropy-cutoffs`` (none).
    pairs : a pairs file (CSV, two columns of model names) or a sequence of
        ``(name, name)``: the paired comparison per depth bin
        (:mod:`filterdb_dask.pairs`); checked before the first pass.
    correlate : a numeric meta column (one value per model): Spearman's ρ of each
        paired model's per-bin metric with it. Needs ``pairs``.
    basis : an earlier result set (:class:`Results` or its directory) whose PCA
        (mean, components, explained-variance ratio as KL weights), coefficient
        range and bins are used instead of the store's own (docs/method.md §3):
        pass 2 is not run, coefficients outside the range are not binned and are
        counted (``Results.out_of_range``); the store's own PCA is kept as
        ``Results.own_pca``. ``bins``/``fine_bins`` must then be left unset (or
        equal REF's).
    drift_ref : the reference group of the drift curves (groupings by a numeric meta
        column: KL of every group to this one, ``Results.drift_to``); it must be a
        label of at least one of them. Default: each such grouping's first group.

    Returns
    -------
    Results

    Raises
    ------
    AnalysisError
        Unknown grouping column, bad bins, an empty or unknown subset, two models
        sharing one ``model_id``, an ``out_channels`` column that does not fit the
        stored layers, a bad pairs file or correlate column, too few filters, or a
        ``basis`` that is not a result set or does not fit the store (dimension, bins).
    """
    from .engines import resolve_engine
    from .histograms import _validate_bins
    from .store import open_store

    if isinstance(store, str | os.PathLike):
        store = open_store(store)
    # None takes the package config's value (filterdb_dask.yaml, via dask.config)
    by = default_by() if by is None else by
    ref = None
    if basis is not None:
        from .basis import load_basis

        ref = load_basis(basis, store.filters.shape[1])
        for what, given, own in (("bins", bins, ref.bins), ("fine_bins", fine_bins,
                                                            ref.fine_bins)):
            if given is not None and given != own:
                raise AnalysisError(f"`{what}` {given!r} with a `basis`: the bins are the "
                                    f"basis's (`{what}` {own}); leave `{what}` unset")
        bins, fine_bins = ref.bins, ref.fine_bins
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
    if entropy_cutoffs is None:
        entropy_cutoffs = config.get("analysis.entropy-cutoffs")
    entropy_cutoffs = normalize_entropy_cutoffs(entropy_cutoffs)
    meta = store.meta
    validate_models(meta)
    groupings = make_groupings(meta, by)
    pairs_spec = None if pairs is None else read_pairs(pairs, meta)
    if correlate is not None:
        if pairs_spec is None:
            raise AnalysisError("`correlate` needs `pairs` (the models to correlate)")
        validate_correlate(meta, correlate)
    if drift_ref is not None:
        drift_ref = _check_drift_ref(groupings, drift_ref)
    subset_masks = _normalize_subsets(
        meta, default_subsets(meta) if subsets is None else subsets
    )
    # pass 1
    if orthogonality is None:
        orthogonality = config.get("analysis.orthogonality")
    # every kernel of pass 1 in one task per chunk: each chunk read once
    maps = [layer_stats_map(store, engine=engine)]
    if sparsity_eps:
        maps.append(sparsity_sweep_map(store, sparsity_eps, engine=engine))
    # None: switched off, or the store records no weight shapes
    ortho_map = orthogonality_map(store, engine=engine) if orthogonality else None
    if ortho_map is not None:
        maps.append(ortho_map)
    pass1 = [outs[0] for outs in map_together(store.filters, maps)]
    ortho_lazy = pass1[-1] if ortho_map is not None else None
    label = "pass 1/3 moments+quality" if ref is None else "pass 1/2 moments+quality"
    sizes = store.chunk_filters
    stats_sorted, *rest = ex.compute(*pass1, label=label, chunk_filters=sizes)
    stats = store.to_meta_order(stats_sorted)
    sweep = store.to_meta_order(rest.pop(0)) if sparsity_eps else None
    ortho = store.to_meta_order(rest.pop(0)) if ortho_lazy is not None else None
    pca = pca_from_stats(stats)
    validate_pca(pca)
    subset_pcas = {name: pca_from_stats(stats, mask) for name, mask in subset_masks.items()}

    own_pca = observed_range = None
    if ref is not None:  # the basis's PCA and range: no pass 2
        own_pca, pca = pca, ref.pca
        coef_range = ref.coef_range
    else:
        # pass 2
        rng_lazy, dens_lazy = coef_range_density(store, pca, engine=engine)
        coef_range, density = ex.compute(rng_lazy, dens_lazy, label="pass 2/3 range+density",
                                          chunk_filters=sizes)

    # pass 3
    ridge = [g for g in groupings if g.n_groups <= MAX_RIDGE_GROUPS]
    offsets = np.cumsum([0] + [g.n_groups for g in ridge])
    lg = np.full((len(meta), len(ridge)), -1, dtype=np.int64)
    for j, g in enumerate(ridge):
        lg[:, j] = g.codes + offsets[j]
    if ref is None:
        hist_lazy, fine_lazy = layer_histograms(
            store, pca, coef_range, bins=bins, layer_groups=lg, n_groups=int(offsets[-1]),
            fine_bins=fine_bins, engine=engine,
        )
        hist_sorted, fine = ex.compute(hist_lazy, fine_lazy, label="pass 3/3 histograms",
                                       chunk_filters=sizes)
    else:  # the 2-D density of pass 2 comes from the same read, in the basis
        hist_sorted, fine, observed_range, density = ex.compute(*basis_histograms(
            store, pca, coef_range, bins=bins, layer_groups=lg, n_groups=int(offsets[-1]),
            fine_bins=fine_bins, engine=engine,
        ), label="pass 2/2 histograms+density (basis)", chunk_filters=sizes)
    layer_hist = store.to_meta_order(hist_sorted)
    edges, fine_edges = bin_edges(coef_range, bins=bins, fine_bins=fine_bins)
    group_hist = {g.slug: group_histograms(layer_hist, g.codes, g.n_groups) for g in groupings}
    kl = {
        g.slug: kl_matrix(group_hist[g.slug], edges, pca.explained_variance_ratio, g.labels)
        for g in groupings
    }
    fine_hist = {g.slug: fine[offsets[j]: offsets[j + 1]] for j, g in enumerate(ridge)}
    return Results(
        meta=meta,
        pca=pca,
        coef_range=np.asarray(coef_range, dtype=np.float64),
        bin_edges=edges,
        layer_stats=stats,
        layer_hist=layer_hist,
        groupings=groupings,
        group_hist=group_hist,
        kl=kl,
        density=np.asarray(density),
        density_edges=density_edges(),
        fine_edges=fine_edges,
        fine_hist=fine_hist,
        sweep=None if sweep is None else np.asarray(sweep, dtype=np.float64),
        orthogonality=None if ortho is None else np.asarray(ortho, dtype=np.float64),
        subsets=subset_pcas,
        own_pca=own_pca,
        observed_range=(None if observed_range is None
                        else np.asarray(observed_range, dtype=np.float64)),
        settings={
            "bins": bins, "by": [g.name for g in groupings], "fine_bins": fine_bins,
            "engine": engine, "store": getattr(store, "path", None),
            "sparsity_eps": list(sparsity_eps), "orthogonality": ortho is not None,
            "n_chunks": store.n_chunks, "n_layers": len(meta),
            "pairs": pairs_spec, "correlate": correlate,
            "entropy_cutoffs": list(entropy_cutoffs),
            **({} if ref is None else {"basis": ref.record()}),
            **({} if drift_ref is None else {"drift_ref": drift_ref}),
        },
    )
