"""Command line: ``python -m filterdb_dask.run`` / ``filterdb-dask``.

Parses arguments, enters the execution context (``cluster.execution``) and dispatches;
no analysis logic lives here. Exit codes: 0 success, 1 runtime error, 2 usage
error. Errors print one line on stderr; ``--debug`` re-raises them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import textwrap
import threading

from . import config, progress
from .errors import FilterDBError, UsageError

PROG = "filterdb-dask"
DEMO_FILTERS = 3_000_000
DEMO_MODELS = 40


def _count(text: str) -> int:
    """'3M', '50M', '1.5G', '200k', '1464797156' -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 2000000, 3M, 1.5G)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[m.group(2).lower()]
    value = float(m.group(1)) * mult
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole count")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _cutoff_list(text: str) -> tuple[float, ...]:
    from .quality import normalize_entropy_cutoffs

    try:
        return normalize_entropy_cutoffs(text)
    except FilterDBError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _eps_list(text: str) -> tuple[float, ...]:
    from .quality import normalize_sparsity_eps

    try:
        return normalize_sparsity_eps(text)
    except FilterDBError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_cache_dir() -> str:
    """Where the no-argument demo keeps its data (``FILTERDB_DASK_CACHE`` overrides)."""
    env = os.environ.get("FILTERDB_DASK_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "filterdb_dask")


# ------------------------------------------------------------------------- parser
def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", type=_json_object, metavar="JSON",
                   help="fsspec options for an object-store URL (s3://bucket/db.zarr), e.g. "
                        "'{\"endpoint_url\": \"https://...\"}' or '{\"anon\": true}'; "
                        "credentials also from AWS_* environment variables")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _add_execution_options(p: argparse.ArgumentParser) -> None:
    """The execution options, the same for every command (meaning: filterdb_dask.cluster)."""
    from .cluster import JOBQUEUE, SCHEDULERS

    g = p.add_argument_group(
        "execution (default: filterdb_dask.scheduler.<command> in the package config)")
    # no argparse defaults: None means "not given", so the command's default applies
    g.add_argument("--scheduler", choices=SCHEDULERS,
                   help="'distributed' starts a local TLS-secured cluster on 127.0.0.1; "
                        "threads|processes|synchronous are dask's local schedulers "
                        "(default: threads for convert/verify, distributed for analyze)")
    g.add_argument("--address", metavar="URL",
                   help="an existing scheduler, e.g. tcp://10.0.0.5:8786 (tls:// uses "
                        "Dask's distributed.comm.tls config)")
    g.add_argument("--scheduler-file", metavar="FILE",
                   help="scheduler file of 'dask scheduler --scheduler-file' or dask-mpi")
    g.add_argument("--cluster", choices=sorted(JOBQUEUE),
                   help="start workers as batch jobs with dask-jobqueue (site settings from "
                        "Dask config jobqueue.<name>.*)")
    g.add_argument("--mpi", action="store_true", default=False,
                   help="run inside an MPI job (mpirun -np N / srun -n N, N >= 3) with "
                        "dask-mpi: rank 0 the scheduler, rank 1 this command, the rest "
                        "workers; TLS with credentials made for the job (needs the hpc "
                        "extra)")
    g.add_argument("--jobs", type=_positive_int, default=1, help="batch jobs (--cluster)")
    g.add_argument("--cores", type=_positive_int, help="cores per job (--cluster)")
    g.add_argument("--memory", help="memory per job, e.g. 8GB (--cluster)")
    g.add_argument("--walltime", help="walltime per job, e.g. 01:00:00 (--cluster)")
    g.add_argument("--queue", help="queue/partition (--cluster)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the batch job script and exit; submits nothing (--cluster)")
    g.add_argument("--workers", type=_positive_int,
                   help="local cluster: worker processes (default: one per core)")
    g.add_argument("--memory-limit",
                   help="local cluster or --mpi: memory per worker, e.g. 2GB (default: "
                        "dask's 'auto', system memory / workers)")
    g.add_argument("--dashboard", action="store_true", default=None,
                   help="local cluster or --mpi: serve the dask dashboard on 127.0.0.1 "
                        "(off by default: any local user could view it)")


