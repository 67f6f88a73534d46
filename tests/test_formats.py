"""safetensors and Keras HDF5 routes give the same filters and meta as the PyTorch and
ONNX routes (issue 14, item 1).

The weights are real: the digits CNN trained here (as the ONNX/PyTorch tests do) and a
small CNN with depthwise, grouped, 1x1 and transposed convs. They are written with the
safetensors package's own writer (one file, sharded, bf16) and, Keras and TensorFlow not
being installable here, as both Keras HDF5 layouts written with h5py exactly as Keras
lays them out (Keras 2 ``layer_names``/``weight_names``, root and ``model_weights``;
Keras 3 ``layers/<name>/vars/<i>``).
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("safetensors")
ml_dtypes = pytest.importorskip("ml_dtypes")

from safetensors.numpy import save_file  # noqa: E402

from filterdb_dask.convert.ingest import ingest, model_format, read_model  # noqa: E402
from filterdb_dask.convert.onnx_extract import read_onnx  # noqa: E402
from filterdb_dask.convert.read import read_source  # noqa: E402
from filterdb_dask.convert.torch_extract import read_state_dict  # noqa: E402

# meta columns that depend only on the conv weights and their order
SAME_META = ["conv_depth", "conv_depth_norm", "filter_ids", "total_filters",
             "3x3_filter_share", "(3, 3) filters"]


class Mixed(torch.nn.Module):
    """Plain, depthwise (x2 multiplier), grouped, 1x1 and a transposed conv."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.grouped = torch.nn.Conv2d(16, 8, 3, padding=1, groups=2)
        self.pw = torch.nn.Conv2d(8, 12, 1)
        self.up_transpose = torch.nn.ConvTranspose2d(12, 4, 2, stride=2)

    def forward(self, x):
        return self.up_transpose(self.pw(self.grouped(self.dw(self.stem(x)))))


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from filterdb_dask.convert.digits import export, train

    d = tmp_path_factory.mktemp("formats")
    torch.manual_seed(1)
    digits, example, _ = train(epochs=1)
    mixed = Mixed().eval()
    out = {}
    for name, net, ex in (("digits", digits, example), ("mixed", mixed, torch.zeros(1, 3, 8, 8))):
        sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()
              if v.dtype.is_floating_point}
        pth = str(d / f"{name}.pth")
        torch.save(net.state_dict(), pth)
        onnx_path = str(d / f"{name}.onnx")
        export(net, ex, onnx_path)
        out[name] = {"sd": sd, "pth": pth, "onnx": onnx_path, "dir": d}
    return out


def _filters(info):
    return [lay.weights for lay in info.filter_layers()]


def _same_filters(a, b):
    fa, fb = _filters(a), _filters(b)
    assert [w.shape for w in fa] == [w.shape for w in fb]
    for x, y in zip(fa, fb, strict=True):
        np.testing.assert_array_equal(x, y)
    assert [lay.conv_depth for lay in a.layers] == [lay.conv_depth for lay in b.layers]
    assert a.kernel_counts() == b.kernel_counts()


def _same_meta(tmp_path, a_path, b_path):
    metas = []
    for i, p in enumerate((a_path, b_path)):
        h5 = str(tmp_path / f"db{i}.h5")
        ingest([p], h5)
        metas.append(read_source(h5).meta.reset_index(drop=True))
    for col in SAME_META:
        assert metas[0][col].tolist() == metas[1][col].tolist(), col
    with h5py.File(tmp_path / "db0.h5") as f0, h5py.File(tmp_path / "db1.h5") as f1:
        np.testing.assert_array_equal(f0["filter"][:], f1["filter"][:])


# ------------------------------------------------------------------ safetensors


def test_safetensors_single_file_equals_state_dict_route(nets, tmp_path):
    n = nets["digits"]
    st = str(tmp_path / "digits.safetensors")
    save_file(n["sd"], st, metadata={"format": "pt"})
    assert model_format(st) == "safetensors"
    got, want = read_model(st), read_state_dict(n["pth"])
    _same_filters(got, want)
    assert got.producer == "safetensors" and got.name == "digits"
    assert [lay.node for lay in got.layers] == [lay.node for lay in want.layers]
    _same_meta(tmp_path, st, n["pth"])


