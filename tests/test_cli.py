"""The command line: main([...]) in process, and real subprocesses for exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from filterdb_dask.run import main
from tests.conftest import simple_meta, write_h5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None, timeout=600):
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "filterdb_dask.run", *args], cwd=ROOT,
                          capture_output=True, text=True, env=e, timeout=timeout)


def test_help_as_subprocess():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ["synth", "convert", "verify", "info", "analyze", "report"]:
        assert cmd in out.stdout
    out = run_cli("analyze", "--help")
    assert out.returncode == 0 and "--scheduler-file" in out.stdout and "examples:" in out.stdout


def test_usage_errors_exit_2(capsys):
    assert main(["analyze"]) == 2  # missing arguments
    assert main(["synth", "x.h5", "--filters", "lots"]) == 2
    assert main(["analyze", "s", "--out", "o", "--bins", "0"]) == 2
    err = capsys.readouterr().err
    assert "is not a count" in err and "must be at least 1" in err


def test_runtime_errors_exit_1_with_one_line(tmp_path):
    (tmp_path / "t.h5").write_text("not hdf5")
    out = run_cli("convert", str(tmp_path / "t.h5"), str(tmp_path / "s.zarr"))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an HDF5 file" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "s.zarr").exists()
    out = run_cli("analyze", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o"))
    assert out.returncode == 1 and "does not exist" in out.stderr
    assert not (tmp_path / "o").exists()


def test_debug_reraises(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "info", str(tmp_path / "nope.zarr")])


def test_synth_refuses_to_overwrite(tmp_path, capsys):
    p = str(tmp_path / "d.h5")
    assert main(["-q", "synth", p, "--filters", "5k", "--models", "3"]) == 0
    assert main(["-q", "synth", p, "--filters", "5k", "--models", "3"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_pipeline_in_process(tmp_path, capsys):
    h5 = str(tmp_path / "d.h5")
    store = str(tmp_path / "s.zarr")
    out = str(tmp_path / "out")
    assert main(["-q", "synth", h5, "--filters", "40k", "--models", "6", "--layout", "cube64",
                 "--name", "filters", "--meta-format", "table"]) == 0
    assert main(["-q", "convert", h5, store, "--chunk-filters", "8k"]) == 0
    assert main(["-q", "verify", store, h5]) == 0
    assert main(["info", store, "--json"]) == 0
    text = capsys.readouterr().out
    info = json.loads(text[text.index("{"):])
    assert info["filters"] == 40_000 and info["source"]["dtype"] == "float64"
    assert main(["-q", "analyze", store, "--out", out, "--scheduler", "threads",
                 "--by", "Task", "--by", "depth decile", "--bins", "30",
                 "--subset", "Visual Category=natural"]) == 0
    assert sorted(os.listdir(os.path.join(out, "kl"))) == ["depth_decile.csv", "drift.csv",
                                                            "task.csv"]
    assert os.path.exists(os.path.join(out, "report.html"))
    assert main(["analyze", store, "--out", out, "--by", "Nope", "--scheduler", "threads"]) == 1
    assert "cannot group by 'Nope'" in capsys.readouterr().err


def test_no_argument_run_as_subprocess(tmp_path):
    out = run_cli(env={"FILTERDB_DASK_CACHE": str(tmp_path / "cache")}, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    report = out.stdout.strip().splitlines()[-1].split("report: ", 1)[1]
    assert os.path.exists(report) and report.startswith(str(tmp_path / "cache"))
    assert "dask dashboard" not in out.stderr  # off by default (--dashboard turns it on)
    pca = json.load(open(os.path.join(os.path.dirname(report), "pca.json")))
    assert pca["n_filters"] == 3_000_000
    assert np.isclose(sum(pca["explained_variance_ratio"]), 1.0)


def test_verify_exit_code_on_mismatch(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 9)).astype(np.float32)
    p = write_h5(tmp_path / "d.h5", x, simple_meta([10, 20], models=[0, 1]))
    s = str(tmp_path / "s.zarr")
    assert main(["-q", "convert", p, s]) == 0
    x[5] += 1
    q = write_h5(tmp_path / "e.h5", x, simple_meta([10, 20], models=[0, 1]))
    out = run_cli("verify", s, q)
    assert out.returncode == 1 and "rows differ from the source (first rows: 5)" in out.stderr


def test_usage_error_exit_2_as_subprocess(tmp_path):
    out = run_cli("analyze", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o"),
                  "--bins", "many")
    assert out.returncode == 2 and "is not an integer" in out.stderr
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_report_subcommand_rebuilds_the_report(synth_store, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["-q", "analyze", synth_store, "--out", out, "--scheduler", "threads",
                 "--no-report", "--by", "Task"]) == 0
    assert not os.path.exists(os.path.join(out, "report.html"))
    assert main(["report", out]) == 0
    assert os.path.exists(os.path.join(out, "report.html"))
    assert main(["report", str(tmp_path)]) == 1
    assert "is not an analysis directory" in capsys.readouterr().err