def _execution_options(args):
    from .cluster import ExecutionOptions

    return ExecutionOptions(
        scheduler=args.scheduler, address=args.address, scheduler_file=args.scheduler_file,
        cluster=args.cluster, jobs=args.jobs, cores=args.cores, memory=args.memory,
        walltime=args.walltime, queue=args.queue, dry_run=args.dry_run,
        workers=args.workers, memory_limit=args.memory_limit, dashboard=args.dashboard,
        mpi=args.mpi,
    )


def _execution(args):
    """The execution context the command's options ask for (a context manager)."""
    from .cluster import execution

    return execution(_execution_options(args), command=args.command,
                     verbosity=_verbosity(args))


def _dry_run(args) -> int:
    """``--dry-run`` of any command: print the job script; run and submit nothing."""
    from .cluster import job_script

    print(job_script(_execution_options(args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    top.add_argument("-v", "--verbose", action="store_true", help="more output")
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    # the same flags after the command; SUPPRESS keeps them from resetting the top ones
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress output")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="more output")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")

    p = argparse.ArgumentParser(
        prog=PROG,
        parents=[top],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The CNN Filter DB analysis (Gavrikov & Keuper, CVPR 2022), out of "
                    "core and in parallel with Dask.",
        epilog=textwrap.dedent(f"""\
            Without a command: generate a small synthetic DB ({DEMO_FILTERS:,} filters,
            cached), convert it, analyse it and write an HTML report.

            examples:
              {PROG} synth dataset.h5 --filters 50M --models 300
              {PROG} convert dataset.h5 dataset.zarr
              {PROG} analyze dataset.zarr --out results/
              {PROG} analyze dataset.zarr --out results/ --cluster slurm --jobs 8
            """),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_, examples):
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="examples:\n" + textwrap.indent(examples, "  "))
        return sp

    s = add("synth", "write a realistic synthetic dataset.h5 (published layout)",
            f"{PROG} synth dataset.h5 --filters 3M --models 40 --seed 0\n"
            f"{PROG} synth big.h5 --filters 1.4G --models 800 --layout cube64 --name filters\n")
    s.add_argument("out", help="the .h5 file to write")
    s.add_argument("--filters", type=_count, default=DEMO_FILTERS, help="filters N (3M, 1.4G)")
    s.add_argument("--models", type=_positive_int, default=DEMO_MODELS, help="models")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    s.add_argument("--layout", choices=("flat32", "cube64", "flat64", "cube32"),
                   default="flat32", help="float32 (N, K²) or float64 (N, K, K) ...")
    s.add_argument("--kernel", type=int, metavar="K", default=3,
                   help="KxK filters (default 3, the published DB's size; 5, 7, ...)")
    s.add_argument("--name", choices=("filter", "filters"), default="filter",
                   help="filter dataset name")
    s.add_argument("--meta-format", choices=("fixed", "table"), default="fixed")
    s.add_argument("--overwrite", action="store_true", help="replace an existing file")

    c = add("convert", "convert dataset.h5 into a model-aligned Zarr store (resumable)",
            f"{PROG} convert dataset.h5 dataset.zarr\n"
            f"{PROG} convert dataset.h5 dataset.zarr --dtype float32 --chunk-filters 4M\n")
    c.add_argument("source", help="dataset.h5")
    c.add_argument("target", help="store directory or s3:// URL (created or resumed)")
    c.add_argument("--chunk-filters", type=_count,
                   help=f"largest chunk in filters (default {config.get('convert.chunk-filters')})")
    c.add_argument("--dtype", choices=("float32", "float64"),
                   help="store dtype (default: the source's; float32 halves the store)")
    c.add_argument("--codec", choices=("lz4", "zstd", "none"),
                   help=f"store codec (default {config.get('convert.codec')})")
    c.add_argument("--filters-name", help="filter dataset name if not filter/filters")
    _add_storage_options(c)
    _add_execution_options(c)

    v = add("verify", "re-check a store's checksums (and every row against the source)",
            f"{PROG} verify dataset.zarr\n{PROG} verify dataset.zarr dataset.h5\n")
    v.add_argument("store")
    v.add_argument("source", nargs="?")
    _add_storage_options(v)
    _add_execution_options(v)

    i = add("info", "what a store holds: models, layers, filters, groups, chunks, size",
            f"{PROG} info dataset.zarr\n{PROG} info dataset.zarr --json\n")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    _add_storage_options(i)

    a = add("analyze", "run the whole analysis (3 passes) and write results + report",
            f"{PROG} analyze dataset.zarr --out results/\n"
            f"{PROG} analyze dataset.zarr --out r/ --by Task --by 'depth decile' --bins 70\n"
            f"{PROG} analyze dataset.zarr --out r/ --subset 'Visual Category=fractals'\n"
            f"{PROG} analyze dataset.zarr --out r/ --address tcp://127.0.0.1:8786\n"
            f"{PROG} analyze run.zarr --out r/ --by epoch --basis epoch1-results/\n")
    a.add_argument("store")
    a.add_argument("--out", required=True, help="results directory")
    a.add_argument("--by", action="append", metavar="COL",
                   help="grouping: meta column or 'depth decile' (repeatable; default "
                        + ", ".join(config.get("analysis.by")) + ")")
    a.add_argument("--bins", type=_positive_int,
                   help=f"histogram bins of the KL matrices (default "
                        f"{config.get('analysis.bins')})")
    a.add_argument("--fine-bins", type=_positive_int,
                   help=f"at least this many bins of the ridge-plot histograms (each of "
                        f"the --bins bins cut in equal parts; default "
                        f"{config.get('analysis.fine-bins')})")
    a.add_argument("--subset", action="append", metavar="COL=VALUE",
                   help="subset PCA (repeatable; default one per Visual Category)")
    a.add_argument("--engine", choices=("auto", "numba", "numpy"),
                   help=f"per-chunk kernels (default {config.get('analysis.engine')})")
    a.add_argument("--sparsity-eps", type=_eps_list, metavar="E1,E2,...",
                   help="sparsity thresholds swept in pass 1, e.g. 0.001,0.005,0.01,0.05,0.1 "
                        "(quality.csv gains sparsity@E and clean variance entropy per E; "
                        "default: the config's analysis.sparsity-eps, none)")
    a.add_argument("--entropy-cutoffs", type=_cutoff_list, metavar="H1,H2,...",
                   help="normalised-entropy cutoffs, e.g. 0.3,0.5,0.7: the report shows the "
                        "share of degenerated layers per depth decile at each, beside each "
                        "--sparsity-eps (no extra pass; default: the config's "
                        "analysis.entropy-cutoffs, none)")
    a.add_argument("--no-orthogonality", dest="orthogonality", action="store_false",
                   default=None,
                   help="skip the per-layer orthogonality of pass 1 (computed where ingest "
                        "recorded weight shapes; costs O(c_out²) per filter row; default: "
                        "the config's analysis.orthogonality, on)")
    a.add_argument("--pairs", metavar="CSV",
                   help="paired comparison: UTF-8 CSV, two columns of model names (model "
                        "or Name; optional header naming the sides, e.g. robust,normal); "
                        "writes pairs.csv: per pair and depth bin (first layer, then "
                        "deciles) the differences of sparsity, variance entropy and "
                        "orthogonality")
    a.add_argument("--correlate", metavar="COLUMN",
                   help="with --pairs: Spearman correlation per depth bin of each paired "
                        "model's metric with this numeric meta column (pairs_correlation.csv)")
    a.add_argument("--basis", metavar="REF",
                   help="an earlier result directory: project on its PCA, bin on its "
                        "coefficient range and bins, weight the KL by its explained "
                        "variance ratio, so numbers compare with REF's; no pass 2; "
                        "coefficients outside REF's range are counted (out_of_range.csv); "
                        "the store's own PCA goes to own_pca.json")
    a.add_argument("--drift-ref", metavar="LABEL",
                   help="reference group of the drift curves of groupings by a numeric "
                        "column (e.g. --by epoch --drift-ref 1; default: the first group)")
    a.add_argument("--no-report", action="store_true", help="skip the HTML report")
    _add_storage_options(a)
    _add_execution_options(a)

    r = add("report", "(re)build DIR/report.html and PNGs from an analysis directory",
            f"{PROG} report results/\n")
    r.add_argument("dir")
    r.add_argument("--drift-ref", metavar="LABEL",
                   help="reference group of the drift curves (default: the analysis's)")

    g = add("ingest", "add ONNX / PyTorch / safetensors / Keras models to a dataset.h5 or a store",
            f"{PROG} ingest a.onnx b.onnx --into my.h5 --task Classification "
            "--category natural\n"
            f"{PROG} ingest model.pth --into dataset.zarr --meta-file models.csv\n")
    g.add_argument("models", nargs="+",
                   help=".onnx, .pt/.pth state dicts, .safetensors (or a sharded index or "
                        "its folder), Keras .h5 / .weights.h5")
    g.add_argument("--into", required=True,
                   help="dataset .h5 (created, or one written by ingest) or a store directory")
    g.add_argument("--task", help="Task of every model (e.g. Classification)")
    g.add_argument("--category", help="Visual Category of every model (e.g. natural)")
    g.add_argument("--training-dataset", help="Training-Dataset of every model")
    g.add_argument("--pretraining-dataset", help="Pretraining-Dataset of every model")
    g.add_argument("--paper", help="Paper of every model")
    g.add_argument("--meta-file", help="CSV (column 'model' = file name) or YAML with "
                                       "per-model fields")
    g.add_argument("--meta", action="append", metavar="NAME=VALUE",
                   help="a meta column for every model given, e.g. epoch=5 (repeatable; "
                        "numbers are stored as numbers)")
    g.add_argument("--force", action="store_true", help="add models already in the DB")
    g.add_argument("--kernel", type=int, metavar="K", default=None,
                   help="take the KxK conv kernels (depthwise and grouped included) as "
                        "filters of K² values (default: 3; 5 and 7 are the usual others); "
                        "a DB holds one K")
    return p


# ----------------------------------------------------------------------- commands
def _verbosity(args) -> int:
    return 0 if args.quiet else (2 if args.verbose else 1)


def cmd_synth(args) -> int:
    from filterdb_dask.convert.synth import synthesize

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out!r} exists; pass --overwrite to replace it")
    if args.filters < args.models:
        raise UsageError(f"--filters ({args.filters:,}) must be at least --models "
                         f"({args.models:,}): every model needs one filter")
    rep = progress.Reporter("synth", verbosity=_verbosity(args), unit="filters")
    meta = synthesize(args.out, n_filters=args.filters, n_models=args.models, seed=args.seed,
                      layout=args.layout, name=args.name, meta_format=args.meta_format,
                      progress=rep.update, kernel=args.kernel)
    rep.finish()
    print(f"wrote {args.out}: {args.filters:,} filters, {args.models} models, "
          f"{len(meta):,} layers")
    return 0


