"""Any kernel size (issue 13.6): KxK filters of K² values through ingest -> convert ->
analyze, checked against direct numpy computations; one K per DB; 3x3 unchanged."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from filterdb_dask import kernels as K
from filterdb_dask.errors import InputError, StoreError

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

# (out, in / groups, k, k) and groups of a chain of convs on a 4-channel input: normal,
# grouped and depthwise 5x5, a 3x3, a normal and a depthwise 7x7
CHAIN = (((8, 4, 5, 5), 1), ((8, 4, 5, 5), 2), ((8, 1, 5, 5), 8), ((8, 8, 3, 3), 1),
         ((4, 8, 7, 7), 1), ((4, 1, 7, 7), 4))


def conv_model(path: str, seed: int, chain=CHAIN) -> str:
    """An ONNX model of grouped/depthwise ``Conv`` nodes built with onnx.helper."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (shape, groups) in enumerate(chain):
        w = rng.normal(size=shape).astype(np.float32)
        if i in (0, 4):
            w[:1] = 0.0  # an all-zero output channel: sparse filters in a 5x5 and a 7x7 layer
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        p = shape[2] // 2
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], name=f"conv{i}",
                                      group=groups, pads=[p, p, p, p],
                                      kernel_shape=list(shape[2:])))
        prev = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 16, 16])],
                          [helper.make_tensor_value_info(prev, 1, None)], inits)
    onnx.save(helper.make_model(g, producer_name="kernel-size-test"), path)
    return path


def initializer_filters(path: str, k: int) -> list[np.ndarray]:
    """The KxK layers' filters, straight from the model's initializers (in node order)."""
    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = []
    for node in m.graph.node:
        w = inits[node.input[1]]
        if w.shape[2:] == (k, k):
            out.append(w.reshape(-1, k * k).astype(np.float64))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("kmodels")
    return [conv_model(str(d / f"m{i}.onnx"), seed=i) for i in range(4)]


def _peak_scaled(x):
    x = np.asarray(x, dtype=np.float64)
    p = np.abs(x).max(axis=1, keepdims=True)
    return np.divide(x, p, out=np.zeros_like(x), where=p > 0)


def _entropy(w):
    """Variance entropy (base 10) of a layer, from the SVD of its centred filters."""
    if len(w) < 2:
        return np.nan
    s = np.linalg.svd(w - w.mean(axis=0), compute_uv=False)
    v = s**2 / (len(w) - 1)
    if v.sum() == 0:
        return 0.0
    p = v / v.sum()
    p = p[p > 0]
    return float(-(p * np.log10(p)).sum())


