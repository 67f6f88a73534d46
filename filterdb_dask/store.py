"""Open a converted filter store: filters as a model-aligned dask array, meta, layers.

The format (layout, record, checks) is owned by :mod:`filterdb_dask.storeformat`;
this module turns a checked store into dask objects. It also owns the order of
per-layer rows (issue 11.2): chunk tasks produce their layers' rows chunk by chunk;
:meth:`FilterStore.per_chunk` hands each chunk its layers' values and
:meth:`FilterStore.to_meta_order` puts chunk-ordered rows back into meta order, so
no caller permutes.

Each chunk array is one planned chunk, so the dask array's chunks are exactly the
store's model-aligned chunks and a task reads whole Zarr chunks only. Every task
reads through :func:`storeformat.read_chunk`, which verifies what it reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import storeformat as fmt
from .errors import StoreError


@dataclass
class FilterStore:
    """A complete, checked store.

    Attributes
    ----------
    path : the store directory or URL.
    filters : dask array (N, K²) (K×K kernels flattened; (N, 9) for 3×3), chunks =
        the store's model-aligned chunks; every block is verified when read.
    meta : DataFrame, one row per layer (original index and columns) plus int64
        ``start``/``stop`` rows and ``chunk``.
    plan : (K, 2) int64 ``[begin, end)`` rows of each chunk.
    record : the store's attributes (:class:`storeformat.StoreRecord`).
    """

    path: str
    filters: object
    meta: pd.DataFrame
    plan: np.ndarray
    record: fmt.StoreRecord
    location: fmt.Location | None = None

    @property
    def attrs(self) -> dict:
        """The store's ``filterdb`` attributes as stored."""
        return self.record.to_attrs()

    @property
    def n_filters(self) -> int:
        return int(self.plan[-1, 1]) if len(self.plan) else 0

    @property
    def kernel(self) -> int:
        """K: every filter is a K×K kernel (the record's ``kernel``)."""
        return int(self.record.kernel)

    @property
    def n_chunks(self) -> int:
        return len(self.plan)

    @property
    def chunk_filters(self) -> np.ndarray:
        """Each chunk's number of filters (rows), in chunk order."""
        return np.diff(self.plan, axis=1).ravel()

    def _layer_order(self) -> np.ndarray:
        # meta rows sorted by (chunk, start): the order chunk tasks produce layer rows in
        return np.lexsort((self.meta["start"].to_numpy(), self.meta["chunk"].to_numpy()))

    def _chunk_cuts(self) -> np.ndarray:
        chunk = self.meta["chunk"].to_numpy()[self._layer_order()]
        return np.searchsorted(chunk, np.arange(1, len(self.plan)))

    def chunk_bounds(self) -> list[np.ndarray]:
        """Per chunk, the (L_i, 2) ``[start, stop)`` rows of its layers relative to
        the chunk, sorted by start (the order of a chunk task's per-layer rows)."""
        order = self._layer_order()
        chunk = self.meta["chunk"].to_numpy()[order]
        rel = np.stack([self.meta["start"].to_numpy()[order],
                        self.meta["stop"].to_numpy()[order]], axis=1).astype(np.int64)
        rel -= self.plan[chunk, :1] if len(chunk) else 0
        # layers are sorted by chunk: one split, not a mask per chunk (O(L), not O(L*K))
        return np.split(rel, self._chunk_cuts())

    def per_chunk(self, values: np.ndarray) -> list[np.ndarray]:
        """Split per-layer ``values`` (first axis: meta rows, meta order) into one
        array per chunk, rows in the order of :meth:`chunk_bounds`."""
        values = np.asarray(values)
        if len(values) != len(self.meta):
            raise ValueError(f"{len(values)} values for {len(self.meta)} layers")
        return np.split(values[self._layer_order()], self._chunk_cuts())

    def to_meta_order(self, rows: np.ndarray) -> np.ndarray:
        """Per-layer ``rows`` produced chunk by chunk (stacked in chunk order, as
        every per-layer output of a pass is) → the same rows in meta order."""
        rows = np.asarray(rows)
        if len(rows) != len(self.meta):
            raise ValueError(f"{len(rows)} rows for {len(self.meta)} layers")
        out = np.empty_like(rows)
        out[self._layer_order()] = rows
        return out


def _validate_not_a_source(path: str) -> None:
    """A ``dataset.h5`` given where a store is expected: say to convert it first."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as fh:
        head = fh.read(8)
    what = "an HDF5 file (a filter DB source)" if head == b"\x89HDF\r\n\x1a\n" else "a file"
    raise StoreError(
        f"{path!r} is {what}, not a converted store: run 'filterdb-dask convert {path} "
        "STORE.zarr' first, then analyse STORE.zarr"
    )


def open_store(path: str | os.PathLike | fmt.Location,
               storage_options: dict | None = None) -> FilterStore:
    """Open a complete filter store, checked against its own record.

    Parameters
    ----------
    path : the store directory written by ``convert``, or its object-store URL
        (``s3://bucket/db.zarr``).
    storage_options : fsspec options for a URL (endpoint, credentials, ``anon``).

    Returns
    -------
    FilterStore

    Raises
    ------
    StoreError
        Missing, not a filterdb store, another schema, not complete (a conversion
        that did not finish; run it again to resume), or damaged: a chunk's metadata
        differs from the record, the meta table differs from its digest, or a layer
        lies outside its chunk. Reading a block later raises StoreError for a
        missing, replaced or corrupt chunk.

    Examples
    --------
    >>> store = open_store("dataset.zarr")            # doctest: +SKIP
    >>> store.filters                                  # doctest: +SKIP
    dask.array<filters, shape=(1464797156, 9), dtype=float32, ...>
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    loc = fmt.location(path, storage_options)
    path = loc.url
    if not loc.remote:
        _validate_not_a_source(loc.path)
    rec = fmt.read_record(loc)
    if not rec.complete:
        raise StoreError(
            f"store {path!r} is incomplete: its conversion did not finish; run the same "
            "convert command again to resume it"
        )
    meta = fmt.read_meta(loc, rec)
    fmt.check_all_chunk_metadata(loc, rec)
    plan = rec.chunks
    name = "filters-" + tokenize(loc, rec.to_attrs())
    dsk = {
        (name, i, 0): (fmt.read_chunk, loc, i, int(a), int(b), rec.dtype, rec.codec,
                       rec.chunk_marks(i), rec.width)
        for i, (a, b) in enumerate(plan)
    }
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    sizes = tuple(int(b - a) for a, b in plan)
    filters = da.Array(graph, name, chunks=(sizes, (rec.width,)), dtype=np.dtype(rec.dtype))
    return FilterStore(path=path, filters=filters, meta=meta, plan=plan, record=rec,
                       location=loc)
