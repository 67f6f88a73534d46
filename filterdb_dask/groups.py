"""Groupings of meta rows (layers): a meta column, or the depth decile (docs/method.md §4).

A grouping assigns every meta row a group label. Missing values form their own
group labelled ``"nan"`` (``"(missing)"`` when a value already prints as ``nan``).
Labels come in natural order: sorted values (numbers numerically, text
alphabetically, missing last), depth deciles in depth order. Text that reads as a
finite number (``"2"``, ``"1e-3"``) counts as that number, so a column of epochs,
steps or learning rates orders ``2`` before ``10`` however it was stored.

Names: ``"depth decile"`` (and its spellings ``depth_decile``, ``depth-decile``,
``decile``, any case) always means the computed grouping, even where a meta column
has that name. Slugs (file and variable names) are unique within one result set:
a slug that is empty, taken by an earlier grouping or by one of the result set's
own names (``drift``) gets the first free suffix ``_2``, ``_3``, ... in ``by`` order.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from . import config
from .errors import AnalysisError

DEPTH_DECILE = "depth decile"
NAN_LABEL = "nan"
_MISSING_LABELS = (NAN_LABEL, "(missing)")
#: slugs the result set uses for its own files (``kl/drift.csv``)
RESERVED_SLUGS = frozenset({"drift"})
DECILE_LABELS = tuple(
    ("[0.0, 0.1]" if i == 0 else f"({i / 10:.1f}, {(i + 1) / 10:.1f}]") for i in range(10)
)
_DEPTH_ALIASES = {"depth decile", "depth_decile", "depth-decile", "decile"}


def default_by() -> tuple[str, ...]:
    """The default groupings (``filterdb_dask.analysis.by`` in the package config)."""
    return tuple(config.get("analysis.by"))


@dataclass(frozen=True)
class Grouping:
    """One grouping: its name, file-name slug, labels, and each meta row's code."""

    name: str
    slug: str
    labels: tuple[str, ...]
    codes: np.ndarray  # (n_meta_rows,) int64 in 0..len(labels)-1

    @property
    def n_groups(self) -> int:
        return len(self.labels)


#: longest slug: slugs become file and Zarr variable names (255 bytes at most on disk)
MAX_SLUG = 64


def slugify(name: str) -> str:
    """Lowercase, every run of non-alphanumerics replaced by ``_`` (``visual_category``).

    A slug longer than :data:`MAX_SLUG` is cut and ends in a hash of the whole name,
    so it stays a valid file name and two long names stay apart.
    """
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    if len(slug) <= MAX_SLUG:
        return slug
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{slug[:MAX_SLUG - 11].rstrip('_')}_{digest}"


def depth_decile_codes(depth_norm: np.ndarray) -> np.ndarray:
    """Decile code 0..9 of ``conv_depth_norm``, right-closed, 0 included; -1 outside."""
    x = np.asarray(depth_norm, dtype=np.float64)
    edges = np.array([i / 10 for i in range(11)])
    codes = np.searchsorted(edges, x, side="left") - 1
    codes[x == 0.0] = 0
    codes[~((x >= 0.0) & (x <= 1.0))] = -1
    return codes.astype(np.int64)


def _sort_key(v):
    """Numbers (and text that reads as a finite number) by value, then other text."""
    if isinstance(v, bool | np.bool_ | int | float | np.integer | np.floating):
        return (0, float(v), str(v))
    text = str(v)
    try:
        x = float(text)
    except (ValueError, OverflowError):
        return (1, 0.0, text)
    return (0, x, text) if np.isfinite(x) else (1, 0.0, text)


def make_grouping(meta: pd.DataFrame, by: str) -> Grouping:
    """The grouping of ``meta``'s rows by column ``by`` or by depth decile.

    Raises
    ------
    AnalysisError
        ``by`` is neither a meta column nor the depth decile.
    """
    if not isinstance(by, str) or not by:
        raise AnalysisError(f"grouping {by!r} must be a non-empty column name")
    if by.lower() in _DEPTH_ALIASES:
        raw = depth_decile_codes(meta["conv_depth_norm"].to_numpy())
        raw = np.where(raw < 0, len(DECILE_LABELS), raw)  # NaN / outside [0, 1] last
        present = np.unique(raw)  # deciles no layer falls into are not groups
        all_labels = (*DECILE_LABELS, NAN_LABEL)
        labels = tuple(all_labels[c] for c in present)
        codes = np.searchsorted(present, raw).astype(np.int64)
        return Grouping(DEPTH_DECILE, "depth_decile", labels, codes)
    if by not in meta.columns:
        cols = [c for c in meta.columns if c not in ("start", "stop", "chunk")]
        raise AnalysisError(
            f"cannot group by {by!r}: not a meta column nor 'depth decile' "
            f"(columns: {', '.join(map(str, cols[:20]))}{' ...' if len(cols) > 20 else ''})"
        )
    col = meta[by]
    na = col.isna().to_numpy()
    values = col.to_numpy(dtype=object)
    uniq = sorted({v for v, m in zip(values, na, strict=True) if not m}, key=_sort_key)
    labels = [str(v) for v in uniq]
    lookup = {v: i for i, v in enumerate(uniq)}
    codes = np.array(
        [-1 if m else lookup[v] for v, m in zip(values, na, strict=True)], dtype=np.int64
    )
    if na.any():
        labels.append(_missing_label(labels))
        codes[codes < 0] = len(labels) - 1
    if len(set(labels)) != len(labels):  # e.g. 1 and "1" in one column
        raise AnalysisError(f"column {by!r} holds values that print alike: {labels[:10]!r}")
    return Grouping(str(by), slugify(str(by)), tuple(labels), codes)


def _missing_label(labels) -> str:
    taken = set(labels)
    for cand in _MISSING_LABELS:
        if cand not in taken:
            return cand
    i = 2
    while f"(missing {i})" in taken:
        i += 1
    return f"(missing {i})"


def unique_slug(name: str, taken) -> str:
    """``slugify(name)``, or with the first free suffix ``_2``, ``_3``, ... when it
    is empty, in ``taken`` or one of :data:`RESERVED_SLUGS`."""
    base = slugify(name) or "column"
    slug, i = base, 1
    while slug in taken or slug in RESERVED_SLUGS:
        i += 1
        slug = f"{base}_{i}"
    return slug


def make_groupings(meta: pd.DataFrame, by) -> list[Grouping]:
    """Groupings for each name in ``by`` (same grouping twice kept once, order kept),
    each with a slug unique among them (see the module docstring)."""
    if isinstance(by, str):
        by = [by]
    out, names, slugs = [], set(), set()
    for b in by:
        g = make_grouping(meta, b)
        if g.name in names:
            continue
        names.add(g.name)
        slug = unique_slug(g.name, slugs)
        slugs.add(slug)
        out.append(replace(g, slug=slug))
    return out
