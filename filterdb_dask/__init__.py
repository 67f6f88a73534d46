"""filterdb_dask: the CNN Filter DB analysis, out of core, in parallel, exactly."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import config  # noqa: F401  (merges the package defaults into Dask's config)
from .errors import (
    AnalysisError,
    ClusterError,
    FilterDBError,
    InputError,
    StoreBusyError,
    StoreError,
    UnsafePickleError,
    UsageError,
)

try:
    __version__ = _version("filterdb-dask")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AnalysisError",
    "ClusterError",
    "FilterDBError",
    "InputError",
    "StoreBusyError",
    "StoreError",
    "UnsafePickleError",
    "UsageError",
    "analyze",
    "open_store",
    "__version__",
]


def open_store(path):
    """Open a converted store; see :func:`filterdb_dask.store.open_store`."""
    from .store import open_store as _open

    return _open(path)


def analyze(store, **kwargs):
    """Run the whole analysis; see :func:`filterdb_dask.analysis.analyze`."""
    from .analysis import analyze as _analyze

    return _analyze(store, **kwargs)
