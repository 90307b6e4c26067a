"""Every registered estimator (and a point plan) on a tiny float64 oracle, in one process or sharded.

Shared by tests/test_parallel_plans.py (the single-process reference) and tests/_plan_ranks.py
(the same cases on every rank under torchrun, through a `parallel.PlanSharder`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from blackbox_zo.config import EstimatorConfig, EstimatorSettings
from blackbox_zo.estimators import available_estimators, make_estimator
from blackbox_zo.plan import QueryPlan, execute
from helpers import SmoothBlocks

MU = 1e-3
SEED = 7
CALLS = 3  # per case: the sharder calibrates on call 2 and cuts by measured cost on call 3


def subset(d: int) -> torch.Tensor:
    return torch.randperm(d, generator=torch.Generator().manual_seed(1))[:23]


def cases() -> list[tuple[str, dict[str, Any], bool, int | None]]:
    """(case name, EstimatorConfig fields, restrict to a coordinate subset, oracle memory cap)."""
    out = []
    for kind in available_estimators():  # every registered estimator, plug-ins included
        takes = EstimatorSettings.variant(kind).model_fields  # the settings of this kind (q: RGE's)
        for scheme in ("forward", "central"):
            for sub in (False, True):
                fields = {"kind": kind, "mu": MU, "scheme": scheme, **({"q": 24} if "q" in takes else {})}
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
        oracle = SmoothBlocks()
        if cap is not None:
            oracle.memory_cap_bytes = cap
        theta = oracle.initial_theta()
        coords = subset(theta.numel()) if sub else None
        estimator = make_estimator(EstimatorConfig.model_validate(fields))
        estimator.chunk = estimator.chunk or 7  # several chunks per plan, cut across by the shards
        runs = [estimator.estimate(oracle, theta, None, coords=coords, seed=SEED, sharder=sharder) for _ in range(CALLS)]
        results[name] = {"grads": torch.stack([r.grad for r in runs]), "queries": [r.queries for r in runs],
                         "base_loss": runs[-1].base_loss, "ledger": oracle.ledger.total}
    oracle = SmoothBlocks()
    points = oracle.initial_theta() + 0.1 * torch.randn(9, oracle.space.dim, generator=torch.Generator().manual_seed(3),
                                                         dtype=torch.float64)
    losses = execute(QueryPlan.at(points, chunk=2), oracle, None, sharder=sharder)
    results["points"] = {"losses": losses.plus, "queries": losses.queries, "ledger": oracle.ledger.total}
    return results
