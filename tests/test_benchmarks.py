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


def test_pass_breakdown_counts_each_workers_rows_and_waits():
    """benchmarks.passes: the chunk tasks are the one-per-chunk group with the most
    compute time (not the small per-chunk picks), and each worker's rows, busy
    seconds, wait before, between and after its tasks follow the task stream."""
    from benchmarks.passes import pass_breakdown

    def rec(key, worker, start, stop):
        return {"key": key, "worker": worker,
                "startstops": [{"action": "transfer", "start": start - 0.5, "stop": start},
                               {"action": "compute", "start": start, "stop": stop}]}

    stream = [rec(("raw", 0), "a", 10.1, 11.0), rec(("pick", 0), "a", 11.0, 11.01),
              rec(("raw", 1), "a", 11.2, 11.5), rec(("pick", 1), "a", 11.6, 11.61),
              rec(("raw", 2), "b", 10.2, 12.0), rec(("pick", 2), "b", 12.0, 12.01),
              rec(("tree", 0, 0), "b", 12.1, 12.2)]
    got = pass_breakdown(stream, 10.0, 12.5, rows=[5, 3, 8])
    assert got["wall_s"] == 2.5
    a, b = got["workers"]["a"], got["workers"]["b"]
    assert (a["rows"], a["chunk_tasks"], a["tasks"]) == (8, 2, 4)
    assert (b["rows"], b["chunk_tasks"], b["tasks"]) == (8, 1, 3)
    assert a["busy_s"] == pytest.approx(0.9 + 0.01 + 0.3 + 0.01)
    assert a["before_first_s"] == pytest.approx(0.1) and b["before_first_s"] == pytest.approx(0.2)
    assert a["between_s"] == pytest.approx(0.19 + 0.1) and b["between_s"] == pytest.approx(0.09)
    assert a["after_last_s"] == pytest.approx(0.89) and b["after_last_s"] == pytest.approx(0.3)


def test_passes_benchmark_runs_on_a_small_store(tmp_path, capsys):
    from benchmarks.passes import main as passes_main

    assert passes_main(["--filters", "150k", "--dir", str(tmp_path), "--rounds", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    (analysis,) = rep["analyses"]
    assert rep["filters"] == 150_000 and len(analysis["passes"]) == 3
    for p in analysis["passes"].values():  # every filter read once per pass, by someone
        assert sum(w["rows"] for w in p["workers"].values()) == 150_000
        assert p["wall_s"] <= analysis["wall_s"]
