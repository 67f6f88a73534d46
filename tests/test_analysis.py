"""The Dask analysis against the in-memory reference of docs/method.md, across chunkings."""

from __future__ import annotations

import json
import os

import dask
import h5py
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterdb_dask import analyze, open_store
from filterdb_dask.analysis import Results
from filterdb_dask.convert.write import convert
from filterdb_dask.errors import AnalysisError
from filterdb_dask.histograms import coef_range_density, layer_histograms
from filterdb_dask.pca import PCA, layer_stats
from filterdb_dask.quality import sparsity_sweep
from tests import reference as ref
from tests.conftest import simple_meta, write_h5

GROUPINGS = ["Task", "Visual Category", "depth decile", "model"]


def check_against_reference(res: Results, x: np.ndarray, meta: pd.DataFrame, bins=70):
    meta = meta.reset_index()
    xs = ref.scale(x)
    rows_all = np.concatenate([
        np.arange(int(a), int(b) + 1)
        for a, b in (s.split(":") for s in meta["filter_ids"].astype(str))
    ])
    p = ref.pca(xs[rows_all])
    assert res.pca.n_filters == len(rows_all)
    cos = np.abs(np.sum(res.pca.components * p["components"], axis=1))
    assert np.all(cos >= 1 - 1e-9), cos
    np.testing.assert_allclose(res.pca.explained_variance_ratio,
                               p["explained_variance_ratio"], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(res.pca.explained_variance, p["explained_variance"],
                               rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(res.pca.mean, p["mean"], rtol=1e-10, atol=1e-13)
    coefs = np.zeros((len(x), 9))
    coefs[rows_all] = (xs[rows_all] - p["mean"]) @ p["components"].T
    lo, hi = coefs[rows_all].min(), coefs[rows_all].max()
    np.testing.assert_allclose(res.coef_range, [lo, hi], rtol=1e-10, atol=1e-12)
    for by in GROUPINGS:
        rows, labels = ref.row_labels(meta, by)
        groups, m = ref.kl_matrix(coefs[rows], labels, lo, hi, p["explained_variance_ratio"],
                                  bins)
        slug = {"Task": "task", "Visual Category": "visual_category",
                "depth decile": "depth_decile", "model": "model"}[by]
        got = res.kl[slug]
        order = list(got.index)
        want = pd.DataFrame(m, index=groups, columns=groups)
        if by == "depth decile":
            assert order == [g for g in order]  # natural order kept
        want = want.loc[order, order]
        np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-9, atol=1e-12)
        hist = res.group_hist[slug]
        for gi, g in enumerate(order):
            sel = rows[labels == g]
            for k in range(9):
                h, _ = np.histogram(coefs[sel, k], bins=bins, range=(lo, hi))
                np.testing.assert_array_equal(hist[gi, k], h)
    q = res.quality
    for i in range(len(meta)):
        a, b = (int(v) for v in str(meta["filter_ids"].iloc[i]).split(":"))
        sp, ve, vec, nc = ref.layer_quality(x[a:b + 1])
        np.testing.assert_allclose(q["sparsity"].iloc[i], sp, rtol=1e-12)
        np.testing.assert_allclose(q["variance_entropy"].iloc[i], ve, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(q["variance_entropy_clean"].iloc[i], vec, rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(q["variance_entropy_norm"].iloc[i],
                                   ve / ref.entropy_norm(b + 1 - a), rtol=1e-9, atol=1e-12)
        assert q["n"].iloc[i] == b + 1 - a
    c01 = coefs[rows_all][:, :2]
    d, _, _ = np.histogram2d(c01[:, 0], c01[:, 1], bins=512, range=[[-3.3, 3.3]] * 2)
    np.testing.assert_array_equal(res.density, d)


def test_synthetic_db_matches_reference(synth_h5, synth_store):
    res = analyze(synth_store, verbosity=0)
    with h5py.File(synth_h5) as f:
        x = f["filter"][:]
    check_against_reference(res, x, pd.read_hdf(synth_h5, "meta"))


@pytest.fixture(scope="module")
def edge_db(tmp_path_factory):
    """Layers of 1 filter, all-zero layers and filters, missing Task values, gaps."""
    rng = np.random.default_rng(11)
    sizes = [1, 40, 1, 25, 60, 2, 33, 80, 1, 17, 45, 9]
    models = [0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4]
    tasks = ["Semantic Segmentation", "Classification", None, "Classification",
             "GAN-Discriminator", "GAN-Discriminator", None, "Classification",
             "Classification", "Segmentation", "Segmentation", "Classification"]
    cats = ["natural", "natural", "natural", "fractals", "fractals", "fractals", "medical",
            "medical", "natural", "natural", "natural", "natural"]
    meta = simple_meta(sizes, models=models, tasks=tasks, cats=cats)
    n = sum(sizes)
    x = rng.normal(size=(n, 9)).astype(np.float32) * rng.lognormal(0, 1, size=(n, 1)).astype(
        np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x[starts[4]: starts[4] + 60] = 0  # an all-zero layer
    x[starts[1]: starts[1] + 10] = 0  # zero filters inside a layer
    x[starts[7]: starts[7] + 70] *= 1e-5  # a mostly sparse layer
    path = tmp_path_factory.mktemp("edge") / "edge.h5"
    write_h5(path, x, meta, meta_format="table")
    return str(path), x, pd.read_hdf(path, "meta")


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.one_of(st.just(1), st.integers(2, 400)), engine=st.sampled_from(["auto", "numpy"]))
def test_edge_db_matches_reference_across_chunkings(edge_db, tmp_path_factory, target, engine):
    path, x, meta = edge_db
    store = str(tmp_path_factory.mktemp("c") / "s.zarr")
    convert(path, store, chunk_filters=target, verbosity=0)
    res = analyze(store, engine=engine, verbosity=0)
    check_against_reference(res, x, meta)
    assert "nan" in res.kl["task"].index  # missing Task values form their own group
    assert np.isnan(res.quality["variance_entropy"].iloc[0])  # one-filter layer
    assert res.quality["sparsity"].iloc[4] == 1.0


def test_results_are_the_same_for_every_chunking(edge_db, tmp_path):
    path, _, _ = edge_db
    out = []
    for i, target in enumerate([1, 37, 10_000]):
        store = str(tmp_path / f"s{i}.zarr")
        convert(path, store, chunk_filters=target, verbosity=0)
        out.append(analyze(store, verbosity=0))
    for r in out[1:]:
        np.testing.assert_array_equal(r.layer_hist, out[0].layer_hist)
        np.testing.assert_allclose(r.pca.components, out[0].pca.components, atol=1e-12)
        np.testing.assert_array_equal(r.coef_range, out[0].coef_range)


def test_subset_pca_and_later_groupings_need_no_new_pass(synth_h5, synth_store):
    none = np.zeros(len(open_store(synth_store).meta), dtype=bool)
    res = analyze(synth_store, by=["Task"], subsets={"fr": "Visual Category=fractals",
                                                     "none": none},
                  verbosity=0)
    with h5py.File(synth_h5) as f:
        x = f["filter"][:]
    meta = pd.read_hdf(synth_h5, "meta")
    rows = np.concatenate([np.arange(int(a), int(b) + 1) for a, b in
                           (s.split(":") for s in meta.loc[meta["Visual Category"] == "fractals",
                                                           "filter_ids"])])
    p = ref.pca(ref.scale(x[rows]))
    sp = res.subsets["fr"]
    assert sp.n_filters == len(rows)
    cos = np.abs(np.sum(sp.components * p["components"], axis=1))
    assert np.all(cos >= 1 - 1e-9)
    assert np.all(np.isnan(res.subsets["none"].components))  # empty mask: undefined
    # a grouping asked for after the passes: a sum over layers, equal to a full run
    with dask.config.set(scheduler="sync"):
        late = res.kl_matrix("producer")
    full = analyze(synth_store, by=["producer"], verbosity=0).kl["producer"]
    pd.testing.assert_frame_equal(late, full)


def test_builders_do_not_compute(synth_store):
    store = open_store(synth_store)

    def refuse(*a, **k):
        raise AssertionError("a builder computed")

    with dask.config.set(scheduler=refuse):
        stats = layer_stats(store)
        pca = PCA(n_filters=2, mean=np.zeros(9), components=np.eye(9),
                  explained_variance=np.ones(9), explained_variance_ratio=np.full(9, 1 / 9),
                  covariance=np.eye(9))
        rng, dens = coef_range_density(store, pca)
        hist, fine = layer_histograms(store, pca, [-2.0, 2.0], bins=7)
        sweep = sparsity_sweep(store, [0.01, 0.1])
    assert stats.shape == (len(store.meta), 95) and sweep.shape == (len(store.meta), 4)
    assert hist.shape == (len(store.meta), 9, 7) and dens.shape == (512, 512)


def test_each_chunk_is_read_inside_the_task_that_reduces_it(synth_store):
    """A pass over a store is one task per chunk (read + kernel), with no chunk-sized
    result between two tasks; an array derived from the store keeps the plain
    dependency, and both give the same numbers."""
    store = open_store(synth_store)
    pca = PCA(n_filters=2, mean=np.zeros(9), components=np.eye(9),
              explained_variance=np.ones(9), explained_variance_ratio=np.full(9, 1 / 9),
              covariance=np.eye(9))
    rng, dens = coef_range_density(store, pca)
    keys = [k[0] if isinstance(k, tuple) else k for k in dict(dens.__dask_graph__())]
    assert not [k for k in keys if k.startswith(store.filters.name)]
    assert len([k for k in keys if k.startswith("coef-range-density-raw")]) \
        == store.filters.numblocks[0]
    derived = store.filters + 0  # not a plain read: its blocks stay their own tasks
    plain = type(store)(**{**store.__dict__, "filters": derived})
    rng2, dens2 = coef_range_density(plain, pca)
    keys2 = [k[0] if isinstance(k, tuple) else k for k in dict(dens2.__dask_graph__())]
    assert any(k.startswith("add-") for k in keys2)
    with dask.config.set(scheduler="sync"):
        a = dask.compute(rng, dens)
        b = dask.compute(rng2, dens2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("eps", [[], [0.01, 0.1]])
def test_every_chunk_is_read_once_per_pass(synth_store, monkeypatch, eps):
    """Three passes read each chunk three times, also when pass 1 runs several
    kernels on it (moments and the sparsity sweep)."""
    from filterdb_dask import storeformat

    calls = []
    real = storeformat.read_chunk

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(storeformat, "read_chunk", counting)
    store = open_store(synth_store)
    with dask.config.set(scheduler="sync"):
        analyze(store, sparsity_eps=eps, verbosity=0)
    assert sorted(calls) == sorted(list(range(store.n_chunks)) * 3)


def test_bad_options(synth_store):
    with pytest.raises(AnalysisError, match="cannot group by 'Colour'"):
        analyze(synth_store, by=["Colour"], verbosity=0)
    with pytest.raises(AnalysisError, match="bins must be a positive integer, got 0"):
        analyze(synth_store, bins=0, verbosity=0)
    with pytest.raises(AnalysisError, match="subset 'x': 'Nope' is not a meta column"):
        analyze(synth_store, subsets={"x": "Nope=1"}, verbosity=0)
    with pytest.raises(AnalysisError, match="no layer has 'Visual Category' = 'fractal'; "
                                            "its values: 'fractals', 'medical'"):
        analyze(synth_store, subsets={"x": "Visual Category=fractal"}, verbosity=0)
    with pytest.raises(AnalysisError, match="no layer has 'Visual Category' = '=x'"):
        analyze(synth_store, subsets={"q": "Visual Category==x"}, verbosity=0)  # not code


def test_too_few_filters(tmp_path):
    p = write_h5(tmp_path / "one.h5", np.ones((1, 9), np.float32), simple_meta([1]))
    convert(p, str(tmp_path / "s.zarr"), verbosity=0)
    with pytest.raises(AnalysisError, match="at least two filters"):
        analyze(str(tmp_path / "s.zarr"), verbosity=0)


def test_written_results_follow_the_contract(synth_store, tmp_path):
    res = analyze(synth_store, verbosity=0)
    paths = res.write(str(tmp_path / "out"))
    out = tmp_path / "out"
    pca = json.loads((out / "pca.json").read_text())
    assert set(pca) == {"n_filters", "mean", "components", "explained_variance",
                        "explained_variance_ratio", "coef_range"}
    assert np.asarray(pca["components"]).shape == (9, 9)
    for slug in ["task", "visual_category", "depth_decile", "model"]:
        m = pd.read_csv(out / "kl" / f"{slug}.csv", index_col=0)
        assert list(m.index.astype(str)) == list(m.columns)
        np.testing.assert_allclose(m.to_numpy(), res.kl[slug].to_numpy(), rtol=1e-15)
    dd = pd.read_csv(out / "kl" / "depth_decile.csv", index_col=0)
    assert list(dd.index)[:2] == ["[0.0, 0.1]", "(0.1, 0.2]"]
    q = pd.read_csv(out / "quality.csv")
    assert list(q.columns) == ["model_id", "conv_depth", "conv_depth_norm", "model", "n",
                               "sparsity", "variance_entropy", "variance_entropy_norm",
                               "variance_entropy_clean", "variance_entropy_clean_norm",
                               "orthogonality"]
    assert q["orthogonality"].isna().all()  # the synthetic DB records no weight shapes
    ds = xr.open_zarr(out / "results.zarr", consolidated=False)
    np.testing.assert_array_equal(ds["layer_hist"].values, res.layer_hist)
    np.testing.assert_allclose(ds["kl_task"].values, res.kl["task"].to_numpy())
    assert ds["density"].values.max() == 1.0
    assert list(ds["group_task"].values) == list(res.kl["task"].index)
    assert not any(p.endswith(".tmp") for p in os.listdir(out))
    assert "results.zarr" in paths


def test_sparsity_sweep_in_pass_one(synth_store, tmp_path):
    from filterdb_dask.run import main

    out = str(tmp_path / "out")
    assert main(["-q", "analyze", synth_store, "--out", out, "--scheduler", "threads",
                 "--no-report", "--by", "Task",
                 "--sparsity-eps", "0.001,0.005,0.01,0.05,0.1"]) == 0
    q = pd.read_csv(os.path.join(out, "quality.csv"))
    eps = ["0.001", "0.005", "0.01", "0.05", "0.1"]
    assert list(q.columns[11:]) == (
        [f"sparsity@{e}" for e in eps] + [f"variance_entropy_clean@{e}" for e in eps]
        + [f"variance_entropy_clean_norm@{e}" for e in eps])
    np.testing.assert_array_equal(q["sparsity@0.01"], q["sparsity"])  # bit for bit
    np.testing.assert_array_equal(q["variance_entropy_clean_norm@0.01"].isna(),
                                  q["variance_entropy_clean_norm"].isna())
    st = open_store(synth_store)
    x = st.filters.compute()
    for i in range(len(st.meta)):  # every layer, every ε: a direct recomputation
        a, e = int(st.meta["start"].iloc[i]), int(st.meta["stop"].iloc[i])
        w = x[a:e]
        for eps_text in eps:
            sp, _, vec, n_clean = ref.layer_quality(w, eps=float(eps_text))
            assert q[f"sparsity@{eps_text}"].iloc[i] == pytest.approx(sp, abs=1e-15)
            np.testing.assert_allclose(q[f"variance_entropy_clean@{eps_text}"].iloc[i], vec,
                                       rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(q[f"variance_entropy_clean_norm@{eps_text}"].iloc[i],
                                       vec / ref.entropy_norm(n_clean), rtol=1e-9, atol=1e-12)
    ds = xr.open_zarr(os.path.join(out, "results.zarr"), consolidated=False)
    np.testing.assert_array_equal(ds["quality_sparsity@0.1"].values, q["sparsity@0.1"])
    assert json.loads(ds.attrs["settings"])["sparsity_eps"] == [0.001, 0.005, 0.01, 0.05, 0.1]
    # the package default (configurable) is no sweep; a configured one applies
    plain = analyze(synth_store, by=["Task"], verbosity=0).quality
    assert list(plain.columns) == list(q.columns[:11])
    with dask.config.set({"filterdb_dask.analysis.sparsity-eps": [0.2]}):
        got = analyze(synth_store, by=["Task"], verbosity=0).quality
    assert "sparsity@0.2" in got.columns and "sparsity@0.01" not in got.columns


def test_bad_sparsity_eps(synth_store, capsys):
    from filterdb_dask.quality import normalize_sparsity_eps
    from filterdb_dask.run import main

    assert normalize_sparsity_eps(" 0.1, 0.01,") == (0.1, 0.01)
    with pytest.raises(AnalysisError, match=r"sparsity threshold 0\.0 must lie in \(0, 1\]"):
        analyze(synth_store, sparsity_eps=[0.0], verbosity=0)
    with pytest.raises(AnalysisError, match=r"threshold 1\.5 must lie in"):
        normalize_sparsity_eps("1.5")
    with pytest.raises(AnalysisError, match="threshold 0.01 is given twice"):
        normalize_sparsity_eps([0.01, "0.01"])
    with pytest.raises(AnalysisError, match="'x' is not a number"):
        normalize_sparsity_eps("0.01,x")
    with pytest.raises(AnalysisError, match=r"threshold nan must lie in"):
        normalize_sparsity_eps("nan")
    assert main(["analyze", synth_store, "--out", "o", "--sparsity-eps", "0.01,x"]) == 2
    assert "is not a number" in capsys.readouterr().err


# ------------------------------------------------------------------ result sets
@pytest.fixture(scope="module")
def small_results(edge_db, tmp_path_factory):
    path, _, _ = edge_db
    store = str(tmp_path_factory.mktemp("rs") / "s.zarr")
    convert(path, store, chunk_filters=100, verbosity=0)
    none = np.zeros(12, dtype=bool)
    return store, analyze(store, by=["Task", "model"], subsets={"empty": none}, verbosity=0)


def _tree(d):
    return sorted(os.path.relpath(os.path.join(a, f), d) for a, _, fs in os.walk(d) for f in fs)


def test_a_new_set_replaces_the_old_one_whole(small_results, tmp_path):
    store, res = small_results
    out = tmp_path / "out"
    res.write(out)
    (out / "kl" / "conv_depth.csv").write_text("stale")  # a file an older run wrote
    analyze(store, by=["Task"], verbosity=0).write(out)
    files = _tree(out)
    assert "kl/conv_depth.csv" not in files and "kl/model.csv" not in files
    assert "kl/task.csv" in files
    assert [f for f in os.listdir(tmp_path) if f != "out"] == []  # no temporaries left


def test_a_failed_write_leaves_the_old_set(small_results, tmp_path, monkeypatch):
    _, res = small_results
    out = tmp_path / "out"
    res.write(out)
    before = {f: (out / f).read_bytes() for f in _tree(out)}

    def disk_full(self, d):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Results, "export", disk_full)
    with pytest.raises(OSError, match="No space left"):
        res.write(out)
    assert {f: (out / f).read_bytes() for f in _tree(out)} == before
    assert os.listdir(tmp_path) == ["out"]


def test_write_refuses_what_is_not_a_result_set(small_results, tmp_path):
    _, res = small_results
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(AnalysisError, match=r"is not empty and not a result set \(it holds "
                                            r"'notes.txt'\); nothing in it is replaced"):
        res.write(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    res.write(tmp_path / "set")
    (tmp_path / "set" / "kl" / "mine.txt").write_text("mine")
    with pytest.raises(AnalysisError, match="'kl/mine.txt'"):
        res.write(tmp_path / "set")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AnalysisError, match="is a file, not a directory"):
        res.write(tmp_path / "file")
    with pytest.raises(AnalysisError, match="cannot write the result directory"):
        res.write("/proc/filterdb-dask-test/out")


def test_exports_are_strict_json(small_results, tmp_path):
    _, res = small_results
    res.write(tmp_path / "o")

    def bare(name):
        raise AssertionError(f"bare {name}")

    for name in ("pca.json", "pca_subsets.json"):
        obj = json.loads((tmp_path / "o" / name).read_text(), parse_constant=bare)
    assert obj["empty"]["components"][0][0] is None and obj["empty"]["n_filters"] == 0


def test_cli_checks_out_before_the_first_pass(small_results, tmp_path, capsys):
    from filterdb_dask.run import main

    store, _ = small_results
    (tmp_path / "f").write_text("x")
    for out, msg in [(tmp_path / "f", "is a file"), ("/proc/x/out", "cannot write")]:
        rc = main(["analyze", store, "--out", str(out), "--scheduler", "synchronous"])
        err = capsys.readouterr().err
        assert rc == 1 and msg in err and "pass 1" not in err and len(err.splitlines()) == 1
    rc = main(["analyze", store, "--out", str(tmp_path / "o"), "--scheduler", "synchronous", "-q",
               "--subset", "Visual Category=fractal"])
    err = capsys.readouterr().err
    assert rc == 1 and "its values: 'fractals', 'medical', 'natural'" in err


def test_slugs_are_unique_and_never_the_sets_own_names():
    from filterdb_dask.groups import make_groupings

    meta = simple_meta([2, 2, 2], extra={"visual_category": ["a", "b", "a"],
                                        "drift": [1, 2, 3], "!!!": ["x", "y", "x"],
                                        "depth decile": ["u", "v", "w"]}).reset_index()
    gs = make_groupings(meta, ["Visual Category", "visual_category", "drift", "!!!",
                               "depth decile", "depth_decile", "Visual Category"])
    assert [(g.name, g.slug) for g in gs] == [
        ("Visual Category", "visual_category"), ("visual_category", "visual_category_2"),
        ("drift", "drift_2"), ("!!!", "column"), ("depth decile", "depth_decile")]
    assert gs[-1].labels[0] == "[0.0, 0.1]"  # the computed deciles, not the column


def test_missing_values_keep_a_label_of_their_own():
    from filterdb_dask.groups import make_grouping

    meta = simple_meta([1] * 5, tasks=["nan", None, "NA", "", "null"]).reset_index()
    g = make_grouping(meta, "Task")
    assert g.labels == ("", "NA", "nan", "null", "(missing)")
    assert list(g.codes) == [2, 4, 1, 0, 3]


def test_two_models_under_one_model_id_are_refused(tmp_path):
    meta = simple_meta([3, 3, 3, 3], models=[0, 0, 1, 1]).reset_index()
    meta.loc[1, "model"] = "other.onnx"
    p = write_h5(tmp_path / "d.h5", np.random.default_rng(0).normal(size=(12, 9)),
                 meta.set_index(["model_id", "conv_depth", "conv_depth_norm"]))
    convert(p, str(tmp_path / "s.zarr"), verbosity=0)
    with pytest.raises(AnalysisError, match="model_id 0 holds 2 different model values "
                                            r"\('m0.onnx', 'other.onnx'\)"):
        analyze(str(tmp_path / "s.zarr"), verbosity=0)


def test_binned_kde_keeps_the_grid():
    from filterdb_dask.kernels import binned_kde

    edges = np.linspace(0, 1, 257)
    for bw in (1e-4, 0.01, 0.2, 5.0):
        d = binned_kde(np.ones(256), edges, bw)
        assert d.shape == (256,) and np.all(np.isfinite(d)) and d.max() > 0


def test_synth_mistakes_are_usage_errors(tmp_path, capsys):
    from filterdb_dask.convert.synth import synthesize
    from filterdb_dask.errors import InputError
    from filterdb_dask.run import main

    assert main(["synth", str(tmp_path / "x.h5"), "--filters", "5", "--models", "10"]) == 2
    assert "--filters (5) must be at least --models (10)" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"n_filters \(5\) must be at least n_models \(10\)"):
        synthesize(str(tmp_path / "y.h5"), n_filters=5, n_models=10)


@pytest.mark.slow
def test_ctrl_c_during_a_pass_prints_one_line(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) while a local
    distributed cluster runs a pass: exit 130 and one line, no worker tracebacks."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from filterdb_dask.convert.synth import synthesize

    h5 = str(tmp_path / "d.h5")
    synthesize(h5, n_filters=600_000, n_models=8, seed=1)
    convert(h5, str(tmp_path / "s.zarr"), chunk_filters=50_000, verbosity=0)
    p = subprocess.Popen(
        [sys.executable, "-m", "filterdb_dask.run", "analyze", str(tmp_path / "s.zarr"),
         "--out", str(tmp_path / "out"), "--workers", "2", "--engine", "numpy"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as from a terminal: a runner started in the background (``cmd &`` in a
        # script) hands its children SIGINT ignored, and Python keeps it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr))
    reader.start()
    deadline = time.monotonic() + 120
    while not any("pass 1" in ln for ln in lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=120)
    reader.join()
    err = [ln for ln in lines if "dashboard" not in ln and not ln.startswith("pass ")]
    assert p.returncode == 130 and err == ["filterdb-dask: interrupted\n"], lines
    assert not (tmp_path / "out").exists()


def test_long_column_names_give_short_distinct_slugs():
    from filterdb_dask.groups import MAX_SLUG, slugify

    a, b = "x" * 300, "x" * 299 + "y"
    assert len(slugify(a)) <= MAX_SLUG and len(slugify(b)) <= MAX_SLUG
    assert slugify(a) != slugify(b)
    assert slugify("Visual Category") == "visual_category"  # short names unchanged