def cmd_convert(args) -> int:
    from filterdb_dask.convert.write import convert

    with _execution(args) as ex:
        res = convert(args.source, args.target, chunk_filters=args.chunk_filters,
                      dtype=args.dtype, codec=args.codec, filters_name=args.filters_name,
                      execution=ex, storage_options=args.storage_options)
    note = f", {res.unreferenced:,} rows referenced by no meta row" if res.unreferenced else ""
    print(f"converted {args.source} -> {res.path}: {res.n_filters:,} filters in "
          f"{res.n_chunks} chunks ({res.written} written, {res.skipped} already done), "
          f"dtype {res.dtype}{note}")
    return 0


def cmd_verify(args) -> int:
    from filterdb_dask.convert.verify import verify

    with _execution(args) as ex:
        rep = verify(args.store, args.source, execution=ex,
                     storage_options=args.storage_options)
    if rep.ok:
        what = " and the source" if rep.checked_source else ""
        print(f"{args.store}: {rep.chunks} chunks OK (checksums{what})")
        return 0
    for p in rep.problems:
        print(f"{args.store}: {p}", file=sys.stderr)
    print(f"{args.store}: {len(rep.problems)} problem(s)", file=sys.stderr)
    return 1


def store_info(path: str, storage_options: dict | None = None) -> dict:
    """Summary of a store (directory or URL) for ``info``."""
    import numpy as np

    from .groups import default_by, make_grouping
    from .store import open_store

    st = open_store(path, storage_options)
    size = st.location.size()
    sizes = st.chunk_filters
    groups = {}
    for by in default_by():
        try:
            g = make_grouping(st.meta, by)
        except FilterDBError:
            continue
        groups[g.name] = len(g.labels)
    return {
        "store": path,
        "filters": st.n_filters,
        "models": int(st.meta["model_id"].nunique()),
        "layers": len(st.meta),
        "dtype": st.record.dtype,
        "kernel": st.kernel,
        "source": st.record.source,
        "chunks": st.n_chunks,
        "chunk_filters": {"min": int(sizes.min()), "median": int(np.median(sizes)),
                          "max": int(sizes.max())},
        "codec": st.record.codec,
        "size_bytes": size,
        "unreferenced_filters": st.record.unreferenced_filters,
        "groups": groups,
        "columns": [str(c) for c in st.meta.columns if c not in ("start", "stop", "chunk")],
    }


