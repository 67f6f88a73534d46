"""Build a filter DB from real models: ONNX files shipped in PyPI wheels, a CNN
trained here with torch, and the PyTorch route."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from filterdb_dask.convert.ingest import ingest
from filterdb_dask.convert.onnx_extract import read_onnx
from filterdb_dask.convert.read import read_source
from filterdb_dask.errors import InputError

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

WHEELS = {
    "ddddocr-1.6.1-py3-none-any.whl":
        "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl":
        "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
}


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """The ONNX CNNs inside two PyPI wheels, fetched with pip, pinned by sha256."""
    cache = os.environ.get("FILTERDB_WHEEL_CACHE") or str(tmp_path_factory.mktemp("wheels"))
    out = {}
    for wheel, sha in WHEELS.items():
        path = os.path.join(cache, wheel)
        if not os.path.exists(path):
            spec = wheel.split("-")[0].replace("_", "-") + "==" + wheel.split("-")[1]
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                "-d", cache, spec], capture_output=True, text=True)
            if r.returncode != 0 or not os.path.exists(path):
                pytest.skip(f"cannot download {spec} from PyPI: {r.stderr.strip()[-200:]}")
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert digest == sha, f"{wheel} does not match its pinned sha256"
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if member.endswith(".onnx"):
                    z.extract(member, cache)
                    out[os.path.basename(member)] = os.path.join(cache, member)
    return out


def _conv_depths_independent(model):
    """Conv depth by memoised recursion over producers (a second implementation)."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    memo = {}

    def below(node):
        key = id(node)
        if key not in memo:
            best = 0
            for i in node.input:
                p = prod.get(i)
                if p is not None:
                    best = max(best, below(p) + (p.op_type in ("Conv", "ConvInteger")))
            memo[key] = best
        return memo[key]

    sys.setrecursionlimit(100000)
    return {(n.name or n.output[0]): below(n) for n in g.node
            if n.op_type in ("Conv", "ConvInteger")}


