"""Safe reading of a CNN Filter DB ``dataset.h5`` (docs/method.md §1).

The filters are read with h5py; the ``/meta`` table written by ``pandas.HDFStore``
(fixed or table format) is rebuilt from the raw HDF5 objects with h5py, never with
``pandas.read_hdf`` or PyTables, both of which unpickle whatever the file holds.
Pickles are decoded by :mod:`filterdb_dask.convert.safepickle`, which never unpickles.

A downloaded file may point elsewhere: every node is reached through :func:`node`,
which refuses external and soft links, external raw storage and virtual datasets,
and :func:`check_storage` refuses sizes the file does not back with data.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, field

import h5py
import numpy as np
import pandas as pd

from filterdb_dask.errors import InputError, UnsafePickleError
from filterdb_dask.storeformat import (
    DIRECT_ALIGN,
    MAX_KERNEL,
    MIN_KERNEL,
    aligned_empty,
    aligned_scratch,
)

from .safepickle import decode

FILTER_NAMES = ("filter", "filters")
INDEX_LEVELS = ("model_id", "conv_depth", "conv_depth_norm")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class Source:
    """A validated ``dataset.h5``: where its filters are and its layer table.

    Attributes
    ----------
    path : the file.
    name : the filter dataset's name ('filter' or 'filters').
    shape : its HDF5 shape, ``(N, K²)`` or ``(N, K, K)`` (the published DB: K = 3).
    dtype : its dtype.
    meta : the meta table as a DataFrame (original index and columns, cleaned
        ``Task``), plus int64 columns ``start`` and ``stop`` (rows ``[start, stop)``).
    unreferenced : number of filter rows no meta row references.
    """

    path: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    meta: pd.DataFrame
    unreferenced: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def n_filters(self) -> int:
        return int(self.shape[0])

    @property
    def kernel(self) -> int:
        """K of the K×K filters."""
        return kernel_of_shape(self.shape)


# ----------------------------------------------------------------------------- open
def open_h5(path: str) -> h5py.File:
    """Open ``path`` read-only with a one-line error for every way it can fail."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{path!r} is a directory, not an HDF5 file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path!r} is empty (0 bytes)")
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputError(f"{path!r} cannot be read: {exc}") from exc
    if not is_h5:
        raise InputError(f"{path!r} is not an HDF5 file")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise InputError(
            f"{path!r} cannot be opened as HDF5 (truncated or corrupt?): {exc}"
        ) from exc


def _where(obj) -> str:
    return f"{obj.file.filename!r} {obj.name}"


def node(group: h5py.Group, name: str) -> h5py.Dataset | h5py.Group:
    """``group[name]``, refusing every way HDF5 can point elsewhere.

    Only hard links are followed: an external link would open another file, a soft
    link can dangle or loop. A dataset is refused when its raw data lives outside the
    file (external storage) or in other datasets or files (virtual dataset).

    Raises
    ------
    InputError
        Missing, linked, external or virtual.
    """
    where = f"{group.file.filename!r} {group.name.rstrip('/')}/{name}"
    raw = name.encode("utf-8")
    if "/" in name or not group.id.links.exists(raw):
        raise InputError(f"{where} does not exist")
    kind = group.id.links.get_info(raw).type
    if kind == h5py.h5l.TYPE_EXTERNAL:
        filename, target = group.id.links.get_val(raw)
        raise InputError(
            f"{where} is an external link to {target.decode(errors='replace')!r} in "
            f"{filename.decode(errors='replace')!r}; links into other files are not followed"
        )
    if kind != h5py.h5l.TYPE_HARD:
        raise InputError(
            f"{where} is a soft or user-defined link, not a stored object; only plain "
            "objects are read (a link can dangle, loop or lead elsewhere)"
        )
    obj = group[name]
    if isinstance(obj, h5py.Dataset):
        if obj.is_virtual:
            raise InputError(
                f"{where} is a virtual dataset (its data lives in other datasets or files); "
                "only datasets stored in the file are read"
            )
        if obj.external:
            files = ", ".join(repr(e[0]) for e in obj.external[:3])
            raise InputError(
                f"{where} keeps its raw data in external file(s) {files}; only data stored "
                "in the file itself is read"
            )
    return obj


