"""dask-mpi (``--mpi``): a real ``mpirun`` job gives the threaded scheduler's result
Dataset bit for bit, admits only its own ranks, and leaves no rank behind.

Skipped with the reason where ``mpirun`` (Debian: openmpi-bin) or mpi4py/dask-mpi
is missing; .ci/run installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from filterdb_dask.cluster import ExecutionOptions, execution
from filterdb_dask.errors import ClusterError, UsageError
from filterdb_dask.resultset import Results
from filterdb_dask.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "FILTERDB_MPI_TEST_RUN"
TIMEOUT = 420


def _mpi_missing() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not found (Debian: apt-get install openmpi-bin)"
    probe = subprocess.run(
        [sys.executable, "-c", "import dask_mpi; from mpi4py import MPI"],
        capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"mpi4py/dask-mpi not usable ({last}): pip install 'filterdb-dask[hpc]'"
    return None


@pytest.fixture(scope="module")
def mpi():
    reason = _mpi_missing()
    if reason:
        pytest.skip(reason)


def _ranks_of(marker: str) -> list[psutil.Process]:
    """Live processes started for the run marked ``marker`` (mpirun passes its
    environment to every rank)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _mpirun(args: list[str], np_: int = 4, timeout: float = TIMEOUT):
    """Run ``mpirun -np np_ <args>``; kill the whole job on timeout; check that no
    rank outlives it. Returns (returncode, stdout, stderr)."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: marker})
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, marker)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpirun did not finish within {timeout}s (killed): {stderr[-3000:]}")
    deadline = time.time() + 30
    left = _ranks_of(marker)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = _ranks_of(marker)
    if left:
        names = [" ".join(p.cmdline())[:120] for p in left]
        _kill(proc, marker)
        pytest.fail(f"{len(left)} process(es) of the MPI job outlived mpirun: {names}")
    return proc.returncode, stdout, stderr


def _kill(proc, marker):
    """SIGKILL mpirun's process group and every rank of the run."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in _ranks_of(marker):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _dataset(out):
    ds = Results.open(out).to_dataset()
    settings = json.loads(ds.attrs.pop("settings"))
    return ds, settings


def _assert_identical(a_out, b_out):
    import xarray as xr

    a, sa = _dataset(a_out)
    b, sb = _dataset(b_out)
    xr.testing.assert_identical(a, b)  # every value and attribute, bit for bit
    assert {k: v for k, v in sa.items() if k != "scheduler"} == \
        {k: v for k, v in sb.items() if k != "scheduler"}
    return sa, sb


