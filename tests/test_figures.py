"""Figures against the authors' plotting cells (docs/method.md, "Figures").

Each figure's plotted array comes from a small function in ``filterdb_dask.report``;
here it is rebuilt the way the notebook does it, from the filters in memory with
numpy / scikit-learn / KDEpy, and compared. The PNGs get sanity checks (size bounds,
not blank), the kernel density its own property tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import warnings

import numpy as np
import pytest
from sklearn.decomposition import PCA

from filterdb_dask import analyze
from filterdb_dask import kernels as K
from filterdb_dask import report as R
from filterdb_dask.errors import AnalysisError
from filterdb_dask.resultset import Results
from tests import reference as ref

KDEpy = pytest.importorskip("KDEpy")


def _silverman_kdepy(data):
    """KDEpy's own rule (its fallbacks warn; the warnings are part of its behaviour)."""
    from KDEpy.bw_selection import silvermans_rule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(silvermans_rule(np.asarray(data, dtype=np.float64)[:, None]))


def _png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def built(synth_store, synth_h5, tmp_path_factory):
    """The analysis and report of the session's synthetic store, plus the filters."""
    out = str(tmp_path_factory.mktemp("figures") / "out")
    res = analyze(synth_store, verbosity=0)
    res.write(out)
    err = io.StringIO()
    drawn: dict = {}

    def spy(name):
        real = getattr(R, name)

        def wrapper(*args, **kwargs):
            drawn.setdefault(name, []).append(args)
            return real(*args, **kwargs)
        return wrapper

    # record what write_report hands the figure functions (the wiring, not just the parts)
    with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        for name in ("fig_covariance", "fig_density", "fig_ridge", "fig_eigenimages"):
            mp.setattr(R, name, spy(name))
        R.write_report(out, verbosity=1)
    import h5py

    with h5py.File(synth_h5, "r") as f:
        x = f["filter"][:]
    meta = res.meta
    rows = np.concatenate([np.arange(a, b) for a, b in zip(meta["start"], meta["stop"],
                                                            strict=True)])
    xs = ref.scale(x[rows])
    pca = PCA(n_components=9, svd_solver="full").fit(xs)
    layer_of_row = np.repeat(np.arange(len(meta)), (meta["stop"] - meta["start"]).to_numpy())
    return {"out": out, "stderr": err.getvalue(), "drawn": drawn, "res": res, "xs": xs, "pca": pca,
            "coefs": pca.transform(xs), "layer": layer_of_row}


# ---------------------------------------------------------------------- plotted arrays
def test_the_report_draws_the_notebook_arrays(built):
    """write_report hands each figure the notebook's array, not a look-alike."""
    (sigma,), = built["drawn"]["fig_covariance"]
    np.testing.assert_allclose(sigma, built["pca"].get_covariance(), rtol=1e-9, atol=1e-12)
    (counts, *_), = built["drawn"]["fig_density"]
    c = built["coefs"]
    h, _, _ = np.histogram2d(c[:, 0], c[:, 1], bins=512, range=[[-3.3, 3.3], [-3.3, 3.3]])
    assert np.abs(R.density_image(counts) * h.max() - h.T).sum() <= 4
    res = built["res"]
    ridges = {args[3]: args for args in built["drawn"]["fig_ridge"]}
    g = res.grouping("Task")
    x, dens, labels, _ = next(a for t, a in ridges.items() if "Task" in t)
    rd = res.ridge(g.slug)
    np.testing.assert_allclose(x, rd["x"])
    keep = [list(g.labels).index(lab) for lab in labels]
    np.testing.assert_allclose(dens, rd["density"][keep])
    (rows,), = built["drawn"]["fig_eigenimages"]
    assert len(rows) == 1 + len(res.subsets)


def test_covariance_is_sklearn_get_covariance(built):
    sigma = R.covariance_matrix(Results.open(built["out"]).pca)
    want = built["pca"].get_covariance()
    np.testing.assert_allclose(sigma, want, rtol=1e-9, atol=1e-12)
    # the old figure showed the coefficients' diagonal covariance: not this
    assert np.abs(sigma - np.diag(np.diag(sigma))).max() > 1e-3


def test_cumulative_ratio_is_notebook_cumsum(built):
    with open(os.path.join(built["out"], "pca.json")) as fh:
        pca = json.load(fh)
    np.testing.assert_allclose(R.cumulative_ratio(pca["explained_variance_ratio"]),
                               np.cumsum(built["pca"].explained_variance_ratio_), atol=1e-12)


