"""Plots and a self-contained HTML report from a result set.

Reads the result set through :meth:`filterdb_dask.resultset.Results.open`, i.e.
``results.zarr`` only (labels, slugs, bin edges and settings as recorded, never
re-derived from CSV), so a report can be rebuilt later without touching the
filters. Every figure is also saved as PNG in ``DIR/plots``. matplotlib is
imported inside the functions (it is the ``plot`` extra).
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
import struct
import sys
import time
import warnings

import numpy as np
import pandas as pd

from . import kernels
from .errors import AnalysisError

#: groupings shown in ascending column-mean order (docs/method.md §5); others keep natural order
SORT_BY_MEAN = ("Task", "Visual Category")
#: heat maps label every group up to this many; beyond, every k-th (full labels in the CSV)
MAX_HEATMAP_LABELS = 120
#: characters a label keeps in a figure (data files keep the whole label)
LABEL_WIDTH = 28
#: resolution of the PNGs, and the most pixels a PNG may have on either side
DPI = 110
MAX_SIDE_PX = 2400
#: the largest figure side in inches before saving (labels are shortened first)
MAX_FIG_INCHES = 18.0
#: vertical extent of a ridge curve's highest point, in rows (curves overlap the row above)
RIDGE_OVERLAP = 1.5
#: components drawn per PCA in the eigenimage figure (a 3x3 PCA has 9: all drawn)
MAX_EIGENIMAGES = 16
#: coefficient panels of a ridge figure (the first ones; a 3x3 PCA has 9: all drawn)
RIDGE_COMPONENTS = 9
#: density image lower limit (docs/method.md §6: log colour scale from 1e-5)
DENSITY_VMIN = 1e-5

#: the report build in progress: its start and verbosity (for the progress lines)
_build = {"t0": time.monotonic(), "verbosity": 1}


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise AnalysisError(
            "the report needs matplotlib: pip install 'filterdb-dask[plot]'"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plots: dict, name: str, outdir: str) -> None:
    """Write ``outdir/name.png`` and keep it base64 for the page; one progress line.

    The resolution drops where a figure would exceed ``MAX_SIDE_PX`` on a side, so
    no label, however long, can make a huge image.
    """
    plt = _plt()

    def png(dpi, bbox="tight"):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches=bbox)
        data = buf.getvalue()
        return data, max(struct.unpack(">II", data[16:24]))  # the header's width, height

    dpi = DPI
    data, side = png(dpi)
    for _ in range(2):
        if side <= MAX_SIDE_PX:
            break
        dpi *= 0.95 * MAX_SIDE_PX / side
        data, side = png(dpi)
    if side > MAX_SIDE_PX:  # an artist far outside the figure: cut it at the figure's edge
        data, side = png(min(DPI, MAX_SIDE_PX / max(fig.get_size_inches())), None)
    plt.close(fig)
    with open(os.path.join(outdir, f"{name}.png"), "wb") as fh:
        fh.write(data)
    plots[name] = base64.b64encode(data).decode("ascii")
    if _build["verbosity"] > 0:
        sys.stderr.write(f"report: plots/{name}.png ({len(plots)} figures, "
                         f"{time.monotonic() - _build['t0']:.1f}s)\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------- labels
def short_label(text, width: int = LABEL_WIDTH) -> str:
    """One line of at most ``width`` characters: head and tail kept, ``…`` between."""
    t = " ".join(str(text).split())
    if len(t) <= width:
        return t
    tail = (width - 1) // 3
    return t[: width - 1 - tail] + "…" + t[len(t) - tail:]


def short_labels(labels, width: int = LABEL_WIDTH) -> list[str]:
    """:func:`short_label` of each; labels that would read alike get ``#i`` appended."""
    out = [short_label(v, width) for v in labels]
    seen: dict[str, int] = {}
    for v in out:
        seen[v] = seen.get(v, 0) + 1
    return [f"{v} #{i}" if seen[v] > 1 else v for i, v in enumerate(out)]


def cell_text(v: float) -> str:
    """Two decimals; a value that rounds to zero reads ``0.00``, never ``-0.00``."""
    t = f"{v:.2f}"
    return "0.00" if float(t) == 0 else t


def _annotate(ax, im, m: np.ndarray) -> None:
    """Cell values in black on light cells and white on dark ones."""
    n0, n1 = m.shape
    fs = 7 if max(n0, n1) <= 9 else 6
    for i in range(n0):
        for j in range(n1):
            r, g, b, _ = im.cmap(im.norm(m[i, j]))
            dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5
            ax.text(j, i, cell_text(m[i, j]), ha="center", va="center", fontsize=fs,
                    color="white" if dark else "black")


