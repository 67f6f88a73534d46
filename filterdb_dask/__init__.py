"""filterdb_dask: the CNN Filter DB analysis, out of core, in parallel, exactly.

The method (what every number and figure is) is described in ``docs/method.md`` of the
repository. Entry points:

* :func:`open_store` (``filterdb_dask.store``) opens a converted Zarr store;
* :func:`analyze` (``filterdb_dask.analysis``) runs the three passes and returns
  :class:`Results`;
* :func:`write_report` (``filterdb_dask.report``) renders a written result set.

They are imported on first use (importing Dask takes seconds), and are the real
functions: ``help(filterdb_dask.analyze)`` shows their signatures and docstrings.
"""

from __future__ import annotations

import importlib
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

#: public name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "analyze": "analysis",
    "Results": "analysis",
    "open_store": "store",
    "FilterStore": "store",
    "PCA": "pca",
    "write_report": "report",
}

__all__ = [
    "AnalysisError",
    "ClusterError",
    "FilterDBError",
    "FilterStore",
    "InputError",
    "PCA",
    "Results",
    "StoreBusyError",
    "StoreError",
    "UnsafePickleError",
    "UsageError",
    "analyze",
    "open_store",
    "write_report",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
