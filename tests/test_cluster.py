"""Real multi-process clusters over loopback: results equal the threaded ones,
survive a SIGKILLed worker, and the local cluster admits only its owner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import psutil
import pytest

from filterdb_dask.analysis import analyze
from filterdb_dask.cluster import ExecutionOptions, execution, validate
from filterdb_dask.errors import ClusterError, UsageError
from filterdb_dask.run import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_cluster(tmp_path):
    """`dask scheduler` + two `dask worker` processes on 127.0.0.1."""
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    sched_file = str(tmp_path / "scheduler.json")
    env = dict(os.environ, PYTHONPATH=ROOT, DASK_DISTRIBUTED__WORKER__DAEMON="False")
    procs = [subprocess.Popen(
        [os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", sched_file],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.time() + 60
    while not os.path.exists(sched_file) and time.time() < deadline:
        time.sleep(0.1)
    for i in range(2):
        procs.append(subprocess.Popen(
            [os.path.join(BIN, "dask"), "worker", addr, "--nthreads", "1", "--nworkers", "1",
             "--host", "127.0.0.1", "--name", f"w{i}", "--memory-limit", "3GB",
             "--local-directory", str(tmp_path / f"w{i}")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(addr, timeout="60s") as c:
        c.wait_for_workers(2, timeout=120)
    yield {"address": addr, "scheduler_file": sched_file, "procs": procs}
    for p in procs[::-1]:
        for child in psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []:
            child.kill()
        p.kill()
        p.wait()


def _read(out):
    kl = {s: pd.read_csv(os.path.join(out, "kl", f"{s}.csv"), index_col=0)
          for s in ["task", "visual_category", "depth_decile", "model"]}
    q = pd.read_csv(os.path.join(out, "quality.csv"))
    import json

    return json.load(open(os.path.join(out, "pca.json"))), kl, q


def _assert_same(a, b):
    pa, ka, qa = a
    pb, kb, qb = b
    np.testing.assert_allclose(pa["components"], pb["components"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pa["explained_variance_ratio"], pb["explained_variance_ratio"],
                               rtol=1e-12)
    assert pa["coef_range"] == pb["coef_range"]
    for s in ka:
        pd.testing.assert_frame_equal(ka[s], kb[s], rtol=1e-12)
    pd.testing.assert_frame_equal(qa, qb, rtol=1e-12)


@pytest.fixture(scope="module")
def threaded(synth_store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("threads") / "out")
    assert main(["-q", "analyze", synth_store, "--out", out, "--scheduler", "threads",
                 "--no-report"]) == 0
    return _read(out)


def test_existing_scheduler_over_tcp_equals_threads(tcp_cluster, synth_store, threaded, tmp_path):
    out = str(tmp_path / "out")
    assert main(["-q", "analyze", synth_store, "--out", out, "--address",
                 tcp_cluster["address"], "--no-report"]) == 0
    _assert_same(_read(out), threaded)
    out2 = str(tmp_path / "out2")
    assert main(["-q", "analyze", synth_store, "--out", out2, "--scheduler-file",
                 tcp_cluster["scheduler_file"], "--no-report"]) == 0
    _assert_same(_read(out2), threaded)
    # the scheduler we did not start is still up
    assert tcp_cluster["procs"][0].poll() is None


def test_sigkilled_worker_mid_analysis(tcp_cluster, synth_store, tmp_path):
    from distributed import Client

    ref = str(tmp_path / "ref")
    assert main(["-q", "analyze", synth_store, "--out", ref, "--scheduler", "threads",
                 "--no-report", "--engine", "numpy"]) == 0

    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "filterdb_dask.run", "-q", "analyze", synth_store, "--out", out,
           "--address", tcp_cluster["address"], "--no-report", "--engine", "numpy"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    killed = None
    with Client(tcp_cluster["address"]) as c:
        deadline = time.time() + 120
        while time.time() < deadline and killed is None and proc.poll() is None:
            busy = {w: p for w, p in c.processing().items() if p}
            if busy:
                pid = c.run(os.getpid, workers=[next(iter(busy))])
                killed = next(iter(pid.values()))
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed is not None, "no task was seen running"
    assert proc.returncode == 0, stderr
    _assert_same(_read(out), _read(ref))


def test_local_distributed_cluster_equals_threads(synth_store, threaded, tmp_path):
    out = str(tmp_path / "out")
    assert main(["-q", "analyze", synth_store, "--out", out, "--workers", "2",
                 "--memory-limit", "2GB", "--no-report"]) == 0
    _assert_same(_read(out), threaded)


def test_cluster_option_errors(tmp_path):
    with pytest.raises(UsageError, match="choose one of `address`, `scheduler_file`"):
        with execution(ExecutionOptions(address="tcp://127.0.0.1:1", scheduler_file="x")):
            pass
    with pytest.raises(UsageError, match="`scheduler` threads cannot be combined with `cluster`"):
        with execution(ExecutionOptions(scheduler="threads", cluster="slurm")):
            pass
    with pytest.raises(UsageError, match="`dry_run` prints a batch job script: it needs `cluster`"):
        with execution(ExecutionOptions(dry_run=True)):
            pass
    with pytest.raises(UsageError, match="a dry run computes nothing"):
        with execution(ExecutionOptions(dry_run=True, cluster="slurm")):
            pass
    with pytest.raises(ClusterError, match="scheduler file '.*nope.json' does not exist"):
        with execution(ExecutionOptions(scheduler_file=str(tmp_path / "nope.json"))):
            pass
    with pytest.raises(ClusterError, match="cannot reach the scheduler") as info:
        with execution(ExecutionOptions(address=f"tcp://127.0.0.1:{_free_port()}",
                                        connect_timeout="2s")):
            pass
    assert info.value.__cause__ is not None  # the cause is chained, for --debug


# A process that is not the analyst tries to run code through the scheduler: it
# imports what it needs, drops to `nobody` (the interpreter may live under a 0700
# home, so exec'ing it as nobody is not possible here), connects and submits a task
# that writes a marker file on the worker.
FOREIGN = textwrap.dedent("""
    import json, os, sys
    import ssl, tempfile
    from distributed import Client
    from distributed.security import Security
    import distributed.comm.tcp
    addr, marker, mode, as_nobody = sys.argv[1:5]
    creds = json.loads(sys.stdin.read() or "null")
    own = Security.temporary()
    if as_nobody == "1":
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    def touch(path):
        with open(path, "w") as fh:
            fh.write("ran")
        return os.getuid()

    kw = {"none": {}, "tcp": {}, "own": {"security": own},
          "run": {"security": Security(**(creds or {}))}}[mode]
    target = addr.replace("tls://", "tcp://") if mode == "tcp" else addr
    try:
        with Client(target, timeout="10s", **kw) as c:
            c.submit(touch, marker, pure=False).result(timeout=60)
        print("CONNECTED", os.getuid())
    except Exception as exc:
        print("REFUSED", os.getuid(), type(exc).__name__, " ".join(str(exc).split())[:300])
