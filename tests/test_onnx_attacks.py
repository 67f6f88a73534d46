"""Hostile ONNX files, built with onnx.helper at test time, given to ``ingest`` in a
subprocess under a 1 GiB address-space limit: each is refused with one line, exit 1,
no output file (issue 9, "bound what small inputs can cost")."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.hostile import assert_refused, run_bounded

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from filterdb_dask.convert.onnx_extract import read_onnx  # noqa: E402
from filterdb_dask.errors import InputError  # noqa: E402

f = numpy_helper.from_array


def _save(path, nodes, inits, *, opset=None):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info(nodes[-1].output[0], 1, None)], inits)
    kw = {"opset_imports": [helper.make_opsetid("", opset)]} if opset else {}
    onnx.save(helper.make_model(g, **kw), str(path))
    return str(path)


def _qlinearconv(path, scale, zp, w=None):
    w = np.ones((1, 1, 3, 3), np.int8) if w is None else w
    inits = [f(w, "w"), f(scale, "ws"), f(zp, "wz"), f(np.float32(0.5), "xs"),
             f(np.uint8(128), "xz"), f(np.float32(0.25), "ys"), f(np.uint8(128), "yz")]
    n = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"],
                         name="qconv")
    return _save(path, [n], inits)


def _ingest(tmp_path, model, match):
    into = str(tmp_path / "out.h5")
    assert_refused(["ingest", model, "--into", into], match, outputs=[into])


@pytest.mark.parametrize("n", [3000, 12000])
def test_qlinearconv_scale_and_zero_point_broadcast_is_refused(tmp_path, n):
    # a (1, n) scale against a (n, 1) zero point broadcasts one 3x3 kernel into n*n
    # filters: 9 M from a 30 KB file, 144 M (>10 GB as float64) from a 120 KB one
    p = _qlinearconv(tmp_path / "bomb.onnx", np.full((1, n, 1, 1), 0.1, np.float32),
                     np.zeros((n, 1, 1, 1), np.int8))
    assert os.path.getsize(p) < 130_000
    _ingest(tmp_path, p, r"QLinearConv node 'qconv': the scale has shape \(1, \d+, 1, 1\)")


def test_qlinearconv_zero_point_must_be_per_tensor_or_per_output_channel(tmp_path):
    p = _qlinearconv(tmp_path / "zp.onnx", np.float32(0.1), np.zeros((5000, 1, 1, 1), np.int8))
    _ingest(tmp_path, p, r"the zero point has shape \(5000, 1, 1, 1\) .* must be one value or 1")
    # the spec's shapes still work: per tensor and one per output channel
    w = np.arange(-36, 36, dtype=np.int8).reshape(2, 4, 3, 3)
    ok = _qlinearconv(tmp_path / "ok.onnx", np.array([0.5, 2.0], np.float32),
                      np.array([1, -1], np.int8), w)
    want = (w.astype(np.float64) - np.array([1, -1])[:, None, None, None]) * \
        np.array([0.5, 2.0])[:, None, None, None]
    np.testing.assert_array_equal(read_onnx(ok).layers[0].weights, want)


def test_dequantizelinear_broadcast_is_refused_and_blocked_scales_work(tmp_path):
    q = np.ones((2, 1, 3, 3), np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], name="c")]
    bad = _save(tmp_path / "dq.onnx", nodes,
                [f(q, "wq"), f(np.full((2, 4000, 1, 1), 0.5, np.float32), "ws")], opset=13)
    _ingest(tmp_path, bad, r"DequantizeLinear .* the scale has shape \(2, 4000, 1, 1\)")
    # opset 21 blocked quantization: one scale per 2 input channels
    q = np.arange(4 * 3 * 9, dtype=np.int8).reshape(4, 3, 3, 3)
    s = np.arange(1, 4 * 2 * 9 + 1, dtype=np.float32).reshape(4, 2, 3, 3)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1, block_size=2),
             helper.make_node("Conv", ["x", "w"], ["y"], name="c")]
    ok = _save(tmp_path / "blk.onnx", nodes, [f(q, "wq"), f(s, "ws")], opset=21)
    want = q.astype(np.float64) * s[:, [0, 0, 1]]
    np.testing.assert_array_equal(read_onnx(ok).layers[0].weights, want)


def test_declared_initializer_far_larger_than_its_data(tmp_path):
    raw = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[100_000, 100_000, 3, 3],
                      raw_data=np.ones(9, np.float32).tobytes())
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c")
    p = _save(tmp_path / "raw.onnx", [conv], [raw])
    _ingest(tmp_path, p, r"tensor 'w' declares shape \[100000, 100000, 3, 3\] .* holds data for 9")
    typed = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4096, 4096, 3, 3],
                        float_data=[1.0] * 9)
    p = _save(tmp_path / "typed.onnx", [conv], [typed])
    _ingest(tmp_path, p, r"declares shape \[4096, 4096, 3, 3\]")
    neg = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[-1, 1, 3, 3],
                      float_data=[1.0] * 9)
    with pytest.raises(InputError, match="negative dimension"):
        read_onnx(_save(tmp_path / "neg.onnx", [conv], [neg]))


def test_one_weight_shared_by_many_conv_nodes_is_refused(tmp_path):
    w = np.ones((64, 64, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], [f"y{i}"], name=f"c{i}") for i in range(50)]
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(50)], ["y"]))
    p = _save(tmp_path / "shared.onnx", nodes, [f(w, "w")])
    _ingest(tmp_path, p, r"conv layers would hold more than 4x the 36,864 numbers")


def test_identity_cycle_is_refused(tmp_path):
    nodes = [helper.make_node("Identity", ["b"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
             helper.make_node("Conv", ["x", "a"], ["y"], name="c")]
    p = _save(tmp_path / "cycle.onnx", nodes, [])
    _ingest(tmp_path, p, r"more than 64 Identity/Cast/DequantizeLinear nodes \(or a cycle\)")


def _external(folder, location, *, offset=None, length=None, dims=(8, 1, 3, 3), name="w"):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims),
                    data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        if v is not None:
            e = t.external_data.add()
            e.key, e.value = k, str(v)
    return t


@pytest.fixture
def secret(tmp_path):
    """A file outside the model's folder that a model must not read."""
    p = tmp_path / "secret.bin"
    p.write_bytes(np.arange(1000, dtype=np.float32).tobytes())
    os.makedirs(tmp_path / "model")
    return p


