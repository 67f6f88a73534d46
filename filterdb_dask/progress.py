"""Compute dask collections with progress: a bar in a terminal, log lines otherwise.

One entry point, :func:`compute`, works with every scheduler: on a distributed
client it follows the scheduler's task states, on the local schedulers it counts
finished tasks with a dask callback. ``verbosity`` 0 is quiet.
"""

from __future__ import annotations

import sys
import time

import dask
from dask.callbacks import Callback

#: module-wide default, set by the CLI's -q/-v
VERBOSITY = 1


class Reporter:
    """Draws ``done / total`` for one labelled step on stderr."""

    def __init__(
        self, label: str, *, verbosity: int | None = None, stream=None, unit: str = "tasks"
    ):
        self.label = label
        self.unit = unit
        self.verbosity = VERBOSITY if verbosity is None else verbosity
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last_decile = -1
        self._last_draw = 0.0

    def update(self, done: int, total: int) -> None:
        if self.verbosity <= 0 or total <= 0:
            return
        frac = min(done / total, 1.0)
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw < 0.1 and done < total:
                return
            self._last_draw = now
            bar = "#" * int(30 * frac)
            self.stream.write(
                f"\r{self.label:<28} [{bar:<30}] {100 * frac:5.1f}% {now - self.t0:7.1f}s"
            )
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(
                    f"{self.label}: {100 * frac:.0f}% ({done:,}/{total:,} {self.unit}, "
                    f"{now - self.t0:.1f}s)\n"
                )
                self.stream.flush()

    def finish(self) -> None:
        if self.verbosity <= 0:
            return
        if self.tty:
            self.stream.write(f"\r{self.label:<28} done in {time.monotonic() - self.t0:.1f}s"
                              + " " * 40 + "\n")
            self.stream.flush()


class _CountingCallback(Callback):
    def __init__(self, reporter: Reporter):
        super().__init__()
        self.reporter = reporter
        self.total = 0
        self.done = 0

    def _start_state(self, dsk, state):
        self.total = sum(len(state[k]) for k in ("ready", "waiting", "running")) + len(
            state.get("finished", ())
        )

    def _posttask(self, key, result, dsk, state, worker_id):
        self.done += 1
        self.reporter.update(self.done, max(self.total, self.done))


def _current_client():
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute(
    *collections, label: str = "computing", verbosity: int | None = None, io_bound: bool = False
):
    """``dask.compute(*collections)`` with progress on stderr.

    ``io_bound=True`` runs twice as many threads as cores on the local threaded
    scheduler, so reads overlap with compression (no effect on other schedulers).
    Returns a tuple of results, like ``dask.compute``.
    """
    rep = Reporter(label, verbosity=verbosity)
    client = _current_client()
    scheduler = dask.config.get("scheduler", None)
    if client is not None and scheduler in (None, "dask.distributed", "distributed"):
        from distributed.diagnostics.progressbar import TextProgressBar

        class _Bar(TextProgressBar):
            def _draw_bar(self, remaining, all, **kwargs):
                rep.update(all - remaining, all)

            def _draw_stop(self, **kwargs):
                pass

        futures = client.compute(list(collections))
        if rep.verbosity > 0:
            _Bar(futures, scheduler=client.scheduler.address, interval="200ms")
        results = client.gather(futures)
        rep.finish()
        return tuple(results)
    kwargs = {}
    if io_bound and scheduler in (None, "threads", "threading") and \
            dask.config.get("num_workers", None) is None:
        import os

        kwargs["num_workers"] = 2 * (os.cpu_count() or 1)
    with _CountingCallback(rep):
        results = dask.compute(*collections, **kwargs)
    rep.finish()
    return results