def test_safetensors_mixed_conv_kinds(nets, tmp_path):
    sd = nets["mixed"]["sd"]
    st = str(tmp_path / "mixed.safetensors")
    save_file(sd, st)
    info = read_model(st)
    # the same tensors as the state-dict route, in natural name order (the file keeps
    # no module order); the transposed conv is left out; depthwise and grouped give one
    # filter per output channel x input channel of its group
    want = {lay.node: lay.weights for lay in read_state_dict(nets["mixed"]["pth"]).layers}
    assert {lay.node for lay in info.layers} == set(want)
    for lay in info.layers:
        np.testing.assert_array_equal(lay.weights, want[lay.node])
    assert [lay.conv_depth for lay in info.layers] == [0, 1, 2, 3]
    assert [lay.node for lay in info.layers] == ["dw.weight", "grouped.weight", "pw.weight",
                                                 "stem.weight"]
    assert [lay.weights.shape for lay in info.layers] == [(16, 1, 3, 3), (8, 8, 3, 3),
                                                          (12, 8, 1, 1), (8, 3, 3, 3)]
    assert info.kernel_counts() == {"(3, 3) filters": 16 + 64 + 24, "(1, 1) filters": 96}


def test_safetensors_equals_onnx_route(nets, tmp_path):
    # the mixed net has no BatchNorm: its ONNX weights are the state dict's, bit for bit
    n = nets["mixed"]
    st = str(tmp_path / "m.safetensors")
    save_file(n["sd"], st)
    by_name = {lay.node: lay.weights for lay in read_model(st).layers}
    onnx_info = read_onnx(n["onnx"])
    assert len(onnx_info.layers) == 4  # ConvTranspose is not a Conv
    for lay in onnx_info.layers:
        key = [k for k in by_name if lay.weights.shape == by_name[k].shape
               and np.array_equal(lay.weights, by_name[k])]
        assert len(key) == 1, lay.node


def test_safetensors_sharded_is_one_model(nets, tmp_path):
    n = nets["digits"]
    sd = n["sd"]
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    folder = tmp_path / "digits-sharded"
    folder.mkdir()
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / fname))
        weight_map.update(dict.fromkeys(ks, fname))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map},
                                sort_keys=True))
    for p in (str(index), str(folder)):
        got = read_model(p)
        _same_filters(got, read_state_dict(n["pth"]))
        assert got.name == "digits-sharded" and got.path == str(folder)
    _same_meta(tmp_path, str(index), n["pth"])


