"""Paired comparison (docs/method.md §7): the table against a direct pandas
computation, Spearman against scipy, hostile pairs files as one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr

from filterdb_dask import analyze
from filterdb_dask.errors import AnalysisError
from filterdb_dask.pairs import PAIR_BINS, PAIR_METRICS, read_pairs, spearman
from filterdb_dask.resultset import Results


@pytest.fixture(scope="module")
def synth_meta(synth_store):
    from filterdb_dask import open_store

    return open_store(synth_store).meta


def _models(meta):
    return list(dict.fromkeys(meta["model"]))


def _direct_bins(q):
    """First layers (conv_depth_norm 0) their own bin, then (k/10, (k+1)/10]: pd.cut."""
    cut = pd.cut(q["conv_depth_norm"], bins=[i / 10 for i in range(11)], right=True,
                 labels=list(PAIR_BINS[1:]))
    return cut.astype(object).where(q["conv_depth_norm"] != 0, "first")


def _direct_table(q, pairs):
    """Per pair and bin: mean metric of each side and the difference, in pandas."""
    q = q.assign(bin=_direct_bins(q)).dropna(subset=["bin"])
    means = q.groupby(["model", "bin"])[list(PAIR_METRICS)].mean()
    rows = []
    for a, b in pairs:
        for label in PAIR_BINS:
            if (a, label) in means.index and (b, label) in means.index:
                d = means.loc[(a, label)] - means.loc[(b, label)]
                rows.append({"first": a, "second": b, "bin": label,
                             **{f"{m}_diff": d[m] for m in PAIR_METRICS}})
    return pd.DataFrame(rows)


def test_pair_table_matches_pandas(synth_store, synth_meta, tmp_path):
    from filterdb_dask.run import main

    names = _models(synth_meta)
    pairs = [(names[0], names[1]), (names[2], names[3]), (names[4], names[0]),
             (names[6], names[7])]
    f = tmp_path / "pairs.csv"
    f.write_text("robust,normal\n" + "".join(f"{a},{b}\n" for a, b in pairs), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["-q", "analyze", synth_store, "--out", str(out), "--scheduler", "threads",
                 "--by", "Task", "--pairs", str(f), "--correlate", "total_filters"]) == 0
    res = Results.open(out)
    got = pd.read_csv(out / "pairs.csv")
    want = _direct_table(res.quality, pairs)
    assert list(got["robust"]) == list(want["first"]) and list(got["bin"]) == list(want["bin"])
    assert len(got) > 2 * len(pairs)  # several bins per pair
    for m in PAIR_METRICS:
        np.testing.assert_allclose(got[f"{m}_diff"], want[f"{m}_diff"], rtol=1e-13,
                                   atol=1e-15, equal_nan=True)
    np.testing.assert_array_equal(got["sparsity_diff"],
                                  got["sparsity_robust"] - got["sparsity_normal"])
    assert got["orthogonality_diff"].isna().all()  # the synthetic DB has no shapes
    # Spearman over the paired models (each once) against scipy
    corr = pd.read_csv(out / "pairs_correlation.csv")
    q = res.quality.assign(bin=_direct_bins(res.quality))
    tf = synth_meta.groupby("model")["total_filters"].first()
    models = sorted({n for p in pairs for n in p})
    checked = 0
    for label in PAIR_BINS:
        for metric in ("sparsity", "variance_entropy"):
            sub = q[(q["bin"] == label) & q["model"].isin(models)]
            per = sub.groupby("model")[metric].mean().dropna()
            sel = corr[(corr["bin"] == label) & (corr["metric"] == metric)]
            if not len(sel):
                assert not len(sub)  # a bin no paired model has layers in
                continue
            row = sel.iloc[0]
            assert row["n"] == len(per)
            if len(per) >= 3 and per.nunique() > 1:
                rho = scipy.stats.spearmanr(per.to_numpy(), tf[per.index].to_numpy()).statistic
                assert row["spearman"] == pytest.approx(rho, abs=1e-12)
                checked += 1
            else:
                assert np.isnan(row["spearman"])
    assert checked >= 3
    # results.zarr is the source of truth: the table is there, and the settings
    ds = xr.open_zarr(out / "results.zarr", consolidated=False)
    settings = json.loads(ds.attrs["settings"])
    assert settings["pairs"]["columns"] == ["robust", "normal"]
    assert settings["correlate"] == "total_filters"
    np.testing.assert_array_equal(ds["pairs_sparsity_diff"].values, got["sparsity_diff"])
    np.testing.assert_array_equal(ds["pair_correlation_spearman"].values, corr["spearman"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Paired differences" in page and "Spearman" in page
    assert (out / "plots" / "pairs.png").is_file()
    assert (out / "plots" / "pairs_correlation.png").is_file()


def test_spearman_against_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    y[:5] = y[0]  # ties
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-14)
    assert np.isnan(spearman([1, 2], [2, 1])) and np.isnan(spearman([1, 2, 3], [1, 1, 1]))
    assert np.isnan(spearman([1, 2, np.nan, 4], [1, np.nan, 3, 4]))


def test_pairs_with_orthogonality_of_onnx_models(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    from filterdb_dask.convert.ingest import ingest
    from filterdb_dask.convert.write import convert

    h5 = str(tmp_path / "own.h5")
    for s in range(4):
        rng = np.random.default_rng(s)
        nodes, inits, prev = [], [], "x"
        for i, shape in enumerate([(8, 3, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (8, 16, 3, 3)]):
            w = rng.normal(size=shape).astype(np.float32)
            if s % 2:
                w[: shape[0] // 2] = w[0]  # the second of a pair: half its rows equal
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"y{i}"], name=f"c{i}",
                                          pads=[1, 1, 1, 1]))
            prev = f"y{i}"
        g = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(prev, 1, None)], inits)
        path = str(tmp_path / f"net{s}.onnx")
        onnx.save(helper.make_model(g), path)
        ingest([path], h5, fields={"acc": 0.5 + 0.1 * s})
    store = str(tmp_path / "own.zarr")
    convert(h5, store, verbosity=0)
    res = analyze(store, by=["model"], verbosity=0,
                  pairs=[("net0.onnx", "net1.onnx"), ("net2.onnx", "net3.onnx")],
                  correlate="acc")
    t = res.pair_table()
    assert list(t["bin"].unique()) == ["first", "(0.3, 0.4]", "(0.6, 0.7]", "(0.9, 1.0]"]
    want = _direct_table(res.quality, [("net0.onnx", "net1.onnx"), ("net2.onnx", "net3.onnx")])
    np.testing.assert_allclose(t["orthogonality_diff"], want["orthogonality_diff"], rtol=1e-13)
    assert (t["orthogonality_diff"] > 0.1).all()  # equal rows lower the second's value
    c = res.pair_correlation()
    assert list(c["bin"].unique()) == list(t["bin"].unique()) and (c["n"] == 4).all()
    assert c.loc[c["metric"] != "sparsity", "spearman"].notna().all()  # sparsity: all 0
    acc = np.array([0.5, 0.6, 0.7, 0.8])
    q = res.quality.assign(bin=_direct_bins(res.quality))
    per = q[q["bin"] == "first"].groupby("model")["orthogonality"].mean()
    rho = scipy.stats.spearmanr(per.to_numpy(), acc).statistic
    got = c[(c["bin"] == "first") & (c["metric"] == "orthogonality")]["spearman"].iloc[0]
    assert got == pytest.approx(rho, abs=1e-12)


def _meta_frame():
    return pd.DataFrame({"model_id": [0, 0, 1, 2, 3], "model": ["a", "a", "b", "c", "c2"],
                         "Name": ["A", "A", "B", "C", "C"]})


@pytest.mark.parametrize("content,match", [
    (b"a,zz\n", r"row 1: no model is named 'zz'"),
    (b"a,b\nb,a\n", r"row 2: the pair 'b', 'a' is also row 1"),
    (b"a,b\na,b\n", r"row 2: the pair 'a', 'b' is also row 1"),
    (b"a,a\n", r"row 1: 'a' is paired with itself"),
    (b"a,b,c\n", r"row 1: 3 cells; each row names two models"),
    (b"a,C\n", r"row 1: 'C' names more than one model"),
    (b"a,\xff\xfeb\n", r"is not UTF-8 text"),
    (b"a,b\x00\n", r"holds NUL bytes"),
    (b"\n\n", r"names no pair of models"),
    (b"robust,normal\n", r"names no pair of models"),
    (b"x,x\na,b\n", r"header \['x', 'x'\] must name two different sides"),
    (b"bin,normal\na,b\n", r"header label 'bin' is taken"),
    (b"x,sparsity_diff\na,b\n", r"header label 'sparsity_diff' is taken"),
])
def test_hostile_pairs_files(tmp_path, content, match):
    f = tmp_path / "p.csv"
    f.write_bytes(content)
    with pytest.raises(AnalysisError, match=match):
        read_pairs(str(f), _meta_frame())


def test_pairs_file_limits(tmp_path):
    meta = _meta_frame()
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as fh:
        fh.truncate(64 << 20)
    with pytest.raises(AnalysisError, match=r"has 67,108,864 bytes; a pairs file holds at most"):
        read_pairs(str(huge), meta)
    with pytest.raises(AnalysisError, match=r"does not exist or is not a file"):
        read_pairs(str(tmp_path / "missing.csv"), meta)
    with pytest.raises(AnalysisError, match=r"does not exist or is not a file"):
        read_pairs(str(tmp_path), meta)
    # the Name column serves where the model column has no such name; BOM and blanks
    f = tmp_path / "ok.csv"
    f.write_bytes("\ufeffA , b\n\n a,c\n".encode())
    got = read_pairs(str(f), meta)
    assert got == {"columns": ["first", "second"], "names": [["A", "b"], ["a", "c"]],
                   "model_ids": [[0, 1], [0, 2]]}


def test_pairs_errors_on_the_command_line(synth_store, tmp_path, capsys):
    from filterdb_dask.run import main

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"nope.onnx,other.onnx\n")
    out = tmp_path / "out"
    rc = main(["-q", "analyze", synth_store, "--out", str(out), "--scheduler", "threads",
               "--pairs", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "names no model" in err
    assert not out.exists()  # refused before any pass, nothing written
    with pytest.raises(AnalysisError, match=r"`correlate` needs `pairs`"):
        analyze(synth_store, correlate="total_filters", verbosity=0)
    good = tmp_path / "good.csv"
    from filterdb_dask import open_store

    names = _models(open_store(synth_store).meta)
    good.write_text(f"{names[0]},{names[1]}\n", encoding="utf-8")
    for col, match in (("nope", r"correlate column 'nope' is not a meta column"),
                       ("Task", r"correlate column 'Task' is not numeric")):
        with pytest.raises(AnalysisError, match=match):
            analyze(synth_store, pairs=str(good), correlate=col, verbosity=0)
