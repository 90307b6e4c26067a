"""SIGINT / SIGTERM: stop at a step boundary, or at once, and say so in one line.

Two modes, installed as context managers (main thread only; elsewhere they do nothing):

* :func:`raise_on_signals` (the CLI, for every command): SIGINT and SIGTERM raise
  :class:`Interrupted` where the program is, like Ctrl-C normally does, for SIGTERM too.
  Setup (data generation, pruning), evaluation and experiments stop this way; the CLI
  turns it into one line and exit code 128 + signal number (130, 143).
* :class:`GracefulStop` (the trainer's loop): the handler only records the signal. The
  trainer checks :meth:`GracefulStop.requested` before each step, so the step in flight
  finishes, a checkpoint is written and the run ends with ``summary.json`` saying
  ``stopped: interrupted``. A second signal more than a second after the first stops at
  once (single process only): the last checkpoint is kept, the step in flight is lost.
  Under torchrun the launcher forwards a Ctrl-C to every worker and then sends its own
  signal, so repeats are ignored there; the launcher's own timeout ends a stuck worker.

Under torchrun every rank must stop before the same step, or one rank would wait forever
in a collective the others never join: :func:`agreed_signal` all-reduces the signal
number (max) over ranks once per step, so a signal seen by one rank stops all of them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

from . import parallel

__all__ = ["Interrupted", "GracefulStop", "raise_on_signals", "agreed_signal", "exit_code", "signal_name",
           "HANDLED_SIGNALS"]

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_GRACE_S = 1.0  # a repeat closer than this to the first signal is the same request


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by SIGINT or SIGTERM.

    A KeyboardInterrupt, so `except Exception` in user code does not swallow it. The
    trainer fills in where it stopped: `step` (the last step taken, numbered as in
    metrics.jsonl), `checkpoint_step` (the step the kept checkpoint holds), `run_dir`,
    `summary`, and `at_once` (True when a second signal cut the step in flight short).
    """

    def __init__(self, signum: int = signal.SIGINT, *, step: int | None = None, checkpoint_step: int | None = None,
                 run_dir=None, summary: dict | None = None, at_once: bool = False, during: str | None = None):
        self.signum, self.step, self.checkpoint_step = int(signum), step, checkpoint_step
        self.run_dir, self.summary, self.at_once, self.during = run_dir, summary, at_once, during
        super().__init__(self.describe())

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)

    def describe(self) -> str:
        where = ""
        if self.during:
            where = f" during {self.during}"
        elif self.step is not None:
            where = f" during step {self.step + 1}" if self.at_once else f" after step {self.step}"
        kept = ""
        if self.run_dir is not None and self.checkpoint_step is not None:
            kept = f"; checkpoint of step {self.checkpoint_step} in {self.run_dir}"
        return f"interrupted by {signal_name(self.signum)}{where}{kept}"


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    for s in HANDLED_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted at once (restored on exit)."""

    def handler(signum, frame):
        raise Interrupted(signum)

    with _handlers(handler):
        yield


class GracefulStop:
    """Records SIGINT / SIGTERM for the trainer to act on at the next step boundary."""

    def __init__(self, repeat_stops_at_once: bool = True):
        self.signum = 0
        self.first_at = 0.0
        self.repeat_stops_at_once = repeat_stops_at_once
        self._cm = None

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum, self.first_at = int(signum), time.monotonic()
            return
        if self.repeat_stops_at_once and time.monotonic() - self.first_at > REPEAT_GRACE_S:
            raise Interrupted(self.signum, at_once=True)

    @property
    def requested(self) -> int:
        """The signal number if a stop was requested (in this process), else 0."""
        return self.signum

    def __enter__(self) -> "GracefulStop":
        self._cm = _handlers(self._handle)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


def agreed_signal(local: int) -> int:
    """The largest signal number any rank has seen (one all-reduce under torchrun; else `local`)."""
    return parallel.agree_max(local, "all-reduce of the stop request")
