"""Package defaults come from one YAML through Dask's config; errors form one hierarchy."""

from __future__ import annotations

import importlib.metadata

import dask
import pytest

import filterdb_dask
from filterdb_dask import config
from filterdb_dask.engines import numba_available, resolve_engine
from filterdb_dask.errors import ClusterError, FilterDBError, StoreError, UsageError
from filterdb_dask.run import main


def test_defaults_live_in_the_package_yaml():
    assert config.get("analysis.bins") == 70
    assert config.get("analysis.fine-bins") == 256
    assert config.get("analysis.density-bins") == 512
    assert list(config.get("analysis.density-range")) == [-3.3, 3.3]
    assert config.get("scheduler.analyze") == "distributed"
    assert config.get("scheduler.convert") == "threads"
    env = config.get("local-cluster.pre-spawn-environ")
    assert env["MALLOC_TRIM_THRESHOLD_"] >= 1 << 30 and env["MALLOC_MMAP_THRESHOLD_"] >= 1 << 30
    assert env["MALLOC_ARENA_MAX"] == 1


def test_overriding_a_default_through_dask_config(synth_store):
    from filterdb_dask.analysis import analyze

    with dask.config.set({"filterdb_dask.analysis.bins": 30,
                          "filterdb_dask.analysis.by": ["Task"],
                          "filterdb_dask.analysis.density-bins": 64}):
        res = analyze(synth_store, verbosity=0)
    assert res.settings["bins"] == 30 and res.settings["by"] == ["Task"]
    assert res.layer_hist.shape[-1] == 30 and list(res.kl) == ["task"]
    assert res.density.shape == (64, 64) and len(res.density_edges) == 65


def test_recorded_engine_is_the_one_that_ran(synth_store):
    from filterdb_dask.analysis import analyze

    res = analyze(synth_store, verbosity=0, by=["Task"])
    assert res.settings["engine"] == ("numba" if numba_available() else "numpy")
    assert res.settings["engine"] == resolve_engine("auto")
    res = analyze(synth_store, verbosity=0, by=["Task"], engine="numpy")
    assert res.settings["engine"] == "numpy"


def test_usage_error_in_the_hierarchy_and_exit_2(tmp_path, capsys):
    assert issubclass(UsageError, FilterDBError) and issubclass(UsageError, ValueError)
    assert issubclass(ClusterError, FilterDBError)
    assert main(["synth", str(tmp_path / "a.h5"), "--filters", "1000", "--models", "2"]) == 0
    assert main(["synth", str(tmp_path / "a.h5"), "--filters", "1000", "--models", "2"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_debug_shows_the_chained_cause(synth_store, tmp_path, capsys):
    argv = ["analyze", synth_store, "--out", str(tmp_path / "o"), "--cluster", "slurm",
            "--dry-run", "--cores", "1", "--memory", "1GB", "--walltime", "two hours"]
    assert main(argv) == 2
    assert "walltime 'two hours' is not [D-]HH:MM:SS" in capsys.readouterr().err
    with pytest.raises(UsageError) as info:
        main(["--debug", *argv])
    assert isinstance(info.value.__cause__, ValueError)
    # library errors keep the exception that caused them (no `from None`)
    (tmp_path / "not-a-store").mkdir()
    with pytest.raises(StoreError, match="is not a Zarr store") as info:
        main(["--debug", "info", str(tmp_path / "not-a-store")])
    assert info.value.__cause__ is not None


def test_version_from_package_metadata():
    assert filterdb_dask.__version__ == importlib.metadata.version("filterdb-dask")


@pytest.mark.parametrize("scheduler", ["threads", None])
def test_io_bound_work_gets_two_threads_per_core(scheduler):
    # every task waits at a barrier for all the others: it passes only if the threaded
    # scheduler, named or dask's default, runs 2 x cores of them at once
    import threading

    from filterdb_dask.cluster import Execution, _usable_cpus

    n = 2 * _usable_cpus()
    barrier = threading.Barrier(n, timeout=20)
    tasks = [dask.delayed(barrier.wait, pure=False)() for _ in range(n)]
    (got,) = Execution("t", scheduler=scheduler, verbosity=0).compute(tasks, io_bound=True)
    assert sorted(got) == list(range(n))
