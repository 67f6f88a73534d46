"""Orthogonality of a layer's rows (docs/method.md §7): the kernel against analytic
cases and a direct computation, and end to end from ONNX models built here (plain,
grouped and depthwise Conv) through ingest -> convert -> analyze."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from filterdb_dask import kernels as K
from filterdb_dask.engines import get_kernels, numba_available
from filterdb_dask.errors import AnalysisError
from filterdb_dask.quality import layer_out_channels, quality_table


def direct(w) -> float:
    """The definition with numpy's matmul: 1 - mean |cosine| over i != j."""
    w = np.asarray(w, dtype=np.float64).reshape(len(w), -1)
    c = len(w)
    if c < 2:
        return float("nan")
    n = np.linalg.norm(w, axis=1, keepdims=True)
    wn = np.divide(w, n, out=np.zeros_like(w), where=n > 0)
    g = np.abs(wn @ wn.T)
    np.fill_diagonal(g, 0.0)
    return 1.0 - g.sum() / (c * (c - 1))


def test_analytic_cases():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(27, 27)))
    assert K.orthogonality_rows(q[:16]) == pytest.approx(1.0, abs=1e-14)  # orthonormal rows
    assert K.orthogonality_rows(np.eye(9) * 3.0) == 1.0  # orthogonal, any norm
    same = np.tile(rng.normal(size=27), (6, 1))
    assert K.orthogonality_rows(same) == pytest.approx(0.0, abs=1e-14)  # identical rows
    same[::2] *= -5.0  # a sign flip or a scale leaves |cosine| = 1
    assert K.orthogonality_rows(same) == pytest.approx(0.0, abs=1e-14)
    # an all-zero row stays zero: its dot product with every row is 0
    z = q[:5].copy()
    z[2] = 0.0
    assert K.orthogonality_rows(z) == pytest.approx(1.0, abs=1e-14)
    assert K.orthogonality_rows(np.zeros((4, 18))) == 1.0  # zero layer: the formula's value
    two = np.array([[1.0, 0, 0], [1.0, 1.0, 0]])
    assert K.orthogonality_rows(two) == pytest.approx(1 - np.sqrt(0.5), abs=1e-15)
    assert np.isnan(K.orthogonality_rows(rng.normal(size=(1, 9))))  # c_out = 1
    assert np.isnan(K.orthogonality_rows(np.zeros((0, 9))))


@pytest.mark.parametrize("c,m", [(2, 9), (7, 18), (64, 27), (300, 45)])
def test_rows_match_direct_computation(c, m):
    rng = np.random.default_rng(c)
    w = rng.normal(size=(c, m)).astype(np.float32)
    w[1] = 0
    assert K.orthogonality_rows(w) == pytest.approx(direct(w), abs=1e-13)


