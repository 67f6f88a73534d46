"""A small run of the benchmark suite: it runs end to end and its checks hold."""

from __future__ import annotations

import json

from benchmarks.__main__ import main


def test_small_benchmark_run(tmp_path):
    out = tmp_path / "bench"
    assert main(["--filters", "300k", "--out", str(out), "--repeat", "1", "--workers", "2",
                 "--scaling", "100k,300k", "--skip",
                 "flox grouped histograms,dask-histogram grouped histograms"]) == 0
    rep = json.loads((out / "bench.json").read_text())
    c = rep["contenders"]
    assert set(c) >= {"read floor", "filterdb_dask whole analysis", "authors' method in memory",
                      "dask-ml PCA (tsqr)", "xhistogram grouped histograms", "hand-rolled dask"}
    whole = c["filterdb_dask whole analysis"]["errors"]
    assert whole["histogram_cells_differing"] == 0
    assert whole["smallest_eigenvalue_rel_error"] < 1e-9
    assert whole["kl_max_rel_error"] < 1e-9
    assert c["filterdb_dask pass 3"]["errors"]["histogram_cells_differing"] == 0
    assert [s["n"] for s in rep["scaling"]] == [100_000, 300_000]
    assert rep["machine"]["cores"] >= 1 and rep["convert"]["n"] == 300_000
    md = (out / "bench.md").read_text()
    assert "| filterdb_dask whole analysis |" in md and "Targets:" in md
