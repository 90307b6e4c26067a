"""`blackbox-zo experiment wake-flow`: SRC / NON / FO-SOL / ZO-SOL end to end (DeepZero Fig. 6).

The generic solver-in-the-loop experiment (`problems.sol.experiment`) on the wake-flow preset
(`WakeFlowProblem`): the settings are the wake-flow problem's (`wake.*`), `--paper-scale`
applies DeepZero Appx. H's settings, `--quick` a smoke run on tiny grids, `--seeds 0,1,2`
repeats the trained methods per seed. FO-SOL and ZO-SOL share the config, the initial
corrector, the batches, the optimizer and the number of steps: only where the gradient comes
from differs. Those run on DeepZero's settings (`problems.wake_flow.problem.ZO_SOL`), not on
the problem's default method; `--methods ...,NON+ES` adds the default run (NON, then ES).

Writes to `runs/wake-flow-experiment/<timestamp>/` (or `--out`): results.md / results.csv,
mae_bars.png, mae_over_time.png, vorticity.png (one test run: reference, SRC, NON, FO-SOL,
ZO-SOL), summary.json, and the trainer's run directories `seed<S>/fo-sol/`, `seed<S>/zo-sol/`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from problems.sol import experiment as sol_experiment

from .problem import QUICK, WakeFlowProblem

__all__ = ["main", "QUICK"]


def main(argv: Sequence[str] | None = None) -> int:
    """SRC / NON / FO-SOL / ZO-SOL on the wake flow: test MAE table and plots (DeepZero Fig. 6)."""
    return sol_experiment.main(argv, problem=WakeFlowProblem())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
