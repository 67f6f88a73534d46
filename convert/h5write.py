"""Write a ``dataset.h5`` in the published layout (filters + pandas ``/meta``).

Used by the synthetic generator and by model ingest. Writing goes to a temporary
file beside the target, renamed into place only when complete, so a killed run
never leaves a file that looks finished. pandas/PyTables only ever open files made
here a moment before (PyTables unpickles the attributes of what it opens);
:func:`write_meta` puts a table into any other file with h5py.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable

import h5py
import numpy as np
import pandas as pd

#: layout name -> (dtype, per-filter shape)
FILTER_LAYOUTS = {
    "flat32": (np.float32, (9,)),
    "cube64": (np.float64, (3, 3)),
    "flat64": (np.float64, (9,)),
    "cube32": (np.float32, (3, 3)),
}


def _put_meta(path: str, meta: pd.DataFrame, meta_format: str) -> None:
    """``pandas.HDFStore.put`` into ``path``: only ever a file this process just created.

    PyTables unpickles attributes of the files it opens, so it never opens a file
    that came from elsewhere (see :func:`write_meta`).
    """
    if meta_format not in ("fixed", "table"):
        raise ValueError(f"meta_format {meta_format!r} is not 'fixed' or 'table'")
    with warnings.catch_warnings():
        # pandas warns that object columns are pickled: that is the published format
        warnings.simplefilter("ignore")
        with pd.HDFStore(path, mode="a") as store:
            store.put("meta", meta, format=meta_format, track_times=False)


def write_meta(target: h5py.Group, meta: pd.DataFrame, *, meta_format: str = "fixed") -> None:
    """Write ``meta`` as ``target['meta']`` in the layout ``pandas.read_hdf`` reads.

    ``target`` is an open h5py file (or group), typically one that was not made
    here: pandas writes the table into a new scratch file in a private folder and
    h5py copies the ``/meta`` group across, so neither pandas nor PyTables ever
    opens ``target``'s file. An existing ``meta`` is replaced.

    Parameters
    ----------
    target : open, writable h5py group.
    meta : the DataFrame (plain data: str, numbers, None/NaN).
    meta_format : 'fixed' or 'table'.
    """
    folder = tempfile.mkdtemp(prefix="filterdb-meta-")
    try:
        scratch = os.path.join(folder, "meta.h5")
        _put_meta(scratch, meta, meta_format)
        with h5py.File(scratch, "r") as src:
            if "meta" in target:
                del target["meta"]
            target.copy(src["meta"], "meta")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_dataset(
    path: str,
    pieces: Iterable[np.ndarray],
    n_filters: int,
    meta: pd.DataFrame,
    *,
    layout: str = "flat32",
    name: str = "filter",
    meta_format: str = "fixed",
    progress: Callable[[int, int], None] | None = None,
    kernel: int = 3,
) -> None:
    """Stream ``pieces`` of (m, K²) filters into ``path`` and add the meta table.

    Parameters
    ----------
    path : target file, replaced atomically at the end.
    pieces : iterable of (m, K²) arrays whose lengths add up to ``n_filters``.
    n_filters : total rows.
    meta : the meta DataFrame (index ``[model_id, conv_depth, conv_depth_norm]``).
    layout : key of :data:`FILTER_LAYOUTS`.
    name : 'filter' or 'filters'.
    meta_format : 'fixed' or 'table'.
    progress : optional callable ``(done_rows, total_rows)``.
    kernel : K; the layout's per-filter shape is ``(K²,)`` (flat) or ``(K, K)`` (cube).
    """
    dtype, shape = FILTER_LAYOUTS[layout]
    shape = (kernel * kernel,) if len(shape) == 1 else (kernel, kernel)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        # "w-": never write through a file or symlink someone placed at that name
        with h5py.File(tmp, "w-", libver="earliest", track_order=False) as f:
            dset = f.create_dataset(name, shape=(n_filters, *shape), dtype=dtype)
            done = 0
            for piece in pieces:
                m = len(piece)
                if done + m > n_filters:
                    raise ValueError(f"pieces hold more than the {n_filters} filters announced")
                dset[done : done + m] = np.asarray(piece, dtype=dtype).reshape(m, *shape)
                done += m
                if progress is not None:
                    progress(done, n_filters)
            if done != n_filters:
                raise ValueError(f"pieces hold {done} filters, {n_filters} were announced")
        t0 = int(time.time())
        _put_meta(tmp, meta, meta_format)  # tmp was created just above
        _clear_object_times(tmp, name, t0 - 2, int(time.time()) + 2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# v1 object header message "Object Modification Time" (type 0x0012, size 8, version 1)
_MTIME = re.compile(rb"\x12\x00\x08\x00.\x00\x00\x00\x01\x00\x00\x00(....)", re.S)


def _clear_object_times(path: str, skip: str, t0: int, t1: int) -> None:
    """Zero the modification times PyTables stamps into object headers.

    HDF5 records when each object was written; with those cleared, the same
    inputs give the same bytes. Only stamps from this write (``t0..t1``) outside
    the raw filter data are touched.
    """
    with h5py.File(path, "r") as f:
        offset = f[skip].id.get_offset()
        size = f[skip].id.get_storage_size()
    lo, hi = (offset, offset + size) if offset is not None else (0, 0)
    with open(path, "r+b") as fh:
        for start, stop in ((0, lo), (hi, os.path.getsize(path))):
            fh.seek(start)
            buf = fh.read(stop - start)
            for m in _MTIME.finditer(buf):
                if t0 <= int.from_bytes(m.group(1), "little") <= t1:
                    fh.seek(start + m.start(1))
                    fh.write(b"\0\0\0\0")
