"""analyze in a fixed reference basis (--basis) and drift curves, against numpy."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr

from filterdb_dask import analyze
from filterdb_dask.basis import basis_digest, load_basis
from filterdb_dask.convert.write import convert
from filterdb_dask.errors import AnalysisError
from filterdb_dask.resultset import Results
from filterdb_dask.run import main
from tests import reference as ref
from tests.conftest import simple_meta, write_h5

SIZES = [30, 55, 41, 7, 64, 23, 1, 48, 36, 52, 2, 29] * 2  # 8 models of 3 layers
HALF = 4  # models 0..3 form REF's store; 4..7 are shifted


def _models():
    return [i // 3 for i in range(len(SIZES))]


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A store whose second half of models is shifted, and one of its first half."""
    d = tmp_path_factory.mktemp("basis")
    rng = np.random.default_rng(3)
    models = _models()
    n = sum(SIZES)
    x = rng.normal(size=(n, 9)) * rng.lognormal(0, 0.5, size=(n, 1))
    starts = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    cut = int(starts[3 * HALF])
    # first half: one smooth pattern plus noise (a narrow range); the second half
    # spreads in every direction, so many of its coefficients fall outside REF's range
    x[:cut] = x[:cut] * 0.2 + np.array([1.0, 0.8, 0.2, 0.8, 0.5, 0.0, 0.2, 0.0, -0.6])
    x = x.astype(np.float32)
    x[starts[5]: starts[5] + 3] = 0  # zero filters: coefficient -mean·components
    epoch = [[1, 2, 10, 20, 30, 40, 50, 60][m] for m in models]
    meta = simple_meta(SIZES, models=models, extra={"epoch": epoch})
    write_h5(d / "all.h5", x, meta, meta_format="table")
    k = 3 * HALF
    meta_a = simple_meta(SIZES[:k], models=models[:k], extra={"epoch": epoch[:k]})
    write_h5(d / "a.h5", x[:cut], meta_a, meta_format="table")
    convert(str(d / "all.h5"), str(d / "all.zarr"), chunk_filters=150, verbosity=0)
    convert(str(d / "a.h5"), str(d / "a.zarr"), chunk_filters=70, verbosity=0)
    by = ["epoch", "model", "depth decile"]
    ref_res = analyze(str(d / "a.zarr"), by=by, verbosity=0)
    ref_res.write(str(d / "ref"))
    return {"dir": d, "x": x, "meta": pd.read_hdf(d / "all.h5", "meta").reset_index(),
            "by": by, "ref": ref_res, "cut": cut}


def _coefs(xs, mean, comps):
    """c = (x_scaled − μ)·componentsᵀ, each sum taken left to right (docs/method.md §3)."""
    d = xs - mean
    out = np.zeros((len(xs), comps.shape[0]))
    for k in range(comps.shape[0]):
        acc = d[:, 0] * comps[k, 0]
        for j in range(1, d.shape[1]):
            acc = acc + d[:, j] * comps[k, j]
        out[:, k] = acc
    return out