def cmd_info(args) -> int:
    info = store_info(args.store, args.storage_options)
    if args.json:
        print(json.dumps(info, indent=2, allow_nan=False))
        return 0
    src = info["source"]
    print(f"store      {info['store']}")
    print(f"filters    {info['filters']:,} {info['kernel']}x{info['kernel']} "
          f"({info['dtype']}; source {src['dtype']} "
          f"{tuple(src['shape'])} '{src['name']}')")
    print(f"models     {info['models']:,}")
    print(f"layers     {info['layers']:,}")
    cf = info["chunk_filters"]
    print(f"chunks     {info['chunks']} (filters per chunk: min {cf['min']:,}, median "
          f"{cf['median']:,}, max {cf['max']:,}); codec {info['codec']}")
    print(f"size       {info['size_bytes'] / 2**20:,.1f} MiB stored")
    if info["unreferenced_filters"]:
        print(f"unreferenced rows {info['unreferenced_filters']:,}")
    print("groups     " + ", ".join(f"{k}: {v}" for k, v in info["groups"].items()))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import analyze
    from .resultset import check_out_dir
    from .store import open_store

    store = open_store(args.store, args.storage_options)  # fail fast, before any cluster starts
    check_out_dir(args.out)  # and before the first pass, not after the last
    basis = None
    if args.basis is not None:
        from .basis import load_basis

        # read and checked before any cluster starts
        basis = load_basis(args.basis, store.filters.shape[1])
        for flag, given, own in (("--bins", args.bins, basis.bins),
                                 ("--fine-bins", args.fine_bins, basis.fine_bins)):
            if given is not None and given != own:
                raise UsageError(f"{flag} {given} with --basis: the bins are REF's "
                                 f"({flag} {own}); leave {flag} out")
    if args.drift_ref is not None:
        from .analysis import _check_drift_ref
        from .groups import default_by, make_groupings

        try:
            _check_drift_ref(make_groupings(store.meta, args.by or default_by()),
                             args.drift_ref)
        except FilterDBError as exc:
            raise UsageError(str(exc)) from exc
    subsets = None
    if args.subset:
        subsets = {}
        for spec in args.subset:
            if "=" not in spec:
                raise UsageError(f"--subset {spec!r} is not COL=VALUE")
            subsets[spec] = spec
    with _ignoring_sigint_at_start(_execution(args)) as ex:
        res = analyze(store, by=args.by, bins=args.bins,
                      subsets=subsets, fine_bins=args.fine_bins, engine=args.engine,
                      execution=ex, sparsity_eps=args.sparsity_eps,
                      orthogonality=args.orthogonality, pairs=args.pairs,
                      correlate=args.correlate, entropy_cutoffs=args.entropy_cutoffs,
                      basis=basis, drift_ref=args.drift_ref)
    res.settings.update({"scheduler": ex.description})
    paths = res.write(args.out, report=not args.no_report, verbosity=_verbosity(args))
    print(f"results: {os.path.abspath(args.out)}")
    if "report.html" in paths:
        print(f"report: {paths['report.html']}")
    return 0