# ---------------------------------------------------------------------- plotted arrays
def covariance_matrix(pca) -> np.ndarray:
    """Σ of the scaled filters, (D, D): ``componentsᵀ · diag(explained_variance) · components``.

    This is scikit-learn's ``PCA.get_covariance()`` for a full-rank PCA (no noise
    term), i.e. the n−1 covariance of pass 1 recovered from its eigendecomposition.
    """
    c = np.asarray(pca.components, dtype=np.float64)
    v = np.asarray(pca.explained_variance, dtype=np.float64)
    return c.T @ (v[:, None] * c)


def cumulative_ratio(ratio) -> np.ndarray:
    """Cumulative explained variance ratio, (D,)."""
    return np.cumsum(np.asarray(ratio, dtype=np.float64))


def aligned_components(components, reference) -> tuple[np.ndarray, np.ndarray]:
    """Subset components with each sign set to agree with its closest global component.

    A component's sign is arbitrary; for display each subset component is flipped
    when its dot product with the global component of largest ``|cosine|`` is
    negative.

    Returns
    -------
    ``(aligned (D, D), flipped (D,) bool)``.
    """
    c = np.asarray(components, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    dots = c @ r.T
    closest = np.abs(dots).argmax(axis=1)
    flipped = dots[np.arange(len(c)), closest] < 0
    return np.where(flipped[:, None], -c, c), flipped


def eigenimage_rows(pca, subsets: dict) -> tuple[dict[str, np.ndarray], int]:
    """Rows of the eigenimage figure: global components, then each subset aligned.

    Returns the rows (name -> (D, D)) and the number of subset components flipped.
    """
    ref = np.asarray(pca.components, dtype=np.float64)
    rows = {"all filters": ref}
    n_flipped = 0
    for name, sp in subsets.items():
        c = np.asarray(sp.components, dtype=float)
        if np.all(np.isfinite(c)):
            rows[str(name).split("=", 1)[-1]], flipped = aligned_components(c, ref)
            n_flipped += int(flipped.sum())
    return rows, n_flipped


def density_image(counts: np.ndarray) -> np.ndarray:
    """The array the notebook hands to ``imshow``: ``H.T / H.max()``.

    ``counts[i, j]`` counts coefficient 0 in bin i and coefficient 1 in bin j, so
    rows of the image are coefficient 1 (growing downwards with the upper origin).
    """
    h = np.asarray(counts, dtype=np.float64)
    peak = h.max() if h.size else 0.0
    return h.T / peak if peak > 0 else np.zeros_like(h.T)


def ridge_heights(density: np.ndarray) -> np.ndarray:
    """Ridge curves as drawn, (G, D, F): each divided by the largest in its column."""
    d = np.asarray(density, dtype=np.float64)
    peak = d.max(axis=(0, 2), keepdims=True)
    return np.divide(d, peak, out=np.zeros_like(d), where=peak > 0)


def fire_cmap():
    """colorcet's ``fire`` with empty (masked) and below-range cells in its lowest colour."""
    try:
        import colorcet
    except ImportError as exc:
        raise AnalysisError(
            "the report needs colorcet: pip install 'filterdb-dask[plot]'"
        ) from exc
    fire = colorcet.cm.fire
    return fire.with_extremes(bad=fire(0.0), under=fire(0.0))


def entropy_note(sizes=(2, 3, 4, 5, 6), d: int = 9) -> str:
    """Why normalised variance entropy exceeds 1 for tiny layers, with T(n) values;
    for filters of ``d`` != 9 values, the normaliser used instead."""
    if d != 9:
        k = int(round(d ** 0.5))
        return (
            f"Filters are {k}x{k} (D = {d} values). The variance entropy (base 10) of n "
            f"filters is at most log10(min(n−1, {d})) (n filters centred on their mean span "
            f"at most n−1 of the {d} directions); the normalised variance entropy divides "
            f"by exactly that bound, log10(min(n−1, {d})) = {np.log10(d):.3f} for n > {d}, "
            "so it lies in [0, 1] (1: variance spread evenly over every direction the layer "
            "can span). The paper's logistic fit T(n) is fitted to 3x3 filters only and is "
            "not used for other kernel sizes. NaN for n < 3 (at most one direction: entropy 0)."
        )
    parts = []
    for n in sizes:
        t = float(kernels.entropy_norm(n))
        top = float(np.log10(min(n - 1, 9))) if n > 1 else 0.0
        parts.append(f"n={n}: T={t:.3f}, largest entropy {top:.3f}"
                     + (f" ({top / t:.2f}×T)" if t > 0 else ""))
    return (
        "Normalised variance entropy is the layer's entropy divided by T(n), the paper's "
        "logistic fit over layer sizes, not by the largest entropy n filters can have. "
        "n filters centred on their mean span at most n−1 directions, so their entropy "
        "can reach log10(min(n−1, 9)); for small layers the fit lies far below that ("
        + "; ".join(parts) + "). A layer of 3–6 filters whose variance is spread over its "
        "few directions therefore scores above 1 (up to 2.4 for n = 3): it is not "
        "degenerated, and such values are not an error. T(2) is negative, and two filters "
        "have one direction (entropy 0)."
    )


# ---------------------------------------------------------------------- figures
def _fig_size(w: float, h: float) -> tuple[float, float]:
    return min(w, MAX_FIG_INCHES), min(h, MAX_FIG_INCHES)


def fig_explained_variance(pca, subsets: dict):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    k = np.arange(1, len(pca.explained_variance_ratio) + 1)
    ax.plot(k, cumulative_ratio(pca.explained_variance_ratio), "o-", lw=2.5, color="k",
            label="all filters")
    for name, sp in subsets.items():
        r = np.asarray(sp.explained_variance_ratio, dtype=float)
        if np.all(np.isfinite(r)):
            ax.plot(k, cumulative_ratio(r), ".-", alpha=0.8,
                    label=short_label(str(name).split("=", 1)[-1]))
    ax.set_xlabel("number of components")
    ax.set_ylabel("cumulative explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(k if len(k) <= 12 else k[::max(1, len(k) // 12)])
    ax.grid(alpha=0.3)
    n = len(ax.get_lines())
    if n <= 30:
        ax.legend(fontsize=7, ncol=1 if n <= 10 else 2)
    return fig


def eigenimage_count(d: int) -> int:
    """Components drawn per PCA in the eigenimage figure: all of a 3x3 PCA's 9, at most
    ``MAX_EIGENIMAGES`` (the largest) of a larger kernel's K²."""
    return min(int(d), MAX_EIGENIMAGES)


def fig_eigenimages(rows: dict[str, np.ndarray]):
    """Components as KxK images, one row per PCA; the first row is the global PCA.

    Every later row is drawn sign-aligned to the first (:func:`aligned_components`).
    Kernels larger than 3x3 show their first :func:`eigenimage_count` components.
    """
    plt = _plt()
    ref = np.asarray(next(iter(rows.values())), dtype=np.float64)
    rows = {name: (c if r == 0 else aligned_components(c, ref)[0])
            for r, (name, c) in enumerate(rows.items())}
    n = len(rows)
    d = ref.shape[1]
    kk = int(round(d ** 0.5))
    m = eigenimage_count(d)
    fig, axes = plt.subplots(n, m, figsize=_fig_size(max(9, 0.62 * m), 1.0 * n + 0.6),
                             squeeze=False, layout="constrained")
    im = None
    names = short_labels(rows)
    for r, comps in enumerate(rows.values()):
        for k in range(m):
            ax = axes[r, k]
            im = ax.imshow(np.asarray(comps[k]).reshape(kk, kk), cmap="RdBu_r", vmin=-1,
                           vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"c{k}", fontsize=8)
        axes[r, 0].set_ylabel(names[r], fontsize=7, rotation=0, ha="right", va="center")
    fig.colorbar(im, ax=axes, shrink=0.6, label="weight")
    return fig


def fig_covariance(sigma: np.ndarray):
    """Σ of the scaled filters (D×D), symmetric diverging scale; every cell annotated
    up to 9×9 (3x3 filters)."""
    plt = _plt()
    d = len(sigma)
    fig, ax = plt.subplots(figsize=(5.6, 4.8) if d <= 9 else (7.5, 6.4), layout="constrained")
    top = float(np.abs(sigma).max()) or 1.0
    im = ax.imshow(sigma, cmap="RdBu_r", vmin=-top, vmax=top)
    step = 1 if d <= 25 else 2
    fs = 7 if d <= 9 else 5
    ax.set_xticks(range(0, d, step), [f"x{k}" for k in range(0, d, step)], fontsize=fs,
                  rotation=90 if d > 9 else 0)
    ax.set_yticks(range(0, d, step), [f"x{k}" for k in range(0, d, step)], fontsize=fs)
    if d <= 9:
        _annotate(ax, im, sigma)
    ax.set_title("covariance Σ of the scaled filters")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def fig_matrix(m: np.ndarray, labels, title: str, *, cmap="viridis", annotate=False):
    """A heat map of a group × group matrix, groups named by shortened labels."""
    plt = _plt()
    n = len(labels)
    size = min(max(4.0, 0.16 * n + 3), 16)
    fig, ax = plt.subplots(figsize=_fig_size(size, size * 0.85), layout="constrained")
    im = ax.imshow(m, cmap=cmap)
    names = short_labels(labels, 20 if n > 30 else LABEL_WIDTH)
    step = max(1, -(-n // MAX_HEATMAP_LABELS))
    ticks = list(range(0, n, step))
    fs = 7 if n <= 30 else max(3.5, min(6.0, 350 / n))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=fs)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=fs)
    if annotate and n <= 12:
        _annotate(ax, im, m)
    ax.set_title(short_label(title, 60))
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def fig_ridge(x, dens, labels, title):
    """One panel per component; groups are rows, curves scaled by :func:`ridge_heights`."""
    plt = _plt()
    g = len(labels)
    h = ridge_heights(dens)
    names = short_labels(labels)
    m = min(dens.shape[1], RIDGE_COMPONENTS)
    fig, axes = plt.subplots(1, m, figsize=_fig_size(14, 0.38 * g + 1.4), sharex=True,
                             sharey=True, layout="constrained", squeeze=False)
    axes = axes[0]
    offsets = np.arange(g)[::-1].astype(float)  # first group on top
    for k, ax in enumerate(axes):
        for i in range(g):  # lower rows drawn later, over the tails of the rows above
            y0 = offsets[i]
            top = y0 + RIDGE_OVERLAP * h[i, k]
            ax.fill_between(x, y0, top, color=f"C{i % 10}", alpha=0.8, lw=0, zorder=2 * i)
            ax.plot(x, top, color="white", lw=0.5, zorder=2 * i + 1)
        ax.set_title(f"coefficient {k}", fontsize=8)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        ax.tick_params(axis="y", length=0)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_xlim(x[0], x[-1])
    axes[0].set_ylim(-0.1, g - 1 + RIDGE_OVERLAP + 0.1)
    axes[0].set_yticks(offsets, names, fontsize=7 if g <= 30 else 5)
    fig.suptitle(short_label(title, 80))
    return fig


def fig_drift(matrices: dict[str, pd.DataFrame]):
    plt = _plt()
    names, values = [], []
    for name, m in matrices.items():
        a = m.to_numpy()
        v = a[np.triu_indices(len(a), k=1)]
        if len(v):
            names.append(name)
            values.append(v)
    fig, ax = plt.subplots(figsize=_fig_size(max(7.0, 0.5 * len(names) + 2), 4.5),
                           layout="constrained")
    if values:
        ax.boxplot(values, tick_labels=short_labels(names, 20))
        if len(names) > 6:
            ax.tick_params(axis="x", rotation=90)
    ax.set_ylabel("symmetric KL shift")
    ax.set_title("drift per grouping (upper-triangle values)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def drift_curve_lines(table: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What a drift curve draws from :meth:`Results.drift_to`'s table: x (the numeric
    labels; a missing-value group left out) and one line per component's weighted
    term ``w_k S_k`` plus ``total`` (their sum)."""
    keep = np.isfinite(table["value"].to_numpy(dtype=np.float64))
    t = table[keep]
    lines = {c[len("weighted_"):]: t[c].to_numpy(dtype=np.float64)
             for c in t.columns if c.startswith("weighted_c")}
    lines["total"] = t["total"].to_numpy(dtype=np.float64)
    return t["value"].to_numpy(dtype=np.float64), lines


def fig_drift_curve(table: pd.DataFrame, name: str, ref: str):
    """KL of every group to the reference group along a numeric column: one thin line
    per component's weighted term, the weighted total thick."""
    plt = _plt()
    x, lines = drift_curve_lines(table)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for k, (lab, y) in enumerate(lines.items()):
        if lab == "total":
            ax.plot(x, y, "o-", color="k", lw=2.5, label="total D(g, ref)")
        else:
            ax.plot(x, y, ".-", color=f"C{k % 10}", lw=1, alpha=0.85, label=f"w·S {lab}")
    ax.axvline(float(table.loc[ref, "value"]) if np.isfinite(table.loc[ref, "value"])
               else x[0], color="0.5", ls=":", lw=1)
    ax.set_xlabel(short_label(name, 40))
    ax.set_ylabel("symmetric KL to the reference group")
    ax.set_title(short_label(f"drift of {name} to {name} = {ref}", 70))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def fig_density(counts: np.ndarray, edges=None):
    """The notebook's picture: ``imshow(H.T / H.max())``, upper origin, ``fire``, log scale.

    ``edges`` is accepted for the caller's convenience; like the notebook's picture,
    this one has no ticks, so it does not use them.
    """
    plt = _plt()
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(5.6, 4.8), layout="constrained")
    img = np.ma.masked_less_equal(density_image(counts), 0)
    im = ax.imshow(img, norm=LogNorm(vmin=DENSITY_VMIN, vmax=1), cmap=fire_cmap(),
                   interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("coefficient 0 →")
    ax.set_ylabel("← coefficient 1 (grows downwards)")
    ax.set_title("2-D density (normalised to max)")
    fig.colorbar(im, ax=ax, shrink=0.8, extend="min")
    return fig


def fig_quality(q: pd.DataFrame):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.5), layout="constrained")
    sc = ax.scatter(q["sparsity"], q["variance_entropy_norm"], c=np.log10(q["n"].clip(1)),
                    s=6, alpha=0.6, cmap="viridis")
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("normalised variance entropy")
    ax.set_title("layer quality (one dot per layer)")
    fig.colorbar(sc, ax=ax, label="log10 filters in layer")
    ax.grid(alpha=0.3)
    return fig


