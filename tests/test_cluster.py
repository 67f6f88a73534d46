"""Real multi-process clusters over loopback TCP: results equal the threaded ones,
and survive a SIGKILLed worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest

from filterdb_dask.cluster import ClusterOptions, get_client
from filterdb_dask.errors import ClusterError
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
    with pytest.raises(ClusterError, match="choose one of --address, --scheduler-file"):
        with get_client(ClusterOptions(address="tcp://127.0.0.1:1", scheduler_file="x")):
            pass
    with pytest.raises(ClusterError, match="scheduler file '.*nope.json' does not exist"):
        with get_client(ClusterOptions(scheduler_file=str(tmp_path / "nope.json"))):
            pass
    with pytest.raises(ClusterError, match="cannot reach the scheduler"):
        with get_client(ClusterOptions(address=f"tcp://127.0.0.1:{_free_port()}",
                                       connect_timeout="2s")):
            pass