def test_density_image_is_transposed_histogram2d_over_max(built):
    import xarray as xr

    ds = xr.open_zarr(os.path.join(built["out"], "results.zarr"), consolidated=False)
    c = built["coefs"]
    h, _, _ = np.histogram2d(c[:, 0], c[:, 1], bins=512, range=[[-3.3, 3.3], [-3.3, 3.3]])
    want = h.T / h.max()
    got = R.density_image(ds["density_counts"].values)
    assert got.shape == (512, 512)
    # coefficients computed two ways may straddle a bin edge by rounding: allow a handful
    moved = np.abs(got * h.max() - want * h.max()).sum()
    assert moved <= 4, moved
    assert got.max() == 1.0


def test_density_figure_is_drawn_like_the_notebook():
    counts = np.zeros((512, 512))
    counts[10, 300] = 7  # coefficient 0 in bin 10, coefficient 1 in bin 300
    counts[500, 2] = 1
    fig = R.fig_density(counts)
    ax = fig.axes[0]
    im = ax.images[0]
    assert im.origin == "upper"
    arr = im.get_array()
    # transposed: row = coefficient 1, column = coefficient 0; empty cells masked
    assert arr[300, 10] == 1.0 and arr[2, 500] == pytest.approx(1 / 7)
    assert np.ma.is_masked(arr[0, 0])
    black = (0.0, 0.0, 0.0, 1.0)
    assert tuple(im.cmap.get_bad()) == black and tuple(im.cmap.get_under()) == black
    assert im.cmap.name.startswith("fire")
    assert im.norm.vmin == 1e-5 and im.norm.vmax == 1
    assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
    R._plt().close(fig)


def test_subset_eigenimages_are_sign_aligned_to_the_closest_global_component(built):
    res = built["res"]
    written = Results.open(built["out"])  # what the report reads
    subsets = written.subsets
    rows, n_flipped = R.eigenimage_rows(written.pca, subsets)
    glob = built["pca"].components_
    vc = res.meta["Visual Category"].astype(str).to_numpy()
    for name in subsets:
        cat = name.split("=", 1)[-1]
        sel = vc[built["layer"]] == cat
        sub = PCA(n_components=9, svd_solver="full").fit(built["xs"][sel]).components_
        shown = rows[cat]
        # the same components up to sign, and each agrees in sign with its closest global one
        np.testing.assert_allclose(np.abs(shown), np.abs(sub), atol=1e-8)
        dots = shown @ glob.T
        closest = np.abs(dots).argmax(axis=1)
        assert (dots[np.arange(9), closest] > 0).all()
    np.testing.assert_allclose(rows["all filters"], glob, atol=1e-8)
    assert n_flipped >= 0


def test_ridge_bandwidth_is_kdepy_silverman_of_the_group(built):
    res = built["res"]
    g = res.grouping("Task")
    rd = res.ridge(g.slug)
    width = res.fine_edges[1] - res.fine_edges[0]
    c = built["coefs"]
    codes = g.codes[built["layer"]]
    for gi in range(g.n_groups):
        for k in range(9):
            data = c[codes == gi, k]
            want = _silverman_kdepy(data)
            got = rd["bandwidth"][gi, k]
            # n and sigma exact; quartiles from the fine histogram, within one fine bin
            factor = (3 * len(data) / 4) ** -0.2
            assert abs(got - want) <= 1.01 * width / 1.3489795 * factor + 1e-12, (gi, k)
            # one fine bin of quartile error is up to a few % for the narrowest group
            assert got == pytest.approx(want, rel=0.04)


