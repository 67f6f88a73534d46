"""Layer quality (docs/method.md §7): tables of every layer, degenerated layers, models.

A sparsity threshold sweep (``sparsity_eps``) adds, per ε, the layer's sparsity
and clean variance entropy at threshold ``ε · max|w|``; it runs in pass 1 beside
the layer statistics (the same chunks, no further pass over the filters).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from . import kernels
from ._graph import ChunkMap, map_together
from .engines import get_kernels
from .errors import AnalysisError

QUALITY_COLUMNS = (
    "model_id", "conv_depth", "conv_depth_norm", "model", "n", "sparsity",
    "variance_entropy", "variance_entropy_norm", "variance_entropy_clean",
    "variance_entropy_clean_norm", "orthogonality",
)
#: the meta column that gives a layer's weight shape to orthogonality (ingest writes it)
OUT_CHANNELS = "out_channels"
#: defaults for calling a layer degenerated
SPARSITY_THRESHOLD = 0.5
ENTROPY_NORM_THRESHOLD = 0.5


def normalize_sparsity_eps(eps) -> tuple[float, ...]:
    """``"0.001,0.01"`` or a sequence of numbers -> a tuple of distinct floats in (0, 1].

    Raises
    ------
    AnalysisError
        A value that is not a number, not in (0, 1], or given twice.
    """
    if eps is None:
        return ()
    if isinstance(eps, str):
        eps = [v for v in (p.strip() for p in eps.split(",")) if v]
    out: list[float] = []
    for v in eps:
        try:
            e = float(v)
        except (TypeError, ValueError) as exc:
            raise AnalysisError(
                f"sparsity threshold {str(v)[:40]!r} is not a number; give e.g. 0.001,0.01,0.1"
            ) from exc
        if not (0.0 < e <= 1.0):
            raise AnalysisError(f"sparsity threshold {e!r} must lie in (0, 1]")
        if e in out:
            raise AnalysisError(f"sparsity threshold {e!r} is given twice")
        out.append(e)
    return tuple(out)


def eps_label(eps: float) -> str:
    """Column suffix of a threshold: ``sparsity@0.001`` (shortest round-trip repr)."""
    return repr(float(eps))


def _sweep_task(x, bounds, engine, eps):
    return (get_kernels(engine).sparsity_sweep_chunk(x, bounds, np.asarray(eps)),)


def sparsity_sweep(store, sparsity_eps: Sequence[float], *, engine: str = "auto"):
    """Lazy per-layer clean counts and clean variance entropy for each ε (pass 1).

    Parameters
    ----------
    store : FilterStore
    sparsity_eps : thresholds ε in (0, 1], as :func:`normalize_sparsity_eps` takes.
    engine : 'auto', 'numba' or 'numpy'.

    Returns
    -------
    dask array (n_layers, 2E) float64, rows in chunk order (put them in meta order
    with ``store.to_meta_order``); see :func:`kernels.sparsity_sweep_chunk`.
    """
    ((out,),) = map_together(store.filters, [sparsity_sweep_map(store, sparsity_eps,
                                                                engine=engine)])
    return out


def sparsity_sweep_map(store, sparsity_eps: Sequence[float], *,
                       engine: str = "auto") -> ChunkMap:
    """The per-chunk kernel of :func:`sparsity_sweep` (for
    :func:`filterdb_dask._graph.map_together`)."""
    eps = normalize_sparsity_eps(sparsity_eps)
    if not eps:
        raise AnalysisError("a sparsity sweep needs at least one threshold")
    get_kernels(engine)
    bounds = store.chunk_bounds()
    return ChunkMap(_sweep_task, [(b,) for b in bounds],
                    [([len(b) for b in bounds], (2 * len(eps),), np.float64)],
                    "sparsity-sweep", (engine, eps))


def layer_out_channels(meta: pd.DataFrame) -> np.ndarray | None:
    """``c_out`` of every layer (float, NaN where unknown) from the meta column
    ``out_channels``, or None when the meta table has no such column.

    Raises
    ------
    AnalysisError
        A value that is not a number, not a positive integer, or does not divide
        the layer's filter count (the column does not describe the stored weights).
    """
    if OUT_CHANNELS not in meta.columns:
        return None
    raw = meta[OUT_CHANNELS]
    c = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    n = (meta["stop"] - meta["start"]).to_numpy(dtype=np.float64)
    known = ~np.isnan(c)
    with np.errstate(invalid="ignore"):
        bad = (raw.notna().to_numpy() & ~known) | (known & ~(
            np.isfinite(c) & (c >= 1) & (c == np.floor(c)) & (np.fmod(n, c) == 0)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        v = raw.iloc[i]
        v = v.item() if isinstance(v, np.generic) else v
        raise AnalysisError(
            f"meta row {i}: {OUT_CHANNELS} {str(v)[:40]!r} is not a positive whole number "
            f"dividing the layer's {int(n[i])} filters ({int(bad.sum())} such rows); the "
            "column must give each layer's weight shape as ingest writes it, or be removed"
        )
    return c


def _ortho_task(x, bounds, c_out, engine):
    return (get_kernels(engine).orthogonality_chunk(x, bounds, c_out),)


def orthogonality(store, *, engine: str = "auto"):
    """Lazy per-layer orthogonality of the raw weights (pass 1; docs/method.md §7),
    or None when the store records no weight shapes (``out_channels``).

    Parameters
    ----------
    store : FilterStore
    engine : 'auto', 'numba' or 'numpy' (the same bits either way).

    Returns
    -------
    dask array (n_layers,) float64, rows in chunk order (``store.to_meta_order``),
    NaN for layers of unknown shape or with fewer than two output channels; or None.

    Raises
    ------
    AnalysisError
        As :func:`layer_out_channels`, or an unknown engine.
    """
    m = orthogonality_map(store, engine=engine)
    return None if m is None else map_together(store.filters, [m])[0][0]


def orthogonality_map(store, *, engine: str = "auto") -> ChunkMap | None:
    """The per-chunk kernel of :func:`orthogonality` (for
    :func:`filterdb_dask._graph.map_together`), or None without weight shapes."""
    c_out = layer_out_channels(store.meta)
    if c_out is None or not (c_out >= 2).any():
        return None
    get_kernels(engine)
    bounds = store.chunk_bounds()
    return ChunkMap(_ortho_task,
                    [(b, c) for b, c in zip(bounds, store.per_chunk(c_out), strict=True)],
                    [([len(b) for b in bounds], (), np.float64)], "orthogonality",
                    (engine,))


def quality_table(
    meta: pd.DataFrame,
    stats: np.ndarray,
    sweep: np.ndarray | None = None,
    sparsity_eps: Sequence[float] = (),
    orthogonality: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per meta row (meta order) with the quality columns.

    Parameters
    ----------
    meta : the store's meta table.
    stats : (n_meta_rows, N_STATS) pass-1 statistics in meta order.
    sweep : (n_meta_rows, 2E) :func:`sparsity_sweep` in meta order, or None.
    sparsity_eps : the E thresholds of ``sweep``; each adds the columns
        ``sparsity@ε``, ``variance_entropy_clean@ε``, ``variance_entropy_clean_norm@ε``.
    orthogonality : (n_meta_rows,) :func:`orthogonality` in meta order, or None
        (the column is NaN).
    """
    q = kernels.quality_finalize(stats)
    q["orthogonality"] = (np.full(len(meta), np.nan) if orthogonality is None
                          else np.asarray(orthogonality, dtype=np.float64))
    df = pd.DataFrame({
        "model_id": meta["model_id"].to_numpy(),
        "conv_depth": meta["conv_depth"].to_numpy(),
        "conv_depth_norm": meta["conv_depth_norm"].to_numpy(),
        "model": meta["model"].to_numpy() if "model" in meta else np.full(len(meta), np.nan),
    })
    for k, v in q.items():
        df[k] = v
    df = df[list(QUALITY_COLUMNS)]
    eps = normalize_sparsity_eps(sparsity_eps)
    if sweep is not None and eps:
        per = kernels.sparsity_sweep_finalize(stats[:, kernels.STAT_N], np.asarray(sweep),
                                              kernels.stats_dim(stats))
        extra = {f"{name}@{eps_label(e)}": per[name][:, k]
                 for name in per for k, e in enumerate(eps)}
        df = pd.concat([df, pd.DataFrame(extra, index=df.index)], axis=1)
    return df


