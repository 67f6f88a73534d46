"""Choose between the compiled (numba) and the plain numpy per-chunk kernels.

'auto' is resolved once, where the analysis is planned (:func:`resolve_engine`),
and the concrete name travels with the tasks: every worker runs that engine or
fails saying so, so the engine a result set records is the one that ran.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from . import kernels
from .errors import AnalysisError

ENGINES = ("auto", "numba", "numpy")


@functools.cache
def _compiled():
    try:
        from . import _compiled
    except ImportError:
        return None
    return _compiled


def numba_available() -> bool:
    """Whether the compiled kernels can be used here."""
    return _compiled() is not None


def resolve_engine(engine: str = "auto") -> str:
    """The concrete engine ('numba' or 'numpy') that ``engine`` means here.

    Raises
    ------
    AnalysisError
        As :func:`get_kernels`.
    """
    return get_kernels(engine).name


def get_kernels(engine: str = "auto") -> SimpleNamespace:
    """The hot kernels for ``engine`` ('auto' = numba when installed).

    Raises
    ------
    AnalysisError
        For an unknown engine, or 'numba' when numba is not installed.
    """
    if engine not in ENGINES:
        raise AnalysisError(f"engine {engine!r} is not one of {ENGINES}")
    mod = _compiled()
    if engine == "numba" and mod is None:
        raise AnalysisError(
            "engine 'numba' needs numba: pip install 'filterdb-dask[fast]'"
        )
    if engine == "numpy" or mod is None:
        mod = kernels
    return SimpleNamespace(
        name="numpy" if mod is kernels else "numba",
        layer_stats_chunk=mod.layer_stats_chunk,
        range_density_chunk=mod.range_density_chunk,
        histogram_chunk=mod.histogram_chunk,
        sparsity_sweep_chunk=mod.sparsity_sweep_chunk,
        orthogonality_chunk=mod.orthogonality_chunk,
    )
