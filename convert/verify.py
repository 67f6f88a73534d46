"""Re-check a store: per-chunk checksums, and optionally every row against the source."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import dask
import numpy as np

from filterdb_dask import cluster
from filterdb_dask.errors import StoreError
from filterdb_dask.store import chunk_name, read_attrs

from .read import read_rows, read_source
from .write import checksum


@dataclass
class VerifyReport:
    path: str
    chunks: int
    checked_source: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_chunk(store_path, i, a, b, expected, src_path, src_name, dtype):
    import zarr

    try:
        arr = zarr.open_array(store_path, path=chunk_name(i), mode="r")
        y = arr[...]
    except Exception as exc:
        return [f"chunk {i} (rows {a}:{b}) cannot be read: {type(exc).__name__}: {exc}"]
    problems = []
    if y.shape != (b - a, 9):
        return [f"chunk {i} (rows {a}:{b}) has shape {y.shape}, expected {(b - a, 9)}"]
    crc = checksum(y)
    if crc != expected:
        problems.append(
            f"chunk {i} (rows {a}:{b}) checksum {crc:08x} != recorded {expected:08x}"
        )
    if src_path is not None:
        x = np.ascontiguousarray(read_rows(src_path, src_name, a, b), dtype=dtype)
        bad = np.nonzero(~np.all(x == y, axis=1))[0]
        if len(bad):
            rows = ", ".join(str(a + r) for r in bad[:5])
            problems.append(
                f"chunk {i}: {len(bad)} rows differ from the source (first rows: {rows})"
            )
    return problems


def verify(store: str, source: str | None = None, *, verbosity: int | None = None,
           execution: cluster.Execution | None = None) -> VerifyReport:
    """Check every chunk's checksum, and every row against ``source`` when given.

    ``execution`` says where to compute (:func:`filterdb_dask.cluster.execution`;
    default: dask's current scheduler, progress per ``verbosity``).

    Raises
    ------
    StoreError
        Not a filterdb store, or incomplete.
    """
    store = os.fspath(store)
    attrs = read_attrs(store)
    if not attrs.get("complete"):
        raise StoreError(f"store {store!r} is incomplete; run its convert command again")
    plan = np.asarray(attrs["chunks"], dtype=np.int64).reshape(-1, 2)
    sums = attrs.get("checksums") or []
    report = VerifyReport(store, len(plan), source is not None)
    src_path = src_name = None
    if source is not None:
        src = read_source(source, name=attrs["source"]["name"])
        src_path, src_name = src.path, src.name
        if src.n_filters != attrs["n_filters"]:
            report.problems.append(
                f"source holds {src.n_filters} filters, the store {attrs['n_filters']}"
            )
            return report
    tasks = [
        dask.delayed(_check_chunk, pure=True)(
            store, i, int(a), int(b), int(sums[i]), src_path, src_name, attrs["dtype"]
        )
        for i, (a, b) in enumerate(plan)
    ]
    (results,) = cluster.ensure(execution, verbosity).compute(tasks, label="verify")
    for probs in results:
        report.problems.extend(probs)
    return report
