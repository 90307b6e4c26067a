"""An oracle and an experiment that fail on purpose, for tests/test_faults.py.

Importing this module registers `fault-bowl-v1` (trained directly through OracleProblem,
options via `--set oracle.options.KEY=VALUE`) and the experiment `fault-sleep`. Run as a
script it is the CLI with them registered: `python tests/fault_oracles.py train ...`, which
is how the fault suite starts the runs it sends signals to.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from blackbox_zo.oracle import Oracle, ParamSpace, TransientOracleError, register_oracle
from blackbox_zo.problem import register_experiment

NAME = "fault-bowl-v1"


class FaultBowl(Oracle):
    """0.5 |theta - 1.5|^2 in `dim` dimensions, with faults switched on by options.

    * nan_after=N: every call from the N-th on returns NaN; nan_at=N: the N-th call only
    * nan_in_eval: evaluation queries (ledger phase "eval") return NaN
    * transient=K, transient_from=N: calls N, N+1, ... fail K times in all with TransientOracleError
    * permanent_at=N: call N and later raise ValueError (a crash that retrying cannot fix)
    * quantum=Q: the loss is rounded to multiples of Q (piecewise constant)
    * noise=S: fresh Gaussian noise on every call (breaks the determinism contract)
    * sleep_s: seconds per call; setup_sleep_s: seconds in the constructor (the problem's setup)
    """

    name = NAME

    def __init__(self, dim: int = 4, nan_after: int | None = None, nan_at: int | None = None,
                 nan_in_eval: bool = False, transient: int = 0,
                 transient_from: int = 1, permanent_at: int | None = None, quantum: float | None = None,
                 noise: float = 0.0, sleep_s: float = 0.0, setup_sleep_s: float = 0.0):
        self.space = ParamSpace([("x", (int(dim),))])
        self.nan_after, self.nan_at, self.nan_in_eval = nan_after, nan_at, nan_in_eval
        self.transient, self.transient_from, self.failures = int(transient), int(transient_from), 0
        self.permanent_at, self.quantum, self.noise, self.sleep_s = permanent_at, quantum, noise, sleep_s
        self.calls = 0
        if setup_sleep_s:  # the marker tells a test that setup is under way
            Path("setup.started").touch()
            time.sleep(setup_sleep_s)

    def losses(self, thetas, batch):
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.permanent_at is not None and self.calls >= self.permanent_at:
            raise ValueError("the simulator crashed (a permanent error)")
        if self.calls >= self.transient_from and self.failures < self.transient:
            self.failures += 1
            raise TransientOracleError("connection reset by peer (simulated)")
        loss = 0.5 * ((thetas - 1.5) ** 2).sum(1)
        if self.quantum:
            loss = torch.round(loss / self.quantum) * self.quantum
        if self.noise:
            loss = loss + self.noise * torch.randn(thetas.shape[0])
        if (self.nan_after is not None and self.calls >= self.nan_after) or self.calls == self.nan_at or \
                (self.nan_in_eval and self.ledger.phase_name == "eval"):
            loss = loss * float("nan")
        return loss

    def example_batch(self):
        return None


register_oracle(NAME)(FaultBowl)


@register_experiment("fault-sleep")
def sleep_experiment(argv):
    """Sleeps (argv[0] seconds, default 60): something to interrupt (the marker says it began)."""
    Path("experiment.started").touch()
    time.sleep(float(argv[0]) if argv else 60.0)
    return 0


if __name__ == "__main__":
    from blackbox_zo.cli import main

    sys.exit(main(sys.argv[1:]))