def test_basis_of_the_first_half_against_numpy(shifted):
    d, x, meta = shifted["dir"], shifted["x"], shifted["meta"]
    res = analyze(str(d / "all.zarr"), by=shifted["by"], basis=str(d / "ref"), verbosity=0)
    basis = Results.open(d / "ref")
    lo, hi = basis.coef_range
    np.testing.assert_array_equal(res.pca.components, basis.pca.components)
    np.testing.assert_array_equal(res.bin_edges, basis.bin_edges)
    c = _coefs(ref.scale(x), basis.pca.mean, basis.pca.components)
    # the store's own PCA is kept beside (pass 1) and is not the basis
    own = ref.pca(ref.scale(x))
    np.testing.assert_allclose(res.own_pca.explained_variance_ratio,
                               own["explained_variance_ratio"], rtol=1e-9)
    assert res.own_pca.n_filters == len(x) and res.n_filters == len(x)
    assert res.pca.n_filters == shifted["cut"]
    # out of range: exact, per layer and component
    want_oor = np.zeros((len(meta), 9), dtype=np.int64)
    for i in range(len(meta)):
        a, b = (int(v) for v in str(meta["filter_ids"].iloc[i]).split(":"))
        ci = c[a:b + 1]
        want_oor[i] = ((ci < lo) | (ci > hi)).sum(axis=0)
        for k in range(9):
            h, _ = np.histogram(ci[:, k], bins=70, range=(lo, hi))
            np.testing.assert_array_equal(res.layer_hist[i, k], h)
    np.testing.assert_array_equal(res.out_of_range, want_oor)
    half = 3 * HALF
    assert want_oor[:half].sum() == 0 and want_oor[half:].sum() > 100  # the test bites
    np.testing.assert_array_equal(res.observed_range, [c.min(), c.max()])
    # KL in REF's basis, weights = REF's explained variance ratio
    for by, slug in [("epoch", "epoch"), ("model", "model")]:
        rows, labels = ref.row_labels(meta, by)
        groups, m = ref.kl_matrix(c[rows], labels, lo, hi,
                                  basis.pca.explained_variance_ratio)
        got = res.kl[slug]
        want = pd.DataFrame(m, index=groups, columns=groups).loc[got.index, got.index]
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-9, atol=1e-12)
    assert list(res.kl["epoch"].index) == ["1", "2", "10", "20", "30", "40", "50", "60"]
    # the 2-D density, taken in the basis in pass 3
    dens, _, _ = np.histogram2d(c[:, 0], c[:, 1], bins=512, range=[[-3.3, 3.3]] * 2)
    np.testing.assert_array_equal(res.density, dens)
    # the basis is recorded: path and digest
    rec = res.settings["basis"]
    assert rec["path"] == os.path.abspath(d / "ref")
    assert rec["digest"] == basis_digest({
        "mean": basis.pca.mean, "components": basis.pca.components,
        "explained_variance_ratio": basis.pca.explained_variance_ratio,
        "coef_range": basis.coef_range, "bin_edges": basis.bin_edges,
        "fine_edges": basis.fine_edges})


def test_self_basis_reproduces_the_original_bit_for_bit(shifted, tmp_path):
    d = shifted["dir"]
    res = analyze(str(d / "a.zarr"), by=shifted["by"], basis=str(d / "ref"), verbosity=0)
    res.write(str(tmp_path / "self"))
    a = xr.open_zarr(d / "ref" / "results.zarr", consolidated=False).load()
    b = xr.open_zarr(tmp_path / "self" / "results.zarr", consolidated=False).load()
    extra = {"observed_range"} | {v for v in b.data_vars if v.startswith("own_")}
    assert set(b.data_vars) - set(a.data_vars) == extra
    assert set(a.data_vars) <= set(b.data_vars)
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
        assert a[v].dtype == b[v].dtype, v
    for v in a.coords:
        np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
    assert {k: v for k, v in a.attrs.items() if k != "settings"} == \
        {k: v for k, v in b.attrs.items() if k not in ("settings", "own_n_filters")}
    assert int(b["out_of_range"].values.sum()) == 0
    np.testing.assert_array_equal(b["observed_range"].values, a["coef_range"].values)
    for key in ("mean", "components", "explained_variance_ratio"):
        np.testing.assert_array_equal(b[f"own_{key}"].values, a[key].values)
    for f in ("kl/epoch.csv", "kl/model.csv", "quality.csv", "drift/epoch.csv"):
        assert (d / "ref" / f).read_bytes() == (tmp_path / "self" / f).read_bytes(), f


def test_basis_in_a_reopened_result_set_and_its_exports(shifted, tmp_path):
    d = shifted["dir"]
    res = analyze(str(d / "all.zarr"), by=["epoch"], basis=shifted["ref"], verbosity=0)
    assert res.settings["basis"]["path"] is None  # an in-memory Results has no path
    out = tmp_path / "r"
    res.write(str(out), report=True, verbosity=0)
    back = Results.open(out)
    np.testing.assert_array_equal(back.out_of_range, res.out_of_range)
    np.testing.assert_array_equal(back.observed_range, res.observed_range)
    for k in ("mean", "components", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(back.own_pca, k), getattr(res.own_pca, k))
    assert back.own_pca.n_filters == res.own_pca.n_filters
    t = pd.read_csv(out / "out_of_range.csv")
    np.testing.assert_array_equal(t[[f"out_of_range_c{k}" for k in range(9)]].to_numpy(),
                                  res.out_of_range)
    assert (t["out_of_range"] == res.out_of_range.sum(axis=1)).all()
    own = json.loads((out / "own_pca.json").read_text())
    assert own["n_filters"] == len(shifted["x"])
    page = (out / "report.html").read_text()
    assert "Reference basis" in page and res.settings["basis"]["digest"][:16] in page
    assert f"{int(res.out_of_range.sum()):,} coefficients" in page
    assert (out / "plots" / "drift_curve_epoch.png").exists()