""")


def test_local_cluster_refuses_foreign_clients(synth_store, threaded, tmp_path):
    root = os.geteuid() == 0
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    attempts = [("none", False), ("tcp", False), ("own", False)]
    if root:
        attempts += [("none", True), ("own", True), ("run", True)]
    out = str(tmp_path / "out")
    with execution(ExecutionOptions(workers=2), command="analyze", verbosity=0) as ex:
        addr = ex.client.scheduler.address
        assert addr.startswith("tls://127.0.0.1:")
        sec = ex.client.security
        creds = {"tls_ca_file": sec.tls_ca_file, "tls_client_cert": sec.tls_client_cert,
                 "tls_client_key": sec.tls_client_key, "require_encryption": True}
        procs = []
        for mode, nobody in attempts:
            marker = marker_dir / f"{mode}-{'nobody' if nobody else 'owner'}"
            p = subprocess.Popen(
                [sys.executable, "-c", FOREIGN, addr, str(marker), mode, "1" if nobody else "0"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd="/")
            # only the control gets the run's credentials, through its own pipe
            p.stdin.write(json.dumps(creds) if mode == "run" else "")
            p.stdin.close()
            procs.append((mode, nobody, marker, p))
        # the real analysis runs while they try
        res = analyze(synth_store, execution=ex)
        res.write(out)
        outcomes = {}
        for mode, nobody, marker, p in procs:
            p.wait(timeout=180)
            outcomes[(mode, nobody)] = (p.stdout.read().strip(), p.stderr.read()[-2000:],
                                        marker.exists())
    _assert_same(_read(out), threaded)
    for (mode, nobody), (stdout, stderr, ran) in outcomes.items():
        who = "nobody" if nobody else "the owner without the run's credentials"
        if mode == "run":
            # the control: with the credentials, the same harness gets in
            assert stdout.startswith("CONNECTED"), (stdout, stderr)
            assert ran
            continue
        assert stdout.startswith("REFUSED"), f"{mode} as {who}: {stdout} {stderr}"
        assert "PermissionError" not in stdout and "ImportError" not in stdout, stdout
        assert not ran, f"a task of {who} ({mode}) ran on the analyst's cluster"


_CHUNK_BYTES = 36 << 20  # a chunk of 2**20 float32 filters


def _faults_of_buffers(n: int = 12) -> tuple[int, int]:
    """Minor page faults of the first and of the ``n - 1`` later rounds of a task's
    buffers: a chunk's float32 values and their float64 copy (as the kernels make),
    alive at once, filled, then freed. Counted in rounds, not pages: the kernel
    counts a transparent huge page as one fault."""
    import resource

    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty(_CHUNK_BYTES, dtype=np.uint8)
        a.fill(1)
        b = np.empty(2 * _CHUNK_BYTES, dtype=np.uint8)
        b.fill(2)
        del a, b
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults[0], sum(faults[1:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_threaded_work_reuses_its_chunk_buffers():
    # dask's threaded scheduler runs tasks in pool threads; tune_allocator (called by
    # the commands before computing) must keep a pool thread's freed buffers for reuse
    code = textwrap.dedent("""
        import threading
        from filterdb_dask.cluster import tune_allocator
        from tests.test_cluster import _faults_of_buffers
        tune_allocator()
        out = []
        t = threading.Thread(target=lambda: out.append(_faults_of_buffers()))
        t.start(); t.join()
        print(*out[0])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    first, later = map(int, subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split())
    # the first round's memory is reused: the eleven later rounds fault (almost) never;
    # without the arena limit the float64 buffer, larger than a thread arena's 64 MiB
    # heap, is mapped afresh every round (~37 faults a round against ~560 first)
    assert later <= first // 10, (first, later)