def normalize_entropy_cutoffs(cutoffs) -> tuple[float, ...]:
    """``"0.3,0.5"`` or a sequence of numbers -> a tuple of distinct finite floats.

    Raises
    ------
    AnalysisError
        A value that is not a finite number, or given twice.
    """
    if cutoffs is None:
        return ()
    if isinstance(cutoffs, str):
        cutoffs = [v for v in (p.strip() for p in cutoffs.split(",")) if v]
    out: list[float] = []
    for v in cutoffs:
        try:
            c = float(v)
        except (TypeError, ValueError):
            raise AnalysisError(
                f"entropy cutoff {str(v)[:40]!r} is not a number; give e.g. 0.3,0.5,0.7"
            ) from None
        if not np.isfinite(c):
            raise AnalysisError(f"entropy cutoff {c!r} must be a finite number")
        if c in out:
            raise AnalysisError(f"entropy cutoff {c!r} is given twice")
        out.append(c)
    return tuple(out)


def degenerated_sweep(
    quality: pd.DataFrame,
    sparsity_eps: Sequence[float] = (),
    entropy_cutoffs: Sequence[float] = (),
    *,
    sparsity: float = SPARSITY_THRESHOLD,
    entropy_norm: float = ENTROPY_NORM_THRESHOLD,
) -> pd.DataFrame:
    """Share of degenerated layers per depth decile as the thresholds move.

    For each ε of the sweep a layer is degenerated when ``sparsity@ε >= sparsity``
    or ``variance_entropy_norm <= entropy_norm``; for each entropy cutoff ``h`` when
    ``sparsity >= sparsity`` (ε = 0.01) or ``variance_entropy_norm <= h``. So ε =
    0.01 and ``h = entropy_norm`` give the share :func:`degenerated_layers` gives.

    Returns
    -------
    DataFrame with columns ``decile`` (labels of the depth deciles that hold
    layers), ``threshold`` (``sparsity@ε`` or ``variance_entropy_norm<=h``),
    ``layers`` and ``share``, deciles in depth order within each threshold.
    """
    from .groups import DECILE_LABELS, depth_decile_codes

    codes = depth_decile_codes(quality["conv_depth_norm"].to_numpy())
    ent = quality["variance_entropy_norm"].to_numpy(dtype=np.float64)
    sp = quality["sparsity"].to_numpy(dtype=np.float64)
    cases = [(f"sparsity@{eps_label(e)}",
              (quality[f"sparsity@{eps_label(e)}"].to_numpy(dtype=np.float64) >= sparsity)
              | (ent <= entropy_norm)) for e in normalize_sparsity_eps(sparsity_eps)]
    cases += [(f"variance_entropy_norm<={eps_label(h)}", (sp >= sparsity) | (ent <= h))
              for h in normalize_entropy_cutoffs(entropy_cutoffs)]
    rows = []
    present = [k for k in range(len(DECILE_LABELS)) if (codes == k).any()]
    for name, deg in cases:
        for k in present:
            inside = codes == k
            rows.append({"decile": DECILE_LABELS[k], "threshold": name,
                         "layers": int(inside.sum()), "share": float(deg[inside].mean())})
    return pd.DataFrame(rows, columns=["decile", "threshold", "layers", "share"])