@pytest.mark.parametrize("k", [5, 7])
def test_kxk_ingest_convert_analyze_against_numpy(models, tmp_path, k):
    from filterdb_dask import analyze, open_store
    from filterdb_dask.convert.ingest import ingest
    from filterdb_dask.convert.read import read_source
    from filterdb_dask.convert.verify import verify
    from filterdb_dask.convert.write import convert

    d = k * k
    h5 = str(tmp_path / "db.h5")
    res = ingest(models, h5, fields={"Task": "Classification"}, kernel=k)
    src = read_source(h5)
    assert src.shape == (res.filters, d) and src.kernel == k
    # rows: every KxK layer of every model, depthwise and grouped included, in order
    expect = [w for p in models for w in initializer_filters(p, k)]
    per_model = {5: 8 * 4 + 8 * 4 + 8 * 1, 7: 4 * 8 + 4 * 1}[k]
    assert res.filters == 4 * per_model == sum(len(w) for w in expect)
    with h5py.File(h5) as f:
        x = f["filter"][:]
    np.testing.assert_array_equal(x, np.concatenate(expect).astype(np.float32))
    assert f"{k}x{k}_filter_share" in src.meta.columns

    store = str(tmp_path / "db.zarr")
    convert(h5, store, chunk_filters=3 * per_model // 2, verbosity=0)
    st = open_store(store)
    assert st.kernel == k and st.filters.shape == (res.filters, d) and st.n_chunks > 1
    assert verify(store, h5, verbosity=0).ok
    np.testing.assert_array_equal(st.filters.compute(), x)

    out = {e: analyze(st, by=["model", "depth decile"], engine=e, verbosity=0,
                      sparsity_eps=[0.01, 0.1])
           for e in ("numpy", "numba")}
    a, b = out["numpy"], out["numba"]
    # both engines: the same bits for D != 9 too
    for key in ("mean", "components", "explained_variance"):
        np.testing.assert_array_equal(getattr(a.pca, key), getattr(b.pca, key))
    np.testing.assert_array_equal(a.layer_stats, b.layer_stats)
    np.testing.assert_array_equal(a.layer_hist, b.layer_hist)
    np.testing.assert_array_equal(a.density, b.density)
    np.testing.assert_array_equal(a.sweep, b.sweep)
    r = a
    assert r.kernel == k and r.layer_hist.shape[1] == d and r.pca.components.shape == (d, d)

    # PCA (METHOD §2-3): eigh of the scatter of the peak-scaled filters, n-1 denominator
    xs = _peak_scaled(x)
    mu = xs.mean(axis=0)
    cov = (xs - mu).T @ (xs - mu) / (len(xs) - 1)
    vals, vecs = np.linalg.eigh(cov)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    np.testing.assert_allclose(r.pca.mean, mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.pca.explained_variance, vals, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.pca.explained_variance_ratio, vals / vals.sum(),
                               rtol=1e-9, atol=1e-12)
    dots = np.abs(np.sum(r.pca.components * vecs.T, axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-6)  # eigenvalues are distinct here

    # histograms over all K² components and the 2-D density of coefficients 0 vs 1
    c = (xs - r.pca.mean) @ r.pca.components.T
    assert r.coef_range[0] == pytest.approx(c.min(), abs=1e-12)
    assert r.coef_range[1] == pytest.approx(c.max(), abs=1e-12)
    meta = r.meta
    for i in range(len(meta)):
        lo, hi = int(meta["start"].iloc[i]), int(meta["stop"].iloc[i])
        want = np.stack([np.histogram(c[lo:hi, j], bins=r.bin_edges)[0] for j in range(d)])
        np.testing.assert_array_equal(r.layer_hist[i], want)
    dens = np.histogram2d(c[:, 0], c[:, 1], bins=[r.density_edges, r.density_edges])[0]
    np.testing.assert_array_equal(r.density, dens)
    assert r.kl["model"].shape == (4, 4) and np.all(np.isfinite(r.kl["model"].to_numpy()))

    # quality (METHOD §7) with K² in the entropy's normalisation: log10(min(n-1, K²))
    q = r.quality
    for i in range(len(meta)):
        w = x[int(meta["start"].iloc[i]):int(meta["stop"].iloc[i])].astype(np.float64)
        peaks = np.abs(w).max(axis=1)
        t = 0.01 * peaks.max() or 1.0
        assert q["sparsity"].iloc[i] == np.mean(peaks < t)
        ve = _entropy(w)
        assert q["variance_entropy"].iloc[i] == pytest.approx(ve, abs=1e-9)
        n = len(w)
        norm = np.log10(min(n - 1, d)) if n >= 3 else np.nan
        assert q["variance_entropy_norm"].iloc[i] == pytest.approx(ve / norm, abs=1e-9,
                                                                   nan_ok=True)
        clean = w[peaks >= t]
        assert q["variance_entropy_clean"].iloc[i] == pytest.approx(_entropy(clean), abs=1e-9,
                                                                    nan_ok=True)
    assert (q["sparsity"] > 0).any()  # the zero channels of the first layer
    if "orthogonality" in q.columns:  # rows of W: c_out x (c_in/groups · K²)
        for i in range(len(meta)):
            w = x[int(meta["start"].iloc[i]):int(meta["stop"].iloc[i])].astype(np.float64)
            c = int(meta["out_channels"].iloc[i])
            rows = w.reshape(c, -1)
            nrm = np.linalg.norm(rows, axis=1, keepdims=True)
            u = np.divide(rows, nrm, out=np.zeros_like(rows), where=nrm > 0)
            g = np.abs(u @ u.T)
            want = 1 - (g.sum() - np.trace(g)) / (c * (c - 1))
            assert q["orthogonality"].iloc[i] == pytest.approx(want, abs=1e-9)
    # the ε = 0.01 column of the sweep is today's sparsity
    np.testing.assert_array_equal(q["sparsity@0.01"], q["sparsity"])


def test_kxk_result_set_and_report(models, tmp_path):
    from filterdb_dask import analyze
    from filterdb_dask.convert.ingest import ingest
    from filterdb_dask.report import write_report
    from filterdb_dask.resultset import Results

    store = str(tmp_path / "db.zarr")
    ingest(models, store, kernel=5, fields={"Visual Category": "natural"})
    res = analyze(store, by=["model"], verbosity=0, engine="numpy")
    out = str(tmp_path / "out")
    res.write(out)
    back = Results.open(out)
    assert back.kernel == 5
    np.testing.assert_array_equal(back.layer_hist, res.layer_hist)
    np.testing.assert_array_equal(back.pca.components, res.pca.components)
    with open(os.path.join(out, "pca.json")) as fh:
        assert np.asarray(json.load(fh)["components"]).shape == (25, 25)
    write_report(out, verbosity=0)
    with open(os.path.join(out, "report.html"), encoding="utf-8") as fh:
        page = fh.read()
    assert "as 5x5 images" in page and "log10(min(n−1, 25))" in page
    assert os.path.exists(os.path.join(out, "plots", "eigenimages.png"))


def test_one_kernel_size_per_db(models, tmp_path):
    from filterdb_dask import storeformat as fmt
    from filterdb_dask.convert.ingest import ingest
    from filterdb_dask.convert.write import convert

    h5 = str(tmp_path / "db.h5")
    ingest(models[:1], h5, kernel=5)
    with pytest.raises(InputError, match=r"holds 5x5 filters; a DB holds one kernel size"):
        ingest(models[1:2], h5)  # the default K = 3
    store = str(tmp_path / "db.zarr")
    convert(h5, store, verbosity=0)
    with pytest.raises(InputError, match=r"holds 5x5 filters"):
        ingest(models[1:2], store, kernel=7)
    new = str(tmp_path / "new.zarr")
    ingest(models[:1], new, kernel=7)
    assert fmt.read_record(new).kernel == 7
    with pytest.raises(InputError, match=r"holds 7x7 filters"):
        ingest(models[1:2], new, kernel=5)
    # below the ingest check, the format itself refuses rows of another width
    rec = fmt.read_record(store)
    with pytest.raises(StoreError, match=r"one kernel size per store"):
        fmt.append(store, np.zeros((4, 9), np.float32), np.array([[rec.n_filters,
                   rec.n_filters + 4]]), None, n_filters_seen=rec.n_filters, appended=[],
                   unreferenced=0)
    for bad in (1, 16, 99, "x", 2.5):
        with pytest.raises(InputError, match=r"must be an integer in 2\.\.15"):
            ingest(models[:1], str(tmp_path / "bad.h5"), kernel=bad)
    assert not os.path.exists(tmp_path / "bad.h5")


@pytest.mark.parametrize("shape", [(20, 10), (20, 3, 5), (20, 16, 16), (20, 256), (20, 1)])
def test_non_square_or_huge_filters_are_one_line_errors(tmp_path, shape):
    from filterdb_dask.convert.write import convert
    from tests.conftest import simple_meta, write_h5

    x = np.ones(shape, np.float32)
    path = write_h5(str(tmp_path / "d.h5"), x, simple_meta([20]))
    with pytest.raises(InputError, match=r"expected square K×K filters.*K in 2\.\.15"):
        convert(path, str(tmp_path / "s.zarr"), verbosity=0)


@pytest.mark.parametrize("layout", ["flat32", "cube64"])
def test_h5_layouts_of_any_k_convert(tmp_path, layout):
    from filterdb_dask import open_store
    from filterdb_dask.convert.synth import synthesize
    from filterdb_dask.convert.write import convert

    h5 = str(tmp_path / "s.h5")
    synthesize(h5, n_filters=3000, n_models=4, layout=layout, kernel=5)
    with h5py.File(h5) as f:
        shape = f["filter"].shape
        x = f["filter"][:].reshape(3000, 25)
    assert shape == ((3000, 25) if layout == "flat32" else (3000, 5, 5))
    convert(h5, str(tmp_path / "s.zarr"), verbosity=0)
    st = open_store(str(tmp_path / "s.zarr"))
    assert st.kernel == 5
    np.testing.assert_array_equal(st.filters.compute(), x.astype(st.filters.dtype))


def test_stores_without_a_kernel_field_open_as_3x3(tmp_path, synth_h5):
    import zarr

    from filterdb_dask import open_store
    from filterdb_dask import storeformat as fmt
    from filterdb_dask.convert.write import convert

    store = str(tmp_path / "s.zarr")
    convert(synth_h5, store, verbosity=0)
    g = zarr.open_group(store, mode="a")
    attrs = dict(g.attrs[fmt.ATTR_KEY])
    assert attrs["kernel"] == 3
    del attrs["kernel"]  # a store written before the field existed
    g.attrs[fmt.ATTR_KEY] = attrs
    st = open_store(store)
    assert st.kernel == 3 and st.filters.shape[1] == 9
    for bad in (16, 1, "5", True):
        g.attrs[fmt.ATTR_KEY] = {**attrs, "kernel": bad}
        with pytest.raises(StoreError, match=r"damaged \(kernel"):
            open_store(store)
    # a record claiming 5x5 over 3x3 chunks: the chunks do not match the record
    g.attrs[fmt.ATTR_KEY] = {**attrs, "kernel": 5}
    with pytest.raises(StoreError, match=r"differs from the store's record"):
        open_store(store)


@pytest.mark.parametrize("d", [4, 25, 49])
def test_kernels_bit_identical_across_engines_for_any_d(d):
    from filterdb_dask.engines import get_kernels

    pytest.importorskip("numba")
    nb, npk = get_kernels("numba"), get_kernels("numpy")
    rng = np.random.default_rng(d)
    x = rng.standard_normal((1500, d)).astype(np.float32)
    x[100:160] = 0.0
    x[300:330] *= 1e-4
    bounds = np.array([[0, 700], [700, 700], [700, 1499], [1499, 1500]])
    s1, s2 = npk.layer_stats_chunk(x, bounds), nb.layer_stats_chunk(x, bounds)
    assert s1.shape == (4, d * d + d + 5) and K.stats_dim(s1) == d
    np.testing.assert_array_equal(s1, s2)
    lay = K.stat_layout(d)
    n, mu, m2 = K.moments_combine(s1[:, lay.n], s1[:, lay.mean], s1[:, lay.m2])
    pca = K.pca_finalize(n, mu, m2)
    de = np.linspace(-3.3, 3.3, 41)
    r1 = npk.range_density_chunk(x, bounds, pca["mean"], pca["components"], de)
    r2 = nb.range_density_chunk(x, bounds, pca["mean"], pca["components"], de)
    np.testing.assert_array_equal(r1[0], r2[0])
    np.testing.assert_array_equal(r1[1], r2[1])
    edges = K.histogram_edges(30, *r1[0])
    fe = K.fine_edges(edges, 3)
    lg = np.array([[0], [1], [0], [-1]])
    h1 = npk.histogram_chunk(x, bounds, pca["mean"], pca["components"], edges, lg, 2, fe)
    h2 = nb.histogram_chunk(x, bounds, pca["mean"], pca["components"], edges, lg, 2, fe)
    assert h1[0].shape == (4, d, 30)
    np.testing.assert_array_equal(h1[0], h2[0])
    np.testing.assert_array_equal(h1[1], h2[1])
    eps = np.array([0.1, 0.01])
    np.testing.assert_array_equal(npk.sparsity_sweep_chunk(x, bounds, eps),
                                  nb.sparsity_sweep_chunk(x, bounds, eps))
    # the scatter against a direct computation
    xs = _peak_scaled(x[0:700])
    dev = xs - xs.mean(axis=0)
    np.testing.assert_allclose(s1[0, lay.m2].reshape(d, d), dev.T @ dev, rtol=1e-9, atol=1e-9)


def test_cli_kernel_option(models, tmp_path):
    from filterdb_dask.run import main
    from tests.hostile import assert_refused

    h5 = str(tmp_path / "c.h5")
    assert main(["-q", "ingest", models[0], "--into", h5, "--kernel", "7"]) == 0
    with h5py.File(h5) as f:
        assert f["filter"].shape == (36, 49)
    assert_refused(["ingest", models[1], "--into", h5], r"holds 7x7 filters")
    assert_refused(["ingest", models[1], "--into", str(tmp_path / "x.h5"), "--kernel", "99"],
                   r"kernel size '99' must be an integer in 2\.\.15",
                   outputs=[str(tmp_path / "x.h5")])
