"""A small run of the benchmark suite: it runs end to end and its checks hold."""

from __future__ import annotations

import json

import pytest

from benchmarks import parse_count
from benchmarks.__main__ import TARGETS, main


def test_small_benchmark_run(tmp_path):
    out = tmp_path / "bench"
    assert main(["--filters", "300k,200k", "--out", str(out), "--repeat", "1", "--workers",
                 "2", "--kernel-filters", "200k", "--scaling", "100k", "--skip",
                 "flox grouped histograms,dask-histogram grouped histograms"]) == 0
    rep = json.loads((out / "bench.json").read_text())
    assert [r["n"] for r in rep["runs"]] == [300_000, 200_000]
    c = rep["runs"][0]["contenders"]
    assert set(c) >= {"read floor", "read floor (threads)", "filterdb_dask whole analysis",
                      "authors' method in memory", "dask-ml PCA (tsqr)",
                      "xhistogram grouped histograms", "hand-rolled dask"}
    whole = c["filterdb_dask whole analysis"]["errors"]
    assert whole["histogram_cells_differing"] == 0
    assert whole["smallest_eigenvalue_rel_error"] < 1e-9
    assert whole["kl_max_rel_error"] < 1e-9
    assert c["filterdb_dask pass 3"]["errors"]["histogram_cells_differing"] == 0
    for run in rep["runs"]:
        t = run["targets"]["targets"]
        assert set(t) == set(TARGETS)
        for r in t.values():  # every target measured, with a verdict that follows it
            assert r["value"] is not None and r["pass"] == (r["value"] >= r["target"])
    k = rep["kernels"]
    for eng in ("numba", "numpy"):
        assert all(k[eng][f"pass {i}"]["filters_per_s"] > 0 for i in (1, 2, 3))
    assert all(k["limits"][f"pass {i}"]["filters_per_s"] > 0 for i in (1, 2, 3))
    assert [s["n"] for s in rep["scaling"]] == [100_000]
    md = (out / "bench.md").read_text()
    assert "| filterdb_dask whole analysis |" in md and "| target | measured |" in md
    assert "Kernels alone" in md and "per-core limit" in md


def test_counts_parse():
    assert parse_count("20M") == 20_000_000 and parse_count("300k") == 300_000
    assert parse_count("7") == 7
    with pytest.raises(ValueError, match="not a count: 'lots'"):
        parse_count("lots")


def test_a_contender_that_cannot_run_is_recorded_not_fatal(monkeypatch):
    from benchmarks import __main__ as bench
    from benchmarks import contenders

    calls = []

    def boom(ctx):
        calls.append(1)
        raise MemoryError("needs 13 GiB on one worker")

    monkeypatch.setitem(contenders.CONTENDERS, "boom", boom)
    monkeypatch.setitem(contenders.CONTENDERS, "ok", lambda ctx: {})
    rows = bench.run_contenders({"n": 10, "cores": 1, "reference": None}, ["boom", "ok"], 2)
    assert rows["boom"]["failed"] == "MemoryError: needs 13 GiB on one worker"
    assert calls == [1]  # not tried again
    assert "median_s" not in rows["boom"] and len(rows["ok"]["times"]) == 2


def test_peers_run_with_dasks_own_queueing():
    import dask
    from distributed import Client

    from benchmarks.__main__ import _queueing
    from filterdb_dask.cluster import ExecutionOptions, local_cluster

    def sat(dask_scheduler=None):
        return dask_scheduler.WORKER_SATURATION

    with local_cluster(ExecutionOptions(workers=1)) as cluster, Client(cluster) as client:
        assert client.run_on_scheduler(sat) == float("inf")
        with _queueing(client, "filterdb_dask whole analysis"):
            assert client.run_on_scheduler(sat) == float("inf")
        with _queueing(client, "xhistogram grouped histograms"):
            assert client.run_on_scheduler(sat) == dask.config.get(
                "distributed.scheduler.worker-saturation") != float("inf")
        assert client.run_on_scheduler(sat) == float("inf")
