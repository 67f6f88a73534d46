"""Conv kernels from Keras HDF5 weight files, read with h5py (no Keras or TensorFlow).

Three layouts are read, told apart by content:

- **Keras 2** (``model.save("m.h5")`` or ``model.save_weights("w.h5")``): the
  ``layer_names`` attribute (at the root, or on the ``model_weights`` group of a full
  model) lists the layers in model order; each layer group's ``weight_names``
  attribute lists its variables, stored at ``<layer>/<weight name>``
  (e.g. ``conv2d/conv2d/kernel:0``). A full model's ``model_config`` attribute gives
  each layer's class.
- **Keras 3** (``model.save_weights("m.weights.h5")``): one group per layer,
  ``layers/<layer name>/vars/<i>`` (nested models nest ``layers/``), variables
  numbered in the layer's own order (kernel ``0``, bias ``1``; a separable conv has
  depthwise ``0``, pointwise ``1``). The file keeps no layer order and no classes
  (both live in the ``.keras`` archive's config): layers are taken in natural name
  order (``conv2d``, ``conv2d_1``, ..., ``conv2d_10``: Keras numbers default names
  per class in creation order, so a stack of one conv class is in model order; layers
  of several classes or renamed layers are not, and their ``conv_depth`` is an
  approximation; neither HDF5 object nor data addresses keep the writing order). The
  class comes from the (default) layer name: ``depthwise_conv2d*``,
  ``separable_conv2d*``, ``conv2d_transpose*``; a renamed depthwise layer would read
  as a plain conv.
- **Keras 3 archive** (``model.save("m.keras")``): a zip of ``config.json`` and
  ``model.weights.h5`` (the layout above); the config gives the layers' model order
  and classes, so ``conv_depth`` and renamed layers are exact.

Keras stores a conv kernel ``(kh, kw, in / groups, out)`` and a depthwise kernel
``(kh, kw, in, multiplier)``. They become the project's ``(out, in / groups, kh, kw)``
(as ONNX and PyTorch store them; TensorFlow convolutions are cross-correlations like
PyTorch's, so no kernel is flipped): ``kernel.transpose(3, 2, 0, 1)``, and for a
depthwise kernel ``transpose(2, 3, 0, 1).reshape(in * multiplier, 1, kh, kw)``
(output channel ``c * multiplier + m``, as a PyTorch conv with ``groups=in``).
A separable conv gives two conv layers (depthwise, then the 1x1 pointwise), as in
an ONNX export. Transposed convs are left out (as ONNX ``ConvTranspose``).
``conv_depth`` is the position of the kernel in layer order.

The file is hostile input and is read with the dataset reader's guards
(:func:`filterdb_dask.convert.read.node`, :func:`filterdb_dask.convert.read.check_storage`):
only objects reached through hard links, never soft or external links, external raw storage or
virtual datasets, and a dataset whose declared size its storage cannot hold is
refused before it is read.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from filterdb_dask.errors import InputError

from .onnx_extract import ConvLayer, ModelInfo, file_sha256
from .read import check_storage, has_link, node
from .statedict import is_transposed

CONFIG_CAP = 16 << 20  # bytes of a model_config attribute
MAX_NESTING = 32  # models inside models in a Keras 3 file
MAX_RATIO = 1100  # uncompressed / compressed size of a .keras archive's weights


def keras_layout(f) -> str | None:
    """``"keras2"``, ``"keras3"`` or None for an open ``h5py.File`` (no link followed)."""
    import h5py

    if "layer_names" in f.attrs:
        return "keras2"
    if isinstance(f.get("model_weights", getlink=True), h5py.HardLink) \
            and isinstance(f["model_weights"], h5py.Group) \
            and "layer_names" in f["model_weights"].attrs:
        return "keras2"
    if isinstance(f.get("layers", getlink=True), h5py.HardLink):
        return "keras3"
    return None


def _walk(group, rel: str, path: str):
    """``group[rel]`` one path component at a time, each through
    :func:`filterdb_dask.convert.read.node` (hard links only; external links, soft links,
    external and virtual data refused)."""
    import h5py

    obj = group
    for part in [p for p in rel.split("/") if p]:
        if not isinstance(obj, h5py.Group):
            raise InputError(f"{path!r}: {obj.name} is not a group")
        obj = node(obj, part)
    return obj


def _read_dataset(obj, path: str) -> np.ndarray:
    """A dataset's numbers; its storage must hold what it declares (``check_storage``)."""
    import h5py

    if not isinstance(obj, h5py.Dataset):
        raise InputError(f"{path!r}: {obj.name} is not a dataset")
    if obj.dtype.kind not in "fiu" or obj.dtype.itemsize > 8 or obj.shape is None:
        raise InputError(f"{path!r}: {obj.name} holds {obj.dtype} {obj.shape!r}, not numbers")
    check_storage(obj)
    try:
        return obj[()]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path!r}: {obj.name} cannot be read "
                         f"({' '.join(str(exc).split())[:80]})") from exc


