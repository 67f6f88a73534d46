"""Run the CLI on a hostile input the way a user would, with a memory ceiling.

``run_bounded`` starts ``python -m filterdb_dask.run ARGS`` in a subprocess whose
address space is limited (``RLIMIT_AS``, 1 GiB by default): an input that makes the
program allocate more dies of ``MemoryError`` / exit 1 "internal error" instead of
swapping the machine, and the test sees it. ``assert_refused`` checks what every
refused input must give: exit 1 (no signal death), one line on stderr naming the
problem, no traceback, and none of the given output paths left behind.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

AS_LIMIT = 1 << 30


def _limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_bounded(args: list[str], *, limit: int = AS_LIMIT, timeout: float = 120):
    """(returncode, stdout, stderr) of the CLI run under an address-space limit."""
    env = dict(os.environ)
    # numba's and BLAS's thread pools reserve address space per thread
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "filterdb_dask.run", *args],
                       preexec_fn=_limit(limit), capture_output=True, text=True,
                       timeout=timeout, env=env)
    return r.returncode, r.stdout, r.stderr


def assert_refused(args: list[str], match: str, *, outputs=(), limit: int = AS_LIMIT) -> str:
    """Run; assert the one-line refusal (``match`` a substring of it); return the line."""
    import re

    rc, out, err = run_bounded(args, limit=limit)
    lines = err.strip().splitlines()
    assert rc == 1, f"exit {rc} (want 1); stderr: {err[-2000:]}"
    assert len(lines) == 1, f"want one line on stderr, got: {err[-2000:]}"
    line = lines[0]
    assert line.startswith("filterdb-dask: error: "), line
    assert "internal error" not in line and "MemoryError" not in line, line
    assert re.search(match, line), f"{match!r} not in {line!r}"
    for p in outputs:
        assert not os.path.exists(p), f"{p} was left behind"
    return line
