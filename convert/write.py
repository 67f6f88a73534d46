"""Convert ``dataset.h5`` into a model-aligned, self-describing, resumable Zarr store.

Each planned chunk (whole layers, whole small models) becomes one Zarr array
``filters/NNNNN`` written by one task: read the rows from HDF5 (opened by path
inside the task), check they are finite, cast, write, checksum, and only then
record the checksum in the array's attributes. A chunk counts as done only when
that record is there, so a run killed at any moment (even mid-write) is resumed
by running the same command: finished chunks are kept, the rest rewritten. The
store's ``complete`` flag is set last, after every chunk and the meta table.

A lock file (``O_EXCL``) keeps two converters off the same target; a lock left by
a dead process on this host is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zlib
from dataclasses import dataclass

import dask
import numpy as np
import pandas as pd

from filterdb_dask import cluster
from filterdb_dask.errors import InputError, StoreBusyError, StoreError
from filterdb_dask.store import (
    ATTR_KEY,
    SCHEMA_VERSION,
    STR_NA_SUFFIX,
    chunk_name,
)

from .plan import chunk_layers, plan_chunks
from .read import Source, read_rows, read_source

LOCK_NAME = ".filterdb-convert.lock"
DEFAULT_CHUNK_FILTERS = 1 << 20
#: rows per Zarr chunk inside a planned chunk: 4.5 MiB of float32 decodes ~2x faster
#: than one 36 MiB Zarr chunk (cache-sized blocks, less copying)
ZARR_CHUNK_ROWS = 1 << 17
CODECS = ("lz4", "zstd", "none")


@dataclass
class ConvertResult:
    path: str
    n_filters: int
    n_chunks: int
    written: int
    skipped: int
    unreferenced: int
    dtype: str


# ------------------------------------------------------------------------- helpers
def _compressors(codec: str, typesize: int):
    import zarr

    if codec == "none":
        return None
    if codec == "lz4":
        return zarr.codecs.BloscCodec(
            cname="lz4", clevel=5, shuffle="bitshuffle", typesize=typesize
        )
    if codec == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    raise InputError(f"codec {codec!r} is not one of {CODECS}")


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


def checksum(a: np.ndarray) -> int:
    """CRC-32 of the array's bytes (C order, store dtype)."""
    return zlib.crc32(np.ascontiguousarray(a).data) & 0xFFFFFFFF


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """Exclusive lock file inside the target directory."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def __enter__(self):
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.path) as fh:
                        other = json.load(fh)
                except (OSError, ValueError):
                    other = {}
                same_host = other.get("host") == me["host"]
                if same_host and not _pid_alive(int(other.get("pid", -1))):
                    os.remove(self.path)  # left by a dead converter: take it over
                    continue
                raise StoreBusyError(
                    f"another converter (pid {other.get('pid')!r} on "
                    f"{other.get('host')!r}) is writing {os.path.dirname(self.path)!r}; "
                    f"wait for it, or remove {self.path!r} if it is gone"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise StoreBusyError(f"could not take the lock {self.path!r}")

    def __exit__(self, *exc):
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        return False


# ----------------------------------------------------------------------- meta
def _column_kind(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "bool"
    if pd.api.types.is_integer_dtype(s):
        return "int"
    if pd.api.types.is_float_dtype(s):
        return "float"
    return "str"


def write_meta(root, meta: pd.DataFrame) -> None:
    """One array per meta column; strings as UTF-8 plus a NA mask; no pickles."""
    g = root.require_group("meta")
    spec = []
    for j, name in enumerate(meta.columns):
        s = meta[name]
        kind = _column_kind(s)
        arr_name = f"c{j:03d}"
        if kind == "str":
            na = s.isna().to_numpy()
            vals = np.array(["" if m else _as_text(v) for v, m in zip(s, na, strict=True)],
                            dtype=object)
            a = g.create_array(arr_name, shape=vals.shape, dtype=str, overwrite=True)
            a[...] = vals
            m = g.create_array(arr_name + STR_NA_SUFFIX, shape=na.shape, dtype=bool,
                               overwrite=True)
            m[...] = na
        else:
            vals = s.to_numpy(dtype={"bool": bool, "int": np.int64, "float": np.float64}[kind])
            a = g.create_array(arr_name, shape=vals.shape, dtype=vals.dtype, overwrite=True)
            a[...] = vals
        spec.append({"name": str(name), "array": arr_name, "kind": kind})
    index = [n for n in meta.index.names if n is not None and n in meta.columns]
    g.attrs.update({"columns": spec, "index": index})


def _as_text(v) -> str:
    if isinstance(v, bytes | np.bytes_):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, list | tuple | np.ndarray):
        return json.dumps(np.asarray(v).tolist())
    return str(v)


# ----------------------------------------------------------------------- task
def _write_chunk(
    store_path: str, src_path: str, name: str, i: int, a: int, b: int, dtype: str, codec: str
):
    """Read, check and write chunk ``i``; returns (i, crc, n_bad, first bad rows)."""
    x = read_rows(src_path, name, a, b)
    # one float64 sum finds any NaN/Inf (float32 data cannot overflow it); only then
    # look row by row, so clean chunks pay a single cheap pass
    with np.errstate(invalid="ignore", over="ignore"):
        total = x.sum(dtype=np.float64)
    if not np.isfinite(total):
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad = np.nonzero(~finite)[0]
            return i, None, int((~np.isfinite(x)).sum()), (bad[:5] + a).tolist()
    return i, write_chunk(store_path, i, x, a, b, dtype, codec), 0, []


def write_chunk(store_path: str, i: int, x: np.ndarray, a: int, b: int, dtype: str,
                codec: str) -> int:
    """Write chunk ``i`` (rows ``[a, b)``) as its own array; record its checksum last.

    The checksum in the array's attributes is the commit mark a resume looks for.
    """
    import zarr

    y = np.ascontiguousarray(x, dtype=dtype)
    arr = zarr.create_array(
        store_path,
        name=chunk_name(i),
        shape=y.shape,
        chunks=(max(1, min(y.shape[0], ZARR_CHUNK_ROWS)), 9),
        dtype=y.dtype,
        compressors=_compressors(codec, y.dtype.itemsize),
        overwrite=True,
        config={"write_empty_chunks": True},
    )
    arr[...] = y
    crc = checksum(y)
    arr.attrs.update({"rows": [int(a), int(b)], "crc32": crc})
    return crc


def _chunk_done(root, i: int, a: int, b: int) -> int | None:
    """The recorded checksum of chunk ``i`` if it was completely written."""
    try:
        arr = root[chunk_name(i)]
    except KeyError:
        return None
    except Exception:
        return None  # a half-written array header: rewrite it
    attrs = dict(arr.attrs)
    if attrs.get("rows") == [a, b] and "crc32" in attrs and arr.shape == (b - a, 9):
        return int(attrs["crc32"])
    return None


# ----------------------------------------------------------------------- convert
def convert(
    source: str,
    target: str,
    *,
    chunk_filters: int = DEFAULT_CHUNK_FILTERS,
    dtype: str | None = None,
    codec: str = "lz4",
    filters_name: str | None = None,
    verbosity: int | None = None,
    execution: cluster.Execution | None = None,
) -> ConvertResult:
    """Convert ``source`` (dataset.h5) into the store ``target`` (resumable).

    Parameters
    ----------
    source : the input HDF5 file.
    target : the store directory; created, resumed, or refused if it belongs to
        another source.
    chunk_filters : the largest chunk wanted, in filters (default 2**20).
    dtype : 'float32' or 'float64' for the store; default: the source's dtype
        (float16 sources are stored as float32). Casting float64 to float32 halves
        the store and rounds every value to float32.
    codec : 'lz4' (Blosc LZ4 + byte shuffle, default), 'zstd' or 'none'.
    filters_name : the filter dataset's name if not 'filter'/'filters'.
    verbosity : progress output (0 quiet) when no ``execution`` is given.
    execution : where to compute (:func:`filterdb_dask.cluster.execution`);
        default: dask's current scheduler.

    Raises
    ------
    InputError, StoreError, StoreBusyError
    """
    import zarr

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
    fp = fingerprint(src)
    wanted = {
        "schema_version": SCHEMA_VERSION,
        "complete": False,
        "n_filters": src.n_filters,
        "n_layers": len(meta),
        "dtype": store_dtype.name,
        "codec": codec,
        "target_chunk_filters": int(chunk_filters),
        "chunks": plan.tolist(),
        "unreferenced_filters": src.unreferenced,
        "source": {
            "path": os.path.abspath(src.path),
            "name": src.name,
            "shape": list(src.shape),
            "dtype": src.dtype.name,
            "fingerprint": fp,
        },
    }
    target = os.fspath(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise StoreError(f"target {target!r} exists and is not a directory")
    os.makedirs(target, exist_ok=True)
    with _Lock(target):
        _prepare_target(target, wanted)
        root = zarr.open_group(target, mode="a")
        old = dict(root.attrs).get(ATTR_KEY)
        if old and old.get("complete"):
            return ConvertResult(target, src.n_filters, len(plan), 0, len(plan),
                                 src.unreferenced, store_dtype.name)
        root.attrs[ATTR_KEY] = wanted
        write_meta(root, meta)
        done = {}
        todo = []
        for i, (a, b) in enumerate(plan):
            crc = _chunk_done(root, i, int(a), int(b))
            if crc is None:
                todo.append(dask.delayed(_write_chunk, pure=False)(
                    target, os.path.abspath(src.path), src.name, i, int(a), int(b),
                    store_dtype.name, codec,
                ))
            else:
                done[i] = crc
        ex = cluster.ensure(execution, verbosity)
        (results,) = ex.compute(todo, label="convert", io_bound=True) if todo \
            else ((),)
        bad_total = 0
        bad_rows: list[int] = []
        for i, crc, n_bad, rows in results:
            if crc is None:
                bad_total += n_bad
                bad_rows.extend(rows)
            else:
                done[i] = crc
        if bad_total:
            raise InputError(
                f"{src.path!r}: the filters hold {bad_total} NaN/Inf values (first rows: "
                f"{sorted(bad_rows)[:5]}); the store was left incomplete"
            )
        final = dict(wanted, complete=True, checksums=[done[i] for i in range(len(plan))])
        root.attrs[ATTR_KEY] = final
    return ConvertResult(target, src.n_filters, len(plan), len(todo), len(plan) - len(todo),
                         src.unreferenced, store_dtype.name)


def _prepare_target(target: str, wanted: dict) -> None:
    """Create the target, or check an existing one belongs to the same conversion."""
    import zarr

    if set(os.listdir(target)) - {LOCK_NAME}:
        if not os.path.exists(os.path.join(target, "zarr.json")):
            raise StoreError(
                f"target {target!r} exists, is not empty and is not a filterdb store; "
                "choose another target"
            )
        try:
            old = dict(zarr.open_group(target, mode="r").attrs).get(ATTR_KEY)
        except Exception:
            old = None
        if not isinstance(old, dict):
            raise StoreError(f"target {target!r} is a Zarr store but not a filterdb store")
        if old.get("source", {}).get("fingerprint") != wanted["source"]["fingerprint"]:
            raise StoreError(
                f"target {target!r} was converted from another source "
                f"({old.get('source', {}).get('path')!r}); choose another target or "
                "delete it"
            )
        for key in ("dtype", "codec", "chunks"):
            if old.get(key) != wanted[key]:
                raise StoreError(
                    f"target {target!r} was started with another {key} "
                    f"({old.get(key)!r:.60}); rerun with the same options or delete it"
                )
        return
    zarr.open_group(target, mode="a")
