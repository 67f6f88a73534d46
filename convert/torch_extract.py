"""Conv kernels from PyTorch: a ``state_dict``/checkpoint file or an ``nn.Module``.

Which state-dict tensors are conv weights, and how ``conv_depth`` follows from
their order, is :mod:`filterdb_dask.convert.statedict`'s rule (shared with the safetensors
route). In an ``nn.Module``, ``conv_depth`` is the position of the ``Conv2d`` in
module order, and a ``BatchNorm2d`` that directly follows a ``Conv2d`` is folded
into its weights (``w * gamma / sqrt(var + eps)``), as ``torch.onnx.export`` does
in eval mode, so both routes give the same filters.
"""

from __future__ import annotations

import os

import numpy as np

from filterdb_dask.errors import InputError

from .onnx_extract import ModelInfo, file_sha256
from .statedict import is_conv_weight, state_dict_info


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise InputError("reading PyTorch models needs torch: pip install torch") from exc
    return torch


def read_state_dict(path: str, *, name: str | None = None) -> ModelInfo:
    """4-D weight tensors of a state dict or checkpoint, in stored order.

    Loaded with ``weights_only=True``: no code in the file is run.
    """
    torch = _torch()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path!r} is not a loadable PyTorch state dict "
                         f"({type(exc).__name__})") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputError(f"{path!r} does not hold a state dict")
    weights = [(k, v.detach().cpu().double().numpy()) for k, v in sd.items()
               if hasattr(v, "ndim") and is_conv_weight(str(k), v.ndim, v.is_floating_point())]
    return state_dict_info(name or os.path.splitext(os.path.basename(path))[0], path,
                           file_sha256(path), weights, producer="pytorch")


def read_module(module, *, name: str = "module", fold_batchnorm: bool = True) -> ModelInfo:
    """Conv2d weights of an ``nn.Module`` in module order (BatchNorm folded)."""
    torch = _torch()
    import hashlib

    mods = list(module.modules())
    weights = []
    for i, m in enumerate(mods):
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight.detach().cpu().double().numpy().copy()
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if fold_batchnorm and isinstance(nxt, torch.nn.BatchNorm2d):
                gamma = nxt.weight.detach().cpu().double().numpy() if nxt.affine else 1.0
                var = nxt.running_var.detach().cpu().double().numpy()
                w *= (gamma / np.sqrt(var + nxt.eps))[:, None, None, None]
            weights.append((f"{name}.{i}", w))
    h = hashlib.sha256()
    for _, w in weights:
        h.update(np.ascontiguousarray(w).tobytes())
    return state_dict_info(name, f"<module {name}>", h.hexdigest(), weights,
                           producer="pytorch")