#: a chunked filter dataset above this size may compress at most MAX_RATIO:1
BOMB_MIN_BYTES = 256 << 20
MAX_RATIO = 64


def check_storage(dset: h5py.Dataset, *, max_bytes: int | None = None) -> None:
    """Refuse a dataset whose declared size is not backed by data in the file.

    A contiguous dataset must have its bytes allocated; a chunked one must have
    every chunk allocated (a few MB of file claiming 2**34 rows of fill values would
    otherwise be read for hours) and, when large, compress at most ``MAX_RATIO``:1.
    ``max_bytes`` bounds what is read into memory at once (meta nodes).

    Raises
    ------
    InputError
    """
    where = _where(dset)
    declared = math.prod(dset.shape or ()) * dset.dtype.itemsize
    if max_bytes is not None and declared > max_bytes:
        raise InputError(
            f"{where} declares {declared:,} bytes; a meta node may hold at most {max_bytes:,}"
        )
    if declared == 0:
        return
    layout = dset.id.get_create_plist().get_layout()
    stored = dset.id.get_storage_size()
    if layout == h5py.h5d.CONTIGUOUS:
        if dset.id.get_offset() is None or stored < declared:
            raise InputError(
                f"{where} declares {declared:,} bytes but the file stores {stored:,} of them "
                "(unwritten data); the file is incomplete or crafted"
            )
    elif layout == h5py.h5d.CHUNKED:
        chunks = dset.chunks
        expected = math.prod(-(-s // c) for s, c in zip(dset.shape, chunks, strict=True))
        allocated = dset.id.get_num_chunks()
        if allocated < expected:
            raise InputError(
                f"{where} declares {dset.shape[0]:,} rows in {expected:,} chunks but only "
                f"{allocated:,} chunks are stored (the rest would be fill values); the file "
                "is incomplete or crafted"
            )
        if declared > BOMB_MIN_BYTES and declared > MAX_RATIO * stored:
            raise InputError(
                f"{where} declares {declared:,} bytes stored in {stored:,} (compressed "
                f"{declared / max(stored, 1):,.0f}:1, limit {MAX_RATIO}:1); trained weights "
                "barely compress, so the file is crafted"
            )


def kernel_of_shape(shape) -> int | None:
    """K of a filter dataset of shape ``(N, K²)`` or ``(N, K, K)``, K in
    ``MIN_KERNEL..MAX_KERNEL``; None for any other shape (not square, too large)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and shape[1] == shape[2]:
        k = shape[1]
    elif len(shape) == 2 and shape[1] > 0:
        k = math.isqrt(shape[1])
        if k * k != shape[1]:
            return None
    else:
        return None
    return k if MIN_KERNEL <= k <= MAX_KERNEL else None


def has_link(group: h5py.Group, name: str) -> bool:
    """Whether ``group`` has a link ``name`` (of any kind), without following it."""
    return "/" not in name and group.id.links.exists(name.encode("utf-8"))


def find_filters(f: h5py.File, path: str, name: str | None = None) -> h5py.Dataset:
    """The filter dataset: ``name``, else 'filter' or 'filters' (docs/method.md §1)."""
    names = [name] if name else [n for n in FILTER_NAMES if has_link(f, n)]
    if name and not has_link(f, name):
        raise InputError(f"{path!r} has no dataset {name!r} (it holds {sorted(f)!r})")
    if not names:
        raise InputError(
            f"{path!r} has no filter dataset: looked for 'filter' and 'filters', "
            f"found {sorted(f)!r}"
        )
    if len(names) > 1:
        raise InputError(
            f"{path!r} holds both 'filter' and 'filters'; choose one with `filters_name`"
        )
    dset = node(f, names[0])
    if not isinstance(dset, h5py.Dataset):
        raise InputError(f"{path!r}: {names[0]!r} is a group, not a dataset")
    shape = dset.shape
    if kernel_of_shape(shape) is None:
        raise InputError(
            f"{path!r}: filter dataset {names[0]!r} has shape {shape!r}; expected square "
            f"K×K filters, (N, K²) or (N, K, K) with K in {MIN_KERNEL}..{MAX_KERNEL} "
            "(the published DB: (N, 9) or (N, 3, 3))"
        )
    if dset.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{path!r}: filter dataset {names[0]!r} has dtype {dset.dtype}; "
            "expected float16, float32 or float64"
        )
    if shape[0] == 0:
        raise InputError(f"{path!r}: filter dataset {names[0]!r} holds no filters")
    offset = dset.id.get_offset()
    need = int(np.prod(shape)) * dset.dtype.itemsize
    if offset is not None and offset + need > os.path.getsize(path):
        raise InputError(
            f"{path!r} is truncated: filter dataset {names[0]!r} needs bytes up to "
            f"{offset + need:,} but the file has {os.path.getsize(path):,}"
        )
    check_storage(dset)
    return dset


# ---------------------------------------------------------------------- attributes
#: largest pickled attribute decoded (PyTables keeps column lists there)
MAX_ATTR_PICKLE = 16 << 20
#: largest meta node read into memory
MAX_META_NODE = 256 << 20


def _attr(obj, key: str, default=None, *, pickled: bool = False):
    """Read an attribute; PyTables' pickled attributes are decoded, never unpickled.

    PyTables marks nothing: it unpickles every bytes attribute ending in '.', and so
    do we with :func:`filterdb_dask.convert.safepickle.decode` (``pickled=True`` where the value is
    always a pickle). Text that merely ends in '.' is kept as text when it cannot be
    a pickle (one line of UTF-8); anything else that does not decode is refused.
    """
    if key not in obj.attrs:
        return default
    where = f"{_where(obj)} attribute {key!r}"
    try:
        value = obj.attrs[key]
    except (OSError, TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{where} cannot be read: {exc}") from exc
    if isinstance(value, h5py.Empty):
        return default
    if isinstance(value, np.ndarray) and value.dtype.kind == "V":
        value = value.tobytes()
    if isinstance(value, bytes | np.bytes_):
        raw = bytes(value)
        if pickled or raw.endswith(b"."):
            try:
                return decode(raw, where=where, max_bytes=MAX_ATTR_PICKLE)
            except UnsafePickleError:
                if pickled or not _plain_text(raw):
                    raise
        return raw.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def meta_format(f: h5py.File, path: str, key: str = "meta") -> str:
    """'fixed' or 'table': how pandas stored ``/key``."""
    kind = _attr(node(f, key), "pandas_type")
    if kind not in ("frame", "frame_table"):
        raise InputError(f"{path!r} /{key} is not a pandas DataFrame (pandas_type {kind!r})")
    return "table" if kind == "frame_table" else "fixed"


#: most objects whose attributes :func:`check_attribute_pickles` reads
MAX_SCANNED_OBJECTS = 1 << 20


def check_attribute_pickles(f: h5py.File, path: str) -> None:
    """Refuse a file whose attributes hold a pickle PyTables would run on opening.

    PyTables unpickles every bytes attribute ending in '.' of the nodes it touches;
    each such attribute of every object in the file must decode as plain data.

    Raises
    ------
    UnsafePickleError, InputError
    """
    objs = [f]
    f.visititems(lambda _name, obj: objs.append(obj) if len(objs) <= MAX_SCANNED_OBJECTS
                 else True)
    if len(objs) > MAX_SCANNED_OBJECTS:
        raise InputError(f"{path!r} holds more than {MAX_SCANNED_OBJECTS:,} objects")
    for obj in objs:
        for key in obj.attrs:
            _attr(obj, key)


def _plain_text(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return text.isprintable()


# ----------------------------------------------------------------------------- meta
def read_meta(f: h5py.File, path: str, key: str = "meta") -> pd.DataFrame:
    """Rebuild the pandas DataFrame stored under ``key`` without unpickling anything.

    Every node is reached through :func:`node` (no links, no external or virtual
    data) and bounded by :func:`check_storage`; pickles go to
    :func:`filterdb_dask.convert.safepickle.decode`.
    """
    if not has_link(f, key):
        raise InputError(f"{path!r} has no meta table '/{key}' (it holds {sorted(f)!r})")
    g = node(f, key)
    if not isinstance(g, h5py.Group):
        raise InputError(f"{path!r}: '/{key}' is not a pandas table")
    where = f"{path!r} /{key}"
    kind = _attr(g, "pandas_type")
    try:
        if kind == "frame":
            return _read_fixed_frame(g, where)
        if kind == "frame_table":
            return _read_table_frame(g, where)
    except (InputError, UnsafePickleError):
        raise
    except (KeyError, ValueError, IndexError, TypeError, OSError, RuntimeError) as exc:
        raise InputError(f"{where} is not a readable pandas table: {exc}") from exc
    raise InputError(f"{where} is not a pandas DataFrame (pandas_type {kind!r})")


def _dataset(g: h5py.Group, name: str) -> h5py.Dataset:
    dset = node(g, name)
    if not isinstance(dset, h5py.Dataset):
        raise InputError(f"{_where(dset)} is a group where pandas keeps a dataset")
    check_storage(dset, max_bytes=MAX_META_NODE)
    return dset


def _decode_strings(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "S":
        return np.array([v.decode("utf-8") for v in arr.ravel()], dtype=object).reshape(
            arr.shape
        )
    return arr


def _read_array(dset: h5py.Dataset) -> np.ndarray:
    """One fixed-format node: plain array, or pickled object array (VLArray)."""
    if _attr(dset, "CLASS") == "VLARRAY":
        if dset.shape[:1] == (0,):
            raise InputError(f"{_where(dset)} holds no pickled array")
        raw = np.asarray(dset[0]).tobytes()
        arr = decode(raw, where=_where(dset))
        if not isinstance(arr, np.ndarray):
            raise InputError(f"{_where(dset)} does not hold an array")
        return arr
    arr = dset[()]
    if dset.id.get_type().get_class() == h5py.h5t.BITFIELD:
        arr = arr.astype(bool)  # PyTables stores numpy bools as 8-bit bitfields
    kind = _attr(dset, "kind")
    if kind == "string" or arr.dtype.kind == "S":
        arr = _decode_strings(arr)
    return arr


def _index_from(g: h5py.Group, axis: str, where: str) -> pd.Index:
    variety = _attr(g, f"{axis}_variety")
    if variety == "multi":
        nlev = int(_attr(g, f"{axis}_nlevels"))
        levels, codes, names = [], [], []
        for i in range(nlev):
            lev = _dataset(g, f"{axis}_level{i}")
            levels.append(_read_array(lev))
            codes.append(_dataset(g, f"{axis}_label{i}")[()])
            names.append(_label(_attr(lev, "name"), lev))
        return pd.MultiIndex(levels=levels, codes=codes, names=names)
    if variety != "regular":
        raise InputError(f"{where}: unsupported index variety {variety!r}")
    dset = _dataset(g, axis)
    values = _read_array(dset)
    name = _label(_attr(dset, "name"), dset)
    if _attr(dset, "kind") == "datetime64":
        values = values.astype("datetime64[ns]")
    return pd.Index(values, name=name)


def _label(value, obj):
    """An index or column name: None, text or a number (a pickle may say anything)."""
    if value is None or isinstance(value, str | int | float):
        return value
    raise InputError(f"{_where(obj)}: a name is {type(value).__name__}, not text or a number")


def _read_fixed_frame(g: h5py.Group, where: str) -> pd.DataFrame:
    columns = _index_from(g, "axis0", where)
    index = _index_from(g, "axis1", where)
    n = len(index)
    data: dict = {}
    for b in range(int(_attr(g, "nblocks", 0))):
        items = _index_from(g, f"block{b}_items", where)
        dset = _dataset(g, f"block{b}_values")
        values = _read_array(dset)
        if _attr(dset, "CLASS") == "VLARRAY":
            values = values.T  # object blocks are stored items x rows
        values = np.asarray(values).reshape(n, len(items)) if values.size == n * len(
            items
        ) else values
        if _attr(dset, "value_type") == "datetime64":
            values = values.astype("datetime64[ns]")
        for j, col in enumerate(items):
            data[col] = values[:, j]
    missing = [c for c in columns if c not in data]
    if missing:
        raise InputError(f"{where}: columns {missing!r} have no data blocks")
    df = pd.DataFrame({c: data[c] for c in columns}, index=index)
    df.columns = columns
    return df


def _names(value, obj, what: str) -> list:
    """A list of column names from a pickled attribute, checked."""
    if isinstance(value, list | tuple) and all(
        isinstance(v, str | int | float) for v in value
    ):
        return list(value)
    raise InputError(f"{_where(obj)}: {what} is not a list of names ({str(value)[:60]!r})")


def _read_table_frame(g: h5py.Group, where: str) -> pd.DataFrame:
    t = _dataset(g, "table")
    rows = t[()]
    if rows.dtype.names is None:
        raise InputError(f"{_where(t)} is not a table (no fields)")
    encoding = _attr(g, "encoding", "UTF-8") or "UTF-8"
    nan_rep = _attr(g, "nan_rep", "nan")
    non_index = _attr(g, "non_index_axes", [], pickled=True)
    if non_index and not (
        isinstance(non_index, list) and isinstance(non_index[0], tuple) and len(non_index[0]) == 2
    ):
        raise InputError(f"{_where(g)}: non_index_axes is not [(axis, [names])]")
    order = _names(non_index[0][1], g, "non_index_axes") if non_index else []
    levels = _attr(g, "levels", None)
    levels = _names(levels, g, "levels") if levels else None
    cols: dict = {}
    for field_name in rows.dtype.names:
        if field_name == "index":
            continue
        meta_kind = _attr(t, f"{field_name}_meta", None)
        if meta_kind == "category":
            raise InputError(
                f"{where}: categorical column {field_name!r} is not supported; "
                "re-save the meta table with plain columns"
            )
        names = _names(_attr(t, f"{field_name}_kind", [field_name], pickled=True), t,
                       f"{field_name}_kind")
        values = rows[field_name]
        if values.ndim == 1:
            values = values[:, None]
        col_nan = _attr(t, f"{field_name}_nan_rep", nan_rep)
        for j, name in enumerate(names):
            v = values[:, j]
            if v.dtype.kind == "S":
                dec = np.array([s.decode(encoding) for s in v], dtype=object)
                dec[dec == col_nan] = np.nan
                v = dec
            dtype = _attr(t, f"{field_name}_dtype", None)
            if dtype == "bool":
                v = v.astype(bool)
            elif isinstance(dtype, str) and dtype.startswith("datetime64"):
                v = v.astype("datetime64[ns]")
            cols[name] = v
    df = pd.DataFrame(cols)
    if order:
        df = df[[c for c in order if c in df.columns] + [c for c in df if c not in order]]
    if levels:
        df = df.set_index(levels)
    elif "index" in rows.dtype.names:
        idx = rows["index"]
        if idx.dtype.kind == "S":
            idx = _decode_strings(idx)
        df.index = pd.Index(idx)
    return df


# --------------------------------------------------------------------- filter ids
_RANGE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_filter_ids(values, n_filters: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    """``[start, stop)`` rows from ``filter_ids`` ("a:b" inclusive, or int lists).

    Raises
    ------
    InputError
        Malformed, decreasing, out of range, non-contiguous list, or overlapping.
    """
    n = len(values)
    start = np.empty(n, dtype=np.int64)
    stop = np.empty(n, dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, bytes | np.bytes_):
            v = bytes(v).decode("utf-8")
        if isinstance(v, str):
            m = _RANGE.match(v)
            if not m:
                raise InputError(
                    f"{path!r}: filter_ids {v!r} in meta row {i} is not 'start:end'"
                )
            a, b = int(m.group(1)), int(m.group(2))
        elif isinstance(v, list | tuple | np.ndarray):
            ids = np.asarray(v).ravel()
            if ids.size == 0 or ids.dtype.kind not in "iu":
                raise InputError(
                    f"{path!r}: filter_ids in meta row {i} is not a non-empty list of "
                    f"integers ({str(v)[:60]!r})"
                )
            a, b = int(ids[0]), int(ids[-1])
            if not np.array_equal(ids, np.arange(a, a + ids.size)):
                raise InputError(
                    f"{path!r}: filter_ids list in meta row {i} is not a contiguous "
                    f"ascending range ({str(ids[:6].tolist())[:60]}...)"
                )
        else:
            raise InputError(
                f"{path!r}: filter_ids {v!r} in meta row {i} is neither 'start:end' "
                "nor a list of ints"
            )
        if b < a:
            raise InputError(
                f"{path!r}: filter_ids {a}:{b} in meta row {i} is decreasing (end < start)"
            )
        if a < 0 or b >= n_filters:
            raise InputError(
                f"{path!r}: filter_ids {a}:{b} in meta row {i} lies outside the filter "
                f"array (N={n_filters}); the file is truncated or the meta belongs to "
                "another file"
            )
        start[i], stop[i] = a, b + 1
    order = np.argsort(start, kind="stable")
    s, e = start[order], stop[order]
    bad = np.nonzero(s[1:] < e[:-1])[0]
    if len(bad):
        i, j = order[bad[0]], order[bad[0] + 1]
        raise InputError(
            f"{path!r}: filter_ids of meta rows {i} ({start[i]}:{stop[i] - 1}) and "
            f"{j} ({start[j]}:{stop[j] - 1}) overlap"
        )
    return start, stop


def normalize_meta(meta: pd.DataFrame, n_filters: int, path: str) -> tuple[pd.DataFrame, int]:
    """Clean the meta table (docs/method.md §1) and add ``start``/``stop``.

    Index levels named model_id/conv_depth/conv_depth_norm are also made columns;
    v0.1.0's ``Datatype`` becomes ``Visual Category``; every ``Task`` containing
    "Segmentation" becomes "Segmentation". Unknown columns are kept.

    Returns
    -------
    (meta, unreferenced_rows)
    """
    if len(meta) == 0:
        raise InputError(f"{path!r}: the meta table has no rows")
    meta = meta.copy()
    for name in meta.index.names:
        if name in INDEX_LEVELS and name not in meta.columns:
            meta[name] = meta.index.get_level_values(name)
    if "Visual Category" not in meta.columns and "Datatype" in meta.columns:
        meta["Visual Category"] = meta["Datatype"]
    missing = [c for c in (*INDEX_LEVELS, "filter_ids") if c not in meta.columns]
    if missing:
        raise InputError(
            f"{path!r}: the meta table lacks {missing!r} (columns: {list(meta.columns)[:12]!r})"
        )
    if "Task" in meta.columns:
        meta["Task"] = clean_task(meta["Task"])
    start, stop = parse_filter_ids(list(meta["filter_ids"]), n_filters, path)
    meta["start"] = start
    meta["stop"] = stop
    unreferenced = int(n_filters - (stop - start).sum())
    return meta, unreferenced


def clean_task(task: pd.Series) -> pd.Series:
    """Every value containing 'Segmentation' becomes 'Segmentation' (docs/method.md §1)."""
    out = task.astype(object).copy()
    seg = out.map(lambda v: isinstance(v, str) and "Segmentation" in v).astype(bool)
    out[seg] = "Segmentation"
    return out


def read_source(path: str, *, name: str | None = None) -> Source:
    """Open and validate a ``dataset.h5``: filter dataset, safe meta, layer rows.

    Parameters
    ----------
    path : the file.
    name : the filter dataset's name; default: 'filter' or 'filters', whichever exists.

    Raises
    ------
    InputError
        With a one-line message for every way the file can be unusable.
    """
    path = os.fspath(path)
    with open_h5(path) as f:
        dset = find_filters(f, path, name)
        raw = read_meta(f, path)
        meta, unref = normalize_meta(raw, dset.shape[0], path)
        return Source(
            path=path,
            name=dset.name.lstrip("/"),
            shape=tuple(dset.shape),
            dtype=dset.dtype,
            meta=meta,
            unreferenced=unref,
        )


def read_rows(path: str, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the filter dataset as an (n, K²) array.

    A contiguous dataset (the published ``dataset.h5``) is read straight from its
    bytes in the file, bypassing the page cache (:func:`_read_direct`): the values
    h5py would return, bit for bit, without the cost of caching tens of GB read once
    (on the project's test VM, 200 M filters: 15.3–15.8 s of system time against 1.5–2.1).
    Anything else, or a file system without direct I/O, is read by h5py.
    """
    with h5py.File(path, "r", locking=False) as f:
        d = node(f, name)  # re-checked: the file may have changed since read_source
        width = math.prod(d.shape[1:])
        where = _contiguous_bytes(d)
        if where is None:
            return d[start:stop].reshape(stop - start, -1)
        dtype = d.dtype
        out = _read_direct(path, where + start * width * dtype.itemsize,
                           (stop - start, width), dtype)
        if out is None:
            out = d[start:stop].reshape(stop - start, -1)
    return out


def read_blocks(path: str, name: str, start: int, stop: int, rows: int):
    """Rows ``[start, stop)`` of the filter dataset as consecutive (n, K²) blocks of
    ``rows`` rows (the last one shorter), read as :func:`read_rows` reads (directly
    from a contiguous dataset's bytes, else by h5py), the file opened once.

    Each block of a direct read lies in this thread's reused buffer: it is valid
    until the next block is asked for. A converter streaming a chunk through its
    digest, check and encoder this way holds one block in memory, not the chunk: on
    the 20 M benchmark file, the page faults of fresh chunk-sized buffers were a
    quarter of a conversion's CPU time.
    """
    with h5py.File(path, "r", locking=False) as f:
        d = node(f, name)
        width = math.prod(d.shape[1:])
        where = _contiguous_bytes(d)
        dtype = d.dtype
        fd = -1
        if where is not None and getattr(os, "O_DIRECT", 0):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                fd = -1
        try:
            for a in range(start, stop, rows):
                b = min(stop, a + rows)
                out = None
                if fd >= 0:
                    out = _read_direct_fd(fd, where + a * width * dtype.itemsize,
                                          (b - a, width), dtype, _block_scratch)
                if out is None:
                    out = d[a:b].reshape(b - a, -1)
                yield out
        finally:
            if fd >= 0:
                os.close(fd)


def _block_scratch(n: int) -> np.ndarray:
    """This thread's aligned buffer of at least ``n`` bytes for :func:`read_blocks`."""
    return aligned_scratch(_blocks, n)


_blocks = threading.local()


def _contiguous_bytes(d: h5py.Dataset) -> int | None:
    """The file offset of a contiguous, allocated dataset of plain floats stored
    in the file itself (its values are then ``shape × itemsize`` raw bytes from
    there); None for any other layout."""
    if d.dtype.newbyteorder("=") not in FLOAT_DTYPES:  # either byte order
        return None
    dcpl = d.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_external_count():
        return None
    offset = d.id.get_offset()
    if offset is None or d.id.get_storage_size() < math.prod(d.shape) * d.dtype.itemsize:
        return None
    return int(offset)


def _read_direct(path: str, offset: int, shape: tuple[int, int],
                 dtype: np.dtype) -> np.ndarray | None:
    """``shape`` values of ``dtype`` at byte ``offset`` of ``path``, read with
    ``O_DIRECT`` (the whole aligned blocks around them, into a new aligned buffer
    that the result is a view of where the values are aligned, else copied from);
    None when the OS or the file system refuses direct I/O or the file ends early
    (the caller reads through h5py, which reports it)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | direct | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        return _read_direct_fd(fd, offset, shape, dtype, aligned_empty)
    finally:
        os.close(fd)


def _read_direct_fd(fd: int, offset: int, shape: tuple[int, int], dtype: np.dtype,
                    buffer) -> np.ndarray | None:
    """:func:`_read_direct` from ``fd`` (opened with ``O_DIRECT``) into
    ``buffer(nbytes)``, an aligned buffer (None: refused, or the file ends early)."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if nbytes == 0:
        return None
    lo = offset - offset % DIRECT_ALIGN
    hi = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
    buf = buffer(hi - lo)
    try:
        got = 0
        while got < buf.size:
            n = os.preadv(fd, [buf[got:]], lo + got)
            if n == 0:
                break
            got += n
    except OSError:
        return None
    start = offset - lo
    if got < start + nbytes:
        return None
    values = buf[start:start + nbytes]
    if start % dtype.itemsize == 0:  # aligned for the dtype: no copy
        return values.view(dtype).reshape(shape)
    out = np.empty(shape, dtype=dtype)
    out.reshape(-1).view(np.uint8)[...] = values
    return out