@pytest.fixture(scope="module")
def threaded_out(synth_store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mpi-threads") / "out")
    assert main(["-q", "analyze", synth_store, "--out", out, "--scheduler", "threads",
                 "--no-report"]) == 0
    return out


def test_mpirun_analyze_equals_threads(mpi, synth_store, threaded_out, tmp_path):
    out = str(tmp_path / "out")
    rc, stdout, stderr = _mpirun([sys.executable, "-m", "filterdb_dask.run", "analyze",
                                  synth_store, "--out", out, "--mpi", "--no-report"])
    assert rc == 0, stderr[-3000:]
    # only rank 1 runs the command: one result line, one scheduler, TLS
    assert stdout.count("results: ") == 1, stdout
    assert "dask-mpi: scheduler tls://" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    _, settings = _assert_identical(threaded_out, out)
    assert settings["scheduler"].startswith("dask-mpi (TLS), 2 worker rank(s)"), settings


def test_mpi_option_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="`scheduler` threads cannot be combined with `mpi`"):
        with execution(ExecutionOptions(scheduler="threads", mpi=True)):
            pass
    with pytest.raises(UsageError, match="choose one of .* not `cluster` and `mpi`"):
        with execution(ExecutionOptions(cluster="slurm", mpi=True)):
            pass
    with pytest.raises(UsageError, match="not `scheduler_file` and `mpi`"):
        with execution(ExecutionOptions(scheduler_file="x.json", mpi=True)):
            pass
    with pytest.raises(UsageError, match="`workers` cannot be combined with `mpi`"):
        with execution(ExecutionOptions(workers=2, mpi=True)):
            pass
    # the CLI: one line, exit 2, nothing computed
    for extra in (["--scheduler", "distributed"], ["--cluster", "slurm"]):
        assert main(["analyze", "nowhere.zarr", "--out", str(tmp_path / "o"), "--mpi",
                     *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "usage error" in err[0] and "--mpi" in err[0], err
        assert "`" not in err[0], err
    assert not (tmp_path / "o").exists()


def test_mpi_outside_mpirun_is_one_line(synth_store, tmp_path):
    """Not under mpirun (world size 1), or mpi4py missing: one line, exit 1."""
    cmd = [sys.executable, "-m", "filterdb_dask.run", "analyze", synth_store, "--out",
           str(tmp_path / "o"), "--mpi", "--no-report"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_"))}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("filterdb-dask: error: --mpi needs"), lines
    assert ("at least 3 MPI ranks" in lines[0]) or ("pip install" in lines[0]), lines
    assert not os.path.exists(tmp_path / "o" / "results.zarr")


def test_mpi_without_mpi4py_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpi4py(name, *a, **kw):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    with pytest.raises(ClusterError, match=r"`mpi` needs mpi4py, dask-mpi and an MPI "
                                           r"library .*pip install 'filterdb-dask\[hpc\]'"):
        with execution(ExecutionOptions(mpi=True), verbosity=0):
            pass


# Run under mpirun: the library API on every rank. Rank 1, inside the execution,
# lets processes without the job's credentials try to run a task on the scheduler
# and on a worker (plain TCP, TLS with other credentials), then analyses.
FOREIGN_TRY = textwrap.dedent("""
    import json, sys
    from distributed import Client
    from distributed.security import Security
    addr, marker, mode = sys.argv[1:4]
    creds = json.loads(sys.stdin.read() or "null")

    def touch(path):
        open(path, "w").write("ran")

    kw = {"none": {}, "tcp": {}, "own": {"security": Security.temporary()},
          "run": {"security": Security(**(creds or {}))}}[mode]
    target = addr.replace("tls://", "tcp://") if mode == "tcp" else addr
    try:
        with Client(target, timeout="10s", **kw) as c:
            c.submit(touch, marker, pure=False).result(timeout=30)
        print("CONNECTED")
    except Exception as exc:
        print("REFUSED", type(exc).__name__)
""")

FOREIGN_MPI = textwrap.dedent("""
    import json, os, subprocess, sys
    from filterdb_dask.analysis import analyze
    from filterdb_dask.cluster import ExecutionOptions, execution

    store, out, marker_dir, try_file = sys.argv[1:5]
    TRY = open(try_file).read()
    with execution(ExecutionOptions(mpi=True), command="analyze", verbosity=0) as ex:
        sched = ex.client.scheduler.address
        workers = list(ex.client.scheduler_info()["workers"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
        sec = ex.client.security
        creds = json.dumps({"tls_ca_file": sec.tls_ca_file,
                            "tls_client_cert": sec.tls_client_cert,
                            "tls_client_key": sec.tls_client_key,
                            "require_encryption": True})
        outcomes = {}
        for target, name in [(sched, "scheduler"), (workers[0], "worker")]:
            for mode in ("none", "tcp", "own", "run"):
                marker = os.path.join(marker_dir, f"{name}-{mode}")
                p = subprocess.run([sys.executable, "-c", TRY, target, marker, mode],
                                   input=creds if mode == "run" else "",
                                   capture_output=True, text=True, timeout=120, env=env)
                outcomes[f"{name}-{mode}"] = [p.stdout.strip(), os.path.exists(marker)]
        res = analyze(store, execution=ex)
        res.settings["scheduler"] = ex.description
        res.write(out)
    print("OUTCOMES " + json.dumps({"scheduler": sched, "workers": workers,
                                    "tries": outcomes}))
""")


@pytest.mark.slow
def test_mpi_job_admits_only_its_ranks(mpi, synth_store, threaded_out, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(FOREIGN_MPI)
    try_file = tmp_path / "try.py"
    try_file.write_text(FOREIGN_TRY)
    markers = tmp_path / "markers"
    markers.mkdir()
    out = str(tmp_path / "out")
    rc, stdout, stderr = _mpirun([sys.executable, str(script), synth_store, out,
                                  str(markers), str(try_file)])
    assert rc == 0, stderr[-3000:]
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("OUTCOMES ")]
    got = json.loads(line[len("OUTCOMES "):])
    assert got["scheduler"].startswith("tls://")
    assert got["workers"] and all(w.startswith("tls://") for w in got["workers"])
    for name, (said, ran) in got["tries"].items():
        if name == "scheduler-run":
            # the control: the same harness with the job's credentials gets in
            assert said == "CONNECTED" and ran, (name, said)
            continue
        if name == "worker-run":
            continue  # a client speaks to the scheduler, not to a worker
        assert said.startswith("REFUSED"), (name, said)
        assert not ran, f"a foreign task ran on the MPI job ({name})"
    assert sorted(p.name for p in markers.iterdir()) in (["scheduler-run"],
                                                         ["scheduler-run", "worker-run"])
    _assert_identical(threaded_out, out)