def _external_model(tmp_path, tensors):
    conv = helper.make_node("Conv", ["x", tensors[0].name], ["y"], name="c")
    return _save(tmp_path / "model" / "m.onnx", [conv], tensors)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink-file", "symlink-dir"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, secret, kind):
    folder = tmp_path / "model"
    if kind == "dotdot":
        location, match = "../secret.bin", "is not a path inside the model's folder"
    elif kind == "absolute":
        location, match = str(secret), "is not a path inside the model's folder"
    elif kind == "symlink-file":
        os.symlink(secret, folder / "w.bin")
        location, match = "w.bin", r"goes through the symlink .*w\.bin"
    else:
        os.symlink(tmp_path, folder / "sub")
        location, match = "sub/secret.bin", r"goes through the symlink .*sub'"
    p = _external_model(tmp_path, [_external(folder, location)])
    _ingest(tmp_path, p, match)


def test_external_data_ranges_are_checked(tmp_path, secret):
    folder = tmp_path / "model"
    (folder / "w.bin").write_bytes(np.ones(72, np.float32).tobytes())
    # a range past the end of the file, a length that is not the tensor's, and one
    # 288-byte range read for 1000 tensors
    p = _external_model(tmp_path, [_external(folder, "w.bin", offset=100)])
    _ingest(tmp_path, p, r"asks for bytes 100..388 of .*w\.bin' \(288 bytes")
    p = _external_model(tmp_path, [_external(folder, "w.bin", length=4)])
    _ingest(tmp_path, p, r"\(288 bytes\) but its external data is 4 bytes")
    many = [_external(folder, "w.bin", name=f"w{i}") for i in range(1000)]
    p = _external_model(tmp_path, many)
    _ingest(tmp_path, p, r"already read for other tensors")
    os.mkfifo(folder / "pipe")
    p = _external_model(tmp_path, [_external(folder, "pipe")])
    _ingest(tmp_path, p, "is not a regular file")


def test_external_data_inside_the_folder_still_reads_under_the_limit(tmp_path, secret):
    folder = tmp_path / "model"
    os.makedirs(folder / "data")
    w = np.arange(72, dtype=np.float32)
    (folder / "data" / "w.bin").write_bytes(b"\0" * 16 + w.tobytes())
    p = _external_model(tmp_path, [_external(folder, "data/w.bin", offset=16, length=288)])
    into = str(tmp_path / "ok.h5")
    rc, out, err = run_bounded(["ingest", p, "--into", into])
    assert rc == 0, err
    assert "added 1 model(s), 1 layers, 8 filters" in out
    np.testing.assert_array_equal(read_onnx(p).layers[0].weights.ravel(), w)