def fig_orthogonality(q: pd.DataFrame):
    """Orthogonality of each layer of known shape against its normalised depth."""
    plt = _plt()
    known = q[q["orthogonality"].notna()]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    sc = ax.scatter(known["conv_depth_norm"], known["orthogonality"],
                    c=np.log10(known["n"].clip(1)), s=8, alpha=0.7, cmap="viridis")
    ax.set_xlabel("normalised conv depth")
    ax.set_ylabel("orthogonality")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"orthogonality of {len(known):,} layers of known shape")
    fig.colorbar(sc, ax=ax, label="log10 filters in layer")
    ax.grid(alpha=0.3)
    return fig


def fig_degenerated_sweep(sweep: pd.DataFrame):
    """Share of degenerated layers per depth decile: a line per ε (left) and per
    entropy cutoff (right)."""
    from .groups import DECILE_LABELS

    plt = _plt()
    kinds = [("sparsity@", "sparsity threshold ε (entropy cutoff 0.5)"),
             ("variance_entropy_norm<=", "entropy cutoff h (ε = 0.01)")]
    kinds = [(p, t) for p, t in kinds if sweep["threshold"].str.startswith(p).any()]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.0 * len(kinds), 3.8),
                             layout="constrained", squeeze=False)
    pos = {b: i for i, b in enumerate(DECILE_LABELS)}
    for ax, (prefix, title) in zip(axes[0], kinds, strict=True):
        names = list(dict.fromkeys(sweep.loc[sweep["threshold"].str.startswith(prefix),
                                             "threshold"]))
        cmap = plt.get_cmap("viridis")
        for j, name in enumerate(names):
            s = sweep[sweep["threshold"] == name]
            ax.plot(s["decile"].map(pos), s["share"], marker="o", ms=3,
                    color=cmap(j / max(len(names) - 1, 1)),
                    label=name[len(prefix):])
        ax.set_xticks(range(len(DECILE_LABELS)), DECILE_LABELS, rotation=60, fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("share of degenerated layers")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, title=prefix.rstrip("@<="), title_fontsize=7)
        ax.grid(alpha=0.3)
    return fig


