"""The execution context of every command: where and how the work is computed.

This module owns the execution options (:class:`ExecutionOptions`, the same for
``convert``, ``verify`` and ``analyze``) and their meaning:

* no option: the command's default from the package config
  (``filterdb_dask.scheduler.<command>``): dask's threaded scheduler for
  ``convert``/``verify``, a local cluster for ``analyze``;
* ``scheduler='distributed'``: a local cluster of worker processes on 127.0.0.1,
  secured with TLS credentials made for this run and held in memory only (see
  below), memory limit per worker from ``LocalCluster`` itself, no dashboard unless
  asked for (then on 127.0.0.1);
* ``scheduler='threads'|'processes'|'synchronous'``: dask's local schedulers;
* ``address``: an existing scheduler (``tcp://`` or ``tls://``);
* ``scheduler_file``: as written by ``dask scheduler --scheduler-file`` or dask-mpi;
* ``cluster='slurm'|'pbs'|'sge'|'lsf'``: dask-jobqueue, site settings from Dask's
  own config (``jobqueue.<name>.*``), ``jobs`` batch jobs; ``dry_run`` gives the
  job script (:func:`job_script`) and submits nothing.

:func:`execution` turns options into an :class:`Execution`; the library's passes
compute through :meth:`Execution.compute` (progress is only reported, by
:mod:`filterdb_dask.progress`). Only clusters started here are closed here.

Security: any local user can connect to a TCP port on 127.0.0.1, and a Dask
scheduler runs whatever task a client submits. The local cluster therefore uses
``distributed.security.Security.temporary()``: a key and self-signed certificate
made for this run, kept in memory, handed to the worker processes through the
nanny's process pipe (never a file others can read), and required from every peer
(mutual TLS); a client without them is refused. ``address``/``scheduler_file``/
jobqueue clusters use Dask's own security configuration
(``distributed.comm.tls.*``, ``distributed.comm.require-encryption``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import dask

from . import config, progress
from .errors import ClusterError, UsageError

SCHEDULERS = ("distributed", "threads", "processes", "synchronous")
JOBQUEUE = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
}
COMMANDS = ("convert", "verify", "analyze")


@dataclass(frozen=True)
class ExecutionOptions:
    """Where to compute; fields mirror the command-line options of the same name.

    ``scheduler=None`` means the command's configured default.
    """

    scheduler: str | None = None
    address: str | None = None
    scheduler_file: str | None = None
    cluster: str | None = None
    jobs: int = 1
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None
    dashboard: bool | None = None
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    queue: str | None = None
    dry_run: bool = False
    wait_timeout: float = 300.0
    connect_timeout: str = "30s"


@dataclass
class Execution:
    """A resolved execution context.

    ``client`` is the distributed client (None for dask's local schedulers, then
    ``scheduler`` names one, or None for dask's ambient choice); ``description``
    is what the result set records.
    """

    description: str
    client: object | None = None
    scheduler: str | None = None
    verbosity: int = 1

    def compute(self, *collections, label: str = "computing", io_bound: bool = False):
        """``dask.compute(*collections)`` here, with progress on stderr; a tuple.

        ``io_bound=True`` runs twice as many threads as cores on the threaded
        scheduler, so reads overlap with compression (no effect elsewhere).
        """
        rep = progress.Reporter(label, verbosity=self.verbosity)
        if self.client is not None:
            futures = self.client.compute(list(collections))
            progress.follow(futures, rep)
            results = tuple(self.client.gather(futures))
        else:
            kwargs = {}
            if self.scheduler is not None:
                kwargs["scheduler"] = self.scheduler
            if io_bound and self.scheduler == "threads":
                kwargs["num_workers"] = 2 * _usable_cpus()
            with progress.counting(rep):
                results = dask.compute(*collections, **kwargs)
        rep.finish()
        return results


def ensure(execution: Execution | None, verbosity: int | None = None) -> Execution:
    """``execution``, or dask's ambient scheduler for library calls made without one."""
    if execution is not None:
        return execution
    return Execution("dask default scheduler", verbosity=1 if verbosity is None else verbosity)


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _say(msg: str, verbosity: int) -> None:
    if verbosity > 0:
        print(msg, file=sys.stderr, flush=True)


def validate(opts: ExecutionOptions) -> None:
    """Refuse contradicting options.

    Raises
    ------
    UsageError
        Two targets at once, a local scheduler with a target, an unknown name,
        ``jobs < 1``, ``dry_run`` without ``cluster``.
    """
    given = [n for n in ("address", "scheduler_file", "cluster") if getattr(opts, n)]
    if len(given) > 1:
        raise UsageError(
            "choose one of `address`, `scheduler_file` and `cluster`, not "
            + " and ".join(f"`{g}`" for g in given)
        )
    if opts.scheduler is not None and opts.scheduler not in SCHEDULERS:
        raise UsageError(f"scheduler {opts.scheduler!r} is not one of {SCHEDULERS}")
    if given and opts.scheduler not in (None, "distributed"):
        raise UsageError(f"`scheduler` {opts.scheduler} cannot be combined with `{given[0]}`")
    if opts.cluster and opts.cluster not in JOBQUEUE:
        raise UsageError(f"cluster {opts.cluster!r} is not one of {sorted(JOBQUEUE)}")
    if opts.jobs < 1:
        raise UsageError(f"`jobs` must be at least 1, got {opts.jobs!r}")
    if opts.dry_run and not opts.cluster:
        raise UsageError("`dry_run` prints a batch job script: it needs `cluster`")


def choose(opts: ExecutionOptions, command: str) -> str:
    """What runs the work: 'address', 'scheduler-file', 'jobqueue', 'local-cluster',
    or a dask local scheduler name ('threads', 'processes', 'synchronous')."""
    validate(opts)
    if opts.address:
        return "address"
    if opts.scheduler_file:
        return "scheduler-file"
    if opts.cluster:
        return "jobqueue"
    if command not in COMMANDS:
        raise ValueError(f"command {command!r} is not one of {COMMANDS}")
    scheduler = opts.scheduler or config.get(f"scheduler.{command}")
    if scheduler not in SCHEDULERS:
        raise UsageError(
            f"configured filterdb_dask.scheduler.{command} {scheduler!r} is not one of "
            f"{SCHEDULERS}"
        )
    return "local-cluster" if scheduler == "distributed" else scheduler


def job_script(opts: ExecutionOptions) -> str:
    """The batch job script a ``cluster`` option would submit; submits nothing."""
    validate(opts)
    if not opts.cluster:
        raise UsageError("`dry_run` prints a batch job script: it needs `cluster`")
    cluster = jobqueue_cluster(opts)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def temporary_security():
    """TLS credentials for one run: made in memory, trusted by nothing else."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError as exc:
        raise ClusterError(
            "the local cluster's TLS credentials need the 'cryptography' package: "
            "pip install cryptography"
        ) from exc


def local_cluster(opts: ExecutionOptions, *, security=None):
    """Start a local cluster of worker processes on 127.0.0.1, secured with TLS.

    ``security`` defaults to :func:`temporary_security`. Settings not given in
    ``opts`` come from the package config (``filterdb_dask.local-cluster.*``).
    """
    from distributed import LocalCluster

    conf = config.get("local-cluster")
    workers = opts.workers or conf["n-workers"] or _usable_cpus()
    threads = opts.threads_per_worker or conf["threads-per-worker"]
    dashboard = _dashboard_wanted(opts)
    security = security or temporary_security()
    settings = {"distributed.worker.daemon": True,
                "distributed.nanny.pre-spawn-environ": dict(conf["pre-spawn-environ"] or {})}
    if not dashboard:
        # the scheduler and workers always run an HTTP server (plain HTTP, no TLS);
        # without the dashboard it serves nothing (no /info, /json, /metrics, proxy)
        settings.update({"distributed.scheduler.http.routes": [],
                         "distributed.worker.http.routes": []})
    with dask.config.set(settings):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            memory_limit=opts.memory_limit or conf["memory-limit"],
            processes=True,
            host="127.0.0.1",
            protocol="tls://",
            security=security,
            dashboard_address="127.0.0.1:0" if dashboard else None,
            # merged over LocalCluster's own options: an ephemeral loopback port
            # rather than 8787 when the dashboard is off
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0", "dashboard": dashboard},
        )


def _dashboard_wanted(opts: ExecutionOptions) -> bool:
    if opts.dashboard is None:
        return bool(config.get("local-cluster.dashboard"))
    return opts.dashboard


def jobqueue_cluster(opts: ExecutionOptions):
    """A dask-jobqueue cluster (not started: no jobs are submitted until scaled).

    Cores and memory per job come from the options or from Dask's config
    (``jobqueue.<name>.cores``/``.memory``); like dask-jobqueue, nothing is guessed.
    """
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ClusterError(
            f"`cluster` {opts.cluster} needs dask-jobqueue: pip install 'filterdb-dask[hpc]'"
        ) from exc
    cls = getattr(dask_jobqueue, JOBQUEUE[opts.cluster])
    kw = {name: getattr(opts, name) for name in ("cores", "memory", "walltime", "queue")
          if getattr(opts, name) is not None}
    conf = dask.config.get(f"jobqueue.{opts.cluster}", {}) or {}
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "cores" not in kw and conf.get("cores") is None or \
                "memory" not in kw and conf.get("memory") is None:
            hint = (f"; give cores and memory per job with `cores`/`memory` or in Dask's "
                    f"config jobqueue.{opts.cluster}.cores/.memory")
        raise ClusterError(f"cannot set up a {opts.cluster} cluster: {first}{hint}") from exc


def _lifetime(walltime: str) -> str:
    try:
        days = int(walltime.split("-")[0]) if "-" in walltime else 0
        parts = [int(p) for p in walltime.split("-")[-1].split(":")]
    except ValueError as exc:
        raise UsageError(
            f"walltime {walltime!r} is not [D-]HH:MM:SS (e.g. 02:00:00)"
        ) from exc
    while len(parts) < 3:
        parts.insert(0, 0)
    seconds = days * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    return f"{max(60, int(seconds * 0.9) - 300)}s"


@contextlib.contextmanager
def execution(opts: ExecutionOptions | None = None, *, command: str = "analyze",
              verbosity: int = 1):
    """Context manager: set up what the options ask for; yield an :class:`Execution`.

    Clusters started here are closed on exit; clients to existing schedulers are
    only disconnected. A dry run never gets here (see :func:`job_script`).

    Raises
    ------
    UsageError
        Contradicting options, or ``dry_run`` (which must not compute anything).
    ClusterError
        Unreachable scheduler, missing dask-jobqueue, no worker joined.
    """
    opts = opts or ExecutionOptions()
    kind = choose(opts, command)
    if opts.dry_run:
        raise UsageError("a dry run computes nothing: print job_script(opts) instead")
    if kind in ("threads", "processes", "synchronous"):
        yield Execution(f"dask {kind} scheduler", scheduler=kind, verbosity=verbosity)
        return
    from distributed import Client

    cluster = client = None
    try:
        if kind == "address":
            try:
                client = Client(opts.address, timeout=opts.connect_timeout)
            except (OSError, TimeoutError, TypeError) as exc:
                raise ClusterError(
                    f"cannot reach the scheduler at {opts.address!r}: {exc}"
                ) from exc
            what = f"existing scheduler {opts.address}"
        elif kind == "scheduler-file":
            if not os.path.exists(opts.scheduler_file):
                raise ClusterError(f"scheduler file {opts.scheduler_file!r} does not exist")
            try:
                client = Client(scheduler_file=opts.scheduler_file, timeout=opts.connect_timeout)
            except (OSError, TimeoutError, TypeError, ValueError) as exc:
                raise ClusterError(
                    f"cannot reach the scheduler of {opts.scheduler_file!r}: {exc}"
                ) from exc
            what = f"scheduler file {opts.scheduler_file}"
        elif kind == "jobqueue":
            cluster = jobqueue_cluster(opts)
            cluster.scale(jobs=opts.jobs)
            client = Client(cluster)
            _say(f"{opts.cluster}: submitted {opts.jobs} job(s); waiting for workers", verbosity)
            try:
                client.wait_for_workers(1, timeout=opts.wait_timeout)
            except TimeoutError as exc:
                raise ClusterError(
                    f"no {opts.cluster} worker joined within {opts.wait_timeout:.0f}s; "
                    "check the queue (squeue/qstat) and the job script (--dry-run)"
                ) from exc
            what = f"dask-jobqueue {opts.cluster}, {opts.jobs} job(s)"
        else:
            cluster = local_cluster(opts)
            client = Client(cluster)
            what = (f"local distributed cluster (TLS), {len(cluster.workers)} worker "
                    "process(es)")
        if client.dashboard_link and (kind != "local-cluster" or _dashboard_wanted(opts)):
            _say(f"dask dashboard: {client.dashboard_link}", verbosity)
        with client.as_current():
            yield Execution(what, client=client, verbosity=verbosity)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