def degenerated_layers(
    quality: pd.DataFrame,
    *,
    sparsity: float = SPARSITY_THRESHOLD,
    entropy_norm: float = ENTROPY_NORM_THRESHOLD,
) -> pd.DataFrame:
    """Layers with sparsity >= ``sparsity`` or normalised variance entropy <=
    ``entropy_norm``, most degenerated first, with the reason."""
    sparse = quality["sparsity"] >= sparsity
    flat = quality["variance_entropy_norm"] <= entropy_norm
    out = quality[sparse | flat].copy()
    out["reason"] = np.where(
        sparse[out.index] & flat[out.index], "sparse+low-entropy",
        np.where(sparse[out.index], "sparse", "low-entropy"),
    )
    score = out["sparsity"].fillna(0) + (1 - out["variance_entropy_norm"].fillna(1))
    return out.assign(_s=score).sort_values("_s", ascending=False, kind="stable").drop(
        columns="_s"
    )


def model_summary(quality: pd.DataFrame, degenerated: pd.DataFrame) -> pd.DataFrame:
    """Per model: layers, filters, degenerated layers and their share, means."""
    g = quality.groupby("model_id", sort=True)
    df = pd.DataFrame({
        "model": g["model"].first(),
        "layers": g.size(),
        "filters": g["n"].sum(),
        "mean_sparsity": g["sparsity"].mean(),
        "mean_variance_entropy_norm": g["variance_entropy_norm"].mean(),
        "mean_orthogonality": g["orthogonality"].mean(),
    })
    deg = degenerated.groupby("model_id").size()
    df["degenerated_layers"] = deg.reindex(df.index, fill_value=0).astype(np.int64)
    df["degenerated_share"] = df["degenerated_layers"] / df["layers"]
    return df.sort_values(["degenerated_share", "layers"], ascending=False, kind="stable")
