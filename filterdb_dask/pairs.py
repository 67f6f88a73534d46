"""Paired comparison of models per depth bin (docs/method.md §7, "Paired comparison").

A pairs file names two models per row (e.g. the robust and the normally trained
version of one architecture). Per pair and depth bin (the first conv layer its own
bin, the other layers by decile of normalised depth) the mean of each layer metric
of the one model minus that of the other; and, with a numeric meta column, the
Spearman correlation over the paired models of the per-bin metric with that column.
Everything here is small pandas work on the quality table: no pass over the filters.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pandas as pd

from .errors import AnalysisError
from .groups import depth_decile_codes

#: the layer metrics compared
PAIR_METRICS = ("sparsity", "variance_entropy", "orthogonality")
#: the depth bins: the first conv layer, then deciles of the rest
PAIR_BINS = ("first",) + tuple(f"({i / 10:.1f}, {(i + 1) / 10:.1f}]" for i in range(10))
#: a pairs file larger than this is refused (a list of model names is small)
MAX_PAIRS_BYTES = 8 << 20
MAX_PAIRS = 100_000
#: names the pair table uses itself: not a side's label
RESERVED_LABELS = frozenset({"bin", "diff", "metric", "n", "spearman"})


def pair_bin_codes(depth_norm: np.ndarray) -> np.ndarray:
    """Bin of every layer from its ``conv_depth_norm``: 0 (``"first"``) at 0, the
    model's first conv layers; ``1 + k`` in ``(k/10, (k+1)/10]`` (the depth deciles'
    edges, :func:`groups.depth_decile_codes`); -1 when missing or outside [0, 1]."""
    x = np.asarray(depth_norm, dtype=np.float64)
    dec = depth_decile_codes(x)
    return np.where(x == 0.0, 0, np.where(dec >= 0, dec + 1, -1)).astype(np.int64)


def _model_names(meta: pd.DataFrame) -> dict[str, int]:
    """Name -> model_id for the ``model`` column, then ``Name`` for names not in it;
    a name shared by two models maps to -1 (ambiguous)."""
    ids = meta["model_id"].to_numpy()
    out: dict[str, int] = {}
    for col in ("model", "Name"):
        if col not in meta.columns:
            continue
        per = pd.DataFrame({"name": meta[col].to_numpy(dtype=object), "id": ids}).dropna()
        per["name"] = per["name"].map(str)
        n_ids = per.groupby("name", sort=False)["id"].nunique()
        first = per.groupby("name", sort=False)["id"].first()
        for name, nid in first.items():
            if name in out:
                continue
            out[name] = int(nid) if n_ids[name] == 1 else -1
    return out


def read_pairs(source, meta: pd.DataFrame) -> dict:
    """Read and check a pairs file (or a list of name pairs) against the meta table.

    The file is UTF-8 CSV with two columns of model names (the ``model`` column's
    values, else ``Name``'s); an optional first row naming no model is the header
    (the two sides' labels, default ``first``/``second``). Blank lines are skipped.

    Returns
    -------
    dict with ``columns`` (two labels), ``names`` (list of [a, b]) and
    ``model_ids`` (list of [id_a, id_b]): what ``settings["pairs"]`` records.

    Raises
    ------
    AnalysisError
        A missing, huge, non-UTF-8 or malformed file; a row without exactly two names;
        an unknown or ambiguous name; a model paired with itself; a pair given twice.
    """
    where = "pairs"
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        where = f"pairs file {path!r}"
        if not os.path.isfile(path):
            raise AnalysisError(f"{where} does not exist or is not a file")
        size = os.path.getsize(path)
        if size > MAX_PAIRS_BYTES:
            raise AnalysisError(f"{where} has {size:,} bytes; a pairs file holds at most "
                                f"{MAX_PAIRS_BYTES:,} (two model names a row)")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PAIRS_BYTES + 1)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise AnalysisError(f"{where} is not UTF-8 text (byte {exc.start}); save it as "
                                "UTF-8 CSV") from exc
        if "\x00" in text:
            raise AnalysisError(f"{where} holds NUL bytes: not a CSV text file")
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            raise AnalysisError(f"{where} is not readable CSV: {exc}") from exc
    else:
        rows = [list(r) for r in source]
    rows = [(i + 1, [str(c).strip() for c in r]) for i, r in enumerate(rows)
            if any(str(c).strip() for c in r)]
    names = _model_names(meta)
    columns = ["first", "second"]
    if rows and len(rows[0][1]) == 2 and not any(c in names for c in rows[0][1]):
        columns = rows.pop(0)[1]
        if columns[0] == columns[1] or not all(columns):
            raise AnalysisError(f"{where}: header {columns!r} must name two different sides")
        taken = [c for c in columns if c in RESERVED_LABELS
                 or c.startswith(("layers_", *(f"{m}_" for m in PAIR_METRICS)))]
        if taken:
            raise AnalysisError(f"{where}: header label {taken[0]!r} is taken by the table's "
                                "own columns; name the sides otherwise (e.g. robust,normal)")
    if not rows:
        what = (f": its only row {columns!r} names no model (in the meta columns model or "
                "Name)" if columns != ["first", "second"] else "")
        raise AnalysisError(f"{where} names no pair of models{what}")
    if len(rows) > MAX_PAIRS:
        raise AnalysisError(f"{where} has {len(rows):,} pairs; at most {MAX_PAIRS:,}")
    out_names, out_ids, seen = [], [], {}
    for line, cells in rows:
        if len(cells) != 2 or not all(cells):
            raise AnalysisError(f"{where}, row {line}: {len(cells)} cells; each row names "
                                "two models (first,second)")
        ids = []
        for c in cells:
            if c not in names:
                raise AnalysisError(f"{where}, row {line}: no model is named {c[:80]!r} "
                                    "(in the meta columns model or Name)")
            if names[c] < 0:
                raise AnalysisError(f"{where}, row {line}: {c[:80]!r} names more than one "
                                    "model; give the model column's file name")
            ids.append(names[c])
        if ids[0] == ids[1]:
            raise AnalysisError(f"{where}, row {line}: {cells[0][:80]!r} is paired with "
                                "itself")
        key = frozenset(ids)
        if key in seen:
            raise AnalysisError(f"{where}, row {line}: the pair {cells[0][:60]!r}, "
                                f"{cells[1][:60]!r} is also row {seen[key]}")
        seen[key] = line
        out_names.append(cells)
        out_ids.append(ids)
    return {"columns": columns, "names": out_names, "model_ids": out_ids}


def validate_correlate(meta: pd.DataFrame, column: str) -> None:
    """``column`` is a meta column with one number (or nothing) per model.

    Raises
    ------
    AnalysisError
        Not a meta column, not numeric, or two values within one model.
    """
    per_model_values(meta, column)


def per_model_values(meta: pd.DataFrame, column: str) -> pd.Series:
    """``column``'s value of every model (index model_id, NaN where missing)."""
    if column not in meta.columns:
        raise AnalysisError(f"correlate column {column!r} is not a meta column")
    raw = meta[column]
    num = pd.to_numeric(raw, errors="coerce")
    bad = raw.notna().to_numpy() & num.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AnalysisError(f"correlate column {column!r} is not numeric (meta row {i}: "
                            f"{str(raw.iloc[i])[:40]!r})")
    df = pd.DataFrame({"id": meta["model_id"].to_numpy(), "v": num.to_numpy(np.float64)})
    g = df.groupby("id", sort=True)["v"]
    if (g.nunique() > 1).any():
        mid = g.nunique().index[(g.nunique() > 1).to_numpy()][0]
        raise AnalysisError(f"correlate column {column!r} has several values within model "
                            f"{mid!r}; it must hold one value per model")
    return g.first()


def per_model_bins(quality: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric per model and bin (index ``(model_id, bin)``), layers of
    a bin with a NaN metric left out of that metric's mean, plus ``layers``."""
    codes = pair_bin_codes(quality["conv_depth_norm"].to_numpy())
    df = quality[["model_id", *PAIR_METRICS]].assign(bin=codes)
    df = df[df["bin"] >= 0]
    g = df.groupby(["model_id", "bin"], sort=True)
    out = g[list(PAIR_METRICS)].mean()
    out["layers"] = g.size()
    return out


def pair_table(quality: pd.DataFrame, pairs: dict) -> pd.DataFrame:
    """One row per pair and depth bin where both models have layers: the layers and
    per-metric means of each side and their difference (first − second); pairs in
    file order, bins in depth order."""
    agg = per_model_bins(quality).reset_index()
    a_name, b_name = pairs["columns"]
    ids = np.asarray(pairs["model_ids"], dtype=np.int64).reshape(-1, 2)
    names = np.asarray(pairs["names"], dtype=object).reshape(-1, 2)
    p = pd.DataFrame({"_pair": np.arange(len(ids)), "_a": ids[:, 0], "_b": ids[:, 1]})
    sides = []
    for key in ("_a", "_b"):
        side = p[["_pair", key]].merge(agg, left_on=key, right_on="model_id", how="inner")
        sides.append(side.drop(columns=[key, "model_id"]))
    both = sides[0].merge(sides[1], on=["_pair", "bin"], suffixes=("_A", "_B"))
    both = both.sort_values(["_pair", "bin"], kind="stable").reset_index(drop=True)
    out = pd.DataFrame({
        a_name: names[both["_pair"].to_numpy(), 0],
        b_name: names[both["_pair"].to_numpy(), 1],
        "bin": np.asarray(PAIR_BINS, dtype=object)[both["bin"].to_numpy()],
        f"layers_{a_name}": both["layers_A"].to_numpy(np.int64),
        f"layers_{b_name}": both["layers_B"].to_numpy(np.int64),
    })
    for m in PAIR_METRICS:
        va = both[f"{m}_A"].to_numpy(np.float64)
        vb = both[f"{m}_B"].to_numpy(np.float64)
        out[f"{m}_{a_name}"] = va
        out[f"{m}_{b_name}"] = vb
        out[f"{m}_diff"] = va - vb
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3
    points or a constant side."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    rx = pd.Series(x[ok]).rank(method="average").to_numpy(dtype=np.float64)
    ry = pd.Series(y[ok]).rank(method="average").to_numpy(dtype=np.float64)
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def pair_correlation(quality: pd.DataFrame, meta: pd.DataFrame, pairs: dict,
                     column: str) -> pd.DataFrame:
    """Per depth bin (that some paired model has layers in) and metric: Spearman's ρ
    over the paired models (each once) between the model's mean metric in the bin and
    its value of ``column``, and n, the models with both values."""
    value = per_model_values(meta, column)
    agg = per_model_bins(quality).reset_index()
    models = np.unique(np.asarray(pairs["model_ids"], dtype=np.int64))
    agg = agg[agg["model_id"].isin(models)]
    agg = agg.assign(_v=value.reindex(agg["model_id"].to_numpy()).to_numpy(np.float64))
    rows = []
    for code, sub in agg.groupby("bin", sort=True):
        y = sub["_v"].to_numpy(np.float64)
        for m in PAIR_METRICS:
            x = sub[m].to_numpy(np.float64)
            n = int((np.isfinite(x) & np.isfinite(y)).sum())
            rows.append({"bin": PAIR_BINS[code], "metric": m, "n": n,
                         "spearman": spearman(x, y)})
    return pd.DataFrame(rows, columns=["bin", "metric", "n", "spearman"])
