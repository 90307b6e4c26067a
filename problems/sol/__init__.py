"""Solver-in-the-loop for any registered simulator (DeepZero Sec. 6.2, Appx. H, eq. (A3)).

`SolProblem` (`blackbox-zo train sol --set sol.simulator=NAME`): a corrector trained through
the simulator by loss values only. `experiment.main` (`blackbox-zo experiment sol`): SRC /
NON / ZO-SOL (and FO-SOL for a differentiable simulator), over one or more seeds. The data
format, the corrector and the methods are generic; the wake flow (`problems.wake_flow`)
reuses them. Importing this package imports no simulator.
"""

from .problem import SolConfig, SolProblem, SolSettings

__all__ = ["SolProblem", "SolConfig", "SolSettings"]
