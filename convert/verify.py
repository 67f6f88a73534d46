"""Re-check a store: every chunk as ``analyze`` reads it (metadata, stored chunks,
CRC-32C) plus the CRC-32 of its values, the meta table, and optionally every row
against the source. The checks themselves belong to :mod:`filterdb_dask.storeformat`;
this module plans them as tasks and compares with the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask
import numpy as np

from filterdb_dask import cluster
from filterdb_dask import storeformat as fmt
from filterdb_dask.errors import StoreError

from .read import read_rows, read_source


@dataclass
class VerifyReport:
    path: str
    chunks: int
    checked_source: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_chunk(store_path, i, a, b, dtype, codec, marks, crc32, src_path, src_name,
                 width=9):
    problems, y = fmt.check_chunk(store_path, i, a, b, dtype, codec, marks, crc32, width)
    if src_path is not None and y is not None:
        x = np.ascontiguousarray(read_rows(src_path, src_name, a, b), dtype=dtype)
        bad = np.nonzero(~np.all(x.reshape(len(x), width) == y, axis=1))[0]
        if len(bad):
            rows = ", ".join(str(a + r) for r in bad[:5])
            problems.append(
                f"chunk {i}: {len(bad)} rows differ from the source (first rows: {rows})"
            )
    return problems


def verify(store: str, source: str | None = None, *, verbosity: int | None = None,
           execution: cluster.Execution | None = None,
           storage_options: dict | None = None) -> VerifyReport:
    """Check every chunk and the meta table, and every row against ``source`` when given.

    ``execution`` says where to compute (:func:`filterdb_dask.cluster.execution`;
    default: dask's current scheduler, progress per ``verbosity``).
    ``storage_options``: fsspec options for a URL ``store``.

    Raises
    ------
    StoreError
        Not a filterdb store, or incomplete.
    """
    loc = fmt.location(store, storage_options)
    store = loc.url
    rec = fmt.read_record(loc)
    if not rec.complete:
        raise StoreError(f"store {store!r} is incomplete; run its convert command again")
    report = VerifyReport(store, len(rec.chunks), source is not None)
    try:
        fmt.read_meta(loc, rec)
    except StoreError as exc:
        report.problems.append(str(exc))
    src_path = src_name = None
    if source is not None:
        src = read_source(source, name=rec.source["name"])
        src_path, src_name = src.path, src.name
        if src.kernel != rec.kernel:
            report.problems.append(
                f"source holds {src.kernel}x{src.kernel} filters, the store "
                f"{rec.kernel}x{rec.kernel}")
            return report
        if src.n_filters != rec.n_filters:
            report.problems.append(
                f"source holds {src.n_filters} filters, the store {rec.n_filters}"
            )
            return report
    tasks = [
        dask.delayed(_check_chunk, pure=True)(
            loc, i, int(a), int(b), rec.dtype, rec.codec, rec.chunk_marks(i),
            int(rec.checksums[i]), src_path, src_name, rec.width,
        )
        for i, (a, b) in enumerate(rec.chunks)
    ]
    (results,) = cluster.ensure(execution, verbosity).compute(tasks, label="verify")
    for probs in results:
        report.problems.extend(probs)
    return report
