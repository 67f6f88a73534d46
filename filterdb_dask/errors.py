"""Exception types shared by the reader, the converter, the analysis and the CLI.

Every domain error also subclasses a builtin, so callers can catch either
(``except StoreError`` or ``except ValueError``). The CLI maps :class:`UsageError`
to exit code 2 and every other :class:`FilterDBError` to exit code 1. Errors
raised because of another exception chain it (``raise ... from exc``), so
``--debug`` shows the cause.
"""

from __future__ import annotations


class FilterDBError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(FilterDBError, ValueError):
    """Options that contradict each other or cannot apply (exit code 2 in the CLI)."""


class InputError(FilterDBError, ValueError):
    """The input ``dataset.h5`` (or a model file) is not what it must be."""


class UnsafePickleError(InputError):
    """A pickle stored in the input asks for something other than plain data."""


class StoreError(FilterDBError, ValueError):
    """A Zarr store is missing, incomplete, foreign or corrupt."""


class StoreBusyError(StoreError):
    """Another converter holds the lock on the target store."""


class AnalysisError(FilterDBError, ValueError):
    """An analysis option does not fit the data (unknown column, bad bins, ...)."""


class ClusterError(FilterDBError, RuntimeError):
    """A Dask cluster could not be created or reached."""