def test_drift_curve_against_a_direct_computation(shifted):
    d, x, meta = shifted["dir"], shifted["x"], shifted["meta"]
    res = analyze(str(d / "all.zarr"), by=["epoch", "Task"], basis=str(d / "ref"),
                  verbosity=0)
    basis = shifted["ref"]
    lo, hi = basis.coef_range
    w = basis.pca.explained_variance_ratio
    c = _coefs(ref.scale(x), basis.pca.mean, basis.pca.components)
    rows, labels = ref.row_labels(meta, "epoch")
    groups = sorted(set(labels), key=float)
    width = (hi - lo) / 70

    def probs(g, k):
        h, _ = np.histogram(c[rows[labels == g], k], bins=70, range=(lo, hi))
        dens = h / (h.sum() * width)
        dens[h == 0] = ref.EPS
        return dens / dens.sum()

    for refg in (None, "10"):
        got = res.drift_to("epoch", ref=refg)
        r = groups[0] if refg is None else refg
        assert list(got.index) == groups
        for g in groups:
            s = [scipy.stats.entropy(probs(g, k), probs(r, k))
                 + scipy.stats.entropy(probs(r, k), probs(g, k)) for k in range(9)]
            np.testing.assert_allclose(got.loc[g, [f"kl_c{k}" for k in range(9)]]
                                       .to_numpy(dtype=float), s, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got.loc[g, [f"weighted_c{k}" for k in range(9)]]
                                       .to_numpy(dtype=float), w * np.array(s),
                                       rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got.loc[g, "total"], np.dot(w, s), rtol=1e-9,
                                       atol=1e-12)
        # the same bits as the KL matrix's column
        np.testing.assert_array_equal(got["total"].to_numpy(),
                                      res.kl["epoch"][r].to_numpy())
        np.testing.assert_array_equal(got["value"].to_numpy(), [float(g) for g in groups])
    assert got.loc["1", "out_of_range"] == 0 and got.loc["60", "out_of_range"] > 0
    assert got["n_filters"].sum() == len(x)
    assert [g.name for g in res.drift_groupings()] == ["epoch"]  # Task is not numeric
    with pytest.raises(AnalysisError, match="reference group '7' is not one of the groups"):
        res.drift_to("epoch", ref="7")


def test_bad_basis_is_one_line(shifted, tmp_path, capsys):
    d = shifted["dir"]
    store = str(d / "all.zarr")
    with pytest.raises(AnalysisError, match="`basis`: .* is not an analysis directory"):
        analyze(store, basis=str(d / "all.zarr"), verbosity=0)
    with pytest.raises(AnalysisError, match="does not exist"):
        analyze(store, basis=str(tmp_path / "nowhere"), verbosity=0)
    good = Results.open(d / "ref")
    flat = Results.open(d / "ref")
    flat.pca = dataclasses.replace(flat.pca, components=flat.pca.components[:4, :4],
                                   mean=flat.pca.mean[:4])
    with pytest.raises(AnalysisError, match=r"mean has shape \(4,\), the store's filters "
                                            r"have 9 values"):
        analyze(store, basis=flat, verbosity=0)
    neg = Results.open(d / "ref")
    neg.pca = dataclasses.replace(neg.pca,
                                  explained_variance_ratio=-neg.pca.explained_variance_ratio)
    with pytest.raises(AnalysisError, match="negative values"):
        load_basis(neg, 9)
    bent = Results.open(d / "ref")
    bent.bin_edges = bent.bin_edges.copy()
    bent.bin_edges[3] += 1e-3
    with pytest.raises(AnalysisError, match="not the equal-width bins"):
        load_basis(bent, 9)
    cut = Results.open(d / "ref")
    cut.fine_edges = cut.fine_edges[:-2]
    with pytest.raises(AnalysisError, match="do not subdivide"):
        load_basis(cut, 9)
    with pytest.raises(AnalysisError, match="`bins` 50 with a `basis`"):
        analyze(store, basis=good, bins=50, verbosity=0)
    with pytest.raises(AnalysisError, match="`drift_ref` '5' is not a group"):
        analyze(store, by=["epoch"], drift_ref="5", verbosity=0)
    # the CLI: one line, flags named, nothing written
    out = str(tmp_path / "o")
    for argv, code, text in [
        (["--basis", str(d / "all.zarr")], 1, "--basis: "),
        (["--basis", str(d / "ref"), "--bins", "9"], 2, "--bins 9 with --basis"),
        (["--by", "epoch", "--drift-ref", "7"], 2, "--drift-ref '7' is not a group"),
    ]:
        assert main(["-q", "analyze", store, "--out", out, "--scheduler", "synchronous",
                     *argv]) == code
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(out)


