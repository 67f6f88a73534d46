"""Plots and a self-contained HTML report from an analysis directory.

Reads only the files ``Results.write`` produced (``pca.json``, ``kl/*.csv``,
``quality.csv``, ``results.zarr``...), so a report can be rebuilt later without
touching the filters. Every figure is also saved as PNG in ``DIR/plots``.
matplotlib is imported inside the functions (it is the ``plot`` extra).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .groups import slugify

SORT_BY_MEAN = ("task", "visual_category")
MAX_HEATMAP_LABELS = 60


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError(
            "the report needs matplotlib: pip install 'filterdb-dask[plot]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plots: dict, name: str, outdir: str) -> None:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    with open(os.path.join(outdir, f"{name}.png"), "wb") as fh:
        fh.write(data)
    plots[name] = base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------- figures
def fig_explained_variance(pca: dict, subsets: dict):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    k = np.arange(1, 10)
    ax.plot(k, np.cumsum(pca["explained_variance_ratio"]), "o-", lw=2.5, color="k",
            label="all filters")
    for name, sp in subsets.items():
        r = np.asarray(sp["explained_variance_ratio"], dtype=float)
        if np.all(np.isfinite(r)):
            ax.plot(k, np.cumsum(r), ".-", alpha=0.8, label=name.split("=", 1)[-1])
    ax.set_xlabel("number of components")
    ax.set_ylabel("cumulative explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(k)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def fig_eigenimages(rows: dict[str, np.ndarray]):
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 9, figsize=(9, 1.15 * len(rows) + 0.4),
                             squeeze=False)
    im = None
    for r, (name, comps) in enumerate(rows.items()):
        for k in range(9):
            ax = axes[r, k]
            im = ax.imshow(np.asarray(comps[k]).reshape(3, 3), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"c{k}", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.colorbar(im, ax=axes, shrink=0.6, label="weight")
    return fig


def fig_matrix(m: np.ndarray, labels, title: str, *, cmap="viridis", annotate=False):
    plt = _plt()
    n = len(labels)
    size = min(max(4.0, 0.32 * n + 2), 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(m, cmap=cmap)
    if n <= MAX_HEATMAP_LABELS:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
    if annotate and n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="w")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def fig_ridge(x, dens, labels, title):
    plt = _plt()
    g = len(labels)
    fig, axes = plt.subplots(g, 9, figsize=(13, 0.45 * g + 1.2), sharex="col", squeeze=False)
    for k in range(9):
        peak = dens[:, k].max() or 1.0
        for i in range(g):
            ax = axes[i, k]
            ax.fill_between(x, dens[i, k] / peak, color=f"C{i % 10}", alpha=0.75, lw=0)
            ax.set_ylim(0, 1.05)
            ax.set_yticks([])
            for side in ("top", "right", "left"):
                ax.spines[side].set_visible(False)
            if k == 0:
                ax.set_ylabel(labels[i], rotation=0, ha="right", va="center", fontsize=7)
        axes[0, k].set_title(f"coefficient {k}", fontsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(hspace=-0.2)
    return fig


def fig_drift(matrices: dict[str, pd.DataFrame]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names, values = [], []
    for name, m in matrices.items():
        a = m.to_numpy()
        v = a[np.triu_indices(len(a), k=1)]
        if len(v):
            names.append(name)
            values.append(v)
    if values:
        ax.boxplot(values, tick_labels=names)
    ax.set_ylabel("symmetric KL shift")
    ax.set_title("drift per grouping (upper-triangle values)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def fig_density(density: np.ndarray, edges: np.ndarray):
    plt = _plt()
    from matplotlib.colors import LogNorm

    d = density / max(density.max(), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    masked = np.ma.masked_less(d.T, 1e-5)
    im = ax.imshow(masked, origin="lower", extent=[edges[0], edges[-1], edges[0], edges[-1]],
                   norm=LogNorm(vmin=1e-5, vmax=1), cmap="magma", aspect="equal")
    ax.set_xlabel("coefficient 0")
    ax.set_ylabel("coefficient 1")
    ax.set_title("2-D density (normalised to max)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def fig_quality(q: pd.DataFrame):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sc = ax.scatter(q["sparsity"], q["variance_entropy_norm"], c=np.log10(q["n"].clip(1)),
                    s=6, alpha=0.6, cmap="viridis")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("normalised variance entropy")
    ax.set_title("layer quality (one dot per layer)")
    fig.colorbar(sc, ax=ax, label="log10 filters in layer")
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------- report
def _table(df: pd.DataFrame, n: int = 20) -> str:
    return df.head(n).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                              classes="tbl", border=0, na_rep="–")


def write_report(out: str) -> str:
    """Build ``out/report.html`` (images embedded) and ``out/plots/*.png``.

    Returns the report's path.

    Raises
    ------
    AnalysisError
        ``out`` is not a complete analysis directory.
    """
    import xarray as xr

    need = ["pca.json", "quality.csv", "results.zarr", os.path.join("kl", "drift.csv")]
    missing = [n for n in need if not os.path.exists(os.path.join(out, n))]
    if missing:
        raise AnalysisError(f"{out!r} is not an analysis directory (missing {missing})")
    plots_dir = os.path.join(out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    with open(os.path.join(out, "pca.json")) as fh:
        pca = json.load(fh)
    subsets = {}
    if os.path.exists(os.path.join(out, "pca_subsets.json")):
        with open(os.path.join(out, "pca_subsets.json")) as fh:
            subsets = json.load(fh)
    ds = xr.open_zarr(os.path.join(out, "results.zarr"), consolidated=False)
    settings = json.loads(ds.attrs.get("settings", "{}"))
    quality = pd.read_csv(os.path.join(out, "quality.csv"))
    plots: dict[str, str] = {}
    captions: dict[str, str] = {}

    _save(fig_explained_variance(pca, subsets), plots, "explained_variance", plots_dir)
    captions["explained_variance"] = "Cumulative explained variance: all filters and subsets."
    eig = {"all filters": np.asarray(pca["components"])}
    for name, sp in subsets.items():
        c = np.asarray(sp["components"], dtype=float)
        if np.all(np.isfinite(c)):
            eig[name.split("=", 1)[-1]] = c
    _save(fig_eigenimages(eig), plots, "eigenimages", plots_dir)
    captions["eigenimages"] = "Eigenimages (principal components as 3x3 images, scale -1..1)."
    cov = ds["coef_covariance"].values
    _save(fig_matrix(cov, [f"c{k}" for k in range(9)], "covariance of the coefficients",
                     cmap="RdBu_r", annotate=True), plots, "coef_covariance", plots_dir)
    captions["coef_covariance"] = "Covariance of the PCA coefficients (diagonal = variances)."

    kl_dir = os.path.join(out, "kl")
    matrices = {}
    for name in settings.get("by", []):
        slug = slugify(name)
        path = os.path.join(kl_dir, f"{slug}.csv")
        if not os.path.exists(path):
            continue
        m = pd.read_csv(path, index_col=0)
        m.index = m.index.astype(str)
        m.columns = m.columns.astype(str)
        matrices[name] = m
        order = (list(m.mean(axis=0).sort_values(kind="stable").index)
                 if slug in SORT_BY_MEAN else list(m.index))
        mm = m.loc[order, order]
        _save(fig_matrix(mm.to_numpy(), order, f"KL shift: {name}", annotate=True),
              plots, f"kl_{slug}", plots_dir)
        captions[f"kl_{slug}"] = (f"Symmetric KL shift between {name} groups"
                                  + (" (sorted by mean shift)." if slug in SORT_BY_MEAN else "."))
        if f"ridge_{slug}" in ds:
            dens = ds[f"ridge_{slug}"].values
            labels = [str(v) for v in ds[f"group_{slug}"].values]
            keep = dens.reshape(len(labels), -1).sum(axis=1) > 0
            if keep.any():
                _save(fig_ridge(ds["fine_centres"].values, dens[keep],
                                [lab for lab, k in zip(labels, keep, strict=False) if k],
                                f"coefficient densities by {name}"),
                      plots, f"ridge_{slug}", plots_dir)
                captions[f"ridge_{slug}"] = (f"Binned KDE (Silverman bandwidth) of each "
                                             f"coefficient per {name} group.")
    _save(fig_drift(matrices), plots, "drift", plots_dir)
    captions["drift"] = "Distribution of the pairwise shifts of each grouping."
    _save(fig_density(ds["density_counts"].values, ds["density_edges"].values), plots,
          "density_2d", plots_dir)
    captions["density_2d"] = "Coefficient 0 vs 1: 512x512 bins on [-3.3, 3.3], log scale."
    _save(fig_quality(quality), plots, "quality", plots_dir)
    captions["quality"] = "Variance entropy (normalised) vs sparsity, per layer."

    deg = pd.read_csv(os.path.join(out, "degenerated_layers.csv"))
    models = pd.read_csv(os.path.join(out, "model_quality.csv"))
    n_layers = int(settings.get("n_layers", len(quality)))
    header = {
        "filters": f"{int(pca['n_filters']):,}",
        "layers": f"{n_layers:,}",
        "models": f"{quality['model_id'].nunique():,}",
        "coefficient range": f"[{pca['coef_range'][0]:.4f}, {pca['coef_range'][1]:.4f}]",
        "bins": str(settings.get("bins")),
        "groupings": ", ".join(settings.get("by", [])),
        "kernels": str(settings.get("engine")),
        "scheduler": str(settings.get("scheduler", "")),
        "store": str(settings.get("store")),
        "chunks": str(settings.get("n_chunks")),
    }
    body = ["<h1>CNN Filter DB analysis</h1>", "<table class='hdr'>"]
    body += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
             for k, v in header.items()]
    body.append("</table>")
    ratio = ", ".join(f"{v:.4f}" for v in pca["explained_variance_ratio"])
    body.append(f"<p>Explained variance ratio: {ratio}</p>")
    for name, b64 in plots.items():
        body.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{html.escape(captions.get(name, name))}</figcaption></figure>")
    body.append(f"<h2>Most degenerated layers ({len(deg):,} of {n_layers:,})</h2>")
    body.append(_table(deg))
    body.append("<h2>Models with the most degenerated layers</h2>")
    body.append(_table(models))
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>CNN Filter DB analysis"
        "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "img{max-width:100%}figure{margin:1.5em 0}table.tbl{border-collapse:collapse;"
        "font-size:12px}.tbl td,.tbl th{padding:2px 6px;border-bottom:1px solid #ddd}"
        "table.hdr th{text-align:left;padding-right:1em}</style></head><body>"
        + "\n".join(body) + "</body></html>\n"
    )
    path = os.path.join(out, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, path)
    return os.path.abspath(path)