def test_safetensors_bf16(nets, tmp_path):
    sd = nets["digits"]["sd"]
    st = str(tmp_path / "bf16.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, st)
    got = read_model(st)
    want = read_state_dict(nets["digits"]["pth"])
    for x, y in zip(_filters(got), _filters(want), strict=True):
        np.testing.assert_array_equal(x, y.astype(np.float32).astype(ml_dtypes.bfloat16)
                                      .astype(np.float64))
        assert not np.array_equal(x, y)  # rounding happened: the test sees bf16 values


# ------------------------------------------------------------------ Keras HDF5


def _keras_kernel(w):
    """PyTorch (out, in/groups, kh, kw) -> Keras (kh, kw, in/groups, out)."""
    return w.transpose(2, 3, 1, 0)


def _keras_depthwise(w, channels):
    """PyTorch depthwise (channels * mult, 1, kh, kw) -> Keras (kh, kw, channels, mult)."""
    out, _, kh, kw = w.shape
    return w.reshape(channels, out // channels, kh, kw).transpose(2, 3, 0, 1)


def _keras_layers(name, sd):
    """(layer name, [(variable name, array)]) in model order, as Keras names them."""
    if name == "digits":
        return [(f"conv2d{s}", [("kernel", _keras_kernel(sd[f"{i}.weight"])),
                                ("bias", sd[f"{i}.bias"])])
                for s, i in (("", 0), ("_1", 3), ("_2", 6))] + \
               [("dense", [("kernel", sd["9.weight"].T), ("bias", sd["9.bias"])])]
    return [("conv2d", [("kernel", _keras_kernel(sd["stem.weight"])), ("bias", sd["stem.bias"])]),
            ("depthwise_conv2d", [("depthwise_kernel", _keras_depthwise(sd["dw.weight"], 8)),
                                  ("bias", sd["dw.bias"])]),
            ("conv2d_1", [("kernel", _keras_kernel(sd["grouped.weight"])),
                          ("bias", sd["grouped.bias"])]),
            ("conv2d_2", [("kernel", _keras_kernel(sd["pw.weight"])), ("bias", sd["pw.bias"])]),
            ("conv2d_transpose", [("kernel", sd["up_transpose.weight"].transpose(2, 3, 1, 0)),
                                  ("bias", sd["up_transpose.bias"])])]


def write_keras2(path, layers, *, full_model=False):
    """Keras 2 HDF5 (``save_weights`` layout, or ``model.save`` with ``model_weights``)."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        if full_model:
            f.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {
                "layers": [{"class_name": "DepthwiseConv2D" if "depthwise" in n else
                            "Conv2DTranspose" if "transpose" in n else "Conv2D",
                            "config": {"name": n}} for n, _ in layers]}})
            f.attrs["keras_version"] = "2.15.0"
        root.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        root.attrs["backend"] = "tensorflow"
        for n, variables in layers:
            g = root.create_group(n)
            names = [f"{n}/{v}:0".encode() for v, _ in variables]
            g.attrs["weight_names"] = np.array(names)
            for (_, a), wn in zip(variables, names, strict=True):
                g.create_dataset(wn.decode(), data=a)


def write_keras3(path, layers):
    """Keras 3 ``.weights.h5``: ``layers/<name>/vars/<i>`` written in model order."""
    with h5py.File(path, "w") as f:
        f.create_group("vars")
        g = f.create_group("layers")
        for n, variables in layers:
            v = g.create_group(n).create_group("vars")
            for i, (_, a) in enumerate(variables):
                v.create_dataset(str(i), data=a)
        f.create_group("optimizer").create_group("vars")


@pytest.mark.parametrize("layout", ["keras2", "keras2-model", "keras3"])
def test_keras_layouts_equal_state_dict_route(nets, tmp_path, layout):
    for name, n in nets.items():
        layers = _keras_layers(name, n["sd"])
        p = str(tmp_path / (f"{name}.weights.h5" if layout == "keras3" else f"{name}.h5"))
        if layout == "keras3":
            write_keras3(p, layers)
        else:
            write_keras2(p, layers, full_model=layout == "keras2-model")
        assert model_format(p) == "keras"
        got = read_model(p)
        assert got.name == name and got.producer == layout.split("-")[0]
        if name == "digits":
            _same_filters(got, read_state_dict(n["pth"]))
            (tmp_path / layout).mkdir()
            _same_meta(tmp_path / layout, p, n["pth"])
        else:
            # depthwise, grouped and 1x1 kernels against the state dict's tensors; the
            # transposed conv is left out
            sd = n["sd"]
            want = {"conv2d": "stem", "depthwise_conv2d": "dw", "conv2d_1": "grouped",
                    "conv2d_2": "pw"}
            got_by = {lay.node.split("/")[0]: lay.weights for lay in got.layers}
            assert set(got_by) == set(want)
            for k, v in want.items():
                np.testing.assert_array_equal(got_by[k], sd[f"{v}.weight"].astype(np.float64))
            if layout != "keras3":  # Keras 2 keeps the model order
                assert [lay.node.split("/")[0] for lay in got.layers] == list(want)


def test_keras3_layers_in_natural_name_order(tmp_path):
    # 12 conv layers written in model order: alphabetical order would put conv2d_10
    # before conv2d_2, and HDF5 iterates names alphabetically
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 3, 2, 2)).astype(np.float32) for _ in range(12)]
    layers = [(f"conv2d{'' if i == 0 else f'_{i}'}", [("kernel", w)]) for i, w in enumerate(ws)]
    p = str(tmp_path / "deep.weights.h5")
    write_keras3(p, layers)
    got = read_model(p)
    for lay, w in zip(got.layers, ws, strict=True):
        np.testing.assert_array_equal(lay.weights, w.transpose(3, 2, 0, 1))
    assert [lay.conv_depth for lay in got.layers] == list(range(12))


@pytest.mark.parametrize("layout", ["keras2", "keras3"])
def test_keras_separable_conv_is_depthwise_then_pointwise(tmp_path, layout):
    rng = np.random.default_rng(3)
    dw = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)  # 4 channels, multiplier 2
    pw = rng.normal(size=(1, 1, 8, 5)).astype(np.float32)
    layers = [("separable_conv2d", [("depthwise_kernel", dw), ("pointwise_kernel", pw),
                                    ("bias", np.zeros(5, np.float32))])]
    p = str(tmp_path / ("s.weights.h5" if layout == "keras3" else "s.h5"))
    (write_keras3 if layout == "keras3" else write_keras2)(p, layers)
    got = read_model(p)
    assert [lay.weights.shape for lay in got.layers] == [(8, 1, 3, 3), (5, 8, 1, 1)]
    assert [lay.conv_depth for lay in got.layers] == [0, 1]
    # output channel c * 2 + m is input channel c through multiplier m
    np.testing.assert_array_equal(got.layers[0].weights[2 * 3 + 1, 0], dw[:, :, 3, 1])
    np.testing.assert_array_equal(got.layers[1].weights[4, 7, 0, 0], pw[0, 0, 7, 4])
    assert got.kernel_counts() == {"(3, 3) filters": 8, "(1, 1) filters": 40}
    assert len(got.filter_layers()) == 1 and len(got.filter_layers(1)) == 1


def write_keras_archive(path, layers, classes):
    """A Keras 3 ``.keras`` archive: config.json (Sequential) + model.weights.h5, stored."""
    import io
    import zipfile

    buf = io.BytesIO()
    write_keras3(buf, layers)
    config = {"module": "keras", "class_name": "Sequential", "config": {
        "name": "sequential", "layers": [
            {"module": "keras.layers", "class_name": "InputLayer",
             "config": {"name": "input_layer", "batch_shape": [None, 8, 8, 3]}},
            *({"module": "keras.layers", "class_name": classes[n], "config": {"name": n}}
              for n, _ in layers)]}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.weights.h5", buf.getvalue())


def test_keras_archive_gives_model_order_and_classes(nets, tmp_path):
    # renamed layers: only the archive's config tells their classes and order
    n = nets["mixed"]
    sd = n["sd"]
    renamed = {"conv2d": "stem", "depthwise_conv2d": "dw", "conv2d_1": "grouped",
               "conv2d_2": "pw", "conv2d_transpose": "up"}
    layers = [(renamed[k], v) for k, v in _keras_layers("mixed", sd)]
    classes = {"stem": "Conv2D", "dw": "DepthwiseConv2D", "grouped": "Conv2D", "pw": "Conv2D",
               "up": "Conv2DTranspose"}
    p = str(tmp_path / "mixed.keras")
    write_keras_archive(p, layers, classes)
    assert model_format(p) == "keras"
    got = read_model(p)
    assert got.producer == "keras3" and got.name == "mixed"
    assert [lay.node for lay in got.layers] == [f"{k}/vars/0" for k in ("stem", "dw", "grouped",
                                                                          "pw")]
    _same_filters(got, read_state_dict(n["pth"]))
    _same_meta(tmp_path, p, n["pth"])
    # the same weights without the archive: the renamed depthwise layer reads as a plain conv
    bare = str(tmp_path / "mixed.weights.h5")
    write_keras3(bare, layers)
    assert {lay.node: lay.weights.shape for lay in read_model(bare).layers}["dw/vars/0"] == \
        (2, 8, 3, 3)


def test_bad_keras_archive(tmp_path):
    import zipfile

    p = tmp_path / "x.keras"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("config.json", "{}")
    from filterdb_dask.errors import InputError

    with pytest.raises(InputError, match=r"is a zip archive but not a Keras 3 model"):
        read_model(str(p))
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("config.json", b"\xff")
        z.writestr("model.weights.h5", b"")
    with pytest.raises(InputError, match=r"config.json is not valid JSON"):
        read_model(str(p))
