"""Timing of an experiment's phases, shared by the solver-in-the-loop studies."""

from __future__ import annotations

import resource
import time


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class PhaseClock:
    """Wall and process-CPU seconds of a phase (CPU time is what a quiet machine would take)."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = cpu_seconds() - self.cpu0