def _weights_independent(model, node):
    """Conv weights read straight from initializers / Constant nodes by name."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    val = {**inits, **consts}
    w = val[node.input[1]]
    if node.op_type == "ConvInteger":
        base = node.input[1].removesuffix("_quantized")
        return (w.astype(np.float64) - val[node.input[3]].astype(np.float64)) * val[base + "_scale"]
    return w.astype(np.float64)


@pytest.mark.parametrize("name", ["common_old.onnx", "common.onnx",
                                  "ch_PP-OCRv4_det_infer.onnx",
                                  "ch_ppocr_mobile_v2.0_cls_infer.onnx"])
def test_real_models_against_an_independent_reading(real_models, name):
    path = real_models[name]
    info = read_onnx(path)
    model = onnx.load(path)
    depths = _conv_depths_independent(model)
    nodes = {(n.name or n.output[0]): n for n in model.graph.node}
    if name == "common_old.onnx":
        assert {lay.op for lay in info.layers} == {"ConvInteger"}
    if name.startswith("ch_"):
        assert all(nodes[lay.node].input[1] in
                   {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
                   for lay in info.layers)
    assert len(info.layers) == len(depths)
    for lay in info.layers:
        assert lay.conv_depth == depths[lay.node]
        w = _weights_independent(model, nodes[lay.node])
        np.testing.assert_allclose(lay.weights, w, rtol=1e-6, atol=1e-7)
        assert lay.n_filters == w.shape[0] * w.shape[1]
    # depthwise layers: one filter per channel
    dw = [lay for lay in info.filter_layers() if lay.weights.shape[1] == 1]
    if name.startswith("ch_"):
        assert dw, "PaddleOCR models have depthwise 3x3 layers"


def test_ingest_real_models_then_convert_and_analyze(real_models, tmp_path):
    from filterdb_dask import analyze
    from filterdb_dask.convert.write import convert

    paths = [real_models[n] for n in ["common.onnx", "common_old.onnx",
                                      "ch_ppocr_mobile_v2.0_cls_infer.onnx"]]
    h5 = str(tmp_path / "own.h5")
    res = ingest(paths, h5, fields={"Task": "OCR", "Visual Category": "text"})
    src = read_source(h5)
    assert res.filters == src.n_filters and src.unreferenced == 0
    m = src.meta
    assert sorted(m["model_id"].unique()) == [0, 1, 2]
    per_model = m.groupby("model")["filter_ids"].size()
    for p in paths:
        assert per_model[os.path.basename(p)] == len(read_onnx(p).filter_layers())
    assert (m.groupby("model")["conv_depth_norm"].max() == 1.0).all()
    assert m.loc[m["model"] == "common_old.onnx", "op_set"].iloc[0] == 12
    assert m.loc[m["model"] == "common_old.onnx", "ConvInteger"].iloc[0] == 21
    assert m.loc[m["model"] == "common.onnx", "ConvInteger"].iloc[0] == 0
    with h5py.File(h5) as f:
        x = f["filter"][:]
    first = read_onnx(paths[0]).filter_layers()[0].weights.reshape(-1, 9)
    a, b = (int(v) for v in m["filter_ids"].iloc[0].split(":"))
    np.testing.assert_allclose(x[a:b + 1], first.astype(np.float32))
    store = str(tmp_path / "own.zarr")
    convert(h5, store, chunk_filters=50_000, verbosity=0)
    out = analyze(store, by=["model", "depth decile"], verbosity=0)
    assert out.kl["model"].shape == (3, 3) and out.pca.n_filters == res.filters
    # a duplicate is refused, --force adds it
    with pytest.raises(InputError, match=r"is already in .* \(same content hash"):
        ingest([paths[0]], h5)
    ingest([paths[0]], h5, force=True)
    assert read_source(h5).meta["model_id"].max() == 3


def test_append_to_store_keeps_existing_chunks(real_models, tmp_path):
    from filterdb_dask import open_store
    from filterdb_dask.convert.write import convert

    h5 = str(tmp_path / "a.h5")
    ingest([real_models["common.onnx"]], h5)
    store = str(tmp_path / "a.zarr")
    convert(h5, store, verbosity=0)
    before = open_store(store)
    x0 = before.filters.compute()
    mt = os.stat(os.path.join(store, "filters", "00000", "c", "0", "0")).st_mtime_ns
    ingest([real_models["ch_ppocr_mobile_v2.0_cls_infer.onnx"]], store,
           fields={"Task": "OCR"})
    after = open_store(store)
    assert os.stat(os.path.join(store, "filters", "00000", "c", "0", "0")).st_mtime_ns == mt
    np.testing.assert_array_equal(after.filters[: len(x0)].compute(), x0)
    assert after.n_filters > before.n_filters and after.meta["model_id"].max() == 1
    from filterdb_dask.convert.verify import verify

    assert verify(store, verbosity=0).ok


def _tiny_conv_model(path, kernels=((8, 3, 3, 3),), extra_1x1=False, seed=0):
    nodes, inits, prev = [], [], "x"
    rng = np.random.default_rng(seed)
    for i, shape in enumerate(kernels):
        w = rng.normal(size=shape).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info(prev, 1, None)], inits)
    onnx.save(helper.make_model(g, producer_name="test"), path)
    return path


def test_bad_model_files(tmp_path):
    (tmp_path / "t.onnx").write_text("hello")
    with pytest.raises(InputError, match="is not a readable ONNX model"):
        read_onnx(str(tmp_path / "t.onnx"))
    good = _tiny_conv_model(str(tmp_path / "g.onnx"), kernels=((8, 3, 3, 3), (4, 8, 3, 3)))
    data = open(good, "rb").read()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.onnx"):
        read_onnx(str(tmp_path / "cut.onnx"))
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        read_onnx(str(tmp_path / "e.onnx"))
    only1x1 = _tiny_conv_model(str(tmp_path / "one.onnx"), kernels=((8, 3, 1, 1),))
    with pytest.warns(UserWarning, match="has no 3x3 conv kernels; skipped"):
        res = ingest([only1x1, good], str(tmp_path / "db.h5"))
    assert res.skipped == [only1x1] and res.layers == 2 and res.filters == 8 * 3 + 4 * 8
    with pytest.warns(UserWarning), pytest.raises(InputError, match="none of the models"):
        ingest([only1x1], str(tmp_path / "db2.h5"))
    assert not (tmp_path / "db2.h5").exists()


def test_unresolvable_weights_name_the_node(tmp_path):
    n = helper.make_node("Conv", ["x", "w"], ["y"], name="the_conv")
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8]),
                                     helper.make_tensor_value_info("w", 1, [8, 3, 3, 3])],
                          [helper.make_tensor_value_info("y", 1, None)])
    p = str(tmp_path / "in.onnx")
    onnx.save(helper.make_model(g), p)
    with pytest.raises(InputError, match="weights 'w' of node 'the_conv' are a graph input"):
        read_onnx(p)


def test_contiguous_published_file_cannot_grow(tmp_path, synth_h5):
    good = _tiny_conv_model(str(tmp_path / "g.onnx"))
    import shutil

    target = str(tmp_path / "pub.h5")
    shutil.copy(synth_h5, target)
    with pytest.raises(InputError, match="cannot grow"):
        ingest([good], target)


def test_external_data_and_dequantize(tmp_path):
    from onnx.external_data_helper import convert_model_to_external_data

    rng = np.random.default_rng(1)
    q = rng.integers(0, 255, size=(6, 2, 3, 3)).astype(np.uint8)
    scale = np.linspace(0.01, 0.06, 6).astype(np.float32)
    zp = np.full(6, 128, np.uint8)
    inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(zp, "wz")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             helper.make_node("Identity", ["w"], ["w2"]),
             helper.make_node("Conv", ["x", "w2"], ["y"], name="c")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", 1, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    convert_model_to_external_data(m, all_tensors_to_one_file=True, location="m.onnx.data",
                                   size_threshold=0)
    p = str(tmp_path / "m.onnx")
    onnx.save(m, p)
    assert os.path.exists(tmp_path / "m.onnx.data")
    info = read_onnx(p)
    want = (q.astype(np.float64) - 128) * scale[:, None, None, None]
    np.testing.assert_allclose(info.layers[0].weights, want, rtol=1e-6)
    assert info.op_set == 13 and info.depth == 3


def test_qlinearconv_weights_are_dequantized(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.integers(-100, 100, size=(4, 3, 3, 3)).astype(np.int8)
    ws = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    wz = np.zeros(4, np.int8)
    f = numpy_helper.from_array
    inits = [f(w, "w"), f(ws, "ws"), f(wz, "wz"), f(np.float32(0.5), "xs"),
             f(np.uint8(128), "xz"), f(np.float32(0.25), "ys"), f(np.uint8(128), "yz")]
    n = helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"],
                         name="qconv")
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("xq", 2, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", 2, None)], inits)
    p = str(tmp_path / "q.onnx")
    onnx.save(helper.make_model(g), p)
    info = read_onnx(p)
    np.testing.assert_allclose(info.layers[0].weights,
                               w.astype(np.float64) * ws[:, None, None, None], rtol=1e-6)
    assert info.op_counts == {"QLinearConv": 1}


def test_meta_per_model_on_the_command_line_then_numeric_order(tmp_path):
    from filterdb_dask import analyze
    from filterdb_dask.convert.write import convert
    from filterdb_dask.run import main

    h5 = str(tmp_path / "ckpt.h5")
    # epochs ingested out of order, one call each: the checkpoint loop of the README
    for epoch in (10, 2, 1):
        m = _tiny_conv_model(str(tmp_path / f"e{epoch}.onnx"),
                             kernels=((16, 3, 3, 3), (16, 16, 3, 3)), seed=epoch)
        assert main(["ingest", m, "--into", h5, "--meta", f"epoch={epoch}",
                     "--meta", "lr=1e-3", "--meta", "run=a"]) == 0
    meta = read_source(h5).meta
    per_model = meta.groupby("model")[["epoch", "lr", "run"]].first()
    assert per_model.loc["e10.onnx"].tolist() == [10, 0.001, "a"]
    assert meta["epoch"].dtype == np.int64 and meta["lr"].dtype == np.float64
    store = str(tmp_path / "ckpt.zarr")
    convert(h5, store, verbosity=0)
    res = analyze(store, by=["epoch"], verbosity=0)
    assert list(res.kl["epoch"].index) == ["1", "2", "10"]
    res.write(str(tmp_path / "out"))
    with open(tmp_path / "out" / "kl" / "epoch.csv") as fh:
        assert fh.readline().strip().split(",") == ["epoch", "1", "2", "10"]


def test_bad_meta_values(tmp_path):
    from filterdb_dask.convert.ingest import parse_meta_values
    from filterdb_dask.run import main

    assert parse_meta_values(["a=1", "b= 2.5 ", "c=x", "d=nan", "e="]) == {
        "a": 1, "b": 2.5, "c": "x", "d": "nan", "e": ""}
    with pytest.raises(InputError, match="must read NAME=VALUE"):
        parse_meta_values(["epoch"])
    with pytest.raises(InputError, match="must read NAME=VALUE"):
        parse_meta_values(["=5"])
    with pytest.raises(InputError, match="'epoch' is given twice"):
        parse_meta_values(["epoch=1", "epoch=2"])
    m = _tiny_conv_model(str(tmp_path / "m.onnx"))
    with pytest.raises(InputError, match="'conv_depth' of .* would replace a column"):
        ingest([m], str(tmp_path / "db.h5"), fields={"conv_depth": 3})
    assert not (tmp_path / "db.h5").exists()
    assert main(["ingest", m, "--into", str(tmp_path / "db.h5"), "--meta", "layer=1"]) == 1
    assert not (tmp_path / "db.h5").exists()