def test_cli_basis_and_drift_ref(shifted, tmp_path, capsys):
    d = shifted["dir"]
    out = tmp_path / "cli"
    assert main(["-q", "analyze", str(d / "all.zarr"), "--out", str(out), "--by", "epoch",
                 "--basis", str(d / "ref"), "--drift-ref", "10", "--no-report",
                 "--scheduler", "threads"]) == 0
    res = Results.open(out)
    assert res.settings["drift_ref"] == "10"
    curve = pd.read_csv(out / "drift" / "epoch.csv", index_col=0)
    assert curve.loc[10, "total"] == 0.0
    np.testing.assert_allclose(curve["total"].to_numpy(),
                               res.drift_to("epoch", "10")["total"].to_numpy(), rtol=1e-15)
    assert main(["-q", "report", str(out), "--drift-ref", "2"]) == 0
    assert main(["-q", "report", str(out), "--drift-ref", "nope"]) == 2
    assert "--drift-ref 'nope'" in capsys.readouterr().err


def _checkpoint(path, epoch):
    """A two-conv ONNX model whose weights move away from epoch 1's as epoch grows."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, shape in enumerate([(16, 3, 3, 3), (32, 16, 3, 3)]):
        start = rng.normal(size=shape)
        target = rng.normal(size=shape) + np.linspace(-1, 1, 9).reshape(3, 3)
        t = 1 - 0.5 ** (epoch - 1)  # epoch 1: the start; later: most of the way
        inits.append(numpy_helper.from_array(((1 - t) * start + t * target)
                                             .astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info(prev, 1, None)], inits)
    onnx.save(helper.make_model(g, producer_name="test"), str(path))
    return str(path)


def _worked_example(tmp, epochs, checkpoint):
    """The README's worked example ("Build your own filter DB"), command for command
    (threads instead of a local cluster)."""
    run = ["--scheduler", "threads"]
    for e in epochs:
        assert main(["-q", "ingest", checkpoint(e), "--into", str(tmp / "run.h5"),
                     "--task", "Classification", "--meta", f"epoch={e}"]) == 0
    assert main(["-q", "ingest", checkpoint(epochs[0]), "--into", str(tmp / "epoch1.h5"),
                 "--task", "Classification", "--meta", f"epoch={epochs[0]}"]) == 0
    for name in ("epoch1", "run"):
        assert main(["-q", "convert", str(tmp / f"{name}.h5"), str(tmp / f"{name}.zarr"),
                     *run]) == 0
    assert main(["-q", "analyze", str(tmp / "epoch1.zarr"), "--out",
                 str(tmp / "epoch1-results"), "--by", "epoch", "--no-report", *run]) == 0
    assert main(["-q", "analyze", str(tmp / "run.zarr"), "--out", str(tmp / "run-results"),
                 "--by", "epoch", "--by", "depth decile", "--basis",
                 str(tmp / "epoch1-results"), *run]) == 0
    res = Results.open(tmp / "run-results")
    basis = Results.open(tmp / "epoch1-results")
    curve = pd.read_csv(tmp / "run-results" / "drift" / "epoch.csv", index_col=0)
    assert list(curve.index) == list(epochs)  # numeric order
    assert curve["total"].iloc[0] == 0.0
    np.testing.assert_array_equal(curve["total"].to_numpy(),
                                  res.kl["epoch"][str(epochs[0])].to_numpy())
    np.testing.assert_array_equal(res.pca.components, basis.pca.components)
    # epoch 1 in its own basis: its histograms are the basis's, nothing out of range
    e1 = res.grouping("epoch").codes == 0
    np.testing.assert_array_equal(res.layer_hist[e1], basis.layer_hist)
    assert res.out_of_range[e1].sum() == 0
    page = (tmp / "run-results" / "report.html").read_text()
    assert "drift_curve_epoch" in page and "Reference basis" in page
    return res, curve


def test_worked_example_on_onnx_checkpoints(tmp_path):
    epochs = [1, 2, 10]  # 10 after 2: numeric order
    res, curve = _worked_example(tmp_path, epochs,
                                 lambda e: _checkpoint(tmp_path / f"epoch_{e}.onnx", e))
    assert np.all(np.diff(curve["total"].to_numpy()) > 0)  # the weights keep moving away
    assert curve["out_of_range"].iloc[-1] > 0


@pytest.mark.slow
def test_worked_example_with_the_digits_cnn(tmp_path):
    """The README's example with real training: per-epoch ONNX checkpoints of the
    digits CNN, the last one the final model."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from filterdb_dask.convert.digits import main as digits
    from filterdb_dask.convert.onnx_extract import read_onnx

    ckpt = tmp_path / "ckpt"
    assert digits([str(tmp_path / "digits.onnx"), "--epochs", "3",
                   "--checkpoints", str(ckpt)]) == 0
    assert sorted(os.listdir(ckpt)) == ["epoch_1.onnx", "epoch_2.onnx", "epoch_3.onnx"]
    last = [ly.weights for ly in read_onnx(str(ckpt / "epoch_3.onnx")).filter_layers()]
    final = [ly.weights for ly in read_onnx(str(tmp_path / "digits.onnx")).filter_layers()]
    assert len(last) == 3 and all(np.array_equal(a, b) for a, b in zip(last, final,
                                                                        strict=True))
    first = read_onnx(str(ckpt / "epoch_1.onnx")).filter_layers()[1].weights
    assert not np.array_equal(first, last[1])
    res, curve = _worked_example(tmp_path, [1, 2, 3], lambda e: str(ckpt / f"epoch_{e}.onnx"))
    assert np.all(curve["total"].iloc[1:] > 0)


