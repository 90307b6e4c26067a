"""Every registered estimator runs under torchrun (2 gloo ranks) and agrees with one process.

Parallelism shards query plans, not estimators (blackbox_zo/plan.py, blackbox_zo/parallel.py):
one real `torchrun` launch runs every case of plan_cases.py — each registered estimator,
forward and central, on all coordinates and on a subset, plus a point plan — on both ranks
through a `PlanSharder`, while this process computes the same cases without one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blackbox_zo.estimators import available_estimators
from plan_cases import CALLS, cases, run_cases

pytestmark = pytest.mark.distributed

WORLD = 2
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-port",
           str(_free_port()), str(HERE / "_plan_ranks.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # its own session: on a timeout the agent and both ranks are stopped together, nothing else
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    single = run_cases(lambda: None)  # the reference, computed while the ranks run
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # ours to stop
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in ranks:
        assert "error" not in r, r["error"]
    return ranks, single


def test_every_registered_estimator_agrees_with_one_process(launched):
    ranks, single = launched
    names = [c[0] for c in cases()]
    assert {n.split("-forward")[0].split("-central")[0].split("-points")[0] for n in names} >= set(available_estimators())
    for name in names:
        ref = single[name]
        assert ref["grads"].abs().max() > 1e-2, name  # a real gradient (or proposal), not zeros on both sides
        for r in ranks:
            got = r[name]
            # float64 throughout. A sharded plan returns exactly the losses its ranks evaluated (the
            # all-reduce adds zeros), and every rank combines them with the single process's code; the
            # only difference is which other points share an oracle call (a rank's piece cuts the
            # chunks differently), which can move a loss of size ~10 by a few ulp (~1e-14). Divided by
            # 2 mu = 2e-3 and summed over <= 24 terms of size <= 4 (RGE), that is < 1e-9 (measured: at
            # most 2e-12); linear interpolation's solves (orthonormal Q: norm 1; LASSO with debiasing:
            # least squares on the recovered support) do not amplify it. A coordinate or direction
            # evaluated twice, missed or misplaced changes an entry by >= 1e-2.
            torch.testing.assert_close(got["grads"], ref["grads"], rtol=0, atol=1e-9, msg=name)
            # the job's ledger: a forward plan evaluates the base loss on every rank (one query more per
            # extra rank), a central plan costs exactly what it costs in one process
            extra = (WORLD - 1) if ref["has_base"] else 0
            assert got["queries"] == [q + extra for q in ref["queries"]], name
            assert got["ledger"] == ref["ledger"] + CALLS * extra, name
            assert got["base_loss"] == pytest.approx(ref["base_loss"], rel=1e-12, abs=0), name
        # identical on every rank, bitwise: every rank takes the same optimizer step from it
        assert torch.equal(ranks[0][name]["grads"], ranks[1][name]["grads"]), name


def test_a_point_plan_is_shared_and_returns_every_loss(launched):
    ranks, single = launched
    for r in ranks:
        torch.testing.assert_close(r["points"]["losses"], single["points"]["losses"], rtol=0, atol=1e-12)
        assert r["points"]["queries"] == r["points"]["ledger"] == single["points"]["queries"] == 9


def test_coordinate_costs_were_measured_and_agreed(launched):
    ranks, _ = launched
    costs = ranks[0]["costs"]
    assert costs.shape == (3,) and bool((costs > 0).all())  # one measured cost per block
    assert torch.equal(costs, ranks[1]["costs"])


def test_ranks_that_build_different_plans_or_fail_stop_alike(launched):
    ranks, _ = launched
    for r, result in enumerate(ranks):
        f = result["failures"]
        assert "ranks ran different query plans" in f["divergence"] and "RGE estimate" in f["divergence"]
        if r == 0:  # the healthy rank learns that its peer failed
            assert "1 of 2 ranks failed to evaluate their shard" in f["oracle_error"]
        else:  # the failing rank raises its own error
            assert "simulator crashed" in f["oracle_error"]
    # both ledgers hold the job's count, the failed call included (rank 0: its 8 + 8 of the central pair)
    assert ranks[0]["failures"]["ledger_after_failure"] == ranks[1]["failures"]["ledger_after_failure"]