def _strings(attr, path: str, what: str) -> list[str]:
    values = np.atleast_1d(np.asarray(attr))
    if values.dtype.kind not in "SUO":
        raise InputError(f"{path!r}: attribute {what} is not a list of names")
    out = []
    for v in values.tolist():
        try:
            out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
        except UnicodeDecodeError as exc:
            raise InputError(f"{path!r}: attribute {what} holds a name that is not UTF-8") \
                from exc
    return out


def _classes(f, path: str) -> dict[str, str]:
    """Layer name -> class name from a full model's ``model_config`` (if any)."""
    raw = f.attrs.get("model_config")
    if raw is None:
        return {}
    raw = raw.tobytes() if hasattr(raw, "tobytes") and not isinstance(raw, bytes) else raw
    raw = raw.encode("utf-8", "replace") if isinstance(raw, str) else bytes(raw)
    if len(raw) > CONFIG_CAP:
        raise InputError(f"{path!r}: model_config is over {CONFIG_CAP:,} bytes; refusing it")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path!r}: model_config is not valid JSON") from exc
    out: dict[str, str] = {}
    stack = [cfg]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            c = node.get("config")
            if isinstance(node.get("class_name"), str) and isinstance(c, dict) \
                    and isinstance(c.get("name"), str):
                out.setdefault(c["name"], node["class_name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def _to_filters(kernel: np.ndarray, kind: str) -> np.ndarray:
    """Keras kernel -> ``(out, in / groups, kh, kw)`` float64 (rule in the module docstring)."""
    k = np.asarray(kernel, dtype=np.float64)
    if kind == "depthwise":
        kh, kw, cin, mult = k.shape
        return k.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw)
    return k.transpose(3, 2, 0, 1)


def _keras2(f, path: str) -> list[tuple[str, str, np.ndarray]]:
    root = f if "layer_names" in f.attrs else _walk(f, "model_weights", path)
    classes = _classes(f, path)
    out = []
    for layer in _strings(root.attrs["layer_names"], path, "layer_names"):
        if is_transposed(layer) or "Transpose" in classes.get(layer, ""):
            continue
        g = _walk(root, layer, path)
        names = _strings(g.attrs.get("weight_names", []), path, f"weight_names of {layer!r}")
        for wn in names:
            var = wn.rsplit("/", 1)[-1].split(":")[0]
            if var not in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                continue
            obj = _walk(g, wn, path)
            if _ndim(obj) != 4:
                continue  # Dense kernels, 1-D and 3-D convolutions
            kind = "depthwise" if var == "depthwise_kernel" or \
                classes.get(layer) == "DepthwiseConv2D" else "conv"
            out.append((f"{layer}/{wn}", kind, _read_dataset(obj, path)))
    return out


def _ndim(obj) -> int:
    return len(getattr(obj, "shape", None) or ())


def _keras3_layers(group, prefix: str, path: str, found: list, depth: int = 0) -> None:
    import h5py

    if depth > MAX_NESTING:
        raise InputError(f"{path!r}: layers nest more than {MAX_NESTING} deep at {group.name} "
                         "(a link cycle?)")
    layers = _walk(group, "layers", path)
    if not isinstance(layers, h5py.Group):
        raise InputError(f"{path!r}: {layers.name} is not a group")
    for name in layers:
        g = node(layers, name)
        if not isinstance(g, h5py.Group):
            continue
        if has_link(g, "layers"):
            _keras3_layers(g, f"{prefix}{name}/", path, found, depth + 1)
        if has_link(g, "vars"):
            found.append((f"{prefix}{name}", g))


def _kind_parts(leaf: str, cls: str | None):
    """[(variable index, kernel kind)] of a Keras 3 layer, by class or by default name."""
    if cls is not None:
        if "Transpose" in cls or "Conv" not in cls:
            return []
        if "Separable" in cls:
            return [("0", "depthwise"), ("1", "conv")]
        return [("0", "depthwise" if "Depthwise" in cls else "conv")]
    if is_transposed(leaf):
        return []
    if "separable" in leaf:
        return [("0", "depthwise"), ("1", "conv")]
    return [("0", "depthwise" if "depthwise" in leaf else "conv")]


def _keras3(f, path: str, config: list[tuple[str, str]] | None = None):
    found: list = []
    _keras3_layers(f, "", path, found)
    order = {n: i for i, (n, _) in enumerate(config or [])}
    classes = dict(config or [])
    picked = []
    for name, g in found:
        vars_ = _walk(g, "vars", path)
        for i, kind in _kind_parts(name.rsplit("/", 1)[-1], classes.get(name)):
            if not has_link(vars_, i):
                continue
            obj = node(vars_, i)
            if _ndim(obj) == 4 and obj.dtype.kind == "f":
                picked.append((f"{name}/vars/{i}", kind, obj, name))
    picked.sort(key=lambda t: (order.get(t[3], len(order)), _natural(t[0])))
    return [(where, kind, _read_dataset(obj, path)) for where, kind, obj, _ in picked]


def _config_layers(cfg, path: str) -> list[tuple[str, str]]:
    """``[(layer path, class name)]`` in model order from a ``.keras`` config.json."""
    out: list[tuple[str, str]] = []
    stack = [(cfg, "", 0)]
    while stack:
        node, prefix, depth = stack.pop()
        conf = node.get("config") if isinstance(node, dict) else None
        layers = conf.get("layers") if isinstance(conf, dict) else None
        if not isinstance(layers, list):
            continue
        if depth > MAX_NESTING:
            raise InputError(f"{path!r}: config.json nests models more than {MAX_NESTING} deep")
        inner = []
        for lay in layers:
            if not isinstance(lay, dict):
                continue
            c = lay.get("config") if isinstance(lay.get("config"), dict) else {}
            lname, cls = c.get("name", lay.get("name")), lay.get("class_name")
            if isinstance(lname, str) and isinstance(cls, str):
                out.append((prefix + lname, cls))
                inner.append((lay, f"{prefix}{lname}/", depth + 1))
        stack.extend(reversed(inner))
    return out


def _open_archive(path: str, stack):
    """(the archive's ``model.weights.h5`` opened by h5py, its layers in model order)."""
    import zipfile

    import h5py

    try:
        z = stack.enter_context(zipfile.ZipFile(path))
        cfg_info = z.getinfo("config.json")
        w_info = z.getinfo("model.weights.h5")
    except KeyError as exc:
        raise InputError(f"{path!r} is a zip archive but not a Keras 3 model (no config.json "
                         "and model.weights.h5)") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path!r} is not a readable .keras archive ({exc})") from exc
    if cfg_info.file_size > CONFIG_CAP:
        raise InputError(f"{path!r}: config.json is over {CONFIG_CAP:,} bytes; refusing it")
    if w_info.compress_type != zipfile.ZIP_STORED and \
            w_info.file_size > MAX_RATIO * w_info.compress_size + (1 << 20):
        raise InputError(f"{path!r}: model.weights.h5 inflates {w_info.compress_size:,} bytes "
                         f"to {w_info.file_size:,}; refusing it")
    try:
        cfg = json.loads(z.read(cfg_info).decode("utf-8"))
        f = stack.enter_context(h5py.File(stack.enter_context(z.open(w_info)), "r"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path!r}: config.json is not valid JSON") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path!r}: model.weights.h5 cannot be read "
                         f"({' '.join(str(exc).split())[:100]})") from exc
    return f, _config_layers(cfg, path)


