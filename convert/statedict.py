"""Which tensors of a graph-less checkpoint are conv weights, and the model they make.

The one owner of the naming rule shared by the PyTorch state-dict route
(:mod:`filterdb_dask.convert.torch_extract`) and the safetensors route
(:mod:`filterdb_dask.convert.safetensors_extract`), so the same weights give the same model:

- a conv weight is a floating-point 4-D tensor named ``weight`` or ``*.weight``,
  laid out ``(out, in / groups, kh, kw)`` as PyTorch stores ``Conv2d`` weights
  (a depthwise conv is ``(channels * multiplier, 1, kh, kw)``: one filter per
  output channel, like a grouped one);
- a transposed convolution stores ``(in, out / groups, kh, kw)`` and cannot be told
  from its shape, so it is recognised by name: a tensor whose name contains
  ``transpose``, ``deconv`` or ``convt`` is left out (as ONNX ``ConvTranspose``);
- there is no graph, so ``conv_depth`` is the position of the weight among the conv
  weights in stored order and ``depth`` their number: exact for plain feed-forward
  stacks, an approximation for branching networks (use the ONNX route for those).
"""

from __future__ import annotations

import re

import numpy as np

from .onnx_extract import ConvLayer, ModelInfo

_TRANSPOSED = re.compile(r"transpose|deconv|convt", re.IGNORECASE)


def is_transposed(name: str) -> bool:
    """Whether a tensor or layer name marks a transposed convolution."""
    return bool(_TRANSPOSED.search(name))


def is_conv_weight(name: str, ndim: int, floating: bool) -> bool:
    """Whether a checkpoint tensor is a 2-D conv weight (rule in the module docstring)."""
    return (ndim == 4 and floating and (name == "weight" or name.endswith(".weight"))
            and not is_transposed(name))


def state_dict_info(name: str, path: str, sha: str, weights, *, producer: str) -> ModelInfo:
    """A :class:`ModelInfo` from ``(tensor name, (out, in, kh, kw) array)`` in stored order."""
    layers = [
        ConvLayer(node=n, op="Conv", conv_depth=i, kernel=(int(w.shape[2]), int(w.shape[3])),
                  weights=np.asarray(w, dtype=np.float64))
        for i, (n, w) in enumerate(weights)
    ]
    return ModelInfo(path=path, name=name, producer=producer, op_set=None, depth=len(layers),
                     sha256=sha, layers=layers, op_counts={"Conv": len(layers)})
