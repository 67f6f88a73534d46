"""The share of degenerated layers per depth decile as ε and the entropy cutoff move
(issue 13 item 4): against a direct recomputation with ``degenerated_layers``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from filterdb_dask.errors import AnalysisError
from filterdb_dask.groups import make_grouping
from filterdb_dask.quality import degenerated_layers, normalize_entropy_cutoffs
from filterdb_dask.resultset import Results

EPS = (0.001, 0.01, 0.1)
CUTS = (0.3, 0.5, 0.7)


def _direct_share(q, deg_index):
    """Per depth decile: the share of its layers whose row index is in ``deg_index``."""
    g = make_grouping(q.assign(conv_depth_norm=q["conv_depth_norm"]), "depth decile")
    flag = pd.Series(q.index.isin(deg_index), index=q.index)
    return {g.labels[k]: flag[g.codes == k].mean() for k in range(g.n_groups)}


def test_sweep_against_degenerated_layers(synth_store, tmp_path):
    from filterdb_dask.run import main

    out = tmp_path / "out"
    assert main(["-q", "analyze", synth_store, "--out", str(out), "--scheduler", "threads",
                 "--by", "Task", "--sparsity-eps", ",".join(map(str, EPS)),
                 "--entropy-cutoffs", ",".join(map(str, CUTS))]) == 0
    res = Results.open(out)
    q = res.quality.reset_index(drop=True)
    sweep = res.degenerated_sweep()
    assert list(dict.fromkeys(sweep["threshold"])) == (
        [f"sparsity@{e}" for e in EPS] + [f"variance_entropy_norm<={h}" for h in CUTS])
    for e in EPS:  # the rule with sparsity@ε in place of sparsity
        deg = degenerated_layers(q.assign(sparsity=q[f"sparsity@{e}"]))
        want = _direct_share(q, deg.index)
        s = sweep[sweep["threshold"] == f"sparsity@{e}"]
        assert dict(zip(s["decile"], s["share"], strict=True)) == pytest.approx(want, abs=0)
    for h in CUTS:
        want = _direct_share(q, degenerated_layers(q, entropy_norm=h).index)
        s = sweep[sweep["threshold"] == f"variance_entropy_norm<={h}"]
        assert dict(zip(s["decile"], s["share"], strict=True)) == pytest.approx(want, abs=0)
        assert (s["layers"].sum()) == len(q)
    a = sweep[sweep["threshold"] == "sparsity@0.01"]["share"].to_numpy()
    b = sweep[sweep["threshold"] == "variance_entropy_norm<=0.5"]["share"].to_numpy()
    np.testing.assert_array_equal(a, b)  # both are today's rule
    shares = sweep[sweep["threshold"].str.startswith("sparsity@")].pivot(
        index="decile", columns="threshold", values="share")
    assert (shares["sparsity@0.001"] <= shares["sparsity@0.1"]).all()  # ε up, sparser
    ds = xr.open_zarr(out / "results.zarr", consolidated=False)
    np.testing.assert_array_equal(ds["degenerated_sweep_share"].values, sweep["share"])
    assert json.loads(ds.attrs["settings"])["entropy_cutoffs"] == list(CUTS)
    assert (out / "plots" / "degenerated_sweep.png").is_file()
    assert "Share of degenerated layers per depth decile" in (
        out / "report.html").read_text(encoding="utf-8")


def test_no_sweep_no_figure(synth_store):
    from filterdb_dask import analyze

    assert analyze(synth_store, by=["Task"], verbosity=0).degenerated_sweep() is None


def test_bad_entropy_cutoffs(synth_store, capsys):
    from filterdb_dask.run import main

    assert normalize_entropy_cutoffs(" 0.5, 0.3,") == (0.5, 0.3)
    for bad, match in (("x", "is not a number"), ("nan", "must be a finite number"),
                       ("0.5,0.5", "is given twice")):
        with pytest.raises(AnalysisError, match=match):
            normalize_entropy_cutoffs(bad)
    assert main(["analyze", synth_store, "--out", "/nonexistent/x", "--entropy-cutoffs",
                 "0.5,q"]) == 2
    assert "entropy cutoff 'q' is not a number" in capsys.readouterr().err