def test_basis_with_5x5_filters(shifted, tmp_path):
    """A K×K DB in its own basis reproduces itself; a 3×3 basis does not fit it."""
    pytest.importorskip("onnx")
    from filterdb_dask.convert.ingest import ingest
    from tests.test_kernel_size import conv_model

    models = [conv_model(str(tmp_path / f"m{i}.onnx"), seed=i) for i in range(3)]
    store = str(tmp_path / "db.zarr")
    ingest(models, store, kernel=5, fields={"Visual Category": "natural"})
    res = analyze(store, by=["model"], verbosity=0)
    res.write(str(tmp_path / "ref5"))
    again = analyze(store, by=["model"], basis=str(tmp_path / "ref5"), verbosity=0)
    np.testing.assert_array_equal(again.layer_hist, res.layer_hist)
    np.testing.assert_array_equal(again.kl["model"].to_numpy(), res.kl["model"].to_numpy())
    assert again.out_of_range.shape == (len(res.meta), 25) and again.out_of_range.sum() == 0
    again.write(str(tmp_path / "again"), report=True, verbosity=0)
    with pytest.raises(AnalysisError, match=r"has shape \(9,\), the store's filters have 25"):
        analyze(store, basis=str(shifted["dir"] / "ref"), verbosity=0)


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_basis_results_do_not_depend_on_chunking_or_engine(shifted, tmp_path, engine):
    from filterdb_dask.engines import numba_available

    if engine == "numba" and not numba_available():
        pytest.skip("numba not installed")
    d = shifted["dir"]
    other = str(tmp_path / "c.zarr")
    convert(str(d / "all.h5"), other, chunk_filters=37, verbosity=0)
    a = analyze(str(d / "all.zarr"), by=["epoch"], basis=str(d / "ref"), verbosity=0)
    b = analyze(other, by=["epoch"], basis=str(d / "ref"), engine=engine, verbosity=0)
    for name in ("layer_hist", "density", "observed_range", "out_of_range"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.fine_hist["epoch"], b.fine_hist["epoch"])
    np.testing.assert_array_equal(a.kl["epoch"].to_numpy(), b.kl["epoch"].to_numpy())
