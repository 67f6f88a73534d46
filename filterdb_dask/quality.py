"""Layer quality (docs/method.md §7): tables of every layer, degenerated layers, models."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import kernels

QUALITY_COLUMNS = (
    "model_id", "conv_depth", "conv_depth_norm", "model", "n", "sparsity",
    "variance_entropy", "variance_entropy_norm", "variance_entropy_clean",
    "variance_entropy_clean_norm",
)
#: defaults for calling a layer degenerated
SPARSITY_THRESHOLD = 0.5
ENTROPY_NORM_THRESHOLD = 0.5


def quality_table(meta: pd.DataFrame, stats: np.ndarray) -> pd.DataFrame:
    """One row per meta row (meta order) with the quality columns.

    Parameters
    ----------
    meta : the store's meta table.
    stats : (n_meta_rows, N_STATS) pass-1 statistics in meta order.
    """
    q = kernels.quality_finalize(stats)
    df = pd.DataFrame({
        "model_id": meta["model_id"].to_numpy(),
        "conv_depth": meta["conv_depth"].to_numpy(),
        "conv_depth_norm": meta["conv_depth_norm"].to_numpy(),
        "model": meta["model"].to_numpy() if "model" in meta else np.full(len(meta), np.nan),
    })
    for k, v in q.items():
        df[k] = v
    return df[list(QUALITY_COLUMNS)]


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
    })
    deg = degenerated.groupby("model_id").size()
    df["degenerated_layers"] = deg.reindex(df.index, fill_value=0).astype(np.int64)
    df["degenerated_share"] = df["degenerated_layers"] / df["layers"]
    return df.sort_values(["degenerated_share", "layers"], ascending=False, kind="stable")
