"""filterdb_dask: the CNN Filter DB analysis, out of core, in parallel, exactly."""

from __future__ import annotations

from .errors import (
    AnalysisError,
    ClusterError,
    FilterDBError,
    InputError,
    StoreBusyError,
    StoreError,
    UnsafePickleError,
)

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "ClusterError",
    "FilterDBError",
    "InputError",
    "StoreBusyError",
    "StoreError",
    "UnsafePickleError",
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