_WORKER_LOG_ENV = "DASK_LOGGING__DISTRIBUTED"


@contextlib.contextmanager
def _ignoring_sigint_at_start(context):
    """Enter ``context`` (an execution) while SIGINT is ignored; yield what it yields.

    Ctrl-C reaches every process of the terminal's process group; local worker
    processes started while SIGINT is ignored inherit that (Python keeps an ignored
    SIGINT ignored), so only this process sees the KeyboardInterrupt and prints
    one line instead of a traceback per worker.
    """
    with contextlib.ExitStack() as stack:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        # worker processes log only what is fatal to them: a task's error reaches this
        # process and is printed as one line; a worker cut off mid-task is no news
        # (and multiprocessing's resource tracker, started with them, does not warn
        # about the semaphores of workers killed mid-task)
        quiet = {_WORKER_LOG_ENV: "critical", "PYTHONWARNINGS": ",".join(
            w for w in (os.environ.get("PYTHONWARNINGS"),
                        "ignore::UserWarning:multiprocessing.resource_tracker") if w)}
        saved = {k: os.environ.get(k) for k in quiet}
        os.environ.update(quiet)
        try:
            value = stack.enter_context(context)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        try:
            yield value
        except KeyboardInterrupt:
            # closing a cluster whose workers are mid-task logs a warning per worker
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
            raise


