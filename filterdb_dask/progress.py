"""Progress reporting only: a bar in a terminal, log lines otherwise.

:class:`Reporter` draws ``done / total`` for one labelled step on stderr;
:func:`counting` feeds it from dask's local schedulers (a callback counting
finished tasks) and :func:`follow` from a distributed client's futures. What is
computed where is decided by :mod:`filterdb_dask.cluster`, never here.
``verbosity`` 0 is quiet.
"""

from __future__ import annotations

import sys
import time

from dask.callbacks import Callback


class Reporter:
    """Draws ``done / total`` for one labelled step on stderr."""

    def __init__(
        self, label: str, *, verbosity: int | None = None, stream=None, unit: str = "tasks"
    ):
        self.label = label
        self.unit = unit
        self.verbosity = 1 if verbosity is None else verbosity
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


def counting(reporter: Reporter) -> Callback:
    """A dask callback (use as a context manager) that reports finished tasks."""
    return _CountingCallback(reporter)


def follow(futures, reporter: Reporter) -> None:
    """Report the scheduler's progress on ``futures`` (returns at once; no-op if quiet)."""
    if reporter.verbosity <= 0 or not futures:
        return
    from distributed.diagnostics.progressbar import TextProgressBar

    class _Bar(TextProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):
            reporter.update(all - remaining, all)

        def _draw_stop(self, **kwargs):
            pass

    # the futures' own client gives the bar its address and credentials (TLS)
    _Bar(futures, scheduler=futures[0].client.scheduler.address, interval="200ms")