def _natural(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def read_keras(path: str, *, name: str | None = None) -> ModelInfo:
    """Conv kernels of a Keras 2 ``.h5``, Keras 3 ``.weights.h5`` or ``.keras`` file.

    Raises
    ------
    InputError
        Not a Keras file, or a file that asks for indirection or more memory than it
        stores (one line naming the object).
    """
    import contextlib
    import zipfile

    import h5py

    path = os.fspath(path)
    with contextlib.ExitStack() as stack:
        if zipfile.is_zipfile(path):
            f, config = _open_archive(path, stack)
            layout = "keras3"
        else:
            try:
                f = stack.enter_context(h5py.File(path, "r"))
            except OSError as exc:
                raise InputError(f"{path!r} is not a readable HDF5 file "
                                 f"({' '.join(str(exc).split())[:100]})") from exc
            layout, config = keras_layout(f), None
        if layout is None:
            raise InputError(f"{path!r} is HDF5 but not a Keras weights file (no layer_names "
                             "attribute, no layers/ group)")
        kernels = _keras2(f, path) if layout == "keras2" else _keras3(f, path, config)
    layers = []
    for i, (where, kind, k) in enumerate(kernels):
        w = _to_filters(k, kind)
        # a depthwise kernel (kh, kw, in, mult) is a conv with one group per input channel
        layers.append(ConvLayer(node=where, op="Conv", conv_depth=i,
                                kernel=(int(w.shape[2]), int(w.shape[3])), weights=w,
                                groups=int(k.shape[2]) if kind == "depthwise" else None))
    stem = os.path.basename(path)
    for ext in (".weights.h5", ".h5", ".hdf5", ".keras"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return ModelInfo(path=path, name=name or stem, producer=layout,
                     op_set=None, depth=len(layers), sha256=file_sha256(path), layers=layers,
                     op_counts={"Conv": len(layers)})