def test_blocks_bound_memory_and_match(monkeypatch):
    """A small block budget (the path of a huge c_out) gives the same bits: the
    summation order does not depend on the blocks."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(130, 18))
    full = K.orthogonality_rows(w)
    monkeypatch.setattr(K, "ORTHO_BLOCK_ENTRIES", 200)  # 1 row per block
    assert K.orthogonality_rows(w) == full
    assert K.orthogonality_rows(w) == pytest.approx(direct(w), abs=1e-13)


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
@pytest.mark.parametrize("c,m", [(2, 9), (3, 1), (9, 9), (17, 45), (64, 576), (250, 27)])
def test_compiled_twin_gives_the_same_bits(c, m):
    from filterdb_dask import _compiled

    rng = np.random.default_rng(c * 1000 + m)
    w = rng.normal(size=(c, m)).astype(np.float32)
    w[c // 2] = 0.0  # a zero row
    w[-1] = w[0] * -3.0  # a parallel one
    assert _compiled.orthogonality_rows(w) == K.orthogonality_rows(w)
    x = np.concatenate([rng.normal(size=(5, 9)), w.reshape(-1, 9) if m % 9 == 0
                        else rng.normal(size=(c, 9))]).astype(np.float32)
    b = np.array([[0, 5], [5, len(x)]])
    co = np.array([np.nan, float(c)])
    got = get_kernels("numba").orthogonality_chunk(x, b, co)
    assert got.tobytes() == K.orthogonality_chunk(x, b, co).tobytes()


def test_chunk_kernel_bits_do_not_depend_on_the_chunk():
    """A layer gives the same bits wherever it sits in a chunk and whatever its neighbours."""
    rng = np.random.default_rng(1)
    layer = rng.normal(size=(16 * 8, 9)).astype(np.float32)  # c_out 16, 8 filters a row
    alone = K.orthogonality_chunk(layer, np.array([[0, 128]]), np.array([16.0]))
    for pad in (1, 3, 37, 1000):
        x = np.concatenate([rng.normal(size=(pad, 9)).astype(np.float32), layer,
                            rng.normal(size=(5, 9)).astype(np.float32)])
        got = K.orthogonality_chunk(x, np.array([[0, pad], [pad, pad + 128]]),
                                    np.array([np.nan, 16.0]))
        assert np.isnan(got[0])
        assert got[1].tobytes() == alone[0].tobytes()
    assert alone[0] == pytest.approx(direct(layer.reshape(16, -1)), abs=1e-13)
    # c_out 1 and unknown: NaN
    assert np.isnan(K.orthogonality_chunk(layer, np.array([[0, 128]]), np.array([1.0]))).all()


def _meta(c_out, n):
    stops = np.cumsum(n)
    return pd.DataFrame({"out_channels": c_out, "start": stops - np.asarray(n), "stop": stops})


def test_out_channels_column_is_checked():
    assert layer_out_channels(pd.DataFrame({"start": [0], "stop": [4]})) is None
    c = layer_out_channels(_meta([4, np.nan], [8, 9]))
    np.testing.assert_array_equal(c, [4.0, np.nan])
    with pytest.raises(AnalysisError, match=r"meta row 1: out_channels '4' is not a positive "
                                            r"whole number dividing the layer's 10 filters"):
        layer_out_channels(_meta([4, 4], [8, 10]))
    for bad in (0, -2, 2.5, "x", np.inf):
        with pytest.raises(AnalysisError, match=r"meta row 0: out_channels"):
            layer_out_channels(_meta(pd.Series([bad], dtype=object), [8]))


def test_quality_table_without_shapes_has_a_nan_column():
    stats = np.zeros((2, K.N_STATS))
    stats[:, K.STAT_N] = 4
    meta = pd.DataFrame({"model_id": [0, 0], "conv_depth": [0, 1],
                         "conv_depth_norm": [0.0, 1.0]})
    q = quality_table(meta, stats)
    assert q.columns[-1] == "orthogonality" and q["orthogonality"].isna().all()
    q = quality_table(meta, stats, orthogonality=np.array([0.5, np.nan]))
    assert q["orthogonality"].iloc[0] == 0.5


# ------------------------------------------------------------ real ONNX models
onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

#: (weight shape, group): a plain conv, a grouped one (2 groups), a depthwise one,
#: a 1-output-channel conv (NaN) and a 1x1 conv (not a 3x3 layer: not stored)
LAYERS = [((24, 3, 3, 3), 1), ((32, 12, 3, 3), 2), ((32, 1, 3, 3), 32),
          ((1, 32, 3, 3), 1), ((8, 1, 1, 1), 1)]


def _onnx_model(path, seed):
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (shape, group) in enumerate(LAYERS):
        w = rng.normal(size=shape).astype(np.float32)
        if i == 1:
            w[3] = 0.0  # an all-zero output channel
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        k = shape[2]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], name=f"conv{i}",
                                      group=group, pads=[k // 2] * 4))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info(prev, 1, None)], inits)
    onnx.save(helper.make_model(g, producer_name="test"), path)
    return path


@pytest.fixture(scope="module")
def onnx_db(tmp_path_factory):
    from filterdb_dask.convert.ingest import ingest

    d = tmp_path_factory.mktemp("ortho")
    paths = [_onnx_model(str(d / f"m{s}.onnx"), s) for s in range(3)]
    h5 = str(d / "own.h5")
    ingest(paths, h5, fields={"Task": "test"})
    return paths, h5


def _direct_from_initializers(path):
    """Per 3x3 conv node: orthogonality straight from the initializer, by name."""
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        w = inits[n.input[1]].astype(np.float64)
        if w.shape[2:] == (3, 3):
            out[n.name] = direct(w.reshape(w.shape[0], -1))
    return out


def test_ingest_records_the_weight_shape(onnx_db):
    from filterdb_dask.convert.read import read_source

    _, h5 = onnx_db
    m = read_source(h5).meta
    first = m[m["model"] == "m0.onnx"].set_index("layer")
    assert list(first.index) == ["conv0", "conv1", "conv2", "conv3"]  # the 1x1 is left out
    for i, (shape, group) in enumerate(LAYERS[:4]):
        row = first.loc[f"conv{i}"]
        assert (row["out_channels"], row["in_channels"], row["groups"], row["kernel"]) == (
            shape[0], shape[1] * group, group, 3)


@pytest.mark.parametrize("chunk_filters", [50, 1_000_000])
def test_orthogonality_of_onnx_layers_against_initializers(onnx_db, tmp_path, chunk_filters):
    from filterdb_dask import analyze
    from filterdb_dask.convert.write import convert

    paths, h5 = onnx_db
    store = str(tmp_path / "own.zarr")
    convert(h5, store, chunk_filters=chunk_filters, verbosity=0)
    res = analyze(store, by=["model"], verbosity=0)
    q = res.quality
    meta = res.meta.reset_index(drop=True)
    n_checked = 0
    for p in paths:
        want = _direct_from_initializers(p)
        rows = meta.index[meta["model"] == p.rsplit("/", 1)[-1]]
        for r in rows:
            w = want[meta.loc[r, "layer"]]
            got = q["orthogonality"].iloc[r]
            if np.isnan(w):
                assert np.isnan(got)
            else:
                assert got == pytest.approx(w, abs=1e-12)
                n_checked += 1
    assert n_checked == 3 * 3
    assert res.models()["mean_orthogonality"].notna().all()


def test_orthogonality_bits_do_not_depend_on_the_chunking(onnx_db, tmp_path):
    from filterdb_dask import analyze
    from filterdb_dask.convert.write import convert

    _, h5 = onnx_db
    got = []
    for i, cf in enumerate((7, 300, 1_000_000)):
        store = str(tmp_path / f"s{i}.zarr")
        convert(h5, store, chunk_filters=cf, verbosity=0)
        got.append(analyze(store, by=["model"], verbosity=0).orthogonality)
    assert got[0].tobytes() == got[1].tobytes() == got[2].tobytes()
    plain = analyze(store, by=["model"], verbosity=0, engine="numpy").orthogonality
    assert plain.tobytes() == got[2].tobytes()  # either engine, the same bits
    off = analyze(store, by=["model"], verbosity=0, orthogonality=False)
    assert off.orthogonality is None and off.quality["orthogonality"].isna().all()


def test_result_set_keeps_orthogonality(onnx_db, tmp_path):
    import xarray as xr

    from filterdb_dask import analyze
    from filterdb_dask.convert.write import convert
    from filterdb_dask.resultset import Results

    _, h5 = onnx_db
    store = str(tmp_path / "own.zarr")
    convert(h5, store, verbosity=0)
    res = analyze(store, by=["model"], verbosity=0)
    out = tmp_path / "out"
    res.write(out)
    back = Results.open(out)
    assert back.orthogonality.tobytes() == res.orthogonality.tobytes()
    q = pd.read_csv(out / "quality.csv")
    np.testing.assert_array_equal(q["orthogonality"], res.quality["orthogonality"])
    ds = xr.open_zarr(out / "results.zarr", consolidated=False)
    np.testing.assert_array_equal(ds["quality_orthogonality"].values, q["orthogonality"])
    mq = pd.read_csv(out / "model_quality.csv")
    assert "mean_orthogonality" in mq.columns


def test_report_draws_orthogonality(onnx_db, tmp_path):
    from filterdb_dask.convert.write import convert

    _, h5 = onnx_db
    store = str(tmp_path / "own.zarr")
    convert(h5, store, verbosity=0)
    out = tmp_path / "out"
    from filterdb_dask.run import main

    assert main(["-q", "analyze", store, "--out", str(out), "--by", "model",
                 "--scheduler", "threads"]) == 0
    page = (out / "report.html").read_text()
    assert (out / "plots" / "orthogonality.png").is_file()
    assert "Orthogonality of the raw weights" in page and "mean_orthogonality" in page
    off = tmp_path / "off"
    assert main(["-q", "analyze", store, "--out", str(off), "--by", "model", "--no-report",
                 "--scheduler", "threads", "--no-orthogonality"]) == 0
    assert pd.read_csv(off / "quality.csv")["orthogonality"].isna().all()
