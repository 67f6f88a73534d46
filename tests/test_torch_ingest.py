"""A small CNN trained here on scikit-learn's digits, exported to ONNX and ingested;
the PyTorch route gives the same filters."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from filterdb_dask.convert.ingest import ingest  # noqa: E402
from filterdb_dask.convert.onnx_extract import read_onnx  # noqa: E402
from filterdb_dask.convert.read import read_source  # noqa: E402
from filterdb_dask.convert.torch_extract import read_module, read_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from filterdb_dask.convert.digits import export, train

    net, example, acc = train()
    d = tmp_path_factory.mktemp("torch")
    path = str(d / "digits.onnx")
    export(net, example, path)
    sd = str(d / "digits.pth")
    torch.save(net.state_dict(), sd)
    return net, path, sd, acc


def test_trained_model_learned_something(trained):
    assert trained[3] > 0.8


def test_onnx_filters_equal_module_weights_with_batchnorm_folded(trained, tmp_path):
    net, path, _, _ = trained
    info = read_onnx(path)
    mod = read_module(net, name="digits")
    assert [lay.weights.shape for lay in info.filter_layers()] == \
           [lay.weights.shape for lay in mod.filter_layers()]
    assert [lay.conv_depth for lay in info.filter_layers()] == [0, 1, 2]
    assert [lay.conv_depth for lay in mod.filter_layers()] == [0, 1, 2]
    for a, b in zip(info.filter_layers(), mod.filter_layers(), strict=True):
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, atol=1e-6)
    # the folded layer differs from the raw conv weight; the others are the raw weights
    raw0 = net[0].weight.detach().double().numpy()
    assert not np.allclose(info.filter_layers()[0].weights, raw0)
    np.testing.assert_allclose(info.filter_layers()[1].weights,
                               net[3].weight.detach().double().numpy(), rtol=1e-6)
    h5 = str(tmp_path / "db.h5")
    res = ingest([path], h5, fields={"Task": "Classification", "Visual Category": "digits"})
    src = read_source(h5)
    assert res.filters == 8 + 8 * 16 + 16 * 16 == src.n_filters
    assert src.meta["conv_depth_norm"].tolist() == [0.0, 0.5, 1.0]
    ingest([], h5, infos=[mod], force=True)
    src2 = read_source(h5)
    import h5py

    with h5py.File(h5) as f:
        x = f["filter"][:]
    n = res.filters
    np.testing.assert_allclose(x[:n], x[n:2 * n], rtol=1e-5, atol=1e-6)
    assert src2.meta["model_id"].nunique() == 2


def test_state_dict_route(trained):
    net, _, sd, _ = trained
    info = read_state_dict(sd)
    assert [lay.conv_depth for lay in info.filter_layers()] == [0, 1, 2]
    np.testing.assert_array_equal(info.filter_layers()[2].weights,
                                  net[6].weight.detach().double().numpy())
