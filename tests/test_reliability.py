"""The reliability contracts behind the fault suite, each against a reference run or a closed form.

* transient oracle failures: retried within `run.oracle_retries`, a run ends bitwise where an
  undisturbed one does, with the same ledger; past it, the run stops, and its resume ends
  bitwise there too, the failed step's requests charged once more (docs/reliability.md);
* the query budget covers the whole job: setup (ZO-GraSP pruning) and evaluation queries;
* checkpoints: rotation keeps the one before, the digest finds damage torch.load does not;
* the resume contract: which settings may differ;
* the zero-signal guard: warns once for "nearly all zero over several steps", never on a
  healthy run.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import fault_oracles
from blackbox_zo import rundir
from blackbox_zo.config import TrainConfig, resolve_config
from blackbox_zo.oracle import OracleError, ParamSpace, QueryLedger, TransientOracleError
from blackbox_zo.problem import OracleProblem
from blackbox_zo.trainer import TrainingError, ZeroSignalWarning, train

BOWL = fault_oracles.NAME
BASE = ["run.progress=false", "run.epochs=2", "run.checkpoint_every_steps=5", "run.oracle_retry_backoff_s=0"]


def bowl(*overrides):
    p = OracleProblem(BOWL)
    return p, resolve_config(p.config_model, p.default_config(), overrides=BASE + list(overrides))


def params(run_dir):
    return torch.load(run_dir / rundir.CHECKPOINT_NAME, weights_only=True)["module"]["blocks.x"]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("undisturbed")
    p, cfg = bowl()
    return train(p, cfg, run_dir=out), params(out)


# ----------------------------------------------------------------------------- retries


def test_retried_requests_leave_the_run_bitwise_unchanged(tmp_path, undisturbed):
    summary0, theta0 = undisturbed
    # call 6 is step 3's request for its 4 coordinates; it fails 3 times, the 4th attempt answers
    p, cfg = bowl("oracle.options.transient=3", "oracle.options.transient_from=6")
    summary = train(p, cfg, run_dir=tmp_path)
    assert torch.equal(params(tmp_path), theta0)
    assert summary["queries"] == summary0["queries"]  # a request is charged once, however often it is sent
    assert summary["queries_retried"] == 3 * 4 and summary0["queries_retried"] == 0


def test_retries_wait_exponentially(monkeypatch):
    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    oracle = fault_oracles.FaultBowl(transient=4)
    oracle.ledger = QueryLedger(max_retries=5, retry_backoff_s=0.5)
    oracle.query(torch.zeros(1, 4), None)
    assert waits == [0.5, 1.0, 2.0, 4.0]
    assert QueryLedger(retry_backoff_s=10).retry_delay(5) == 60.0  # capped


def test_exhausted_retries_stop_resumably_and_the_resume_ends_where_an_undisturbed_run_does(tmp_path, undisturbed):
    summary0, theta0 = undisturbed
    # step 13's coordinate request (call 27: 25 calls for steps 1-12 and the evaluation after step 10,
    # then step 13's base) fails 3 times in a row; 1 retry allowed: the run stops at step 13
    p, cfg = bowl("oracle.options.transient=3", "oracle.options.transient_from=27", "run.oracle_retries=1")
    with pytest.raises(TrainingError, match=r"step 13 .*failed 2 time\(s\) in a row with a transient error") as info:
        train(p, cfg, run_dir=tmp_path)
    assert info.value.reason == "oracle error" and info.value.checkpoint_step == 12
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stopped"] == "oracle error" and s["stop_step"] == 13 and s["checkpoint_step"] == 12
    # resume, with more retries (a setting a resume may change); the new process counts the oracle's
    # calls from 1 again and makes only 17 (steps 13-20 and one evaluation), so it meets no failure
    p, cfg = bowl("oracle.options.transient=3", "oracle.options.transient_from=27", "run.oracle_retries=3")
    summary = train(p, cfg, resume=tmp_path)
    assert summary["queries_retried"] == 4  # the one retry of the first process, carried by its checkpoint
    assert torch.equal(params(tmp_path), theta0)
    # every request is charged when sent: step 13's base query and its coordinate request (1 + 4),
    # sent before the stop, are charged again when the resumed run repeats step 13
    assert summary["queries"]["train"] == summary0["queries"]["train"] + 5
    assert summary["queries"]["eval"] == summary0["queries"]["eval"]


def test_permanent_errors_are_not_retried():
    class Broken(fault_oracles.FaultBowl):
        def losses(self, thetas, batch):
            self.calls += 1
            raise ValueError("bad input")

    oracle = Broken()
    oracle.ledger = QueryLedger(max_retries=5, retry_backoff_s=0)
    with pytest.raises(OracleError, match="raised ValueError: bad input"):
        oracle.query(torch.zeros(2, 4), None)
    assert oracle.calls == 1 and oracle.ledger.retried == 0 and oracle.ledger.total == 2


def test_transient_error_is_public():
    import blackbox_zo.oracle as oracle_module

    assert "TransientOracleError" in oracle_module.__all__ and issubclass(TransientOracleError, Exception)


# ------------------------------------------------------------------------------ budget


def test_the_budget_covers_pruning_and_evaluation(tmp_path):
    from problems.digits import DigitsProblem

    p = DigitsProblem()
    sets = ["model.width=2", "data.batch_size=32", "run.epochs=1", "sparsity.q=8", "run.progress=false"]
    # pruning costs 2 (q + 1) = 18 queries before training; a budget of 18 + 3 steps' worth
    cfg = resolve_config(p.config_model, p.default_config(), overrides=sets)
    full = train(p, cfg)
    per_step = full["queries"]["train"] // full["steps"]
    cfg = resolve_config(p.config_model, p.default_config(), overrides=sets + [f"run.query_budget={18 + 3 * per_step + 1}"])
    s = train(p, cfg)
    assert s["queries"]["prune"] == 18 and s["steps"] == 3 and s["queries"]["total"] <= 18 + 3 * per_step + 1
    assert s["stopped"] == "query budget"

    # the bowl's evaluation is one query to the oracle, charged to the budget like any other:
    # 10 steps of 5 queries, then the evaluation (1) does not fit in a budget of 50
    p, cfg = bowl("run.query_budget=50")
    s = train(p, cfg, run_dir=tmp_path)
    assert s["queries"] == {"train": 50, "prune": 0, "eval": 0, "total": 50}
    assert s["stopped"] == "query budget" and "eval_loss" not in s and "evaluation not run" in s["eval_missing"]


# --------------------------------------------------------------------------- checkpoints


def test_rotation_keeps_the_one_before_and_the_digest_finds_a_flipped_bit(tmp_path):
    states = [{"module": {"w": torch.full((3,), float(i))}, "position": [0, i, i]} for i in range(3)]
    for s in states:
        rundir.save_checkpoint(tmp_path, s)
    assert rundir.load_checkpoint(tmp_path).step == 2
    assert rundir.read_checkpoint(tmp_path / rundir.PREVIOUS_CHECKPOINT_NAME)["position"][2] == 1
    assert not list(tmp_path.glob(".*"))  # no temp files left
    path = tmp_path / rundir.CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    at = data.find(torch.full((3,), 2.0).numpy().tobytes())
    data[at + 1] ^= 1  # 2.0 -> 2.0000002: a valid float, a valid file
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["module"]["w"][0] != 2.0  # torch.load does not notice
    loaded = rundir.load_checkpoint(tmp_path)
    assert loaded.step == 1 and loaded.damaged == path and "do not match their digest" in loaded.note


def test_an_old_checkpoint_without_a_digest_still_loads(tmp_path):
    torch.save({"module": {}, "position": [0, 0, 7]}, tmp_path / rundir.CHECKPOINT_NAME)
    assert rundir.load_checkpoint(tmp_path).step == 7


# ---------------------------------------------------------------------------- resume contract


def test_the_resume_contract():
    saved = TrainConfig().model_dump()
    new = TrainConfig.model_validate({"run": {"epochs": 20, "max_steps": 5, "query_budget": 100},
                                      "parallel": {"timeout_s": 10}}).model_dump()
    allowed = rundir.check_resume("RUN", saved, new)
    assert [k for k, _, _ in allowed] == ["parallel.timeout_s", "run.epochs", "run.max_steps", "run.query_budget"]
    changed = TrainConfig.model_validate({"optimizer": {"lr": 0.5}, "run": {"seed": 3, "epochs": 20}}).model_dump()
    with pytest.raises(rundir.ResumeError) as info:
        rundir.check_resume("RUN", saved, changed)
    msg = str(info.value)
    assert "optimizer.lr: 0.1 -> 0.5, run.seed: 0 -> 3)" in msg and "run.epochs:" not in msg.split("only")[0]
    assert len(msg.splitlines()) == 1


# --------------------------------------------------------------------------- zero-signal guard


class MostlyFlat(fault_oracles.FaultBowl):
    """Only the first of 40 coordinates moves the loss at mu = 5e-3; the rest are rounded away."""

    def __init__(self):
        super().__init__(dim=40)

    def losses(self, thetas, batch):
        rest = torch.round(((thetas[:, 1:] - 1.5) ** 2).sum(1))
        return 0.5 * (thetas[:, 0] - 1.5) ** 2 + rest


def test_the_zero_signal_guard_warns_once_when_nearly_all_differences_vanish(monkeypatch):
    from blackbox_zo import problem as problem_module

    monkeypatch.setattr(problem_module, "make_oracle", lambda name, **kw: MostlyFlat())
    p, cfg = bowl()
    with pytest.warns(ZeroSignalWarning) as caught:
        s = train(p, cfg)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ZeroSignalWarning)]
    assert len(msgs) == 1 and s["warnings"] == msgs
    # 39 of 40 differences are 0 every step: the 5-step window fills at step 5
    assert msgs[0].startswith("98% of the finite differences of steps 1-5 were exactly 0") and "estimator.mu" in msgs[0]


def test_the_zero_signal_guard_is_silent_on_a_healthy_run(undisturbed):
    summary0, _ = undisturbed
    assert "warnings" not in summary0
