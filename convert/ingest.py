"""Build or extend a filter DB from model files (ONNX, PyTorch, safetensors, Keras).

``ingest(models, into)`` appends every model's KxK filters (``kernel=K``, 3 by
default; depthwise and grouped convolutions included: each output channel x input
channel of its group is one filter) and one meta row per layer with KxK kernels to
a ``dataset.h5`` (new, or one written by this tool: its filter dataset is
extendable) or to a converted store (new chunks are added; what is there is not
rewritten). A DB holds one kernel size: adding KxK filters to a DB of another size
is refused. Models get new ids after the largest one present.
A model whose content hash is already in the DB is refused unless ``force``.
A model without KxK kernels is skipped with a warning: it has no rows to add.
Fields beyond the descriptive ones (``--meta epoch=5``, or a meta file's other
columns) become meta columns of their own, so a series of checkpoints ingested in
a loop can later be grouped by epoch.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd

from filterdb_dask.errors import InputError
from filterdb_dask.storeformat import MAX_KERNEL, MIN_KERNEL

from .onnx_extract import FILTER_K, ModelInfo, read_onnx

DESCRIPTIVE = ("Task", "Visual Category", "Training-Dataset", "Pretraining-Dataset", "Paper",
               "Accessible", "Dataset URL")
INDEX = ["model_id", "conv_depth", "conv_depth_norm"]


@dataclass
class IngestResult:
    into: str
    models: list[str]
    skipped: list[str]
    filters: int
    layers: int


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
TORCH_EXTS = (".pt", ".pth", ".ckpt", ".bin")


def model_format(path: str) -> str:
    """``onnx``, ``torch``, ``safetensors`` or ``keras``, from the file's content first.

    HDF5 content (a Keras ``.h5`` / ``.weights.h5``, whatever the extension) is told
    from a filter DB by its layout; a ``.keras`` archive is Keras 3; a safetensors file
    by its extension or its header (8-byte length, then ``{``), a sharded one by its
    ``.safetensors.index.json`` or the folder holding it; PyTorch by extension;
    anything else is read as ONNX.
    """
    if os.path.isdir(path):
        return "safetensors"
    low = path.lower()
    if low.endswith((".safetensors", ".safetensors.index.json")):
        return "safetensors"
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        head = b""  # the reader names the problem
    if head[:8] == HDF5_MAGIC or low.endswith(".keras"):
        return "keras"
    if low.endswith(TORCH_EXTS):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    return "onnx"


def _keras_or_db(path: str) -> None:
    """Refuse an HDF5 file that is not a Keras model (a filter DB given as a model)."""
    import h5py

    from .keras_extract import keras_layout

    try:
        with h5py.File(path, "r") as f:
            if keras_layout(f) is not None:
                return
            # links are looked at, not followed
            is_db = f.get("meta", getlink=True) is not None and any(
                f.get(k, getlink=True) is not None for k in ("filter", "filters"))
    except OSError as exc:
        raise InputError(f"{path!r} is not a readable HDF5 file ({exc})") from exc
    if is_db:
        raise InputError(f"{path!r} is a filter DB, not a model; to add models to it pass it "
                         "as --into")
    raise InputError(f"{path!r} is HDF5 but not a Keras weights file (no layer_names "
                     "attribute, no layers/ group)")


def read_model(path: str, *, name: str | None = None) -> ModelInfo:
    """One model file: ONNX, PyTorch state dict, safetensors or Keras HDF5.

    See :func:`model_format` for how the format is chosen.
    """
    path = os.fspath(path)
    fmt = model_format(path)
    if fmt == "keras":
        if not path.lower().endswith(".keras"):
            _keras_or_db(path)
        from .keras_extract import read_keras

        return read_keras(path, name=name)
    if fmt == "safetensors":
        from .safetensors_extract import read_safetensors

        return read_safetensors(path, name=name)
    if fmt == "torch":
        from .torch_extract import read_state_dict

        return read_state_dict(path, name=name)
    return read_onnx(path, name=name)


def load_side_info(path: str | None) -> dict[str, dict]:
    """Per-model descriptive fields from a CSV or YAML file keyed by file name.

    CSV: a column ``model`` (file name) and columns such as ``Task``,
    ``Visual Category``, ``Training-Dataset``. YAML: ``{file name: {field: value}}``,
    read with ``yaml.safe_load`` (no Python tags). Values must be plain scalars.

    Raises
    ------
    InputError
        Missing, unreadable or malformed file, or a value that is not a scalar.
    """
    if not path:
        return {}
    if not os.path.isfile(path):
        raise InputError(f"meta file {path!r} does not exist")
    if path.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"meta file {path!r} is not readable YAML: {first}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise InputError(f"meta file {path!r} must map model file names to fields")
        table = {os.path.basename(str(k)): v for k, v in data.items()}
    else:
        try:
            df = pd.read_csv(path)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"meta file {path!r} is not readable CSV: {first}") from exc
        if "model" not in df.columns:
            raise InputError(f"meta file {path!r} needs a 'model' column (file names)")
        table = {os.path.basename(str(r.pop("model"))): r for r in df.to_dict("records")}
    for model, fields in table.items():
        for key, value in list(fields.items()):
            if isinstance(value, datetime.date):  # YAML reads 2022-06-01 as a date
                fields[key] = value = value.isoformat()
            if not isinstance(key, str) or not (
                value is None or isinstance(value, str | int | float | bool)
            ):
                raise InputError(
                    f"meta file {path!r}: field {str(key)[:40]!r} of {model[:60]!r} is "
                    f"{type(value).__name__}; fields are text or numbers"
                )
    return table


def parse_meta_values(items) -> dict:
    """``["epoch=5", "lr=1e-3", "run=a"]`` -> ``{"epoch": 5, "lr": 0.001, "run": "a"}``.

    A value that reads as an integer is stored as one, else as a finite float,
    else as text, so numeric columns group and sort numerically.

    Raises
    ------
    InputError
        An item without ``=``, with an empty name, or a name given twice.
    """
    out: dict = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"`meta` {str(item)[:80]!r} must read NAME=VALUE (e.g. epoch=5)")
        if key in out:
            raise InputError(f"`meta` {key[:40]!r} is given twice")
        out[key] = _meta_value(text.strip())
    return out


def _meta_value(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        x = float(text)
    except ValueError:
        return text
    return x if np.isfinite(x) else text


def validate_kernel(kernel) -> int:
    """K as an int in ``MIN_KERNEL..MAX_KERNEL``; InputError otherwise."""
    try:
        k = int(kernel)
        ok = float(kernel) == k
    except (TypeError, ValueError):
        ok = False
    if not ok or not MIN_KERNEL <= k <= MAX_KERNEL:
        raise InputError(f"kernel size {str(kernel)[:20]!r} must be an integer in "
                         f"{MIN_KERNEL}..{MAX_KERNEL} (K of the KxK filters: 3, 5, 7, ...)")
    return k


def model_table(info: ModelInfo, model_id: int, start: int, fields: dict,
                kernel: int = FILTER_K) -> tuple:
    """Meta rows and (n, K²) filters of one model's KxK layers, rows starting at ``start``."""
    layers = info.filter_layers(kernel)
    if not layers:
        return None, None
    max_depth = max(lay.conv_depth for lay in layers)
    rows, blocks = [], []
    pos = start
    kc = info.kernel_counts()
    nk = kc.get(f"({kernel}, {kernel}) filters", 0)
    for lay in layers:
        w = lay.weights.reshape(-1, kernel * kernel)
        blocks.append(w)
        rows.append({
            "model_id": model_id,
            "conv_depth": lay.conv_depth,
            "conv_depth_norm": lay.conv_depth / max_depth if max_depth else 0.0,
            "filter_ids": f"{pos}:{pos + len(w) - 1}",
            "model": os.path.basename(info.path),
            "Name": fields.get("Name", info.name),
            "producer": info.producer,
            "op_set": info.op_set if info.op_set is not None else np.nan,
            "depth": info.depth,
            "layer": lay.node,
            **lay.shape_fields(),
            "model_sha256": info.sha256,
            "total_filters": info.total_filters,
            f"{kernel}x{kernel}_filter_share": (nk / info.total_filters if info.total_filters
                                                else np.nan),
            **{k: v for k, v in kc.items()},
            **{f"op {k}" if k in ("model", "depth") else k: v
               for k, v in info.op_counts.items()},
            **{k: fields.get(k, np.nan) for k in DESCRIPTIVE},
        })
        clash = [k for k in fields if k != "Name" and k not in DESCRIPTIVE
                 and (k in rows[-1] or k in ("filter", "start", "stop", "chunk"))]
        if clash:
            raise InputError(f"meta field {clash[0][:40]!r} of {info.path!r} would replace a "
                             "column ingest computes; give it another name")
        rows[-1].update({k: v for k, v in fields.items()
                         if k != "Name" and k not in DESCRIPTIVE})
        pos += len(w)
    return pd.DataFrame(rows), np.concatenate(blocks)


def _existing(into: str):
    """(raw meta or None, n_filters, kind, K or None) of the target."""
    if into.endswith(".zarr") or os.path.isdir(into):
        if not os.path.exists(into):
            return None, 0, "new-store", None
        from filterdb_dask.store import open_store

        st = open_store(into)
        return (st.meta.drop(columns=["start", "stop", "chunk"]), st.n_filters, "store",
                st.kernel)
    if not os.path.exists(into):
        return None, 0, "new-h5", None
    from .read import check_attribute_pickles, find_filters, kernel_of_shape, open_h5, read_meta

    with open_h5(into) as f:
        dset = find_filters(f, into)
        meta = read_meta(f, into)
        # the file is extended, not rewritten: refuse one that would run code in pandas
        check_attribute_pickles(f, into)
        return meta, dset.shape[0], "h5", kernel_of_shape(dset.shape)


def ingest(
    models: list[str],
    into: str,
    *,
    fields: dict | None = None,
    meta_file: str | None = None,
    force: bool = False,
    infos: list[ModelInfo] | None = None,
    kernel: int | None = None,
) -> IngestResult:
    """Add models to a dataset.h5 or a store.

    Parameters
    ----------
    models : ONNX, PyTorch, safetensors or Keras files (see :func:`model_format`).
    into : target ``.h5`` (created if missing) or store directory.
    fields : descriptive fields for every model (Task, Visual Category, ...).
    meta_file : CSV/YAML with per-model fields (overrides ``fields``).
    force : add a model even if its content hash is already in the DB.
    infos : already extracted models (Python API, e.g. :func:`read_module`).
    kernel : K: the KxK kernels become filters of K² values (default: the package
        config's ``filterdb_dask.ingest.kernel``, 3). A DB holds one K: a target of
        another K is refused.

    Raises
    ------
    InputError, StoreError
    """
    fields = dict(fields or {})
    if kernel is None:
        from filterdb_dask import config

        kernel = config.get("ingest.kernel")
    kernel = validate_kernel(kernel)
    side = load_side_info(meta_file)
    infos = list(infos or []) + [read_model(p, name=None) for p in models]
    if not infos:
        raise InputError("no models given")
    meta, n_existing, kind, held = _existing(into)
    if held is not None and held != kernel:
        raise InputError(f"{into!r} holds {held}x{held} filters; a DB holds one kernel size, "
                         f"so {kernel}x{kernel} filters cannot be added (ingest with kernel "
                         f"{held}, or into another target)")
    seen = set()
    if meta is not None and "model_sha256" in meta.columns:
        seen = set(meta["model_sha256"].dropna().astype(str))
    next_id = 0
    if meta is not None:
        ids = meta.index.get_level_values("model_id") if "model_id" in meta.index.names \
            else meta["model_id"]
        next_id = int(np.max(ids)) + 1 if len(ids) else 0
    tables, filters, added, skipped = [], [], [], []
    pos = n_existing
    for info in infos:
        if info.sha256 in seen and not force:
            raise InputError(f"{info.path!r} is already in {into!r} (same content hash "
                             f"{info.sha256[:12]}); pass `force` to add it again")
        seen.add(info.sha256)
        f = {**fields, **side.get(os.path.basename(info.path), {})}
        table, w = model_table(info, next_id, pos, f, kernel)
        if table is None:
            warnings.warn(f"{info.path!r} has no {kernel}x{kernel} conv kernels; skipped",
                          stacklevel=2)
            skipped.append(info.path)
            continue
        tables.append(table)
        filters.append(w)
        added.append(info.path)
        pos += len(w)
        next_id += 1
    if not tables:
        raise InputError(f"none of the models has {kernel}x{kernel} conv kernels; nothing was "
                         "added")
    new = pd.concat(tables, ignore_index=True)
    # an operator or kernel shape a model lacks occurs 0 times in it, not "unknown"
    counted = set().union(*(i.op_counts for i in infos), *(i.kernel_counts() for i in infos))
    cols = [c for c in new.columns if c in counted or f"op {c}" in counted]
    new[cols] = new[cols].fillna(0).astype(np.int64)
    x = np.concatenate(filters)
    if kind in ("new-h5", "h5"):
        _append_h5(into, meta, new, x)
    else:
        _append_store(into, meta, new, x, kind, kernel)
    return IngestResult(into, added, skipped, len(x), len(new))


def _combined_meta(meta, new: pd.DataFrame) -> pd.DataFrame:
    if meta is None:
        return new.set_index(INDEX)
    names = [n for n in meta.index.names if n is not None]
    drop = bool(names) and all(n in meta.columns for n in names)
    old = meta.reset_index(drop=drop)
    both = pd.concat([old, new], ignore_index=True, sort=False)
    return both.set_index(INDEX)


def _append_h5(path: str, meta, new: pd.DataFrame, x: np.ndarray) -> None:
    """Create or extend an ingest ``.h5`` with h5py only (never pandas/PyTables on it)."""
    from .h5write import write_meta
    from .read import find_filters, meta_format

    if meta is None:
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with h5py.File(tmp, "w-") as f:  # never through a file placed at that name
                d = x.shape[1]
                f.create_dataset("filter", data=x.astype(np.float32), maxshape=(None, d),
                                 chunks=(min(len(x), 1 << 16), d))
                write_meta(f, _combined_meta(None, new), meta_format="table")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    with h5py.File(path, "a", locking=False) as f:
        d = find_filters(f, path)
        if d.maxshape[0] is not None:
            raise InputError(
                f"the filter dataset of {path!r} cannot grow (it was written contiguous, like "
                "the published file); ingest into a new .h5 file or into a converted store"
            )
        fmt = meta_format(f, path)
        n0 = d.shape[0]
        d.resize(n0 + len(x), axis=0)
        d[n0:] = x.astype(d.dtype).reshape(len(x), *d.shape[1:])
        write_meta(f, _combined_meta(meta, new), meta_format=fmt)


def _append_store(path: str, meta, new: pd.DataFrame, x: np.ndarray, kind: str,
                  kernel: int = FILTER_K) -> None:
    """Plan the new rows' chunks, then append them through the store format (locked)."""
    from filterdb_dask import config
    from filterdb_dask import storeformat as fmt

    from .plan import chunk_layers, plan_chunks
    from .read import normalize_meta

    new_store = None
    if kind == "new-store":
        target = config.get("convert.chunk-filters")
        new_store = {"dtype": "float32", "codec": config.get("convert.codec"),
                     "target_chunk_filters": target, "kernel": int(kernel),
                     "source": {"path": None, "name": "filter", "shape": [0, kernel * kernel],
                                "dtype": "float32", "fingerprint": "ingest"}}
        n0, old_plan = 0, np.zeros((0, 2), np.int64)
    else:
        rec = fmt.read_record(path)
        n0, target, old_plan = rec.n_filters, rec.target_chunk_filters, rec.chunks
    full, unref = normalize_meta(_combined_meta(meta, new), n0 + len(x), path)
    new_rows = full.iloc[len(full) - len(new):]
    plan_new = plan_chunks(new_rows["start"].to_numpy() - n0, new_rows["stop"].to_numpy() - n0,
                           new_rows["model_id"].to_numpy(), len(x), target) + n0
    full["chunk"] = chunk_layers(np.concatenate([old_plan, plan_new]),
                                 full["start"].to_numpy(), full["stop"].to_numpy())
    fmt.append(path, x, plan_new, full, n_filters_seen=n0, appended=sorted(
        set(new["model_sha256"])), unreferenced=unref, new_store=new_store)
