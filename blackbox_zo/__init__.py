"""blackbox_zo: zeroth-order training of deep models through loss-value-only oracles.

The public API, importable from here::

    from blackbox_zo import Oracle, ParamSpace, check_oracle, CGE, RGE, train

Names are loaded when first used (PEP 562), so `import blackbox_zo` and `blackbox-zo --help`
do not import torch; `from blackbox_zo import CGE` imports the modules CGE needs.
Everything not listed in `__all__` is internal: a name starting with `_`, a private module
(`blackbox_zo._commands`), or a module's own helpers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the oracle contract
    "Oracle": "oracle",
    "ParamSpace": "oracle",
    "Block": "oracle",
    "QueryLedger": "oracle",
    "check_oracle": "oracle",
    "CheckReport": "oracle",
    "OracleError": "oracle",
    "TransientOracleError": "oracle",
    "NonFiniteLossError": "oracle",
    "QueryBudgetExceeded": "oracle",
    "register_oracle": "oracle",
    "make_oracle": "oracle",
    "available_oracles": "oracle",
    # query plans and their executor
    "QueryPlan": "plan",
    "PlanLosses": "plan",
    "SeededDirections": "plan",
    "ExplicitDirections": "plan",
    "execute": "plan",
    # estimators
    "Estimate": "estimators",
    "PlanEstimator": "estimators",
    "CGE": "estimators",
    "RGE": "estimators",
    "LinearInterpolation": "estimators",
    "SubspaceCGE": "subspace",
    "register_estimator": "estimators",
    "available_estimators": "estimators",
    "make_estimator": "estimators",
    # evolution strategies: ES and Guided ES are estimators; sep-CMA-ES and CMA-ES are searches
    "ES": "evolution",
    "GuidedES": "evolution",
    "SepCMAES": "evolution",
    "CMAES": "evolution",
    "Search": "evolution",
    "SearchStep": "evolution",
    # ask / tell: a run driven from outside Python
    "AskTellRun": "asktell",
    "AskTellError": "asktell",
    "RunComplete": "asktell",
    "ExternalProblem": "asktell",
    # problems, training
    "Problem": "problem",
    "TrainingSetup": "problem",
    "TensorBatches": "problem",
    "BatchSource": "problem",
    "OracleProblem": "problem",
    "ProblemSetupError": "problem",
    "register_problem": "problem",
    "register_experiment": "problem",
    "get_problem": "problem",
    "available_problems": "problem",
    "available_experiments": "problem",
    "train": "trainer",
    "Trainer": "trainer",
    "TrainingError": "trainer",
    "RunWarning": "trainer",
    "ZeroSignalWarning": "trainer",
    "MetricsLogger": "metrics",
    "JsonlLogger": "metrics",
    "Interrupted": "interrupts",
    # settings
    "TrainConfig": "config",
    "Strict": "config",
    "EstimatorConfig": "config",
    "ConfigError": "config",
    "resolve_config": "config",
    # registries
    "Registry": "registry",
    "UnknownNameError": "registry",
    "DuplicateNameError": "registry",
    "ORACLES": "registry",
    "PROBLEMS": "registry",
    "EXPERIMENTS": "registry",
    "ESTIMATORS": "registry",
    "SIMULATORS": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'blackbox_zo' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what a type checker and an IDE see: the same names, imported eagerly
    from .asktell import AskTellError, AskTellRun, ExternalProblem, RunComplete
    from .config import ConfigError, EstimatorConfig, Strict, TrainConfig, resolve_config
    from .estimators import (CGE, RGE, Estimate, LinearInterpolation, PlanEstimator, available_estimators,
                             make_estimator, register_estimator)
    from .evolution import CMAES, ES, GuidedES, Search, SearchStep, SepCMAES
    from .interrupts import Interrupted
    from .metrics import JsonlLogger, MetricsLogger
    from .oracle import (Block, CheckReport, NonFiniteLossError, Oracle, OracleError, ParamSpace, QueryBudgetExceeded,
                         QueryLedger, TransientOracleError, available_oracles, check_oracle, make_oracle,
                         register_oracle)
    from .plan import ExplicitDirections, PlanLosses, QueryPlan, SeededDirections, execute
    from .subspace import SubspaceCGE
    from .problem import (BatchSource, OracleProblem, Problem, ProblemSetupError, TensorBatches, TrainingSetup,
                          available_experiments, available_problems, get_problem, register_experiment,
                          register_problem)
    from .registry import (ESTIMATORS, EXPERIMENTS, ORACLES, PROBLEMS, SIMULATORS, DuplicateNameError, Registry,
                           UnknownNameError)
    from .trainer import RunWarning, Trainer, TrainingError, ZeroSignalWarning, train
