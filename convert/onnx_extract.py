"""Extract conv kernels and model statistics from an ONNX file (METHOD.md §1).

Every 2-D convolution (``Conv``, ``ConvInteger``, ``QLinearConv``) is read; its
weights are found wherever exporters put them: initializers, ``Constant`` nodes,
behind ``Identity`` / ``Cast`` / ``DequantizeLinear``, or quantized (``(q - zero
point) * scale``), with external-data files resolved by ``onnx.load``. Kernels of
shape 3x3 become filters (one per output channel x input channel of its group).
``ConvTranspose`` is counted as an operator only.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from filterdb_dask.errors import InputError

CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")


@dataclass
class ConvLayer:
    node: str
    op: str
    conv_depth: int
    kernel: tuple[int, int]
    weights: np.ndarray  # (out, in_per_group, kh, kw) float64

    @property
    def n_filters(self) -> int:
        return int(self.weights.shape[0] * self.weights.shape[1])


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

    def filter_layers(self) -> list[ConvLayer]:
        return [lay for lay in self.layers if lay.kernel == (3, 3)]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(path: str):
    try:
        import onnx
    except ImportError:
        raise InputError("reading ONNX needs onnx: pip install 'filterdb-dask[onnx]'") from None
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path!r} is empty (0 bytes)")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path!r} is not a readable ONNX model ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    if not model.graph.node:
        raise InputError(f"{path!r} is not an ONNX model (no graph nodes)")
    try:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:
        raise InputError(f"{path!r}: its external data cannot be read ({exc})") from None
    return model


class _Resolver:
    """Constant values of graph tensors (initializers, Constant nodes, simple ops)."""

    def __init__(self, graph, path):
        from onnx import numpy_helper

        self.path = path
        self.nh = numpy_helper
        self.values = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}

    def _attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                from onnx import helper

                return helper.get_attribute_value(a)
        return default

    def value(self, name: str, for_node: str) -> np.ndarray:
        if name in self.values:
            v = self.values[name]
            return v if isinstance(v, np.ndarray) else self.nh.to_array(v)
        node = self.producer.get(name)
        if node is None:
            raise InputError(f"{self.path!r}: weights {name!r} of node {for_node!r} are a graph "
                             "input, not a constant; cannot read them")
        op = node.op_type
        if op == "Constant":
            t = self._attr(node, "value")
            if t is not None:
                return self.nh.to_array(t)
            for key in ("value_float", "value_floats", "value_int", "value_ints"):
                v = self._attr(node, key)
                if v is not None:
                    return np.asarray(v)
        elif op == "Identity":
            return self.value(node.input[0], for_node)
        elif op == "Cast":
            from onnx import helper

            to = helper.tensor_dtype_to_np_dtype(self._attr(node, "to"))
            return self.value(node.input[0], for_node).astype(to)
        elif op == "DequantizeLinear":
            x = self.value(node.input[0], for_node)
            scale = self.value(node.input[1], for_node)
            zp = self.value(node.input[2], for_node) if len(node.input) > 2 and node.input[2] \
                else np.zeros((), x.dtype)
            return _dequantize(x, scale, zp, int(self._attr(node, "axis", 1)))
        raise InputError(f"{self.path!r}: cannot resolve weights {name!r} of node {for_node!r} "
                         f"(produced by a {op} node)")


def _dequantize(q, scale, zp, axis: int) -> np.ndarray:
    q = np.asarray(q).astype(np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    zp = np.asarray(zp).astype(np.float64)
    if scale.ndim == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.ndim == 1 else zp
    return (q - zp) * scale


def _conv_weights(node, res: _Resolver, path: str) -> np.ndarray:
    name = node.name or node.output[0]
    if node.op_type == "Conv":
        w = res.value(node.input[1], name).astype(np.float64)
    elif node.op_type == "QLinearConv":
        w = _dequantize(res.value(node.input[3], name), res.value(node.input[4], name),
                        res.value(node.input[5], name), 0)
    else:  # ConvInteger: (q - zp) * scale; the scale lives outside the node
        q = res.value(node.input[1], name)
        zp = res.value(node.input[3], name) if len(node.input) > 3 and node.input[3] \
            else np.zeros((), q.dtype)
        scale = _convinteger_scale(node, res)
        if scale is None:
            raise InputError(f"{path!r}: cannot find the weight scale of ConvInteger node "
                             f"{name!r} (looked for an initializer "
                             f"{_base(node.input[1]) + '_scale'!r})")
        w = _dequantize(q, scale, zp, 0)
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
    for i in order:
        n = nodes[i]
        if not is_conv[i]:
            continue
        w = _conv_weights(n, res, path)
        if w.ndim != 4:
            continue  # 1-D or 3-D convolutions are not 2-D filters
        layers.append(ConvLayer(node=n.name or n.output[0], op=n.op_type, conv_depth=below[i],
                                kernel=(int(w.shape[2]), int(w.shape[3])), weights=w))
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
