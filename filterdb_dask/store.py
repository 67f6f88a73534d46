"""Open a converted filter store: filters as a model-aligned dask array, meta, layers.

Store layout (written by ``convert``; Zarr v3 directory)::

    store.zarr/
      zarr.json          attributes["filterdb"]: schema, completion flag, source
                         fingerprint and dtype, chunk plan, per-chunk checksums
      filters/00000      (n_0, 9) filters of chunk 0, one Zarr array per chunk
      filters/00001      ...
      meta/c000 ...      one array per meta column (strings: UTF-8 + a NA mask);
                         attributes name the column and its kind
      layers/start, layers/stop, layers/chunk   int64, one entry per meta row

Each chunk array is one planned chunk, so the dask array's chunks are exactly the
store's model-aligned chunks and a task reads whole Zarr chunks only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import StoreError

SCHEMA_VERSION = 1
ATTR_KEY = "filterdb"
STR_NA_SUFFIX = ".isna"


def chunk_name(i: int) -> str:
    """Path of chunk ``i``'s array inside the store."""
    return f"filters/{i:05d}"


@dataclass
class FilterStore:
    """A complete converted store.

    Attributes
    ----------
    path : the store directory.
    filters : dask array (N, 9), chunks = the store's model-aligned chunks.
    meta : DataFrame, one row per layer (original index and columns) plus int64
        ``start``/``stop`` rows and ``chunk``.
    plan : (K, 2) int64 ``[begin, end)`` rows of each chunk.
    attrs : the store's ``filterdb`` attributes.
    """

    path: str
    filters: object
    meta: pd.DataFrame
    plan: np.ndarray
    attrs: dict

    @property
    def n_filters(self) -> int:
        return int(self.plan[-1, 1]) if len(self.plan) else 0

    @property
    def n_chunks(self) -> int:
        return len(self.plan)

    def chunk_bounds(self) -> list[np.ndarray]:
        """Per chunk, the (L_i, 2) ``[start, stop)`` rows of its layers relative to
        the chunk, sorted by start; the layer order is :meth:`layer_order`."""
        order = self.layer_order()
        chunk = self.meta["chunk"].to_numpy()[order]
        rel = np.stack([self.meta["start"].to_numpy()[order],
                        self.meta["stop"].to_numpy()[order]], axis=1).astype(np.int64)
        rel -= self.plan[chunk, :1] if len(chunk) else 0
        # layers are sorted by chunk: one split, not a mask per chunk (O(L), not O(L*K))
        cuts = np.searchsorted(chunk, np.arange(1, len(self.plan)))
        return np.split(rel, cuts)

    def layer_order(self) -> np.ndarray:
        """Meta row positions sorted by (chunk, start): the order of per-layer
        results produced chunk by chunk."""
        return np.lexsort((self.meta["start"].to_numpy(), self.meta["chunk"].to_numpy()))


def read_attrs(path: str) -> dict:
    """The store's ``filterdb`` attributes, or a StoreError for a foreign path."""
    import zarr

    path = os.fspath(path)
    if not os.path.exists(path):
        raise StoreError(f"store {path!r} does not exist")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise StoreError(f"{path!r} is not a Zarr store ({type(exc).__name__})") from None
    attrs = dict(root.attrs).get(ATTR_KEY)
    if not isinstance(attrs, dict):
        raise StoreError(f"{path!r} is a Zarr store but not a filterdb store")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{path!r} has store schema {attrs.get('schema_version')!r}; this version "
            f"reads schema {SCHEMA_VERSION}: convert again"
        )
    return attrs


def read_meta(path: str) -> pd.DataFrame:
    """Rebuild the meta table stored column by column (no pickles involved)."""
    import zarr

    g = zarr.open_group(path, mode="r", path="meta")
    spec = g.attrs["columns"]
    data = {}
    for item in spec:
        arr = g[item["array"]][...]
        kind = item["kind"]
        if kind == "str":
            na = g[item["array"] + STR_NA_SUFFIX][...]
            arr = np.asarray(arr, dtype=object)
            arr[na] = np.nan
        data[item["name"]] = arr
    df = pd.DataFrame(data)
    index = list(g.attrs.get("index", []))
    if index:
        df.index = pd.MultiIndex.from_frame(df[index]) if len(index) > 1 else pd.Index(
            df[index[0]], name=index[0]
        )
    return df


def _load_chunk(path: str, i: int) -> np.ndarray:
    import zarr

    return zarr.open_array(path, path=chunk_name(i), mode="r")[...]


def open_store(path: str | os.PathLike) -> FilterStore:
    """Open a complete filter store.

    Parameters
    ----------
    path : the store directory written by ``convert``.

    Returns
    -------
    FilterStore

    Raises
    ------
    StoreError
        Missing, not a filterdb store, another schema, or not complete (a
        conversion that did not finish; run it again to resume).

    Examples
    --------
    >>> store = open_store("dataset.zarr")            # doctest: +SKIP
    >>> store.filters                                  # doctest: +SKIP
    dask.array<filters, shape=(1464797156, 9), dtype=float32, ...>
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    path = os.fspath(path)
    attrs = read_attrs(path)
    if not attrs.get("complete"):
        raise StoreError(
            f"store {path!r} is incomplete: its conversion did not finish; run the same "
            "convert command again to resume it"
        )
    plan = np.asarray(attrs["chunks"], dtype=np.int64).reshape(-1, 2)
    meta = read_meta(path)
    name = "filters-" + tokenize(path, attrs.get("source", {}).get("fingerprint"), attrs)
    dsk = {(name, i, 0): (_load_chunk, path, i) for i in range(len(plan))}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    sizes = tuple(int(b - a) for a, b in plan)
    filters = da.Array(graph, name, chunks=(sizes, (9,)), dtype=np.dtype(attrs["dtype"]))
    return FilterStore(path=path, filters=filters, meta=meta, plan=plan, attrs=attrs)