def test_local_cluster_settings(tmp_path, monkeypatch):
    from filterdb_dask import config

    # a nanny copies its pre-spawn environment into its parent's os.environ; a
    # default LocalCluster started earlier in this test process would leak Dask's
    # MALLOC_TRIM_THRESHOLD_ into ours (the CLI's process starts clean)
    for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(k, raising=False)
    wanted = config.get("local-cluster.pre-spawn-environ")
    with execution(ExecutionOptions(workers=1), command="analyze", verbosity=0) as ex:
        import urllib.error
        import urllib.request

        info = ex.client.scheduler_info()
        # no dashboard: the scheduler's plain-HTTP server serves nothing
        port = info["services"]["dashboard"]
        for route in ("status", "info/main/workers.html", "json/identity.json", "metrics"):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/{route}", timeout=10)
        env = ex.client.run(lambda: {k: os.environ.get(k) for k in (
            "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")})
        (worker_env,) = env.values()
        for k, v in worker_env.items():
            assert v == (str(wanted[k]) if k in wanted else None), (k, v)
        assert worker_env["MALLOC_TRIM_THRESHOLD_"] != "65536"  # Dask's default is replaced
        assert worker_env["MALLOC_MMAP_THRESHOLD_"] is not None
        assert worker_env["MALLOC_ARENA_MAX"] == "1"
        if sys.platform.startswith("linux"):
            # a task runs in the worker's pool thread: its chunk-sized buffers are
            # reused, not mapped and faulted afresh in every task
            first, later = ex.client.submit(_faults_of_buffers, pure=False).result()
            assert later <= first // 10, (first, later)
        # LocalCluster's own 'auto' memory limit
        (w,) = info["workers"].values()
        assert w["memory_limit"] > 0
        assert ex.description.startswith("local distributed cluster (TLS)")
        # every chunk task goes to the workers at once (no queueing on the scheduler)
        sat = ex.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION)
        assert sat == float(config.get("local-cluster.worker-saturation")) == float("inf")


def test_worker_saturation_is_checked():
    import dask

    from filterdb_dask.cluster import _saturation

    assert _saturation(2) == 2.0 and _saturation("inf") == float("inf")
    assert _saturation(".inf") == _saturation("+.inf") == float("inf")  # YAML, via env
    assert _saturation(None) == dask.config.get("distributed.scheduler.worker-saturation")
    for bad in (0, -1, "many", float("nan")):
        with pytest.raises(UsageError, match="worker-saturation"):
            _saturation(bad)


def test_library_messages_name_parameters_and_the_cli_names_flags(tmp_path, capsys):
    # the library speaks of its parameters; only the command line turns them into flags
    opts = ExecutionOptions(scheduler="threads", cluster="slurm")
    with pytest.raises(UsageError) as info:
        validate(opts)
    assert "--" not in str(info.value)
    assert main(["analyze", str(tmp_path / "x.zarr"), "--out", str(tmp_path / "o"),
                 "--scheduler", "threads", "--cluster", "slurm", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler threads cannot be combined with --cluster" in err
    assert "`" not in err


def test_cluster_settings_from_the_environment_are_used():
    # Dask stores DASK_FILTERDB_DASK__LOCAL_CLUSTER__WORKER_SATURATION as
    # 'worker_saturation': each setting is looked up by its dotted name, so an
    # override from the environment is used (here: refused as invalid), not skipped
    import subprocess
    import sys

    code = ("from filterdb_dask.cluster import ExecutionOptions, local_cluster\n"
            "from filterdb_dask.errors import UsageError\n"
            "try:\n    local_cluster(ExecutionOptions(workers=1))\n"
            "except UsageError as e:\n    print('REFUSED', e)\n")
    env = dict(os.environ, DASK_FILTERDB_DASK__LOCAL_CLUSTER__WORKER_SATURATION="-1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.startswith("REFUSED") and "worker-saturation" in out.stdout, out