def test_ridge_density_is_the_gaussian_kde_of_the_group(built):
    res = built["res"]
    g = res.grouping("Task")
    rd = res.ridge(g.slug)
    x = rd["x"]
    codes = g.codes[built["layer"]]
    for gi in range(g.n_groups):
        for k in (0, 4, 8):
            data = built["coefs"][codes == gi, k]
            bw = rd["bandwidth"][gi, k]
            want = np.zeros_like(x)
            for part in np.array_split(data, max(1, len(data) // 4000)):
                z = (x[:, None] - part[None, :]) / bw
                want += np.exp(-0.5 * z * z).sum(axis=1)
            want /= len(data) * bw * np.sqrt(2 * np.pi)
            got = rd["density"][gi, k]
            assert len(got) == len(x)
            # binning moves each value by at most half a fine bin
            assert np.abs(got - want).max() <= 0.03 * want.max(), (gi, k)


def test_ridge_heights_scale_each_column_to_its_largest_curve():
    rng = np.random.default_rng(0)
    d = rng.random((4, 9, 32))
    d[:, 3] = 0  # an empty column stays empty
    h = R.ridge_heights(d)
    np.testing.assert_allclose(h.max(axis=(0, 2))[[0, 1, 2, 4, 5, 6, 7, 8]], 1.0)
    assert (h[:, 3] == 0).all()
    np.testing.assert_allclose(h[:, 0] * d[:, 0].max(), d[:, 0])


# ---------------------------------------------------------------------- kernel density
@pytest.mark.parametrize("bandwidth", [1e-6, 0.003, 0.2, 5.0, 1e6, np.nan, 0.0])
@pytest.mark.parametrize("n", [1, 2, 7, 256])
def test_binned_kde_never_changes_the_number_of_grid_points(n, bandwidth):
    edges = np.linspace(0, 1, n + 1)
    d = K.binned_kde(np.ones(n), edges, bandwidth)
    assert d.shape == (n,)
    assert np.isfinite(d).all() and (d >= 0).all()


def test_binned_kde_of_the_reported_case_has_256_points():
    d = K.binned_kde(np.ones(256), np.linspace(0, 1, 257), 0.2)
    assert d.shape == (256,)
    # symmetric data, symmetric density; mass lost past the edges only
    np.testing.assert_allclose(d, d[::-1], rtol=1e-12)
    assert 0.8 < d.sum() / 256 < 1.0


def test_binned_kde_keeps_mass_for_narrow_kernels():
    edges = np.linspace(-1, 1, 101)
    counts = np.zeros(100)
    counts[50] = 10
    for bw in (1e-4, 0.005, 0.02):
        d = K.binned_kde(counts, edges, bw)
        assert (d * 0.02).sum() == pytest.approx(1.0, abs=1e-9)


def test_silverman_bandwidth_is_kdepy_rule_with_its_fallbacks():
    rng = np.random.default_rng(3)
    cases = {
        "normal": rng.normal(size=500),
        "heavy tails (IQR wins)": rng.standard_t(2, size=500),
        "most values equal (1-99 % range)": np.r_[np.zeros(400), rng.normal(size=100)],
        "constant": np.full(50, 2.5),
        "one value": np.array([0.3]),
        "two values": np.array([0.0, 1.0]),
    }
    for name, x in cases.items():
        p1, q1, q3, p99 = np.percentile(x, [1, 25, 75, 99])
        std = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
        got = K.silverman_bandwidth(std, q3 - q1, len(x), inner_range=p99 - p1)
        assert got == pytest.approx(_silverman_kdepy(x), rel=1e-12), name
    assert np.isnan(K.silverman_bandwidth(1.0, 1.0, 0))


def test_histogram_percentiles_are_within_one_bin_of_numpy():
    rng = np.random.default_rng(4)
    for x in (rng.normal(size=10_000), rng.exponential(size=777), rng.uniform(size=5)):
        edges = np.linspace(x.min(), x.max(), 257)
        counts, _ = np.histogram(x, edges)
        q = np.array([0, 1, 25, 50, 75, 99, 100])
        got = K.histogram_percentiles(counts, edges, q)
        want = np.percentile(x, q)
        assert np.abs(got - want).max() <= edges[1] - edges[0]


# ---------------------------------------------------------------------- text and labels
def test_cell_text_has_no_negative_zero():
    assert R.cell_text(-0.001) == "0.00"
    assert R.cell_text(-0.0) == "0.00"
    assert R.cell_text(-0.006) == "-0.01"
    assert R.cell_text(0.333) == "0.33"


def test_covariance_annotations_contrast_with_their_cells():
    sigma = np.diag(np.linspace(0.01, 1.0, 9))
    sigma[0, 8] = sigma[8, 0] = -1.0
    fig = R.fig_covariance(sigma)
    ax = fig.axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(texts) == 81
    assert texts[(8, 8)].get_color() == "white"  # darkest red
    assert texts[(0, 8)].get_color() == "white"  # darkest blue
    assert texts[(0, 1)].get_color() == "black"  # zero: near white
    assert "-0.00" not in {t.get_text() for t in ax.texts}
    R._plt().close(fig)


def test_labels_are_shortened_and_stay_distinct():
    long = "m" * 5000 + ".onnx"
    s = R.short_label(long)
    assert len(s) == R.LABEL_WIDTH and s.endswith(".onnx") and "…" in s
    assert R.short_label("a\nb  c") == "a b c"
    labels = R.short_labels(["x" * 100 + "1", "x" * 100 + "1", "short"])
    assert len(set(labels)) == 3


def test_a_5000_character_label_makes_a_small_png(tmp_path):
    names = ["model_" + "verylongname" * 420 + f"_{i}.onnx" for i in range(100)]
    m = np.random.default_rng(0).random((100, 100))
    plots: dict = {}
    R._save(R.fig_matrix(m, names, "KL shift: " + names[0], annotate=True), plots, "kl",
            str(tmp_path))
    rng = np.random.default_rng(1)
    R._save(R.fig_ridge(np.linspace(-1, 1, 64), rng.random((3, 9, 64)), names[:3],
                        "densities by " + names[0]), plots, "ridge", str(tmp_path))
    fig = R._plt().figure(figsize=(4, 3))
    fig.add_subplot().set_title("x" * 3000)  # a text the figure functions would not shorten
    R._save(fig, plots, "title", str(tmp_path))
    for name in ("kl", "ridge", "title"):
        w, h = _png_size(tmp_path / f"{name}.png")
        assert max(w, h) <= R.MAX_SIDE_PX and w * h <= 6e6, (name, w, h)


def test_heatmaps_of_many_groups_name_their_ticks():
    labels = [f"group {i}" for i in range(300)]
    fig = R.fig_matrix(np.eye(300), labels, "KL")
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert 0 < len(shown) <= R.MAX_HEATMAP_LABELS and all(s.startswith("group ") for s in shown)
    R._plt().close(fig)


def test_entropy_note_states_t_of_n_for_small_layers():
    note = R.entropy_note()
    for n in (3, 4, 5, 6):
        assert f"n={n}: T={float(K.entropy_norm(n)):.3f}" in note
    assert float(K.entropy_norm(3)) < np.log10(2) / 2  # the fit lies below half the top


# ---------------------------------------------------------------------- the PNGs
def test_every_png_is_bounded_and_not_blank(built):
    import matplotlib.image as mpimg

    plots = os.path.join(built["out"], "plots")
    names = sorted(os.listdir(plots))
    assert len(names) >= 10
    for name in names:
        w, h = _png_size(os.path.join(plots, name))
        assert 200 <= w <= R.MAX_SIDE_PX and 150 <= h <= R.MAX_SIDE_PX, (name, w, h)
        img = mpimg.imread(os.path.join(plots, name))[..., :3]
        assert float(img.std()) > 0.05, name
        # something other than white in the middle half (the drawing, not just margins)
        mid = img[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
        assert (mid.min(axis=-1) < 0.9).mean() > 0.005, name


def test_report_prints_one_line_per_figure(built, capsys, monkeypatch, tmp_path):
    pngs = sorted(os.listdir(os.path.join(built["out"], "plots")))
    lines = built["stderr"].splitlines()
    assert all(line.startswith("report: plots/") for line in lines)
    assert sorted(line.split()[1][len("plots/"):] for line in lines) == pngs
    monkeypatch.setitem(R._build, "verbosity", 0)
    R._save(R.fig_drift({}), {}, "quiet", str(tmp_path))
    assert capsys.readouterr().err == ""


def test_report_of_a_missing_directory_says_so(tmp_path):
    with pytest.raises(AnalysisError, match="does not exist"):
        R.write_report(str(tmp_path / "missing"))


def test_eigenimage_figure_draws_subset_rows_sign_aligned():
    rng = np.random.default_rng(2)
    glob = np.linalg.qr(rng.normal(size=(9, 9)))[0].T
    flipped = glob * np.where(np.arange(9) % 2 == 0, -1.0, 1.0)[:, None]
    fig = R.fig_eigenimages({"all filters": glob, "subset": flipped})
    drawn = [ax.images[0].get_array().ravel() for ax in fig.axes if ax.images]
    np.testing.assert_allclose(np.array(drawn[9:18]), glob, atol=1e-12)
    R._plt().close(fig)


def test_report_command_is_quiet_with_q(built, capsys):
    from filterdb_dask.run import main

    assert main(["report", built["out"], "-q"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out.startswith("report: ")
