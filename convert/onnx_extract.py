"""Extract conv kernels and model statistics from an ONNX file (docs/method.md §1).

Every 2-D convolution (``Conv``, ``ConvInteger``, ``QLinearConv``) is read; its
weights are found wherever exporters put them: initializers, ``Constant`` nodes,
behind ``Identity`` / ``Cast`` / ``DequantizeLinear``, or quantized (``(q - zero
point) * scale``). Kernels of shape 3x3 become filters (one per output channel x
input channel of its group). ``ConvTranspose`` is counted as an operator only.

A model file is hostile input, so what it can cost is bounded by what it holds:

- every tensor's declared shape must fit the data it carries (inline or external);
- external data is read here, not by ``onnx``: the location must be a relative path
  that stays inside the model's folder through no symlink, the file a regular file,
  the byte range inside it and as long as the tensor, and no file is read for more
  bytes than it has (so overlapping ranges cannot multiply it);
- a scale or zero point broadcasts only as the ONNX spec allows (per tensor, one per
  output channel / ``axis``, or blocked), so the weights have the size of ``q``;
- the conv layers together may hold at most ``SHARE_LIMIT`` times the numbers the
  file stores (a weight shared by many conv nodes cannot fan a small file out).
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from filterdb_dask.errors import InputError

CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")
FILTER_K = 3  # kernels of FILTER_K x FILTER_K become filters
SHARE_LIMIT = 4  # conv weights per number stored in the file (weight sharing is rare)
MAX_CHAIN = 64  # Identity / Cast / DequantizeLinear nodes between a weight and its conv
# bits of the element types that pack several values into one byte or int32
_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}


@dataclass
class ConvLayer:
    node: str
    op: str
    conv_depth: int
    kernel: tuple[int, int]
    weights: np.ndarray  # (out, in_per_group, kh, kw) float64
    #: the convolution's groups where the file says (ONNX ``group``, a Keras depthwise
    #: layer); None where only the weight is stored (state dicts, Keras ``Conv2D``)
    groups: int | None = None

    @property
    def n_filters(self) -> int:
        return int(self.weights.shape[0] * self.weights.shape[1])

    def shape_fields(self) -> dict:
        """The meta columns of the weight shape (docs/method.md §7): ``out_channels``,
        ``in_channels`` (``in_per_group * groups``; NaN when groups are unknown),
        ``groups`` (NaN when unknown) and ``kernel`` (kh of the kh x kw kernel)."""
        out, in_g = int(self.weights.shape[0]), int(self.weights.shape[1])
        g = self.groups
        return {"out_channels": out,
                "in_channels": in_g * g if g is not None else np.nan,
                "groups": g if g is not None else np.nan,
                "kernel": int(self.weights.shape[2])}


@dataclass
class ModelInfo:
    path: str
    name: str
    producer: str
    op_set: int | None
    depth: int
    sha256: str
    layers: list[ConvLayer]
    op_counts: dict[str, int] = field(default_factory=dict)

    def kernel_counts(self) -> dict[str, int]:
        c: dict[str, int] = collections.Counter()
        for lay in self.layers:
            c[f"({lay.kernel[0]}, {lay.kernel[1]}) filters"] += lay.n_filters
        return dict(c)

    @property
    def total_filters(self) -> int:
        return sum(lay.n_filters for lay in self.layers)

    def filter_layers(self, k: int = FILTER_K) -> list[ConvLayer]:
        """The layers whose kernels are ``k x k`` (the DB holds 3x3 filters)."""
        return [lay for lay in self.layers if lay.kernel == (k, k)]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(path: str):
    try:
        import onnx
    except ImportError as exc:
        raise InputError("reading ONNX needs onnx: pip install 'filterdb-dask[onnx]'") from exc
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path!r} is empty (0 bytes)")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path!r} is not a readable ONNX model ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from exc
    if not model.graph.node:
        raise InputError(f"{path!r} is not an ONNX model (no graph nodes)")
    tensors = list(_all_tensors(model.graph))
    for t in tensors:
        _validate_tensor(t, path)
    _read_external_data(tensors, path)
    return model


def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for sub in a.graphs:
                yield from _all_tensors(sub)


def _n_elements(t, path: str) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise InputError(f"{path!r}: tensor {t.name!r} declares a negative dimension "
                             f"{list(t.dims)!r}")
        n *= int(d)
    return n


def _bits(t) -> int:
    from onnx import TensorProto, helper

    name = TensorProto.DataType.Name(t.data_type)
    if name in _PACKED_BITS:
        return _PACKED_BITS[name]
    return 8 * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _validate_tensor(t, path: str) -> None:
    """Refuse a tensor whose declared shape does not fit the data it carries."""
    from onnx import TensorProto, helper

    if t.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return  # no numbers: never read as weights
    n = _n_elements(t, path)
    try:
        bits = _bits(t)
    except Exception as exc:
        raise InputError(f"{path!r}: tensor {t.name!r} has an unknown element type "
                         f"{t.data_type!r}") from exc
    if t.data_location == TensorProto.EXTERNAL:
        return  # checked against its file by _read_external_data
    if t.HasField("raw_data") or not n:
        have = len(t.raw_data) * 8 // bits
    else:
        field = getattr(t, helper.tensor_dtype_to_field(t.data_type))
        per_entry = 32 // bits if bits < 8 else 1
        have = len(field) * per_entry
        if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
            have = len(field) // 2
    if n > have:
        raise InputError(f"{path!r}: tensor {t.name!r} declares shape {list(t.dims)!r} "
                         f"({n:,} values) but holds data for {have:,}; the file is corrupt "
                         "or crafted")


def _external_file(location: str, folder: str, path: str, name: str) -> str:
    """The file of an external-data ``location``: inside ``folder``, through no symlink."""
    bad = (not location or "\0" in location or os.path.isabs(location)
           or os.path.splitdrive(location)[0])
    parts = os.path.normpath(location).split(os.sep) if not bad else []
    if bad or not parts or parts[0] in ("..", "") or ".." in parts:
        raise InputError(f"{path!r}: external data {location!r} of tensor {name!r} is not a "
                         "path inside the model's folder; refusing to read it")
    cur = folder
    for part in parts:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise InputError(f"{path!r}: external data {location!r} of tensor {name!r} goes "
                             f"through the symlink {cur!r}; external data must be plain files in "
                             "the model's folder")
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([real_folder, os.path.realpath(cur)]) != real_folder:
        raise InputError(f"{path!r}: external data {location!r} of tensor {name!r} resolves "
                         "outside the model's folder; refusing to read it")
    return cur


def _read_external_data(tensors, path: str) -> None:
    """Read external tensor data ourselves, each range checked (see module docstring)."""
    import stat

    from onnx import TensorProto

    folder = os.path.dirname(os.path.abspath(path))
    read_per_file: dict[str, int] = collections.Counter()
    for t in tensors:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        f = _external_file(info.get("location", ""), folder, path, t.name)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError as exc:
            raise InputError(f"{path!r}: external data of tensor {t.name!r} has a bad offset "
                             f"or length {info!r}") from exc
        need = -(-_n_elements(t, path) * _bits(t) // 8)
        if length is not None and length != need:
            raise InputError(f"{path!r}: tensor {t.name!r} declares shape {list(t.dims)!r} "
                             f"({need:,} bytes) but its external data is {length:,} bytes")
        try:
            fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise InputError(f"{path!r}: external data {f!r} of tensor {t.name!r} cannot be "
                             f"opened ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{path!r}: external data {f!r} is not a regular file")
            read_per_file[f] += need
            if offset < 0 or offset + need > st.st_size or read_per_file[f] > st.st_size:
                raise InputError(f"{path!r}: tensor {t.name!r} asks for bytes "
                                 f"{offset:,}..{offset + need:,} of {f!r} ({st.st_size:,} "
                                 "bytes, or already read for other tensors); the model is "
                                 "corrupt or crafted")
            fh.seek(offset)
            data = fh.read(need)
        if len(data) != need:
            raise InputError(f"{path!r}: external data {f!r} of tensor {t.name!r} is short")
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.raw_data = data


class _Resolver:
    """Constant values of graph tensors (initializers, Constant nodes, simple ops)."""

    def __init__(self, graph, path):
        from onnx import numpy_helper

        self.path = path
        self.nh = numpy_helper
        self.values = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.cache: dict[str, np.ndarray] = {}

    def _attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                from onnx import helper

                return helper.get_attribute_value(a)
        return default

    def _array(self, t, for_node: str) -> np.ndarray:
        try:
            return self.nh.to_array(t)
        except Exception as exc:
            raise InputError(f"{self.path!r}: tensor {t.name!r} used by node {for_node!r} "
                             f"cannot be read ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:100]})") from exc

    def value(self, name: str, for_node: str, _hops: int = 0) -> np.ndarray:
        if _hops > MAX_CHAIN:
            raise InputError(f"{self.path!r}: weights of node {for_node!r} sit behind more "
                             f"than {MAX_CHAIN} Identity/Cast/DequantizeLinear nodes (or a "
                             "cycle); refusing")
        if name not in self.cache:
            self.cache[name] = self._value(name, for_node, _hops)
        return self.cache[name]

    def _value(self, name: str, for_node: str, hops: int) -> np.ndarray:
        if name in self.values:
            return self._array(self.values[name], for_node)
        node = self.producer.get(name)
        if node is None:
            raise InputError(f"{self.path!r}: weights {name!r} of node {for_node!r} are a graph "
                             "input, not a constant; cannot read them")
        op = node.op_type
        if op == "Constant":
            t = self._attr(node, "value")
            if t is not None:
                return self._array(t, for_node)
            for key in ("value_float", "value_floats", "value_int", "value_ints"):
                v = self._attr(node, key)
                if v is not None:
                    return np.asarray(v)
        elif op == "Identity":
            return self.value(node.input[0], for_node, hops + 1)
        elif op == "Cast":
            from onnx import helper

            try:
                to = helper.tensor_dtype_to_np_dtype(self._attr(node, "to"))
                return self.value(node.input[0], for_node, hops + 1).astype(to)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{self.path!r}: Cast node {node.name!r} before node "
                                 f"{for_node!r} has a bad target type") from exc
        elif op == "DequantizeLinear":
            x = self.value(node.input[0], for_node, hops + 1)
            scale = self.value(node.input[1], for_node, hops + 1)
            zp = self.value(node.input[2], for_node, hops + 1) \
                if len(node.input) > 2 and node.input[2] else None
            return _dequantize(x, scale, zp, int(self._attr(node, "axis", 1)),
                               block_size=int(self._attr(node, "block_size", 0)),
                               what=f"{self.path!r}: DequantizeLinear {node.name!r}")
        raise InputError(f"{self.path!r}: cannot resolve weights {name!r} of node {for_node!r} "
                         f"(produced by a {op} node)")


def _fit_quant(a: np.ndarray, q: np.ndarray, axis: int, block_size: int, label: str,
               what: str) -> np.ndarray:
    """A scale / zero point shaped to broadcast against ``q`` as the ONNX spec allows.

    Per tensor (one value), per axis (1-D, one per ``q.shape[axis]``), or blocked
    (``q``'s rank, ``ceil(q.shape[axis] / block_size)`` along ``axis``). Anything else
    would broadcast ``q`` to more values than the file holds, so it is refused.
    """
    if a.size == 1:
        return a.reshape(())
    if a.ndim == 1 and q.ndim and a.shape[0] == q.shape[axis]:
        shape = [1] * q.ndim
        shape[axis] = -1
        return a.reshape(shape)
    if (block_size > 0 and a.ndim == q.ndim
            and all(a.shape[d] == q.shape[d] for d in range(q.ndim) if d != axis)
            and a.shape[axis] == -(-q.shape[axis] // block_size)):
        return np.repeat(a, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
    want = q.shape[axis] if q.ndim else 1
    raise InputError(f"{what}: {label} has shape {a.shape!r} for weights of shape {q.shape!r}; "
                     f"it must be one value or {want} (one per channel of axis {axis})")


def _dequantize(q, scale, zp, axis: int, *, block_size: int = 0, what: str) -> np.ndarray:
    """``(q - zp) * scale`` in float64, of exactly ``q``'s shape."""
    q = np.asarray(q)
    if q.ndim and not -q.ndim <= axis < q.ndim:
        raise InputError(f"{what}: axis {axis} is out of range for weights of shape {q.shape!r}")
    axis = axis % q.ndim if q.ndim else 0
    scale = _fit_quant(np.asarray(scale, dtype=np.float64), q, axis, block_size, "the scale",
                       what)
    out = _to_float(q, what)
    if zp is not None:
        out -= _fit_quant(_to_float(np.asarray(zp), what), q, axis, block_size,
                          "the zero point", what)
    return out * scale


def _to_float(a: np.ndarray, what: str) -> np.ndarray:
    try:
        return np.asarray(a).astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: weights of type {a.dtype} are not numbers") from exc


def _conv_weights(node, res: _Resolver, path: str) -> np.ndarray:
    name = node.name or node.output[0]
    what = f"{path!r}: {node.op_type} node {name!r}"
    if node.op_type == "Conv":
        w = _to_float(res.value(node.input[1], name), what)
    elif node.op_type == "QLinearConv":
        if len(node.input) < 6:
            raise InputError(f"{what} has {len(node.input)} inputs, not 8")
        w = _dequantize(res.value(node.input[3], name), res.value(node.input[4], name),
                        res.value(node.input[5], name), 0, what=what)
    else:  # ConvInteger: (q - zp) * scale; the scale lives outside the node
        q = res.value(node.input[1], name)
        zp = res.value(node.input[3], name) if len(node.input) > 3 and node.input[3] else None
        scale = _convinteger_scale(node, res)
        if scale is None:
            raise InputError(f"{path!r}: cannot find the weight scale of ConvInteger node "
                             f"{name!r} (looked for an initializer "
                             f"{_base(node.input[1]) + '_scale'!r})")
        w = _dequantize(q, scale, zp, 0, what=what)
    return w


def _base(name: str) -> str:
    return name[: -len("_quantized")] if name.endswith("_quantized") else name


def _convinteger_scale(node, res: _Resolver):
    """Weight scale of a dynamically quantized conv (onnxruntime's naming)."""
    for cand in (_base(node.input[1]) + "_scale", node.input[1] + "_scale"):
        if cand in res.values:
            return res.value(cand, node.name)
    return None


def _topo(graph):
    """Nodes in topological order (ONNX requires it, but do not rely on it)."""
    produced = {o: i for i, n in enumerate(graph.node) for o in n.output}
    deps = [{produced[i] for i in n.input if i in produced} for n in graph.node]
    order, state = [], [0] * len(graph.node)
    for start in range(len(graph.node)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                state[i] = 2
                order.append(i)
                continue
            if state[i]:
                continue
            state[i] = 1
            stack.append((i, True))
            stack.extend((d, False) for d in deps[i] if not state[d])
    return order, deps


def read_onnx(path: str, *, name: str | None = None) -> ModelInfo:
    """All 2-D conv kernels of an ONNX model with conv depths and model statistics.

    ``conv_depth`` of a conv node is the largest number of conv nodes on any path
    from the graph inputs to it (the first conv has 0); ``depth`` is the longest
    path, counted in nodes.

    Raises
    ------
    InputError
        Not an ONNX file, truncated, or weights that cannot be resolved (the
        message names the node).
    """
    path = os.fspath(path)
    model = _load(path)
    g = model.graph
    res = _Resolver(g, path)
    order, deps = _topo(g)
    nodes = list(g.node)
    is_conv = [n.op_type in CONV_OPS for n in nodes]
    below = [0] * len(nodes)  # conv nodes strictly before
    longest = [1] * len(nodes)
    for i in order:
        for d in deps[i]:
            below[i] = max(below[i], below[d] + (1 if is_conv[d] else 0))
            longest[i] = max(longest[i], longest[d] + 1)
    layers = []
    stored = sum(_n_elements(t, path) for t in _all_tensors(g))
    held = 0
    for i in order:
        n = nodes[i]
        if not is_conv[i]:
            continue
        w = _conv_weights(n, res, path)
        if w.ndim != 4:
            continue  # 1-D or 3-D convolutions are not 2-D filters
        held += w.size
        if held > SHARE_LIMIT * stored:
            raise InputError(f"{path!r}: its conv layers would hold more than {SHARE_LIMIT}x "
                             f"the {stored:,} numbers the file stores (one weight shared by "
                             "many conv nodes?); refusing")
        group = res._attr(n, "group", 1)
        layers.append(ConvLayer(node=n.name or n.output[0], op=n.op_type, conv_depth=below[i],
                                kernel=(int(w.shape[2]), int(w.shape[3])), weights=w,
                                groups=int(group) if isinstance(group, int) and group >= 1
                                else None))
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
    return ModelInfo(
        path=path,
        name=name or os.path.splitext(os.path.basename(path))[0],
        producer=model.producer_name or "",
        op_set=opset,
        depth=max(longest) if longest else 0,
        sha256=file_sha256(path),
        layers=layers,
        op_counts=dict(collections.Counter(n.op_type for n in nodes)),
    )
