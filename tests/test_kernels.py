"""Each per-chunk kernel against a plain reference, and numba against numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from filterdb_dask import kernels as K
from filterdb_dask.engines import get_kernels, numba_available
from filterdb_dask.errors import AnalysisError, StoreError
from tests import reference as ref

ENGINES = ["numpy"] + (["numba"] if numba_available() else [])


def _data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 9)).astype(np.float32)
    x[:50] = 0  # all-zero filters
    x[50:400] *= 1e-5  # sparse ones
    return x


def test_scale_matches_reference_and_keeps_zero_filters():
    x = _data()
    s = K.scale_filters(x)
    np.testing.assert_array_equal(s, ref.scale(x))
    assert np.all(s[:50] == 0)
    assert np.allclose(np.abs(s[60:]).max(axis=1), 1.0)


def test_pca_finalize_matches_sklearn():
    xs = ref.scale(_data(5000))
    b = np.array([[0, 1000], [1000, 1001], [1001, 5000]])
    stats = K.layer_stats_chunk(xs * 1.0, b)  # already scaled: scaling again is identity
    n, mu, m2 = K.moments_combine(stats[:, K.STAT_N], stats[:, K.STAT_MEAN], stats[:, K.STAT_M2])
    got = K.pca_finalize(n, mu, m2)
    want = ref.pca(ref.scale(xs))
    np.testing.assert_allclose(got["mean"], want["mean"], atol=1e-14)
    np.testing.assert_allclose(got["explained_variance_ratio"],
                               want["explained_variance_ratio"], rtol=1e-9, atol=1e-12)
    cos = np.abs(np.sum(got["components"] * want["components"], axis=1))
    assert np.all(cos >= 1 - 1e-9)
    # sign convention: the largest |entry| of every component is positive
    idx = np.argmax(np.abs(got["components"]), axis=1)
    assert np.all(got["components"][np.arange(9), idx] > 0)


@pytest.mark.parametrize("bins", [1, 7, 70])
def test_bin_indices_match_numpy_on_edges(bins):
    lo, hi = -2.5, 3.25
    edges = K.histogram_edges(bins, lo, hi)
    rng = np.random.default_rng(1)
    vals = np.concatenate([edges, rng.uniform(lo, hi, 5000), [lo - 1, hi + 1],
                           np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
    idx = K.bin_indices(vals, edges)
    got = np.bincount(idx[idx >= 0], minlength=bins)
    want, _ = np.histogram(vals, bins=bins, range=(lo, hi))
    np.testing.assert_array_equal(got, want)
    # each value individually, too
    for v, i in zip(vals[:bins + 1], idx[:bins + 1], strict=False):
        h, _ = np.histogram([v], bins=bins, range=(lo, hi))
        assert i == (np.argmax(h) if h.sum() else -1)


def test_empty_range_is_widened_like_numpy():
    e = K.histogram_edges(4, 2.0, 2.0)
    _, want = np.histogram([2.0], bins=4, range=(2.0, 2.0))
    np.testing.assert_array_equal(e, want)


def test_searchsorted_bins_match_histogram2d():
    edges = np.linspace(-3.3, 3.3, 513)
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.normal(size=4000), edges, [-4, 4]])
    b = np.concatenate([rng.normal(size=4000), edges[::-1], [0, 0]])
    ia, ib = K.bin_indices_searchsorted(a, edges), K.bin_indices_searchsorted(b, edges)
    ok = (ia >= 0) & (ib >= 0)
    got = np.bincount(ia[ok] * 512 + ib[ok], minlength=512 * 512).reshape(512, 512)
    want, _, _ = np.histogram2d(a, b, bins=[edges, edges])
    np.testing.assert_array_equal(got, want)


def test_layer_quality_matches_reference():
    x = _data(3000)
    x[2000:2600] = 0  # an all-zero layer
    b = np.array([[0, 1000], [1000, 1001], [1001, 2000], [2000, 2600], [2600, 3000]])
    got = K.quality_finalize(K.layer_stats_chunk(x, b))
    for i, (a, e) in enumerate(b):
        sp, ve, vec, nc = ref.layer_quality(x[a:e])
        assert got["sparsity"][i] == pytest.approx(sp, abs=1e-12)
        np.testing.assert_allclose(got["variance_entropy"][i], ve, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["variance_entropy_clean"][i], vec, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["variance_entropy_norm"][i],
                                   ve / ref.entropy_norm(e - a), rtol=1e-9)
        np.testing.assert_allclose(got["variance_entropy_clean_norm"][i],
                                   vec / ref.entropy_norm(nc), rtol=1e-9)
    assert np.isnan(got["variance_entropy"][1])  # one filter: undefined
    assert got["sparsity"][3] == 1.0 and got["variance_entropy"][3] == 0.0


SWEEP_EPS = np.array([0.05, 0.001, 0.01, 0.1, 0.005])  # unsorted on purpose


def _sweep_data():
    x = _data(3000)
    for (a, e), f in zip([(400, 550), (550, 700), (700, 800), (800, 850)],
                         [0.003, 0.015, 0.08, 0.2], strict=True):
        x[a:e] *= f  # peaks between the thresholds: every ε gives another sparsity
    x[2000:2600] = 0  # an all-zero layer
    b = np.array([[0, 1000], [1000, 1001], [1001, 1001], [1001, 2000], [2000, 2600],
                  [2600, 3000]])
    return x, b


@pytest.mark.parametrize("engine", ENGINES)
def test_sparsity_sweep_matches_a_direct_recomputation_per_eps(engine):
    x, b = _sweep_data()
    sweep = get_kernels(engine).sparsity_sweep_chunk(x, b, SWEEP_EPS)
    np.testing.assert_array_equal(sweep, K.sparsity_sweep_chunk(x, b, SWEEP_EPS))
    stats = K.layer_stats_chunk(x, b)
    got = K.sparsity_sweep_finalize(stats[:, K.STAT_N], sweep)
    for k, eps in enumerate(SWEEP_EPS):
        for i, (a, e) in enumerate(b):
            if a == e:
                assert np.isnan(got["sparsity"][i, k])
                assert np.isnan(got["variance_entropy_clean"][i, k])
                continue
            sp, _, vec, nc = ref.layer_quality(x[a:e], eps=eps)
            assert sweep[i, k] == nc  # clean counts exact on every engine
            assert got["sparsity"][i, k] == pytest.approx(sp, abs=1e-15)
            np.testing.assert_allclose(got["variance_entropy_clean"][i, k], vec,
                                       rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got["variance_entropy_clean_norm"][i, k],
                                       vec / ref.entropy_norm(nc), rtol=1e-9)
    # the thresholds really differ on this data, and ε = 0.01 is today's column bit for bit
    assert len(set(got["sparsity"][0])) == 5
    np.testing.assert_array_equal(got["sparsity"][:, 2], stats[:, K.STAT_SPARSITY])
    np.testing.assert_array_equal(
        got["sparsity"][:, 2],
        get_kernels(engine).layer_stats_chunk(x, b)[:, K.STAT_SPARSITY])


def test_variance_entropy_bounds():
    rng = np.random.default_rng(3)
    iso = rng.normal(size=(200000, 9))
    ve = K.variance_entropy_from_scatter(iso.T @ iso, len(iso))
    assert ve == pytest.approx(np.log10(9), abs=1e-3)
    rank1 = np.outer(rng.normal(size=100), rng.normal(size=9))
    d = rank1 - rank1.mean(0)
    assert K.variance_entropy_from_scatter(d.T @ d, 100) == pytest.approx(0, abs=1e-9)


def test_kl_matches_scipy_pairwise():
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 50, size=(6, 9, 70))
    counts[2] = 0  # an empty group
    counts[3, :, :35] = 0
    w = rng.dirichlet(np.ones(9))
    m = K.shift_matrix(counts, 0.1, w)
    p = K.kl_probabilities(counts, 0.1)
    for g in range(6):
        for h in range(6):
            want = 0.0 if g == h else sum(
                w[k] * (scipy.stats.entropy(p[g, k], p[h, k])
                        + scipy.stats.entropy(p[h, k], p[g, k]))
                for k in range(9))
            assert m[g, h] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert np.allclose(m, m.T) and np.all(np.diag(m) == 0)
    np.testing.assert_allclose(p[2, 0], np.full(70, 1 / 70))  # empty group: uniform


def test_kl_probability_uses_float32_eps_for_empty_bins():
    c = np.array([[0, 2, 2]])
    p = K.kl_probabilities(c, 0.5)
    d = np.array([K.EPS_KL, 2 / (4 * 0.5), 2 / (4 * 0.5)])
    np.testing.assert_allclose(p[0], d / d.sum(), rtol=1e-15)
    assert K.EPS_KL == pytest.approx(1.1920929e-07)


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 400),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    seed=st.integers(0, 2**16),
    f64=st.booleans(),
)
def test_numba_equals_numpy(n, cuts, seed, f64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 9)).astype(np.float64 if f64 else np.float32)
    if n > 10:
        x[:5] = 0
    pts = sorted({0, n, *[c for c in cuts if c <= n]})
    pairs = [[a, e] for a, e in zip(pts[:-1], pts[1:], strict=True)]
    b = np.array(pairs or [[0, 0]], dtype=np.int64)
    if n:
        b = b[::2]  # leave gaps (unreferenced rows)
    npk, nbk = get_kernels("numpy"), get_kernels("numba")
    s1, s2 = npk.layer_stats_chunk(x, b), nbk.layer_stats_chunk(x, b)
    np.testing.assert_array_equal(s1, s2)  # same additions in the same order: same bits
    eps = np.array([0.3, 0.01, 1.0])
    w1, w2 = npk.sparsity_sweep_chunk(x, b, eps), nbk.sparsity_sweep_chunk(x, b, eps)
    np.testing.assert_array_equal(w1, w2)  # the same additions: the same bits
    mean = rng.normal(size=9) * 0.1
    comps = np.linalg.qr(rng.normal(size=(9, 9)))[0]
    edges = K.histogram_edges(13, -2.0, 2.0)
    fedges = K.fine_edges(edges, 3)
    groups = rng.integers(-1, 3, size=(len(b), 2))
    h1, f1 = npk.histogram_chunk(x, b, mean, comps, edges, groups, 3, fedges)
    h2, f2 = nbk.histogram_chunk(x, b, mean, comps, edges, groups, 3, fedges)
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(f1, f2)
    de = np.linspace(-1.5, 1.5, 33)
    r1, d1 = npk.range_density_chunk(x, b, mean, comps, de)
    r2, d2 = nbk.range_density_chunk(x, b, mean, comps, de)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(d1, d2)


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
@pytest.mark.parametrize("f64", [False, True])
@pytest.mark.parametrize("n, sparse_at", [
    (1023, []), (1024, []), (1025, [1024]), (2048 + 300, [0]), (4 * 1024 + 17, [1500]),
    (4 * 1024 + 17, [3 * 1024 + 5]), (3 * 1024, [700, 2100]), (9000, [8990]),
])
def test_numba_equals_numpy_on_long_layers(n, sparse_at, f64):
    """Layers long enough for the compiled pass 1's runs of four blocks, with the first
    sparse filter (peak < 1 % of the layer's) before, inside or after such a run."""
    rng = np.random.default_rng(n + len(sparse_at))
    x = rng.normal(size=(n + 2 * 300 + 11, 9)).astype(np.float64 if f64 else np.float32)
    a = 311  # the layer starts off a block boundary of the chunk
    for r in sparse_at:
        x[a + r] *= 1e-4
    b = np.array([[0, 300], [a, a + n], [a + n, len(x)]], dtype=np.int64)
    s1 = get_kernels("numpy").layer_stats_chunk(x, b)
    s2 = get_kernels("numba").layer_stats_chunk(x, b)
    np.testing.assert_array_equal(s1, s2)  # same additions in the same order: same bits
    assert s2[1, K.STAT_N_CLEAN] == n - len(sparse_at)


def _hard_float32_filters(rng, n: int) -> np.ndarray:
    """float32 filters that stress division by the peak: random bit patterns over
    every exponent (subnormals included), values a few ulp from their peak, signed
    zeros, all-zero filters."""
    bits = rng.integers(0, 2**32, size=(n, 9), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    x[~np.isfinite(x)] = np.float32(1.5)
    near = rng.uniform(0.5, 2.0, size=(n // 3, 1)).astype(np.float32)
    steps = rng.integers(-40, 40, size=(n // 3, 9)).astype(np.int32)
    x[: n // 3] = (near.view(np.int32) + steps).view(np.float32)
    x[n // 3 : n // 3 + 50] *= np.float32(2.0**-120)  # tiny, some subnormal
    x[-40:-20] = 0.0
    x[-20:, ::2] = np.float32(-0.0)
    return x


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
def test_compiled_scaling_has_the_division_bits():
    """The compiled kernels scale float32 filters by a reciprocal and two fused
    multiply-adds instead of nine divisions; the scaled values must be the
    division's, bit for bit (signed zeros and an infinite peak included)."""
    from filterdb_dask import _compiled as C

    rng = np.random.default_rng(7)
    x = _hard_float32_filters(rng, 200_000)
    x[5, 3] = np.inf  # not from the converter; the division's NaN / zeros still
    x[6, :] = np.float32(3.0)
    x[6, 0] = -np.inf
    with np.errstate(invalid="ignore"):  # inf / inf
        want = K.scale_filters(x)
    n, B = len(x), C.BLOCK
    W, S, P, R = (np.empty((9, B)), np.empty((9, B)), np.empty(B), np.empty(B))
    zero = np.zeros(9)
    got_load, got_scale = np.empty((n, 9)), np.empty((n, 9))
    for r0 in range(0, n, B):
        m = min(B, n - r0)
        C._load_shifted(x, r0, m, W, S, P, R, True, zero, zero)
        got_load[r0 : r0 + m] = S[:, :m].T
        C._scale_block(x, r0, m, S, P, R, True)
        got_scale[r0 : r0 + m] = S[:, :m].T
    for got in (got_load, got_scale):
        same = (got.view(np.int64) == want.view(np.int64)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), np.argwhere(~same)[:5]
    assert np.signbit(got_scale[-20:, ::2]).all()  # -0.0 / peak is -0.0
    assert C._narrow(x) and not C._narrow(x.astype(np.float64))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_filters_are_refused_with_a_store_error(engine, bad):
    """A store the converter did not write may hold NaN/Inf: pass 1 says so in one
    line instead of failing inside the eigenvalue solver."""
    x = np.random.default_rng(3).normal(size=(600, 9)).astype(np.float32)
    x[350, 2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the one line only: no numpy warnings before it
        with pytest.raises(StoreError, match="NaN or Inf"):
            get_kernels(engine).layer_stats_chunk(x, np.array([[0, 300], [300, 600]]))


@pytest.mark.parametrize("engine", ENGINES)
def test_layer_stats_do_not_depend_on_the_chunking(engine):
    """A layer's statistics are the same bits whatever else its chunk holds and
    wherever the layer starts in it (the summation order is anchored at the layer)."""
    kern = get_kernels(engine)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(1500, 9)).astype(np.float32)
    x[700:900] *= 1e-5  # sparse filters in the middle of the layer
    alone = kern.layer_stats_chunk(x[300:1200], np.array([[0, 900]]))
    pad = np.concatenate([rng.normal(size=(37, 9)).astype(np.float32), x[300:1200]])
    shifted = kern.layer_stats_chunk(pad, np.array([[0, 37], [37, 937]]))
    np.testing.assert_array_equal(alone[0], shifted[1])
    # and it agrees with a float64 two-pass reference
    xs = ref.scale(x[300:1200])
    d = xs - xs.mean(axis=0)
    np.testing.assert_allclose(alone[0, K.STAT_M2].reshape(9, 9), d.T @ d, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(alone[0, K.STAT_MEAN], xs.mean(axis=0), rtol=1e-12, atol=1e-14)


def test_fine_edges_subdivide_coarse_edges_exactly():
    edges = K.histogram_edges(70, -2.718, 3.14159)
    fine = K.fine_edges(edges, 4)
    assert len(fine) == 281 and np.array_equal(fine[::4], edges)
    assert np.all(np.diff(fine) > 0)
    bad = fine.copy()
    bad[8] = np.nextafter(bad[8], np.inf)  # a coarse edge one ulp off
    for wrong in (bad, K.histogram_edges(282, -2.718, 3.14159)):
        with pytest.raises(AnalysisError, match="do not subdivide the 70 coarse bins exactly"):
            K.validate_fine_edges(edges, wrong)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("per_bin", [1, 3, 4])
def test_coarse_counts_are_np_histogram_and_sums_of_fine(engine, per_bin):
    """One increment per value: coarse = np.histogram exactly (also for values on,
    and one ulp either side of, every coarse and fine edge, and the closed last
    bin); coarse = fine summed over each bin's sub-bins; fine bins follow
    ``fine_bin_indices``' rule."""
    lo, hi = -2.2, 2.2
    edges = K.histogram_edges(70, lo, hi)
    fine = K.fine_edges(edges, per_bin)
    rng = np.random.default_rng(9)
    # filters whose coefficients (identity projection, zero mean) hit the edges
    vals = np.concatenate([fine, np.nextafter(fine, np.inf), np.nextafter(fine, -np.inf),
                           rng.uniform(lo, hi, 3000), [lo - 1, hi + 1]])
    vals = vals[np.abs(vals) <= 1.0]  # scaling leaves filters with peak 1 unchanged
    x = np.zeros((len(vals), 9))
    x[:, 0] = vals
    x[:, 1] = 1.0  # the peak: the row is already scaled
    x[:, 2:] = rng.uniform(-1, 1, size=(len(vals), 7))
    comps = np.eye(9)
    mean = np.zeros(9)
    b = np.array([[0, len(x)]])
    hist, fh = get_kernels(engine).histogram_chunk(x, b, mean, comps, edges,
                                                   np.array([[0]]), 1, fine)
    for k in range(9):
        want, _ = np.histogram(x[:, k], bins=70, range=(lo, hi))
        np.testing.assert_array_equal(hist[0, k], want)
        np.testing.assert_array_equal(fh[0, k].reshape(70, per_bin).sum(axis=1), want)
        idx = K.fine_bin_indices(x[:, k], edges, fine)
        np.testing.assert_array_equal(fh[0, k], np.bincount(idx[idx >= 0], minlength=70 * per_bin))
    ok = (vals >= fine[0]) & (vals <= fine[-1])
    idx = K.fine_bin_indices(vals, edges, fine)
    inner = ok & (vals < hi)
    assert np.all(fine[idx[inner]] <= vals[inner]) and np.all(vals[inner] < fine[idx[inner] + 1])


def test_histogram_chunk_matches_np_histogram_per_layer():
    x = _data(2000)
    b = np.array([[0, 700], [900, 2000]])
    rng = np.random.default_rng(5)
    mean = rng.normal(size=9) * 0.1
    comps = np.linalg.qr(rng.normal(size=(9, 9)))[0]
    edges = K.histogram_edges(70, -2.2, 2.2)
    for eng in ENGINES:
        hist, _ = get_kernels(eng).histogram_chunk(
            x, b, mean, comps, edges, np.full((2, 0), -1), 0, K.fine_edges(edges, 2))
        for i, (a, e) in enumerate(b):
            c = (ref.scale(x[a:e]) - mean) @ comps.T
            for k in range(9):
                want, _ = np.histogram(c[:, k], bins=70, range=(-2.2, 2.2))
                np.testing.assert_array_equal(hist[i, k], want)


def test_unknown_engine_is_refused():
    with pytest.raises(AnalysisError, match="engine 'gpu' is not one of"):
        get_kernels("gpu")


def test_binned_kde_integrates_to_one():
    edges = np.linspace(-3, 3, 257)
    rng = np.random.default_rng(6)
    c, _ = np.histogram(rng.normal(size=100000), bins=edges)
    bw = K.silverman_bandwidth(1.0, 1.3489795, 100000)
    d = K.binned_kde(c, edges, bw)
    assert (d * (edges[1] - edges[0])).sum() == pytest.approx(1.0, abs=1e-3)
    assert K.silverman_bandwidth(2.0, 1.3489795, 32) == pytest.approx(24 ** -0.2)


def _same_bits(a, b):
    np.testing.assert_array_equal(a.layer_stats, b.layer_stats)
    np.testing.assert_array_equal(a.layer_hist, b.layer_hist)
    np.testing.assert_array_equal(a.density, b.density)
    np.testing.assert_array_equal(a.coef_range, b.coef_range)
    for key in ("mean", "components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(a.pca, key), getattr(b.pca, key))
    for slug in a.kl:
        np.testing.assert_array_equal(a.kl[slug].to_numpy(), b.kl[slug].to_numpy())
    assert a.fine_hist.keys() == b.fine_hist.keys()
    for slug in a.fine_hist:
        np.testing.assert_array_equal(a.fine_hist[slug], b.fine_hist[slug])


def test_results_identical_on_1_2_and_4_worker_processes(synth_store):
    """Real local clusters over loopback TCP: the same bits as the threaded
    scheduler whatever the number of worker processes (each chunk's partial results
    merge in a fixed order, and every kernel sums in a fixed order)."""
    from distributed import Client, LocalCluster

    from filterdb_dask.analysis import analyze

    threaded = analyze(synth_store, verbosity=0)
    for n in (1, 2, 4):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None,
                          memory_limit="1GiB") as cluster, Client(cluster):
            _same_bits(analyze(synth_store, verbosity=0), threaded)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("per_bin", [1, 4])
def test_values_outside_a_given_range_are_dropped_as_numpy_drops_them(engine, per_bin):
    """A fixed reference range (``analyze --basis``) narrower than the data: pass 3
    drops what np.histogram(range=...) drops (below lo, above hi; lo and hi themselves
    are binned) in both engines, in small layers (direct increments) and large ones
    (per-layer scratch), coarse and fine alike; the rest is exactly np.histogram."""
    rng = np.random.default_rng(21)
    lo, hi = -0.37, 0.52
    edges = K.histogram_edges(70, lo, hi)
    fine = K.fine_edges(edges, per_bin)
    near = [lo, hi, np.nextafter(lo, -np.inf), np.nextafter(lo, np.inf),
            np.nextafter(hi, -np.inf), np.nextafter(hi, np.inf), -1.0, 1.0, 0.0, -0.0]
    vals = np.concatenate([np.repeat(near, 3), rng.uniform(-1, 1, 4000)])
    rng.shuffle(vals)
    x = np.zeros((len(vals), 9))
    x[:, 0] = vals
    x[:, 1] = 1.0  # the peak: rows are already scaled, coefficients = values
    x[:, 2:] = rng.uniform(-1, 1, size=(len(vals), 7))
    b = np.array([[0, 7], [7, 30], [30, 3000], [3000, len(x)]])
    groups = np.array([[0], [0], [1], [-1]])
    hist, fh = get_kernels(engine).histogram_chunk(x, b, np.zeros(9), np.eye(9), edges,
                                                   groups, 2, fine)
    want_fine = np.zeros((2, 9, 70 * per_bin), dtype=np.int64)
    for i, (a, e) in enumerate(b):
        for k in range(9):
            v = x[a:e, k]
            want, _ = np.histogram(v, bins=70, range=(lo, hi))
            np.testing.assert_array_equal(hist[i, k], want)
            outside = int(np.count_nonzero((v < lo) | (v > hi)))
            assert (e - a) - int(hist[i, k].sum()) == outside
            if groups[i, 0] >= 0:
                idx = K.fine_bin_indices(v, edges, fine)
                want_fine[groups[i, 0], k] += np.bincount(idx[idx >= 0],
                                                          minlength=70 * per_bin)
    np.testing.assert_array_equal(fh, want_fine)
    # a random basis: the coefficients of K.project (the kernels' bits)
    mean = rng.normal(size=9) * 0.1
    comps = np.linalg.qr(rng.normal(size=(9, 9)))[0]
    x2 = _data(2500, seed=3)
    b2 = np.array([[0, 5], [5, 2500]])
    hist, _ = get_kernels(engine).histogram_chunk(x2, b2, mean, comps, edges,
                                                  np.full((2, 0), -1), 0, fine)
    for i, (a, e) in enumerate(b2):
        c = K.project(K.scale_filters(x2[a:e]), mean, comps)
        for k in range(9):
            want, _ = np.histogram(c[:, k], bins=70, range=(lo, hi))
            np.testing.assert_array_equal(hist[i, k], want)
