"""HPC routes: dry runs of every command against a recording fake ``sbatch``, and a
real deployment where dask-jobqueue submits worker jobs to a local SLURM."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from filterdb_dask.run import build_parser, main
from tests import slurm_helper
from tests.test_cluster import _assert_same, _read

pytestmark = pytest.mark.slurm


@pytest.fixture
def dask_config_dir(tmp_path):
    """A site config folder read on top of the tests' DASK_CONFIG (see conftest)."""
    import dask.config

    d = tmp_path / "dask-config"
    d.mkdir()
    yield d
    dask.config.refresh()


def _refresh(d):
    import dask.config

    dask.config.refresh(paths=[str(d), *dask.config.paths])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_helper.why_not()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    handle = slurm_helper.start(str(tmp_path_factory.mktemp("slurm")))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = handle["conf"]
    yield handle
    slurm_helper.stop(handle)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture
def fake_batch(tmp_path, monkeypatch):
    """sbatch/squeue/scancel first on PATH, each recording its calls in a file."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    calls = tmp_path / "batch-calls.log"
    for name in ("sbatch", "squeue", "scancel", "qsub", "bsub"):
        f = bin_dir / name
        f.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\necho "Submitted batch job 4242"\n')
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("sbatch") == str(bin_dir / "sbatch")
    return calls


@pytest.mark.parametrize("scheduler", [[], ["--scheduler", "distributed"]])
def test_dry_run_of_every_command_submits_nothing(fake_batch, synth_h5, synth_store, tmp_path,
                                                  capsys, scheduler):
    opts = ["--cluster", "slurm", "--dry-run", "--cores", "2", "--memory", "3GB", *scheduler]
    commands = {
        "convert": ["convert", synth_h5, str(tmp_path / "new.zarr")],
        "verify": ["verify", synth_store, synth_h5],
        "analyze": ["analyze", synth_store, "--out", str(tmp_path / "out")],
    }
    for name, argv in commands.items():
        assert main([*argv, *opts]) == 0, (name, capsys.readouterr().err)
        script = capsys.readouterr().out
        assert script.startswith("#!/"), (name, script)
        assert "#SBATCH" in script and "--cpus-per-task=2" in script, (name, script)
    assert not fake_batch.exists(), f"submitted: {fake_batch.read_text()}"
    assert not (tmp_path / "new.zarr").exists() and not (tmp_path / "out").exists()


def test_execution_options_same_for_every_command(synth_h5, synth_store, tmp_path, capsys):
    def execution_flags(command):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        (group,) = [g for g in sub._action_groups if g.title.startswith("execution")]
        return {s for a in group._group_actions for s in a.option_strings}

    flags = {c: execution_flags(c) for c in ("convert", "verify", "analyze")}
    assert flags["convert"] == flags["verify"] == flags["analyze"]
    assert {"--scheduler", "--address", "--scheduler-file", "--cluster", "--dry-run"} <= \
        flags["analyze"]
    # an explicit local scheduler with a target is a contradiction for every command
    for argv in (["convert", synth_h5, str(tmp_path / "x.zarr")], ["verify", synth_store],
                 ["analyze", synth_store, "--out", str(tmp_path / "o")]):
        assert main([*argv, "--scheduler", "threads", "--cluster", "slurm", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "--scheduler threads cannot be combined with --cluster" in err
        assert main([*argv, "--dry-run"]) == 2
        assert "--dry-run prints a batch job script: it needs --cluster" in \
            capsys.readouterr().err


def test_jobqueue_resources_are_not_guessed(fake_batch, dask_config_dir, synth_store, tmp_path,
                                            capsys):
    assert main(["analyze", synth_store, "--out", str(tmp_path / "o"), "--cluster", "slurm",
                 "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "cannot set up a slurm cluster" in err and "--cores/--memory" in err
    assert len(err.strip().splitlines()) == 1
    assert not fake_batch.exists()


def test_dry_run_job_script(dask_config_dir, synth_store, capsys, tmp_path):
    assert main(["analyze", synth_store, "--out", str(tmp_path / "o"), "--cluster", "slurm",
                 "--dry-run", "--cores", "3", "--memory", "6GB", "--walltime", "02:30:00",
                 "--queue", "debug"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH" in script
    assert "--cpus-per-task=3" in script
    assert "#SBATCH --mem=6G" in script
    assert "#SBATCH -t 02:30:00" in script
    assert "#SBATCH -p debug" in script
    assert "--lifetime" in script
    assert not (tmp_path / "o").exists()


def test_site_settings_from_dask_config(dask_config_dir, synth_store, capsys, tmp_path):
    (dask_config_dir / "site.yaml").write_text(
        "jobqueue:\n  slurm:\n    cores: 5\n    memory: 10GB\n    account: proj42\n")
    _refresh(dask_config_dir)
    assert main(["analyze", synth_store, "--out", str(tmp_path / "o"), "--cluster", "slurm",
                 "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "--cpus-per-task=5" in script and "-A proj42" in script


def test_analyze_on_slurm_equals_threads(slurm, dask_config_dir, synth_store, tmp_path):
    (dask_config_dir / "site.yaml").write_text(
        "jobqueue:\n  slurm:\n    job-extra-directives: ['--oversubscribe']\n"
        "    scheduler-options: {host: 127.0.0.1, dashboard_address: '127.0.0.1:0'}\n"
        f"    local-directory: {tmp_path}\n    log-directory: {tmp_path / 'logs'}\n")
    _refresh(dask_config_dir)
    ref = str(tmp_path / "ref")
    assert main(["-q", "analyze", synth_store, "--out", ref, "--scheduler", "threads",
                 "--no-report"]) == 0
    out = str(tmp_path / "out")
    assert main(["-q", "analyze", synth_store, "--out", out, "--cluster", "slurm", "--jobs", "2",
                 "--cores", "1", "--memory", "2GB", "--queue", "debug", "--no-report"]) == 0
    _assert_same(_read(out), _read(ref))
    env = dict(os.environ)
    deadline = time.time() + 60
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(0.5)
    assert q.stdout.strip() == "", f"jobs left behind: {q.stdout}"
