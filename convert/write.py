"""Convert ``dataset.h5`` into a model-aligned, self-describing, resumable Zarr store.

Plan, then call the store format (:mod:`filterdb_dask.storeformat` owns the layout,
the record, the lock and the commit marks): each planned chunk (whole layers, whole
small models) is written by one task that reads its rows from HDF5 (opened by path
inside the task), hashes the source bytes, checks they are finite, and calls
:func:`storeformat.write_chunk`, whose commit mark is written last. A run killed at
any moment is resumed by running the same command: finished chunks are kept, the
rest rewritten, and the source rows of every finished chunk are read and hashed
again: a source changed since the interrupted run is refused (the fingerprint alone
sees only its size, meta and ends). The store's ``complete`` flag is set last.

Speed: per chunk, one read of the rows, their BLAKE3 digest and one finiteness sum,
then :func:`storeformat.write_chunk` encodes and checksums each Zarr chunk in one pass
and writes the encoded files itself; chunks run in parallel on dask's threads (BLAKE3,
the CRCs and the compressors release the GIL), and a process computing them itself
keeps the chunk buffers on the heap (:func:`filterdb_dask.cluster.tune_allocator`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dask
import numpy as np

from filterdb_dask import cluster, config
from filterdb_dask import storeformat as fmt
from filterdb_dask.errors import InputError, StoreError
from filterdb_dask.storeformat import CODECS

from .plan import chunk_layers, plan_chunks
from .read import Source, read_blocks, read_rows, read_source


@dataclass
class ConvertResult:
    path: str
    n_filters: int
    n_chunks: int
    written: int
    skipped: int
    unreferenced: int
    dtype: str


def fingerprint(src: Source) -> str:
    """Identity of a source: layout, size, meta rows and the ends of the data."""
    h = hashlib.sha256()
    h.update(json.dumps([src.name, list(src.shape), str(src.dtype)]).encode())
    h.update(os.path.getsize(src.path).to_bytes(8, "little"))
    h.update(src.meta["start"].to_numpy().tobytes())
    h.update(src.meta["stop"].to_numpy().tobytes())
    h.update(json.dumps([str(c) for c in src.meta.columns]).encode())
    n = src.n_filters
    k = min(n, 4096)
    h.update(np.ascontiguousarray(read_rows(src.path, src.name, 0, k)).tobytes())
    h.update(np.ascontiguousarray(read_rows(src.path, src.name, n - k, n)).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------- tasks
def _write_chunk(
    store_path: str | fmt.Location, src_path: str, name: str, i: int, a: int, b: int,
    dtype: str, codec: str, width: int = 9,
):
    """Read, check and write chunk ``i``, one stored Zarr chunk's rows at a time (read,
    digested, checked and encoded while in cache; one block in memory); returns
    (i, mark, n_bad, first bad rows). A chunk with NaN/Inf is read to its end (all of
    its bad values counted) and left without a mark."""
    digest = fmt.SourceDigest()
    writer = fmt.ChunkWriter(store_path, i, a, b, dtype, codec, width)
    n_bad, bad_rows = 0, []
    at = a
    for x in read_blocks(src_path, name, a, b, writer.rows):
        digest.update(x)
        # one float64 sum finds any NaN/Inf (float32 data cannot overflow it); only then
        # look row by row, so clean blocks pay a single cheap pass
        with np.errstate(invalid="ignore", over="ignore"):
            total = x.sum(dtype=np.float64)
        if not np.isfinite(total):
            finite = np.isfinite(x)
            if not finite.all():
                n_bad += int((~finite).sum())
                bad_rows.extend((np.nonzero(~finite.all(axis=1))[0][:5] + at).tolist())
        if not n_bad:
            writer.write(x.reshape(len(x), width))
        at += len(x)
    if n_bad:
        return i, None, n_bad, sorted(bad_rows)[:5]
    return i, writer.commit(digest.value()), 0, []


def _source_unchanged(src_path: str, name: str, i: int, a: int, b: int, rows: int,
                      recorded: str):
    """Chunk ``i`` of an interrupted run: are its source rows still the ones written?"""
    digest = fmt.SourceDigest.like(recorded)
    if digest is None:
        return i, False
    for x in read_blocks(src_path, name, a, b, rows):
        digest.update(x)
    return i, digest.value() == recorded


# ----------------------------------------------------------------------- convert
def convert(
    source: str,
    target: str,
    *,
    chunk_filters: int | None = None,
    dtype: str | None = None,
    codec: str | None = None,
    filters_name: str | None = None,
    verbosity: int | None = None,
    execution: cluster.Execution | None = None,
    storage_options: dict | None = None,
) -> ConvertResult:
    """Convert ``source`` (dataset.h5) into the store ``target`` (resumable).

    Parameters
    ----------
    source : the input HDF5 file.
    target : the store directory or object-store URL (``s3://bucket/db.zarr``);
        created, resumed, or refused if it belongs to another source.
    chunk_filters : the largest chunk wanted, in filters (default: the package
        config's ``filterdb_dask.convert.chunk-filters``, 2**20).
    dtype : 'float32' or 'float64' for the store; default: the source's dtype
        (float16 sources are stored as float32). Casting float64 to float32 halves
        the store and rounds every value to float32.
    codec : 'lz4' (Blosc LZ4 + bit-shuffle), 'zstd' or 'none' (default: the package
        config's ``filterdb_dask.convert.codec``, lz4).
    filters_name : the filter dataset's name if not 'filter'/'filters'.
    verbosity : progress output (0 quiet) when no ``execution`` is given.
    execution : where to compute (:func:`filterdb_dask.cluster.execution`);
        default: dask's current scheduler.
    storage_options : fsspec options for a URL target (endpoint, credentials, ...).

    Raises
    ------
    InputError, StoreError, StoreBusyError
    """
    chunk_filters = config.get("convert.chunk-filters") if chunk_filters is None \
        else chunk_filters
    codec = config.get("convert.codec") if codec is None else codec
    loc = fmt.location(target, storage_options)
    src = read_source(source, name=filters_name)
    store_dtype = np.dtype(dtype or (np.float32 if src.dtype == np.float16 else src.dtype))
    if store_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"store dtype must be float32 or float64, got {dtype!r}")
    if codec not in CODECS:
        raise InputError(f"codec {codec!r} is not one of {CODECS}")
    meta = src.meta
    plan = plan_chunks(
        meta["start"].to_numpy(), meta["stop"].to_numpy(), meta["model_id"].to_numpy(),
        src.n_filters, chunk_filters,
    )
    meta = meta.copy()
    meta["chunk"] = chunk_layers(plan, meta["start"].to_numpy(), meta["stop"].to_numpy())
    wanted = fmt.StoreRecord(
        n_filters=src.n_filters, n_layers=len(meta), dtype=store_dtype.name, codec=codec,
        kernel=src.kernel,
        target_chunk_filters=int(chunk_filters), chunks=plan,
        unreferenced_filters=src.unreferenced,
        source={"path": os.path.abspath(src.path), "name": src.name,
                "shape": list(src.shape), "dtype": src.dtype.name,
                "fingerprint": fingerprint(src)},
    )
    target = loc.url
    loc.prepare()
    src_path = os.path.abspath(src.path)
    with fmt.StoreLock(loc):
        complete, done = fmt.create_or_resume(loc, wanted)
        if complete is not None:
            return ConvertResult(target, src.n_filters, len(plan), 0, len(plan),
                                 src.unreferenced, store_dtype.name)
        tasks = []
        for i, (a, b) in enumerate(plan):
            if i in done:
                tasks.append(dask.delayed(_source_unchanged, pure=False)(
                    src_path, src.name, i, int(a), int(b), fmt.zarr_chunk_rows(int(b - a)),
                    done[i].source_digest))
            else:
                tasks.append(dask.delayed(_write_chunk, pure=False)(
                    loc, src_path, src.name, i, int(a), int(b), store_dtype.name, codec,
                    src.kernel ** 2))
        ex = cluster.ensure(execution, verbosity)
        if ex.client is None:  # computed in this process: chunk buffers from the heap
            cluster.tune_allocator()
        # the meta table is written while the chunks are (it is committed with them)
        with ThreadPoolExecutor(1, thread_name_prefix="write-meta") as pool:
            meta_written = pool.submit(fmt.write_meta, loc, meta)
            (results,) = ex.compute(tasks, label="convert", io_bound=True) if tasks else ((),)
            wanted.meta_sha256 = meta_written.result()
        marks = dict(done)
        bad_total, bad_rows, changed = 0, [], []
        for res in results:
            if len(res) == 2:
                if not res[1]:
                    changed.append(res[0])
                continue
            i, mark, n_bad, rows = res
            if mark is None:
                bad_total += n_bad
                bad_rows.extend(rows)
            else:
                marks[i] = mark
        if changed:
            a, b = plan[changed[0]]
            raise StoreError(
                f"{src.path!r} changed since the interrupted conversion of {target!r}: "
                f"the rows of {len(changed)} finished chunk(s) differ (first: rows {a}:{b}); "
                "delete the target and convert again"
            )
        if bad_total:
            raise InputError(
                f"{src.path!r}: the filters hold {bad_total} NaN/Inf values (first rows: "
                f"{sorted(bad_rows)[:5]}); the store was left incomplete"
            )
        fmt.commit(loc, wanted, marks)
    written = len(plan) - len(done)
    return ConvertResult(target, src.n_filters, len(plan), written, len(done),
                         src.unreferenced, store_dtype.name)
