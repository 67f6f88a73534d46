"""Conv kernels from safetensors checkpoints (one file or sharded), without torch.

Which tensors are conv weights is :mod:`filterdb_dask.convert.statedict`'s rule (4-D floating
``*.weight`` tensors laid out ``(out, in / groups, kh, kw)``, transposed convs
left out by name), the same as for PyTorch state dicts. ``conv_depth`` is the
position of the weight in *natural name order* (digit runs compared as numbers,
so ``features.10`` follows ``features.9``): a safetensors file keeps no module
order (its writer sorts tensors by dtype and name, and a shard index by name), and
PyTorch names modules by their place in the model, so for the usual
``features.0 ... features.12`` or ``layer1.0.conv1`` naming this is module order.

A file is hostile input. Before the ``safetensors`` library sees it, its header is
checked here: the 8-byte length must fit the file and ``HEADER_CAP``, the header
must be UTF-8 JSON of the documented shape, every tensor's byte range must match its
dtype and shape, lie inside the data and not overlap another, and the ranges must
tile the data. So reading costs at most the file's own size (times 4 for bf16 →
float64). Tensors are then read with ``safe_open(..., framework="np")`` (bf16
arrives as an ``ml_dtypes.bfloat16`` array).

A sharded checkpoint is read through its ``*.safetensors.index.json`` as one
model, known by its folder's name: its ``weight_map`` must name plain files in the
index's folder (no paths, no symlinks), each shard is checked as above and must hold
the tensors mapped to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct

from filterdb_dask.errors import InputError

from .onnx_extract import ModelInfo
from .statedict import is_conv_weight, state_dict_info

HEADER_CAP = 16 << 20  # bytes; ~100 bytes per tensor, so room for 150 k tensors
INDEX_CAP = 16 << 20
# safetensors dtype -> (bytes per element, floating point)
DTYPES = {
    "BOOL": (1, False), "U8": (1, False), "I8": (1, False), "U16": (2, False),
    "I16": (2, False), "U32": (4, False), "I32": (4, False), "U64": (8, False),
    "I64": (8, False), "F8_E5M2": (1, True), "F8_E4M3": (1, True), "F16": (2, True),
    "BF16": (2, True), "F32": (4, True), "F64": (8, True),
}


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _json(raw: bytes, path: str, what: str):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path!r}: the {what} is not UTF-8 (byte {exc.start}); the file is "
                         "corrupt or not safetensors") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path!r}: the {what} is not valid JSON "
                         f"({' '.join(str(exc).split())[:100]})") from exc


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: str) -> tuple[dict, dict, int]:
    """(tensors ``{name: (dtype, shape, begin, end)}``, ``__metadata__``, data offset).

    Raises
    ------
    InputError
        Anything that is not a well-formed safetensors header (see module docstring).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"{path!r} is truncated: {len(head)} bytes, shorter than the "
                                 "8-byte header length of a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise InputError(f"{path!r}: header length {n:,} runs past the end of the file "
                                 f"({size:,} bytes); the file is truncated or not safetensors")
            if n > HEADER_CAP:
                raise InputError(f"{path!r}: header length {n:,} is over the "
                                 f"{HEADER_CAP:,}-byte cap; refusing to parse it")
            raw = fh.read(n)
    except OSError as exc:
        raise InputError(f"{path!r} cannot be read ({exc.strerror})") from exc
    header = _json(raw, path, "header")
    if not isinstance(header, dict):
        raise InputError(f"{path!r}: the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path!r}: __metadata__ must map strings to strings")
    data = size - 8 - n
    tensors = {}
    for name, t in header.items():
        if not (isinstance(t, dict) and set(t) == {"dtype", "shape", "data_offsets"}):
            raise InputError(f"{path!r}: tensor {name!r} must have exactly dtype, shape and "
                             f"data_offsets, not {str(t)[:80]!r}")
        dtype, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in DTYPES:
            raise InputError(f"{path!r}: tensor {name!r} has an unknown dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            raise InputError(f"{path!r}: tensor {name!r} has a bad shape {str(shape)[:80]!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_count(o) for o in offs)
                and offs[0] <= offs[1] <= data):
            raise InputError(f"{path!r}: tensor {name!r} has data_offsets {str(offs)[:80]!r} "
                             f"outside the {data:,} data bytes")
        n_el = 1
        for d in shape:
            n_el *= d
        if offs[1] - offs[0] != n_el * DTYPES[dtype][0]:
            raise InputError(f"{path!r}: tensor {name!r} is {dtype} {shape!r} "
                             f"({n_el * DTYPES[dtype][0]:,} bytes) but its byte range "
                             f"{offs!r} holds {offs[1] - offs[0]:,}")
        tensors[name] = (dtype, tuple(shape), offs[0], offs[1])
    _check_tiling(tensors, data, path)
    return tensors, meta, 8 + n


