"""A realistic synthetic ``dataset.h5`` in the published CNN Filter DB layout.

The file is what the Zenodo release looks like (docs/method.md §1): one filter dataset
(``filter`` or ``filters``; float32 ``(N, 9)`` or float64 ``(N, 3, 3)``) and a
``/meta`` DataFrame written by ``pandas.HDFStore`` with the MultiIndex
``[model_id, conv_depth, conv_depth_norm]`` and inclusive ``"start:end"`` filter ids.

What makes it useful for testing an analysis:

* layer sizes follow real CNN shapes (out x in channels growing with depth,
  depthwise layers with one filter per channel, 5-150 layers per model, a few
  models far larger than the rest), scaled so the file holds exactly N filters;
* filters are drawn from distributions that really differ by task, visual
  category and depth (so KL matrices are not flat);
* some layers are degenerated: mostly dead filters, low rank, or all zero.

Generation streams layer pieces from per-(seed, model, layer, piece) random
streams, so memory stays bounded for any N and the same seed gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from filterdb_dask.errors import InputError

from .h5write import FILTER_LAYOUTS, write_dataset

TASKS = [
    "Classification",
    "Semantic Segmentation",
    "Instance Segmentation",
    "Object Detection",
    "GAN-Discriminator",
    "GAN-Generator",
    "Depth Estimation",
    "Super Resolution",
]
CATEGORIES = [
    "natural",
    "medical",
    "fractals",
    "textures",
    "sketches",
    "astronomy",
    "seismic",
    "faces",
]
DATASETS = {
    "natural": ["ImageNet1k", "CIFAR-10", "COCO", "Cityscapes", "Pascal VOC"],
    "medical": ["ChestX-ray14", "ISIC", "BraTS"],
    "fractals": ["FractalDB-1k"],
    "textures": ["DTD", "KTH-TIPS"],
    "sketches": ["QuickDraw", "Sketchy"],
    "astronomy": ["Galaxy10"],
    "seismic": ["F3 Netherlands"],
    "faces": ["CelebA", "FFHQ"],
}
OPERATORS = ["Conv", "Relu", "BatchNormalization", "Add", "MaxPool", "Concat", "Gemm"]

#: rows processed per piece when a layer is large (bounds peak memory)
PIECE = 1 << 19


@dataclass(frozen=True)
class LayerSpec:
    model_id: int
    conv_depth: int
    conv_depth_norm: float
    n: int
    kind: str  # "normal", "depthwise", "dead", "lowrank", "zero"


def _dct_basis(kernel: int = 3) -> np.ndarray:
    """Orthonormal KxK DCT-II basis, one flattened image per row, by frequency."""
    k = np.arange(kernel)
    c = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * kernel))
    c[0] /= np.sqrt(kernel)
    c[1:] *= np.sqrt(2 / kernel)
    d = kernel * kernel
    basis = np.einsum("ui,vj->uvij", c, c).reshape(d, d)
    freq = (k[:, None] + k[None, :]).ravel()
    return basis[np.argsort(freq, kind="stable")]


_BASIS = _dct_basis()


def _basis(kernel: int) -> np.ndarray:
    return _BASIS if kernel == 3 else _dct_basis(kernel)


def _frequencies(kernel: int) -> np.ndarray:
    """u + v of each basis image, in the basis order (0, 1, 1, 2, 2, 2, 3, 3, 4 for 3x3)."""
    k = np.arange(kernel)
    return np.sort((k[:, None] + k[None, :]).ravel(), kind="stable").astype(np.float64)


def _model_sizes(n_filters: int, n_models: int, rng: np.random.Generator) -> np.ndarray:
    """Split N filters among models: log-normal sizes, a few models 10-40x larger."""
    w = rng.lognormal(0.0, 0.8, size=n_models)
    n_huge = max(1, n_models // 25) if n_models >= 4 else 0
    if n_huge:
        w[rng.choice(n_models, n_huge, replace=False)] *= rng.uniform(10, 40, n_huge)
    return _split(n_filters, w, minimum=1)


def _split(total: int, weights: np.ndarray, *, minimum: int) -> np.ndarray:
    """Integer split of ``total`` proportional to ``weights``, each >= minimum."""
    k = len(weights)
    base = np.full(k, minimum, dtype=np.int64)
    rest = total - base.sum()
    if rest < 0:
        raise InputError(f"cannot split {total} into {k} parts of at least {minimum}")
    share = weights / weights.sum() * rest
    out = base + np.floor(share).astype(np.int64)
    short = total - out.sum()
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    out[order[:short]] += 1
    return out


def _architecture(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Raw relative layer sizes (out x in channels) and kinds of one model."""
    n_layers = int(min(n, rng.integers(5, 151)))
    width = rng.choice([16, 32, 64])
    sizes, kinds = [], []
    c_in = 3
    mobile = rng.random() < 0.25
    for i in range(n_layers):
        if i and i % max(1, n_layers // 5) == 0:
            width = min(width * 2, 2048)
        if mobile and i % 2 == 1:
            sizes.append(width)
            kinds.append("depthwise")
        else:
            sizes.append(width * c_in)
            kinds.append("normal")
        c_in = width
    return np.asarray(sizes, dtype=np.float64), kinds


def plan_layers(n_filters: int, n_models: int, seed: int) -> list[LayerSpec]:
    """All layers of the synthetic DB, in file order, holding exactly N filters."""
    if n_models < 1:
        raise InputError(f"n_models must be at least 1, got {n_models!r}")
    if n_filters < n_models:
        raise InputError(
            f"n_filters ({n_filters}) must be at least n_models ({n_models}): "
            "every model needs one filter"
        )
    rng = np.random.default_rng([seed, 0])
    layers: list[LayerSpec] = []
    for mid, n_m in enumerate(_model_sizes(n_filters, n_models, rng)):
        raw, kinds = _architecture(int(n_m), rng)
        sizes = _split(int(n_m), raw, minimum=1)
        top = len(sizes) - 1
        for depth, (size, kind) in enumerate(zip(sizes, kinds, strict=True)):
            u = rng.random()
            if u < 0.03:
                kind = "dead"
            elif u < 0.05:
                kind = "lowrank"
            elif u < 0.06:
                kind = "zero"
            norm = depth / top if top else 0.0
            layers.append(LayerSpec(mid, depth, norm, int(size), kind))
    return layers


def model_meta(n_models: int, seed: int) -> pd.DataFrame:
    """Descriptive per-model columns (task, category, data sets, producer...)."""
    rng = np.random.default_rng([seed, 1])
    rows = []
    for mid in range(n_models):
        task = TASKS[min(int(rng.geometric(0.45)) - 1, len(TASKS) - 1)]
        cat = CATEGORIES[min(int(rng.geometric(0.5)) - 1, len(CATEGORIES) - 1)]
        sets = DATASETS[cat]
        train = ", ".join(rng.choice(sets, size=min(len(sets), 1 + rng.integers(0, 2)),
                                     replace=False))
        pre = "ImageNet1k" if rng.random() < 0.4 else None
        arch = rng.choice(["ResNet", "VGG", "MobileNet", "UNet", "DenseNet", "EfficientNet"])
        rows.append({
            "model_id": mid,
            "model": f"{arch.lower()}_{mid:04d}.onnx",
            "Name": f"{arch}-{mid}",
            "producer": rng.choice(["pytorch", "tf2onnx", "keras2onnx", ""]),
            "op_set": int(rng.integers(7, 18)),
            "Paper": f"https://example.org/paper/{mid}" if rng.random() < 0.7 else None,
            "Accessible": bool(rng.random() < 0.9),
            "Dataset URL": f"https://example.org/data/{cat}",
            "Task": task,
            "Visual Category": cat,
            "Training-Dataset": train,
            "Pretraining-Dataset": pre,
        })
    return pd.DataFrame(rows).set_index("model_id")


def build_meta(layers: list[LayerSpec], models: pd.DataFrame, seed: int,
               kernel: int = 3) -> pd.DataFrame:
    """The ``/meta`` table: one row per layer, MultiIndex, inclusive filter ids."""
    rng = np.random.default_rng([seed, 2])
    sizes = np.array([lay.n for lay in layers], dtype=np.int64)
    stops = np.cumsum(sizes)
    starts = stops - sizes
    df = pd.DataFrame({
        "model_id": [lay.model_id for lay in layers],
        "conv_depth": [lay.conv_depth for lay in layers],
        "conv_depth_norm": [lay.conv_depth_norm for lay in layers],
        "filter_ids": [f"{a}:{b - 1}" for a, b in zip(starts, stops, strict=True)],
    })
    df = df.join(models, on="model_id")
    totals = df.groupby("model_id")["filter_ids"].transform("size")
    per_model = pd.Series(sizes).groupby(df["model_id"]).transform("sum")
    # models also hold kernels of other sizes; their KxK share is below one
    extra = rng.integers(0, 3, size=len(df)) * 64
    df["total_filters"] = (per_model + pd.Series(extra).groupby(df["model_id"]).transform("sum"))
    df[f"{kernel}x{kernel}_filter_share"] = per_model / df["total_filters"]
    df[f"({kernel}, {kernel}) filters"] = per_model
    df["(1, 1) filters"] = pd.Series(extra).groupby(df["model_id"]).transform("sum")
    df["depth"] = totals * 3
    for op in OPERATORS:
        df[op] = (totals * (1 if op == "Conv" else rng.integers(0, 2))).astype(np.int64)
    return df.set_index(["model_id", "conv_depth", "conv_depth_norm"])


def _layer_style(spec: LayerSpec, task: str, cat: str,
                 kernel: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the DCT coefficients for one layer's filters."""
    t = TASKS.index(task) if task in TASKS else 0
    c = CATEGORIES.index(cat) if cat in CATEGORIES else 0
    freq = _frequencies(kernel)
    # shallow layers are smooth and structured; deep ones flatter and noisier
    decay = 1.2 - 0.9 * spec.conv_depth_norm - 0.08 * t + 0.05 * c
    std = np.exp(-max(decay, 0.05) * freq)
    mean = np.zeros(kernel * kernel)
    mean[0] = 0.6 * math.cos(0.7 * c + 0.4 * t) * (1 - 0.6 * spec.conv_depth_norm)
    mean[1] = 0.25 * math.sin(0.9 * t + c)
    return mean, std


def _layer_filters(
    spec: LayerSpec, task: str, cat: str, seed: int, layer_no: int, kernel: int = 3
) -> Iterator[np.ndarray]:
    """Yield the float64 (n, K²) filters of one layer in pieces of at most PIECE rows."""
    mean, std = _layer_style(spec, task, cat, kernel)
    d = kernel * kernel
    basis = _basis(kernel)
    scale_rng = np.random.default_rng([seed, 3, layer_no])
    scale = scale_rng.lognormal(-2.0, 0.7)
    for p, a in enumerate(range(0, spec.n, PIECE)):
        m = min(PIECE, spec.n - a)
        rng = np.random.default_rng([seed, 4, layer_no, p])
        if spec.kind == "zero":
            yield np.zeros((m, d))
            continue
        coef = rng.standard_normal((m, d)) * std + mean
        if spec.kind == "lowrank":
            coef[:, 2:] = 0.0
        w = coef @ basis * scale
        if spec.kind == "depthwise":
            w *= 1.5
        if spec.kind == "dead":
            dead = rng.random(m) < 0.9
            w[dead] *= 1e-4
        yield w


def iter_filters(
    layers: list[LayerSpec], models: pd.DataFrame, seed: int, kernel: int = 3
) -> Iterator[np.ndarray]:
    """Stream all filters of the synthetic DB in row order, float64 (m, K²) pieces."""
    task = models["Task"].to_dict()
    cat = models["Visual Category"].to_dict()
    for i, spec in enumerate(layers):
        yield from _layer_filters(spec, task[spec.model_id], cat[spec.model_id], seed, i,
                                  kernel)


def synthesize(
    path: str,
    *,
    n_filters: int,
    n_models: int,
    seed: int = 0,
    layout: str = "flat32",
    name: str = "filter",
    meta_format: str = "fixed",
    progress=None,
    kernel: int = 3,
) -> pd.DataFrame:
    """Write a synthetic ``dataset.h5`` and return its meta table.

    Parameters
    ----------
    path : output file; written to ``path + '.tmp'`` and renamed when complete.
    n_filters, n_models : exact filter count and model count.
    seed : same seed, same bytes.
    layout : 'flat32' (float32 ``(N, K²)``) or 'cube64' (float64 ``(N, K, K)``), ...
    kernel : K of the KxK filters (3: the published DB's size).
    name : 'filter' (published README) or 'filters' (authors' notebook).
    meta_format : 'fixed' or 'table' (``pandas.HDFStore`` formats).
    progress : optional callable ``(done_rows, total_rows)``.

    Returns
    -------
    The meta DataFrame that was written.
    """
    if layout not in FILTER_LAYOUTS:
        raise InputError(f"layout {layout!r} is not one of {sorted(FILTER_LAYOUTS)}")
    from filterdb_dask.convert.ingest import validate_kernel

    kernel = validate_kernel(kernel)
    layers = plan_layers(n_filters, n_models, seed)
    models = model_meta(n_models, seed)
    meta = build_meta(layers, models, seed, kernel)
    write_dataset(
        path,
        iter_filters(layers, models, seed, kernel),
        n_filters,
        meta,
        layout=layout,
        name=name,
        meta_format=meta_format,
        progress=progress,
        kernel=kernel,
    )
    return meta
