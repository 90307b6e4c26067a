"""One rank of tests/test_parallel_plans.py, launched by torchrun: `_plan_ranks.py OUT_DIR`.

Runs every case of plan_cases.py through a `parallel.PlanSharder`, then two failures every
rank must see alike: ranks that build different plans, and an oracle that raises on one rank.
Writes its results (or its traceback) to OUT_DIR/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

from blackbox_zo import parallel
from blackbox_zo.config import TrainConfig
from blackbox_zo.estimators import RGE
from blackbox_zo.oracle import OracleError
from helpers import SmoothBlocks
from plan_cases import SEED, run_cases


class RaisesOnRank1(SmoothBlocks):
    def losses(self, thetas, batch):
        if int(os.environ["RANK"]) == 1:
            raise RuntimeError("simulator crashed")
        return super().losses(thetas, batch)


def failures(sharder: parallel.PlanSharder, rank: int) -> dict[str, str]:
    out = {}
    oracle = SmoothBlocks()
    try:  # rank 1 draws other directions: the plan checksum in the all-reduce differs
        RGE(q=8).estimate(oracle, oracle.initial_theta(), None, seed=SEED + rank, sharder=sharder)
    except parallel.DivergenceError as exc:
        out["divergence"] = str(exc)
    oracle = RaisesOnRank1()
    try:
        RGE(q=8, scheme="central").estimate(oracle, oracle.initial_theta(), None, seed=SEED, sharder=sharder)
    except OracleError as exc:
        out["oracle_error"] = str(exc)
        out["ledger_after_failure"] = oracle.ledger.total
    return out


def main(out_dir: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    try:
        parallel.init_from_env(TrainConfig.model_validate({"parallel": {"timeout_s": 60}}))
        sharder = parallel.PlanSharder(balance_steps=2)
        result = run_cases(lambda: sharder)
        result["failures"] = failures(sharder, rank)
        result["costs"] = sharder.costs.per_coord
    except Exception:
        result = {"error": traceback.format_exc()}
    tmp = out_dir / f".rank{rank}.tmp"
    torch.save(result, tmp)
    os.replace(tmp, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