def fig_pairs(table: pd.DataFrame, sides: list[str]):
    """Paired differences per depth bin: one panel per metric, a dot per pair, the
    mean over pairs as a line."""
    from .pairs import PAIR_BINS, PAIR_METRICS

    plt = _plt()
    fig, axes = plt.subplots(1, len(PAIR_METRICS), figsize=(12, 3.8), layout="constrained",
                             sharex=True)
    pos = {b: i for i, b in enumerate(PAIR_BINS)}
    x = table["bin"].map(pos).to_numpy(dtype=np.float64)
    for ax, m in zip(axes, PAIR_METRICS, strict=True):
        d = table[f"{m}_diff"].to_numpy(dtype=np.float64)
        ax.scatter(x, d, s=10, alpha=0.5, color="C0")
        if not np.isfinite(d).any():
            ax.text(0.5, 0.5, "undefined for every pair\n(no recorded weight shapes?)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8)
        mean = table.groupby("bin")[f"{m}_diff"].mean()
        xs = [pos[b] for b in PAIR_BINS if b in mean.index]
        ax.plot(xs, [mean[b] for b in PAIR_BINS if b in mean.index], color="C3", lw=1.5,
                marker="o", ms=3, label="mean over pairs")
        ax.axhline(0.0, color="0.4", lw=0.8, ls="--")
        ax.set_title(f"{m}: {_mpl_text(short_label(sides[0], 20))} − "
                     f"{_mpl_text(short_label(sides[1], 20))}", fontsize=9)
        ax.set_xticks(range(len(PAIR_BINS)), PAIR_BINS, rotation=60, fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("paired difference")
    axes[0].legend(fontsize=7)
    return fig


def fig_pair_correlation(corr: pd.DataFrame, column: str):
    """Spearman's ρ per depth bin, one line per metric."""
    from .pairs import PAIR_BINS, PAIR_METRICS

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    pos = {b: i for i, b in enumerate(PAIR_BINS)}
    for m in PAIR_METRICS:
        c = corr[corr["metric"] == m]
        ax.plot(c["bin"].map(pos), c["spearman"], marker="o", ms=3, label=m)
    ax.axhline(0.0, color="0.4", lw=0.8, ls="--")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(range(len(PAIR_BINS)), PAIR_BINS, rotation=60, fontsize=7)
    ax.set_ylabel("Spearman ρ")
    ax.set_title(f"correlation with {_mpl_text(short_label(column, 40))}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------- report
def _table(df: pd.DataFrame, n: int = 20) -> str:
    return df.head(n).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                              classes="tbl", border=0, na_rep="–")


def _mpl_text(label) -> str:
    """A label as matplotlib draws it literally (``$`` would start mathtext)."""
    return str(label).replace("$", r"\$") or "''"


def write_report(out: str, *, verbosity: int | None = None,
                 drift_ref: str | None = None) -> str:
    """Build ``out/report.html`` (images embedded) and ``out/plots/*.png``.

    The figures are those of docs/method.md §6. Everything comes from the result set
    (:meth:`Results.open`, i.e. ``results.zarr``): labels, slugs, bin edges and
    settings as recorded.

    Parameters
    ----------
    out : a result directory written by ``Results.write`` / ``analyze --out``.
    verbosity : 0 quiet; otherwise one line per figure on stderr (default 1).
    drift_ref : reference group of the drift curves (numeric groupings that have this
        label); default the one the analysis recorded (``settings["drift_ref"]``),
        else each grouping's first group.

    Returns
    -------
    str, the absolute path of ``report.html``.

    Raises
    ------
    AnalysisError
        ``out`` does not exist or is not a complete result set.
    """
    from .resultset import Results

    _build.update(t0=time.monotonic(), verbosity=1 if verbosity is None else verbosity)
    res = Results.open(out)
    if drift_ref is not None:
        from .analysis import _check_drift_ref

        res.settings["drift_ref"] = _check_drift_ref(res.groupings, drift_ref)
    plots_dir = os.path.join(out, "plots.tmp")
    shutil.rmtree(plots_dir, ignore_errors=True)
    os.makedirs(plots_dir)
    pca = res.pca
    subsets = {_mpl_text(k): v for k, v in res.subsets.items()}
    if res.own_pca is not None:  # in a basis, "all filters" is REF's PCA: show this store's too
        subsets = {"this store's own PCA": res.own_pca, **subsets}
    settings = res.settings
    quality = res.quality
    plots: dict[str, str] = {}
    captions: dict[str, str] = {}

    with warnings.catch_warnings():
        # a label in a script the font lacks draws as boxes; not worth a warning
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        _figures(res, pca, subsets, quality, plots, captions, plots_dir)

    deg = res.degenerated()
    models = res.models()
    n_layers = int(settings.get("n_layers", len(quality)))
    header = {
        "filters": f"{res.n_filters:,}",
        "layers": f"{n_layers:,}",
        "models": f"{quality['model_id'].nunique():,}",
        "coefficient range": f"[{res.coef_range[0]:.4f}, {res.coef_range[1]:.4f}]",
        "bins": str(res.bins),
        "groupings": ", ".join(g.name for g in res.groupings),
        "kernels": str(settings.get("engine")),
        "scheduler": str(settings.get("scheduler", "")),
        "store": str(settings.get("store")),
        "chunks": str(settings.get("n_chunks")),
    }
    if res.basis is not None:
        header.update(_basis_header(res))
    body = ["<h1>CNN Filter DB analysis</h1>", "<table class='hdr'>"]
    body += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
             for k, v in header.items()]
    body.append("</table>")
    ratio = ", ".join(f"{v:.4f}" for v in res.pca.explained_variance_ratio)
    body.append(f"<p>Explained variance ratio: {ratio}</p>")
    if res.basis is not None:
        body += _basis_section(res)
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
    final_plots = os.path.join(out, "plots")
    shutil.rmtree(final_plots, ignore_errors=True)
    os.rename(plots_dir, final_plots)
    path = os.path.join(out, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, path)
    return os.path.abspath(path)


def _pair_figures(res, plots, captions, plots_dir) -> None:
    """The paired comparison's figures, when the analysis had ``pairs``."""
    table = res.pair_table()
    if table is None or not len(table):
        return
    sides = res.settings["pairs"]["columns"]
    _save(fig_pairs(table, sides), plots, "pairs", plots_dir)
    captions["pairs"] = (
        f"Paired differences ({sides[0]} − {sides[1]}) of each layer metric per depth bin "
        f"(first conv layers, then deciles of the other layers' normalised depth; "
        f"docs/method.md §7): a dot per pair (the model means in the bin), the line the "
        f"mean over {len(res.settings['pairs']['names']):,} pairs. Table: pairs.csv.")
    corr = res.pair_correlation()
    if corr is not None:
        col = res.settings["correlate"]
        _save(fig_pair_correlation(corr, col), plots, "pairs_correlation", plots_dir)
        captions["pairs_correlation"] = (
            f"Spearman correlation, per depth bin, of each paired model's mean metric in "
            f"the bin with its meta value {col!r} (every paired model once; NaN, not drawn, "
            f"below 3 models). Table: pairs_correlation.csv.")
def _basis_header(res) -> dict[str, str]:
    b = res.basis
    oor = res.out_of_range
    total = int(oor.sum())
    share = total / max(res.n_filters * oor.shape[1], 1)
    obs = res.observed_range
    return {
        "basis": f"{b.get('path')} (digest {str(b.get('digest'))[:16]}…)",
        "basis filters": f"{int(b.get('n_filters', 0)):,}",
        "observed range": ("–" if obs is None else f"[{obs[0]:.4f}, {obs[1]:.4f}]"),
        "out of range": f"{total:,} coefficients ({share:.3%})",
    }


def _basis_section(res) -> list[str]:
    """The reference-basis part of the page: what out-of-range means, per component."""
    oor = res.out_of_range
    per = pd.DataFrame({"component": [f"c{k}" for k in range(oor.shape[1])],
                        "out of range": oor.sum(axis=0),
                        "share": oor.sum(axis=0) / max(res.n_filters, 1)})
    own_ratio = ("–" if res.own_pca is None else
                 ", ".join(f"{v:.4f}" for v in res.own_pca.explained_variance_ratio))
    worst = res.out_of_range_table().sort_values("out_of_range", ascending=False,
                                                 kind="stable")
    worst = worst[worst["out_of_range"] > 0]
    return [
        "<h2>Reference basis</h2>",
        "<p>Coefficients, bins and KL weights are those of the result set named above "
        "(its mean, components, coefficient range, bin edges and explained-variance "
        "ratio), so these histograms and shifts compare directly with its own. "
        "Coefficients outside its range are not binned (np.histogram's range rule, "
        "the upper edge inclusive) and are counted here and in out_of_range.csv; the "
        "2-D density is taken in the basis, in the same pass as the histograms. The "
        "store's own PCA is in own_pca.json (explained variance ratio: "
        f"{html.escape(own_ratio)}).</p>",
        _table(per, 100),
        f"<h3>Layers with coefficients out of range ({len(worst):,})</h3>",
        _table(worst),
    ]


def _figures(res, pca, subsets, quality, plots, captions, plots_dir) -> None:
    """Every figure of the report into ``plots`` (name -> base64 PNG) and ``captions``."""
    _save(fig_explained_variance(pca, subsets), plots, "explained_variance", plots_dir)
    captions["explained_variance"] = "Cumulative explained variance: all filters and subsets."
    if res.basis is not None:
        captions["explained_variance"] += (
            " In a reference basis, 'all filters' is the basis's PCA (REF's filters) and "
            "'this store's own PCA' the PCA of the filters analysed here.")
    eig, n_flipped = eigenimage_rows(pca, subsets)
    d = len(pca.mean)
    kk = res.kernel
    shown = eigenimage_count(d)
    _save(fig_eigenimages(eig), plots, "eigenimages", plots_dir)
    captions["eigenimages"] = (
        f"Eigenimages (principal components as {kk}x{kk} images, scale -1..1), c0 the "
        "largest" + (f"; the first {shown} of {d} are drawn (all are in pca.json). "
                     if shown < d else ". ") +
        "A component's sign is arbitrary: for display each subset component is flipped to "
        "agree in sign with the global component closest to it (largest |cosine|); "
        f"{n_flipped} subset components were flipped. pca_subsets.json keeps the computed "
        "signs (largest-|entry| positive).")
    # the store's own filters' Σ, also in a basis (REF's is REF's report)
    _save(fig_covariance(covariance_matrix(res.own_pca or pca)), plots, "coef_covariance",
          plots_dir)
    captions["coef_covariance"] = (
        f"Covariance matrix Σ of the scaled filters ({d} weights x0..x{d - 1}, row-major "
        f"over the {kk}x{kk} kernel, n−1 denominator), "
        "as scikit-learn's PCA.get_covariance() gives it: componentsᵀ·diag(explained "
        "variance)·components.")

    matrices = {}
    for g in res.groupings:
        name, slug = g.name, g.slug
        m = res.kl[slug]
        matrices[_mpl_text(name)] = m
        order = (list(m.mean(axis=0).sort_values(kind="stable").index)
                 if name in SORT_BY_MEAN else list(m.index))
        mm = m.loc[order, order]
        _save(fig_matrix(mm.to_numpy(), [_mpl_text(v) for v in order],
                         f"KL shift: {_mpl_text(name)}", annotate=True),
              plots, f"kl_{slug}", plots_dir)
        captions[f"kl_{slug}"] = (f"Symmetric KL shift between {name} groups"
                                  + (" (sorted by mean shift)." if name in SORT_BY_MEAN else ".")
                                  + f" Labels are shortened; full names in kl/{slug}.csv.")
        if slug in res.fine_hist:
            rd = res.ridge(slug)
            dens = rd["density"]
            keep = dens.reshape(len(g.labels), -1).sum(axis=1) > 0
            if keep.any():
                _save(fig_ridge(rd["x"], dens[keep],
                                [_mpl_text(lab) for lab, k in zip(g.labels, keep, strict=True)
                                 if k],
                                f"coefficient densities by {_mpl_text(name)}"),
                      plots, f"ridge_{slug}", plots_dir)
                captions[f"ridge_{slug}"] = (
                    f"Density of each PCA coefficient (columns) per {name} group (rows): "
                    "Gaussian KDE of a fine histogram, Silverman bandwidth per group and "
                    "coefficient (KDEpy's rule). Heights: every curve is divided by the "
                    "largest density in its column, so rows of one column compare; a "
                    "curve's peak rises 1.5 rows. x: the global coefficient range. Full "
                    f"group names: kl/{slug}.csv."
                    + (f" The first {RIDGE_COMPONENTS} of {d} coefficients are drawn."
                       if d > RIDGE_COMPONENTS else ""))
    _save(fig_drift(matrices), plots, "drift", plots_dir)
    captions["drift"] = "Distribution of the pairwise shifts of each grouping."
    for g in res.drift_groupings():
        ref = res.drift_reference(g)
        _save(fig_drift_curve(res.drift_to(g.name, ref), _mpl_text(g.name), _mpl_text(ref)),
              plots, f"drift_curve_{g.slug}", plots_dir)
        captions[f"drift_curve_{g.slug}"] = (
            f"Drift curve of {g.name}: the symmetric KL shift D(g, ref) of every group to "
            f"the reference group {ref!r} (thick), and each component's weighted term "
            "w_k·S(p_gk, p_ref,k) (thin; they sum to the total), groups in numeric order"
            + (", in the reference basis (REF's components, bins and weights)"
               if res.basis is not None else "")
            + f". drift/{g.slug}.csv holds the curve to the reference the analysis "
              "recorded (any other: Results.drift_to).")
    dens_counts = res.density
    _save(fig_density(dens_counts), plots, "density_2d", plots_dir)
    captions["density_2d"] = ("In the reference basis, computed in pass 3 (no pass 2). "
                              if res.basis is not None else "") + (
        f"Coefficient 0 (left to right) vs coefficient 1 (top to bottom): "
        f"{dens_counts.shape[0]}x{dens_counts.shape[1]} bins on [−3.3, 3.3]², divided by "
        "the maximum, log colour scale from 1e−5 (colorcet fire; empty cells black), "
        "drawn as the authors' notebook draws it (transposed histogram, upper origin).")
    _save(fig_quality(quality), plots, "quality", plots_dir)
    captions["quality"] = ("Variance entropy (normalised) vs sparsity, per layer; dashed: "
                           "1. " + entropy_note(d=d))
    sweep = res.degenerated_sweep()
    if sweep is not None and len(sweep):
        _save(fig_degenerated_sweep(sweep), plots, "degenerated_sweep", plots_dir)
        captions["degenerated_sweep"] = (
            "Share of degenerated layers per depth decile as the thresholds move: a layer "
            "is degenerated when its sparsity at ε is at least 0.5 or its normalised "
            "variance entropy at most the cutoff (docs/method.md §7); ε = 0.01 with "
            "cutoff 0.5 is the degenerated_layers.csv rule.")
    _pair_figures(res, plots, captions, plots_dir)
    if quality["orthogonality"].notna().any():
        _save(fig_orthogonality(quality), plots, "orthogonality", plots_dir)
        n_nan = int(quality["orthogonality"].isna().sum())
        captions["orthogonality"] = (
            "Orthogonality of the raw weights (1 − mean |cosine| between a layer's output "
            "channels; docs/method.md §7) against normalised depth, one dot per layer; "
            f"{n_nan:,} layers without a recorded weight shape or with one output channel "
            "are not drawn.")