def _check_tiling(tensors: dict, data: int, path: str) -> None:
    """Byte ranges must not overlap and must cover the data exactly."""
    end, prev = 0, None
    for name, (_, _, b, e) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b < end:
            raise InputError(f"{path!r}: tensors {prev!r} and {name!r} have overlapping byte "
                             "ranges; the file is corrupt or crafted")
        if b > end:
            raise InputError(f"{path!r}: bytes {end:,}..{b:,} of the data belong to no tensor")
        end, prev = e, name
    if end != data:
        raise InputError(f"{path!r}: the data has {data:,} bytes but its tensors cover {end:,}")


def _natural(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _shard_path(folder: str, shard, index: str) -> str:
    if (not isinstance(shard, str) or not shard or os.path.basename(shard) != shard
            or shard in (".", "..") or "\0" in shard):
        raise InputError(f"{index!r}: shard {str(shard)[:80]!r} is not a plain file name in the "
                         "index's folder")
    p = os.path.join(folder, shard)
    if os.path.islink(p):
        raise InputError(f"{index!r}: shard {p!r} is a symlink; shards must be plain files in "
                         "the index's folder")
    if not os.path.isfile(p):
        raise InputError(f"{index!r}: shard {p!r} does not exist")
    return p


def _read_index(index: str) -> dict[str, str]:
    """``{tensor name: shard path}`` of a ``*.safetensors.index.json``."""
    try:
        if os.path.getsize(index) > INDEX_CAP:
            raise InputError(f"{index!r} is over {INDEX_CAP:,} bytes; refusing to parse it")
        with open(index, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{index!r} cannot be read ({exc.strerror})") from exc
    doc = _json(raw, index, "index")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{index!r} has no weight_map (tensor name -> shard file)")
    folder = os.path.dirname(os.path.abspath(index))
    shards: dict[str, str] = {}
    for shard in wm.values():
        if not isinstance(shard, str) or shard not in shards:
            shards[shard] = _shard_path(folder, shard, index)
    return {k: shards[v] for k, v in wm.items()}


def read_safetensors(path: str, *, name: str | None = None) -> ModelInfo:
    """Conv weights of a ``.safetensors`` file or a sharded checkpoint's index.

    Parameters
    ----------
    path : a ``.safetensors`` file, a ``*.safetensors.index.json``, or a folder
        holding ``model.safetensors.index.json`` or one ``.safetensors`` file.
    name : model name (default: the file name without extension, or the folder's
        name for the generic ``model.safetensors`` / index).

    Raises
    ------
    InputError
        A malformed file (one line naming it and the problem), or the library or
        ``ml_dtypes`` missing.
    """
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:
        raise InputError("reading safetensors needs safetensors and ml_dtypes: "
                         "pip install 'filterdb-dask[formats]'") from exc
    path = _resolve(os.fspath(path))
    if path.endswith(".json"):
        where = _read_index(path)
        files = sorted(set(where.values()))
    else:
        files, where = [path], None
    layout = {}
    for f in files:
        tensors, _, _ = read_header(f)
        layout.update({k: (f, v) for k, v in tensors.items()})
    if where is not None:
        missing = [k for k, f in where.items() if layout.get(k, (None,))[0] != f]
        if missing:
            raise InputError(f"{path!r}: tensor {missing[0]!r} is not in its shard "
                             f"{os.path.basename(where[missing[0]])!r}")
    conv = sorted((k for k, (_, (dtype, shape, _, _)) in layout.items()
                   if is_conv_weight(k, len(shape), DTYPES[dtype][1])), key=_natural)
    weights = []
    by_file: dict[str, list[str]] = {}
    for k in conv:
        by_file.setdefault(layout[k][0], []).append(k)
    arrays = {}
    try:
        for f, names in by_file.items():
            with safe_open(f, framework="np") as fh:
                for k in names:
                    arrays[k] = fh.get_tensor(k)
    except (SafetensorError, OSError, TypeError, ValueError) as exc:
        raise InputError(f"{path!r} cannot be read as safetensors ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from exc
    import numpy as np

    for k in conv:
        weights.append((k, arrays.pop(k).astype(np.float64)))
    # a sharded model is known by its folder (its "model" column and --meta-file key)
    shown = os.path.dirname(os.path.abspath(path)) if where is not None else path
    return state_dict_info(name or _model_name(path), shown, _sha256(files), weights,
                           producer="safetensors")


def _resolve(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist")
    if not os.path.isdir(path):
        return path
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return index
    single = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if len(single) != 1:
        raise InputError(f"{path!r} holds {len(single)} .safetensors files and no "
                         "model.safetensors.index.json; name the file to read")
    return os.path.join(path, single[0])


def _model_name(path: str) -> str:
    base = os.path.basename(path).split(".")[0]
    if base in ("model", "pytorch_model", "diffusion_pytorch_model"):
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return parent or base
    return base


def _sha256(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