def cmd_report(args) -> int:
    from .report import write_report

    try:
        path = write_report(args.dir, verbosity=_verbosity(args), drift_ref=args.drift_ref)
    except FilterDBError as exc:
        if args.drift_ref is None or not str(exc).startswith("`drift_ref`"):
            raise
        raise UsageError(str(exc)) from exc
    print(f"report: {path}")
    return 0


def cmd_ingest(args) -> int:
    import warnings

    from filterdb_dask.convert.ingest import ingest, parse_meta_values

    fields = {k: v for k, v in {
        "Task": args.task, "Visual Category": args.category,
        "Training-Dataset": args.training_dataset,
        "Pretraining-Dataset": args.pretraining_dataset, "Paper": args.paper,
    }.items() if v is not None}
    fields.update(parse_meta_values(args.meta))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ingest(args.models, args.into, fields=fields, meta_file=args.meta_file,
                     force=args.force, kernel=args.kernel)
    for w in caught:
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    print(f"added {len(res.models)} model(s), {res.layers:,} layers, {res.filters:,} filters "
          f"to {res.into}" + (f"; skipped {len(res.skipped)}" if res.skipped else ""))
    return 0


def cmd_demo(args) -> int:
    """No arguments: synth (cached) -> convert (cached) -> analyze -> report."""
    from filterdb_dask.convert.synth import synthesize
    from filterdb_dask.convert.write import convert

    from .analysis import analyze
    from .cluster import execution
    from .storeformat import SCHEMA_VERSION

    verb = _verbosity(args)
    cache = default_cache_dir()
    demo = os.path.join(cache, "demo")
    os.makedirs(demo, exist_ok=True)
    h5 = os.path.join(demo, "dataset.h5")
    store = os.path.join(demo, f"dataset-v{SCHEMA_VERSION}.zarr")  # a new format: new cache
    out = os.path.join(demo, "results")
    print(f"filterdb-dask demo: working in {demo}", flush=True)
    if not os.path.exists(h5):
        rep = progress.Reporter("synth", verbosity=verb, unit="filters")
        synthesize(h5, n_filters=DEMO_FILTERS, n_models=DEMO_MODELS, seed=0,
                   progress=rep.update)
        rep.finish()
    with _ignoring_sigint_at_start(execution(command="analyze", verbosity=verb)) as ex:
        convert(h5, store, execution=ex)
        res = analyze(store, execution=ex)
    res.settings.update({"scheduler": ex.description})
    paths = res.write(out, report=True, verbosity=verb)
    print(f"results: {out}")
    print(f"report: {paths['report.html']}")
    return 0


COMMANDS = {
    "synth": cmd_synth, "convert": cmd_convert, "verify": cmd_verify, "info": cmd_info,
    "analyze": cmd_analyze, "report": cmd_report, "ingest": cmd_ingest, None: cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or usage error (2)
        return int(exc.code or 0)
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    flags = _flag_names(parser, args.command)
    try:
        if hasattr(args, "mpi"):  # contradicting execution options: before any I/O
            from .cluster import validate

            validate(_execution_options(args))
        if getattr(args, "dry_run", False):
            return _dry_run(args)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"{PROG}: usage error: {_cli_terms(_one_line(exc), flags)}", file=sys.stderr)
        return 2
    except (FilterDBError, OSError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {_cli_terms(_one_line(exc), flags)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        if args.debug:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _flag_names(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """API parameter name -> the command line's flag for it (``dry_run`` -> ``--dry-run``),
    from the parser itself, the chosen command's own options taking precedence."""
    names: dict[str, str] = {}

    def collect(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and action.dest != argparse.SUPPRESS:
                names[action.dest] = longs[0]

    collect(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            collect(action.choices[command])
    return names


def _cli_terms(message: str, flags: dict[str, str]) -> str:
    """Library messages name API parameters in backticks (`` `dry_run` ``); on the
    command line they read as the flags that set them (``--dry-run``)."""
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`",
                  lambda m: flags.get(m.group(1), m.group(0)), message)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
