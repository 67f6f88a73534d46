"""The one place that turns command-line options into a Dask scheduler.

* default: a local distributed cluster (worker processes sized to the machine,
  a memory limit per worker, scheduler and dashboard on 127.0.0.1);
* ``--scheduler threads|processes|synchronous``: dask's local schedulers;
* ``--address tcp://host:port`` or ``tls://...``: an existing scheduler;
* ``--scheduler-file FILE``: as written by ``dask scheduler --scheduler-file`` or
  dask-mpi;
* ``--cluster slurm|pbs|sge|lsf``: dask-jobqueue, site settings from Dask's own
  config (``jobqueue.<name>.*``), ``--jobs N`` batch jobs.

TLS: for ``tls://`` addresses the client uses Dask's security configuration
(``distributed.comm.tls.ca-file``, ``.client.cert``, ``.client.key``), so no
option is needed here. Only clusters started here are closed here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import dask

from .errors import ClusterError

SCHEDULERS = ("distributed", "threads", "processes", "synchronous")
JOBQUEUE = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
}


@dataclass
class ClusterOptions:
    scheduler: str = "distributed"
    address: str | None = None
    scheduler_file: str | None = None
    cluster: str | None = None
    jobs: int = 1
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    queue: str | None = None
    dry_run: bool = False
    wait_timeout: float = 300.0
    connect_timeout: str = "30s"


def _say(msg: str, verbosity: int) -> None:
    if verbosity > 0:
        print(msg, file=sys.stderr, flush=True)


def _validate(opts: ClusterOptions) -> None:
    given = [n for n in ("address", "scheduler_file", "cluster") if getattr(opts, n)]
    if len(given) > 1:
        raise ClusterError(
            "choose one of --address, --scheduler-file and --cluster, not "
            + " and ".join("--" + g.replace("_", "-") for g in given)
        )
    if opts.scheduler not in SCHEDULERS:
        raise ClusterError(f"scheduler {opts.scheduler!r} is not one of {SCHEDULERS}")
    if given and opts.scheduler != "distributed":
        raise ClusterError(f"--scheduler {opts.scheduler} cannot be combined with --{given[0]}")
    if opts.cluster and opts.cluster not in JOBQUEUE:
        raise ClusterError(f"cluster {opts.cluster!r} is not one of {sorted(JOBQUEUE)}")
    if opts.jobs < 1:
        raise ClusterError(f"--jobs must be at least 1, got {opts.jobs!r}")


def local_cluster_kwargs(opts: ClusterOptions) -> dict:
    """Worker processes sized to this machine, each with a memory limit."""
    import psutil

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = opts.workers or max(1, cpus or 1)
    threads = opts.threads_per_worker or max(1, (cpus or 1) // workers)
    memory = opts.memory_limit or int(psutil.virtual_memory().total * 0.8 / workers)
    return {
        "n_workers": workers,
        "threads_per_worker": threads,
        "memory_limit": memory,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }


def jobqueue_cluster(opts: ClusterOptions):
    """A dask-jobqueue cluster (not started: no jobs are submitted until scaled)."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(
            f"--cluster {opts.cluster} needs dask-jobqueue: pip install 'filterdb-dask[hpc]'"
        ) from None
    cls = getattr(dask_jobqueue, JOBQUEUE[opts.cluster])
    kw = {}
    for name in ("cores", "memory", "walltime", "queue"):
        v = getattr(opts, name)
        if v is not None:
            kw[name] = v
    conf = dask.config.get(f"jobqueue.{opts.cluster}", {}) or {}
    if "cores" not in kw and conf.get("cores") is None:
        kw["cores"] = 1
    if "memory" not in kw and conf.get("memory") is None:
        kw["memory"] = "4GB"
    if not conf.get("scheduler-options"):
        # workers on other nodes must reach the scheduler; the dashboard stays local
        kw["scheduler_options"] = {"dashboard_address": "127.0.0.1:0"}
    if opts.walltime and not conf.get("worker-extra-args"):
        # leave the job before the batch system kills it, so tasks move elsewhere
        kw["worker_extra_args"] = ["--lifetime", _lifetime(opts.walltime),
                                   "--lifetime-stagger", "2m"]
    try:
        return cls(**kw)
    except Exception as exc:
        raise ClusterError(f"cannot set up a {opts.cluster} cluster: {exc}") from None


def _lifetime(walltime: str) -> str:
    parts = [int(p) for p in walltime.split("-")[-1].split(":")]
    days = int(walltime.split("-")[0]) if "-" in walltime else 0
    while len(parts) < 3:
        parts.insert(0, 0)
    seconds = days * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    return f"{max(60, int(seconds * 0.9) - 300)}s"


@contextlib.contextmanager
def get_client(opts: ClusterOptions | None = None, *, verbosity: int = 1):
    """Context manager: set up the scheduler the options ask for; yield the client.

    Yields ``None`` for dask's local schedulers (then set as dask's default).
    Clusters started here are closed on exit; clients to existing schedulers are
    only disconnected.

    Raises
    ------
    ClusterError
        Conflicting options, unreachable scheduler, missing dask-jobqueue.
    """
    opts = opts or ClusterOptions()
    _validate(opts)
    if opts.scheduler != "distributed" and not (opts.address or opts.scheduler_file):
        with dask.config.set(scheduler=opts.scheduler):
            yield None
        return
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if opts.address:
            try:
                client = Client(opts.address, timeout=opts.connect_timeout)
            except (OSError, TimeoutError) as exc:
                raise ClusterError(
                    f"cannot reach the scheduler at {opts.address!r}: {exc}"
                ) from None
        elif opts.scheduler_file:
            if not os.path.exists(opts.scheduler_file):
                raise ClusterError(f"scheduler file {opts.scheduler_file!r} does not exist")
            try:
                client = Client(scheduler_file=opts.scheduler_file, timeout=opts.connect_timeout)
            except (OSError, TimeoutError, ValueError) as exc:
                raise ClusterError(
                    f"cannot reach the scheduler of {opts.scheduler_file!r}: {exc}"
                ) from None
        elif opts.cluster:
            cluster = jobqueue_cluster(opts)
            cluster.scale(jobs=opts.jobs)
            client = Client(cluster)
            _say(f"{opts.cluster}: submitted {opts.jobs} job(s); waiting for workers", verbosity)
            try:
                client.wait_for_workers(1, timeout=opts.wait_timeout)
            except TimeoutError:
                raise ClusterError(
                    f"no {opts.cluster} worker joined within {opts.wait_timeout:.0f}s; "
                    "check the queue (squeue/qstat) and the job script (--dry-run)"
                ) from None
        else:
            with dask.config.set({"distributed.worker.daemon": True}):
                cluster = LocalCluster(**local_cluster_kwargs(opts))
            client = Client(cluster)
        if client.dashboard_link:
            _say(f"dask dashboard: {client.dashboard_link}", verbosity)
        with client.as_current():
            yield client
    finally:
        if "client" in locals():
            client.close()
        if cluster is not None:
            cluster.close()
