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
  job script (:func:`job_script`) and submits nothing;
* ``mpi=True``: a cluster inside one MPI job (``mpirun -np N``, ``srun``), with
  ``dask_mpi.initialize`` semantics: rank 0 runs the scheduler, rank 1 runs the
  command (the client), ranks 2..N-1 are workers; see :func:`mpi_roles`.

:func:`execution` turns options into an :class:`Execution`; the library's passes
compute through :meth:`Execution.compute` (progress is only reported, by
:mod:`filterdb_dask.progress`). Only clusters started here are closed here.

Security: any local user can connect to a TCP port on 127.0.0.1, and a Dask
scheduler runs whatever task a client submits. The local cluster therefore uses
``distributed.security.Security.temporary()``: a key and self-signed certificate
made for this run, kept in memory, handed to the worker processes through the
nanny's process pipe (never a file others can read), and required from every peer
(mutual TLS); a client without them is refused. An MPI job does the same: rank 0
makes the credentials and broadcasts them over MPI (the job's own transport, no
file), every rank puts them in its in-memory Dask config, and scheduler, workers
and client speak TLS only with peers holding them (``dask_mpi.initialize`` has no
``security`` argument; its scheduler, workers and client read Dask's
``distributed.comm.tls.*`` config, which accepts the PEM text itself).
``address``/``scheduler_file``/jobqueue clusters use Dask's own security
configuration (``distributed.comm.tls.*``, ``distributed.comm.require-encryption``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import dask
import numpy as np

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
    mpi: bool = False


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

    def compute(self, *collections, label: str = "computing", io_bound: bool = False,
                chunk_filters=None):
        """``dask.compute(*collections)`` here, with progress on stderr; a tuple.

        ``io_bound=True`` runs twice as many threads as cores on the threaded
        scheduler, named or dask's default (so reads overlap with compression; no
        effect elsewhere).

        ``chunk_filters``: the filters (rows) of each chunk of the store the
        collections read, in chunk order (``FilterStore.chunk_filters``). On a
        distributed cluster each chunk's task is then placed by
        :func:`balance_chunks` (the same rows on every worker, per thread) rather
        than by Dask, which hands root tasks out in runs of consecutive chunks,
        blind to their sizes; no effect elsewhere.
        """
        rep = progress.Reporter(label, verbosity=self.verbosity)
        if self.client is not None:
            placed = (collections if chunk_filters is None
                      else balance_chunks(collections, chunk_filters, self.client))
            # Dask's array optimisation would materialise the graph into a dict and
            # drop the placement annotations; the passes' graphs are built whole
            # (one task per chunk, nothing to cull or fuse) and lose nothing
            results = self._distributed_compute(
                placed, rep, optimize_graph=placed is collections)
        else:
            kwargs = {}
            if self.scheduler is not None:
                kwargs["scheduler"] = self.scheduler
            if io_bound and _threaded(self.scheduler, collections):
                kwargs["num_workers"] = 2 * _usable_cpus()
            with progress.counting(rep):
                results = dask.compute(*collections, **kwargs)
        rep.finish()
        return results

    def _distributed_compute(self, collections, rep, optimize_graph: bool = True) -> tuple:
        """Compute on the client's cluster. When every collection is a dask array, they
        are persisted together (one graph: a task shared by two of them runs once) and
        each array's blocks are gathered to this process and joined here: the client's
        ``compute`` would join a many-block array in a task on one worker first, moving
        its blocks between workers and then, joined, to this process.
        ``optimize_graph``: Dask's own, passed on."""
        from dask.array import Array
        from dask.core import flatten
        from distributed import futures_of

        client = self.client
        if not collections or not all(isinstance(c, Array) for c in collections):
            futures = client.compute(list(collections), optimize_graph=optimize_graph)
            progress.follow(futures, rep)
            return tuple(client.gather(futures))
        held = client.persist(list(collections), optimize_graph=optimize_graph)
        futures = futures_of(held)
        progress.follow(futures, rep)
        by_key = {f.key: f for f in futures}
        nested = [arr.__dask_keys__() for arr in held]
        # every block of every output in one gather (one request per worker)
        blocks = iter(client.gather([by_key[k] for keys in nested for k in flatten(keys)]))
        results = []
        for arr, keys in zip(held, nested, strict=True):
            finalize, args = arr.__dask_postcompute__()
            results.append(finalize(_nest(keys, blocks), *args))
        del held, futures, by_key
        return tuple(results)


def chunk_workers(rows, nthreads: dict) -> list:
    """A worker for each chunk of ``rows`` rows, from ``nthreads`` (worker -> its
    threads), mostly in runs of consecutive chunks: the rows are cut into one segment
    per worker, in proportion to its threads, and each chunk goes to the worker whose
    segment holds its middle row (every worker within half a chunk of its share at
    each cut; neighbouring chunks, whose partial results the reduction tree combines,
    stay together as Dask keeps them). Then at most two chunks per worker move, each
    from the worker furthest above its share to the one furthest below: the chunk
    nearest to what evens them, and only one that brings both nearer their shares.
    Deterministic."""
    names = list(nthreads)
    weights = np.array([max(int(nthreads[w]), 1) for w in names], dtype=np.float64)
    cuts = np.cumsum(weights) / weights.sum()  # each worker's segment's end, in (0, 1]
    rows = np.asarray(rows, dtype=np.float64)
    total = rows.sum()
    if total <= 0:
        return [names[i * len(names) // max(len(rows), 1)] for i in range(len(rows))]
    middle = (np.cumsum(rows) - rows / 2) / total
    owner = np.minimum(np.searchsorted(cuts, middle, side="right"), len(names) - 1)
    share = total * weights / weights.sum()
    load = np.bincount(owner, weights=rows, minlength=len(names))
    moved = np.zeros(len(rows), dtype=bool)
    for _ in range(2 * len(names)):
        h, lo = int(np.argmax(load - share)), int(np.argmin(load - share))
        want = min(load[h] - share[h], share[lo] - load[lo])  # what evens the two
        fits = np.flatnonzero((owner == h) & ~moved & (rows > 0) & (rows < 2 * want))
        if want <= 0 or not fits.size:
            break
        c = int(fits[np.argmin(np.abs(rows[fits] - want))])
        owner[c], moved[c] = lo, True
        load[h] -= rows[c]
        load[lo] += rows[c]
    return [names[k] for k in owner]


def balance_chunks(collections: tuple, rows, client) -> tuple:
    """``collections`` (dask arrays, anything else as it is) with each chunk task
    annotated for the cluster of ``client``: ``workers`` (:func:`chunk_workers`) and
    ``allow_other_workers`` (a loose wish: a task whose worker is gone, or is
    stolen for, runs elsewhere).

    A chunk task is a task of a layer without dependencies whose keys are
    ``(name, i, 0, ...)`` for exactly the chunks ``i = 0 .. len(rows) - 1`` (the
    store reads, or the tasks that nest them, :mod:`filterdb_dask._graph`); the
    tasks that depend on them follow their data. The graph itself is not changed:
    the annotated layers are copies. Nothing to place (one worker, one chunk, no
    chunk tasks): ``collections`` itself.

    Dask alone also hands out the chunk tasks of a pass in runs of consecutive
    chunks, but cut by task count, blind to the chunks' sizes: on the benchmark
    stores one worker got 10.6 M of the 20 M filters in pass 2 (106.6 M of 200 M),
    and the other waited for it at the end of the pass (``benchmarks``' stores;
    placed by rows: 10.04 / 9.96 M and 100.0 / 100.0 M).
    """
    from dask.array import Array
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    n = len(rows)
    info = client.scheduler_info(n_workers=-1).get("workers", {})
    nthreads = {addr: w.get("nthreads", 1) for addr, w in sorted(info.items())}
    if len(nthreads) < 2 or n < 2:
        return collections
    where = chunk_workers(rows, nthreads)
    out = []
    placed = False
    for c in collections:
        if not isinstance(c, Array):
            out.append(c)
            continue
        hlg = c.__dask_graph__()
        layers = dict(hlg.layers)
        changed = False
        for name, layer in hlg.layers.items():
            if hlg.dependencies.get(name) or len(layer) != n:
                continue
            keys = list(layer.keys())
            if not all(isinstance(k, tuple) and len(k) >= 2 and k[0] == name
                       and isinstance(k[1], int) and not any(k[2:]) for k in keys):
                continue
            if sorted(k[1] for k in keys) != list(range(n)):
                continue
            annotations = dict(layer.annotations or {})
            annotations["workers"] = lambda key, where=where: [where[key[1]]]
            annotations["allow_other_workers"] = True
            layers[name] = MaterializedLayer(dict(layer), annotations=annotations)
            changed = True
        if not changed:
            out.append(c)
            continue
        graph = HighLevelGraph(layers, dict(hlg.dependencies))
        out.append(Array(graph, c.name, chunks=c.chunks, meta=c._meta))
        placed = True
    return tuple(out) if placed else collections


def _nest(keys, values):
    """``keys`` (nested lists, as ``__dask_keys__``) with each key replaced by the next
    of ``values``."""
    return [_nest(k, values) for k in keys] if isinstance(keys, list) else next(values)


def ensure(execution: Execution | None, verbosity: int | None = None) -> Execution:
    """``execution``, or dask's ambient scheduler for library calls made without one:
    a distributed client that dask would compute on (``Client(...)`` made current, as
    in a notebook) is used as such (:meth:`Execution.compute` gathers results
    straight from the workers)."""
    if execution is not None:
        return execution
    verbosity = 1 if verbosity is None else verbosity
    client = _current_client()
    if client is not None:
        return Execution("dask default scheduler (distributed)", client=client,
                         verbosity=verbosity)
    return Execution("dask default scheduler", verbosity=verbosity)


def _current_client():
    """The distributed client dask's current scheduler belongs to, or None."""
    if "distributed" not in sys.modules:  # no client without it
        return None
    from dask.base import get_scheduler
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:  # none
        return None
    get = get_scheduler()
    if getattr(get, "__self__", None) is client and client.status == "running":
        return client
    return None


def _threaded(scheduler: str | None, collections) -> bool:
    """Whether ``dask.compute(*collections, scheduler=scheduler)`` would run on dask's
    threaded scheduler (named, configured, or the default of these collections)."""
    from dask.base import get_scheduler, is_dask_collection
    from dask.threaded import get as threaded_get

    flat = [c for x in collections for c in (x if isinstance(x, (list, tuple)) else [x])
            if is_dask_collection(c)]
    try:
        return get_scheduler(scheduler=scheduler, collections=flat or None) is threaded_get
    except (ValueError, AttributeError):
        return False


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# glibc's M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_ARENA_MAX": -8}
_tuned: set[str] = set()


def tune_allocator() -> bool:
    """Give this process the allocator settings the local cluster gives its workers
    (``filterdb_dask.local-cluster.pre-spawn-environ``: ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX``), through glibc's ``mallopt``,
    for work computed here (dask's threaded scheduler). Without them every
    chunk-sized buffer is a fresh ``mmap``, page-faulted and zeroed when first
    written: a third of the converter's CPU time. The arena limit matters because
    tasks run in pool threads: a thread's own arena grows in heaps of at most 64 MiB,
    so two chunk buffers do not fit one and each is a fresh heap, mapped and faulted
    again, whatever the thresholds. Call it before the pool's threads first allocate
    (threads already attached to an arena keep it). The settings last for the process
    (freed heap up to the trim threshold is kept for reuse); values set in the
    environment at start-up win; no-op where glibc's ``mallopt`` is absent. Returns
    whether anything was set."""
    import ctypes

    wanted = dict(config.get("local-cluster.pre-spawn-environ") or {})
    todo = {k: int(v) for k, v in wanted.items()
            if k in _MALLOPT and k not in os.environ and k not in _tuned}
    if not todo or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = False
    for name, value in todo.items():
        if mallopt(ctypes.c_int(_MALLOPT[name]), ctypes.c_int(min(value, 2**31 - 1))) == 1:
            _tuned.add(name)
            done = True
    return done


def _saturation(value) -> float:
    """``worker-saturation`` of the package config: a number > 0 or inf (null: Dask's
    own setting)."""
    if value is None:
        return dask.config.get("distributed.scheduler.worker-saturation")
    if isinstance(value, str) and value.strip().lower() in (".inf", "+.inf"):
        value = "inf"  # YAML's spelling, as an environment variable passes it through
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not v > 0:
        raise UsageError(f"filterdb_dask worker-saturation must be a number > 0 or inf, "
                         f"got {value!r}")
    return v


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
    given = [n for n in ("address", "scheduler_file", "cluster", "mpi") if getattr(opts, n)]
    if len(given) > 1:
        raise UsageError(
            "choose one of `address`, `scheduler_file`, `cluster` and `mpi`, not "
            + " and ".join(f"`{g}`" for g in given)
        )
    if opts.scheduler is not None and opts.scheduler not in SCHEDULERS:
        raise UsageError(f"scheduler {opts.scheduler!r} is not one of {SCHEDULERS}")
    if opts.mpi and opts.scheduler is not None:
        raise UsageError(f"`scheduler` {opts.scheduler} cannot be combined with `mpi` "
                         "(MPI rank 0 is the scheduler)")
    if opts.mpi and opts.workers is not None:
        raise UsageError("`workers` cannot be combined with `mpi` (the workers are MPI "
                         "ranks 2..N-1: choose N with mpirun -np or srun -n)")
    if given and opts.scheduler not in (None, "distributed"):
        raise UsageError(f"`scheduler` {opts.scheduler} cannot be combined with `{given[0]}`")
    if opts.cluster and opts.cluster not in JOBQUEUE:
        raise UsageError(f"cluster {opts.cluster!r} is not one of {sorted(JOBQUEUE)}")
    if opts.jobs < 1:
        raise UsageError(f"`jobs` must be at least 1, got {opts.jobs!r}")
    if opts.dry_run and not opts.cluster:
        raise UsageError("`dry_run` prints a batch job script: it needs `cluster`")


def choose(opts: ExecutionOptions, command: str) -> str:
    """What runs the work: 'address', 'scheduler-file', 'jobqueue', 'mpi',
    'local-cluster', or a dask local scheduler name ('threads', 'processes',
    'synchronous')."""
    validate(opts)
    if opts.mpi:
        return "mpi"
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

    # one dotted lookup per setting: Dask matches '-' and '_' in each part of the key,
    # so an override from the environment (DASK_FILTERDB_DASK__LOCAL_CLUSTER__N_WORKERS,
    # stored as 'n_workers') is found, where indexing the section's dict misses it
    def conf(name):
        return config.get(f"local-cluster.{name}")

    workers = opts.workers or conf("n-workers") or _usable_cpus()
    threads = opts.threads_per_worker or conf("threads-per-worker")
    saturation = _saturation(conf("worker-saturation"))
    dashboard = _dashboard_wanted(opts)
    security = security or temporary_security()
    settings = {"distributed.worker.daemon": True,
                "distributed.nanny.pre-spawn-environ": dict(conf("pre-spawn-environ") or {}),
                "distributed.scheduler.worker-saturation": saturation}
    if not dashboard:
        # the scheduler and workers always run an HTTP server (plain HTTP, no TLS);
        # without the dashboard it serves nothing (no /info, /json, /metrics, proxy)
        settings.update({"distributed.scheduler.http.routes": [],
                         "distributed.worker.http.routes": []})
    with dask.config.set(settings):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            memory_limit=opts.memory_limit or conf("memory-limit"),
            processes=True,
            host="127.0.0.1",
            protocol="tls://",
            security=security,
            dashboard_address="127.0.0.1:0" if dashboard else None,
            # merged over LocalCluster's own options: an ephemeral loopback port
            # rather than 8787 when the dashboard is off
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0", "dashboard": dashboard},
        )


def _dashboard_wanted(opts: ExecutionOptions, key: str = "local-cluster.dashboard") -> bool:
    if opts.dashboard is None:
        return bool(config.get(key))
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


MPI_MIN_RANKS = 3  # the scheduler, the client and one worker


def mpi_world():
    """``mpi4py``'s ``COMM_WORLD``, checked for an MPI cluster.

    Raises
    ------
    ClusterError
        mpi4py, dask-mpi or the MPI library is missing, or fewer than 3 ranks (not
        started by ``mpirun``/``srun``).
    """
    try:
        import dask_mpi  # noqa: F401
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as exc:
        raise ClusterError(
            f"`mpi` needs mpi4py, dask-mpi and an MPI library ({_first_line(exc)}): "
            "pip install 'filterdb-dask[hpc]' and an MPI such as Debian's openmpi-bin"
        ) from exc
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    if size < MPI_MIN_RANKS:
        raise ClusterError(
            f"`mpi` needs at least {MPI_MIN_RANKS} MPI ranks (scheduler, client, one "
            f"worker), this job has {size}: start it with mpirun -np N or srun -n N, "
            f"N >= {MPI_MIN_RANKS}"
        )
    return comm


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _mpi_threads(comm, opts: ExecutionOptions) -> int:
    """Threads of this worker rank: ``threads_per_worker``, the config's
    ``mpi.threads-per-worker``, or (null) the cores the rank is bound to, or, when
    MPI bound it to nothing narrower than the node, the node's cores shared by the
    worker ranks on the node. Collective: every rank must call it."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        local_workers = sum(1 for r in node.allgather(comm.Get_rank()) if r >= 2)
    finally:
        node.Free()
    wanted = opts.threads_per_worker or config.get("mpi.threads-per-worker")
    if wanted:
        return int(wanted)
    cpus = _usable_cpus()
    if cpus < (os.cpu_count() or cpus):  # bound by mpirun/srun to these cores
        return cpus
    return max(1, cpus // max(1, local_workers))


def _mpi_check_interface(comm, interface: str | None) -> None:
    """Every rank checks ``interface`` before any of them starts a server, so a
    missing one is one error on every rank, not a job waiting for a scheduler."""
    problem = None
    if interface:
        from distributed.utils import get_ip_interface

        try:
            get_ip_interface(interface)
        except (ValueError, OSError) as exc:
            problem = f"rank {comm.Get_rank()}: {_first_line(exc)}"
    problems = [p for p in comm.allgather(problem) if p]
    if problems:
        raise ClusterError(f"`mpi`: network interface {interface!r} is not usable "
                           f"({problems[0]}); set filterdb_dask.mpi.interface")


def _tls_config(security) -> dict:
    """Dask config entries holding ``security``'s credentials (PEM text, in memory)."""
    conf = {"distributed.comm.require-encryption": True,
            "distributed.comm.default-scheme": "tls",
            "distributed.comm.tls.ca-file": security.tls_ca_file}
    for role in ("scheduler", "worker", "client"):
        conf[f"distributed.comm.tls.{role}.cert"] = getattr(security, f"tls_{role}_cert")
        conf[f"distributed.comm.tls.{role}.key"] = getattr(security, f"tls_{role}_key")
    return conf


def mpi_roles(opts: ExecutionOptions, *, verbosity: int = 1):
    """Start this rank's part of a dask-mpi cluster; return its scheduler address
    on the client rank (rank 1), once the scheduler is up.

    On every other rank this blocks while the scheduler (rank 0) or worker
    (ranks 2..N-1) runs, and returns None once the client shut the cluster down;
    the caller then ends the process (the command runs on rank 1 only).
    ``dask_mpi.initialize(exit=False)`` does the work, with TLS credentials made on
    rank 0 for this job and broadcast over MPI; the workers are in-process (no
    nanny), ``threads_per_worker`` threads each (see :func:`_mpi_threads`).
    Collective: every rank of ``COMM_WORLD`` must call it.
    """
    import logging

    import dask_mpi

    comm = mpi_world()
    rank = comm.Get_rank()
    def conf(name):  # dotted lookups, as in local_cluster
        return config.get(f"mpi.{name}")

    interface = conf("interface") or None
    _mpi_check_interface(comm, interface)
    threads = _mpi_threads(comm, opts)
    security = temporary_security() if rank == 0 else None
    security = comm.bcast(security, root=0)
    dashboard = _dashboard_wanted(opts, "mpi.dashboard")
    settings = _tls_config(security)
    settings["distributed.scheduler.worker-saturation"] = _saturation(
        conf("worker-saturation"))
    if not dashboard:
        settings.update({"distributed.scheduler.http.routes": [],
                         "distributed.worker.http.routes": []})
    if rank != 1 and verbosity < 2:
        # the scheduler and workers say only what is fatal (as the local cluster's
        # workers do); a task's error reaches the client, which reports it
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
    if rank >= 2:
        tune_allocator()  # the worker runs in this process (no nanny to set it)
    with dask.config.set(settings):
        is_client = dask_mpi.initialize(
            interface=interface, nthreads=threads,
            memory_limit=opts.memory_limit or conf("memory-limit") or "auto",
            dashboard=dashboard,
            dashboard_address="127.0.0.1:0", protocol="tls", exit=False, comm=comm)
    if not is_client:
        return None
    dask.config.set(settings)  # the client keeps the credentials for this process
    return dask.config.get("scheduler_address")


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
        if kind != "processes":
            tune_allocator()  # the chunk buffers are allocated in this process
        yield Execution(f"dask {kind} scheduler", scheduler=kind, verbosity=verbosity)
        return
    from distributed import Client

    cluster = client = None
    mpi_address = None
    try:
        if kind == "mpi":
            mpi_address = mpi_roles(opts, verbosity=verbosity)
            if mpi_address is None:
                # scheduler or worker rank: the cluster has been shut down by the
                # client (rank 1), which alone runs the command
                raise SystemExit(0)
            n_workers = mpi_world().Get_size() - 2
            client = Client(mpi_address, timeout=opts.connect_timeout)
            try:
                client.wait_for_workers(n_workers, timeout=opts.wait_timeout)
            except TimeoutError as exc:
                raise ClusterError(
                    f"`mpi`: only {len(client.scheduler_info()['workers'])} of {n_workers} "
                    f"worker rank(s) joined within {opts.wait_timeout:.0f}s"
                ) from exc
            threads = sorted({w["nthreads"] for w in
                              client.scheduler_info()["workers"].values()})
            what = (f"dask-mpi (TLS), {n_workers} worker rank(s) x "
                    f"{'/'.join(map(str, threads))} thread(s)")
            _say(f"dask-mpi: scheduler {mpi_address}, {n_workers} worker rank(s)", verbosity)
        elif kind == "address":
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
        started_here = {"local-cluster": "local-cluster.dashboard", "mpi": "mpi.dashboard"}
        if client.dashboard_link and (kind not in started_here
                                      or _dashboard_wanted(opts, started_here[kind])):
            _say(f"dask dashboard: {client.dashboard_link}", verbosity)
        # results land here: large ones (per-layer histograms, tens of MB) reuse the heap
        tune_allocator()
        with client.as_current():
            yield Execution(what, client=client, verbosity=verbosity)
    finally:
        if mpi_address is not None:
            _mpi_shutdown(client, mpi_address)
        elif client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def _mpi_shutdown(client, address: str) -> None:
    """End the MPI job's scheduler and workers (their ranks then exit), also when
    the client never connected (``dask_mpi.send_close_signal`` with a timeout)."""
    from distributed import Client

    try:
        if client is None or client.status != "running":
            if client is not None:
                client.close()
            client = Client(address, timeout="10s")
        client.shutdown()
    except (OSError, TimeoutError):
        pass  # the scheduler is gone already: mpirun ends the job when rank 0 exits
    finally:
        if client is not None:
            client.close()
