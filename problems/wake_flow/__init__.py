"""Solver-in-the-loop on the PhiFlow 3 wake flow (DeepZero Sec. 6.2, Appx. H, Fig. 6).

`WakeFlowProblem` (`blackbox-zo train wake-flow`): ZO-SOL, the corrector trained through
the simulator by loss values only. `experiment.main` (`blackbox-zo experiment wake-flow`):
SRC / NON / FO-SOL / ZO-SOL end to end with the MAE table and plots. Importing this
package does not import PhiFlow (it is loaded when a simulation first runs).
"""

from .problem import PAPER_SCALE, WakeFlowConfig, WakeFlowProblem, WakeSettings

__all__ = ["WakeFlowProblem", "WakeFlowConfig", "WakeSettings", "PAPER_SCALE"]
