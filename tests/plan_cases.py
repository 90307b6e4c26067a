"""Every registered estimator (and a point plan) on a tiny float64 oracle, in one process or sharded
(subspace-cge on a white-box linear layer, `helpers.LinearLayerOracle`: it needs the layer's inputs).

Shared by tests/test_parallel_plans.py (the single-process reference) and tests/_plan_ranks.py
(the same cases on every rank under torchrun, through a `parallel.PlanSharder`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from blackbox_zo.config import EstimatorSettings
from blackbox_zo.estimators import available_estimators, make_estimator
from blackbox_zo.evolution import Search
from blackbox_zo.plan import QueryPlan, execute
from helpers import LinearLayerOracle, SmoothBlocks

MU = 1e-3
SEED = 7
CALLS = 3  # per case: the sharder calibrates on call 2 and cuts by measured cost on call 3


def subset(d: int) -> torch.Tensor:
    return torch.randperm(d, generator=torch.Generator().manual_seed(1))[:23]


def cases() -> list[tuple[str, dict[str, Any], bool, int | None]]:
    """(case name, EstimatorConfig fields, restrict to a coordinate subset, oracle memory cap)."""
    out = []
    for kind, cls in available_estimators().items():  # every registered estimator, plug-ins included
        takes = EstimatorSettings.variant(kind).model_fields  # the settings of this kind (q: RGE's)
        if isinstance(cls, type) and issubclass(cls, Search):  # a search: one population plan, all coordinates
            out.append((f"{kind}-points", {"kind": kind, "mu": MU, "popsize": 9}, False, None))
            continue
        for scheme in ("forward", "central") if "scheme" in takes else ("central",):  # ES: always antithetic
            # subspace-cge plans in one linear layer's weight and bias (its own oracle below), not in a subset
            for sub in (False,) if kind == "subspace-cge" else (False, True):
                fields = {"kind": kind, "mu": MU, **({"scheme": scheme} if "scheme" in takes else {}),
                          **({"q": 24} if "q" in takes else {})}
                out.append((f"{kind}-{scheme}{'-subset' if sub else ''}", fields, sub, None))
    # the direction stream redrawn by combine (a memory cap too small to keep it), chunks of 3
    out.append(("rge-sphere-central-redrawn", {"kind": "rge", "mu": MU, "scheme": "central", "q": 24,
                                               "distribution": "sphere"}, False, 1000))
    out.append(("linear-interpolation-lasso", {"kind": "linear-interpolation", "mu": MU, "interp": {"m": 16}},
                False, None))
    return out


def run_cases(make_sharder: Callable[[], Any]) -> dict[str, dict[str, Any]]:
    sharder = make_sharder()
    results = {}
    for name, fields, sub, cap in cases():
        oracle = LinearLayerOracle() if fields["kind"] == "subspace-cge" else SmoothBlocks()
        if cap is not None:
            oracle.memory_cap_bytes = cap
        theta = oracle.initial_theta()
        coords = subset(theta.numel()) if sub else None
        estimator = make_estimator(EstimatorSettings.model_validate(fields))
        estimator.chunk = estimator.chunk or 7  # several chunks per plan, cut across by the shards
        has_base = (estimator.plan(theta, coords=coords, seed=SEED, chunk=7) if isinstance(estimator, Search) else
                    estimator.step_plan(oracle, theta, None, coords=coords, seed=SEED, chunk=7)).has_base
        if isinstance(estimator, Search):  # three generations; the proposals stand in for the estimates
            runs, point = [], theta
            for _ in range(CALLS):
                runs.append(estimator.step(oracle, point, None, seed=SEED, sharder=sharder))
                point = runs[-1].theta
            vectors = [r.theta for r in runs]
        else:
            runs = [estimator.estimate(oracle, theta, None, coords=coords, seed=SEED, sharder=sharder)
                    for _ in range(CALLS)]
            vectors = [r.grad for r in runs]
        results[name] = {"grads": torch.stack(vectors), "queries": [r.queries for r in runs],
                         "base_loss": runs[-1].base_loss, "ledger": oracle.ledger.total, "has_base": has_base}
    oracle = SmoothBlocks()
    points = oracle.initial_theta() + 0.1 * torch.randn(9, oracle.space.dim, generator=torch.Generator().manual_seed(3),
                                                         dtype=torch.float64)
    losses = execute(QueryPlan.at(points, chunk=2), oracle, None, sharder=sharder)
    results["points"] = {"losses": losses.plus, "queries": losses.queries, "ledger": oracle.ledger.total}
    return results
