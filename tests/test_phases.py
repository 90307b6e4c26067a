"""Two-phase runs (`phase2`): another estimator, a fresh optimizer and its own schedule after N steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from resume_helpers import stop_and_resume

from blackbox_zo.config import ConfigError, resolve_config
from blackbox_zo.rundir import CHECKPOINT_NAME
from blackbox_zo.trainer import train
from problems.digits import DEEPZERO_RECIPE, DigitsProblem

# width 2 (d = 310), one epoch of 22 batches of 64 images: ES (q = 3: 6 queries a step) for 10 steps,
# then Sparse-CGE (ZO-GraSP at 50%: a fixed number of coordinates + 1 base query a step)
FAST = ["model.width=2", "data.batch_size=64", "estimator=es", "estimator.q=3", "estimator.mu=0.05",
        "estimator.blocks=none", "phase1=none", "phase2.batch_size=none",
        "optimizer=adam", "optimizer.lr=0.01", "schedule=constant", "sparsity.sparsity=0.5", "sparsity.q=4",
        "run.progress=false", "run.epochs=1", "run.checkpoint_every_steps=1",
        "phase2.after_steps=10", "phase2.optimizer.name=sgd", "phase2.optimizer.lr=0.05", "phase2.optimizer.momentum=0.9"]


def _config(*extra, drop=()):
    p = DigitsProblem()
    base = [o for o in FAST if o.split("=")[0] not in drop]
    return p, resolve_config(p.config_model, p.default_config(), overrides=base + list(extra))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_phase2_switches_estimator_optimizer_and_schedule_at_its_step(tmp_path):
    p, cfg = _config()
    summary = train(p, cfg, run_dir=tmp_path)
    steps = [r for r in _metrics(tmp_path) if "loss" in r]
    assert len(steps) == 22 and summary["phase2"] == {"estimator": "cge", "from_step": 10, "reached": True}
    assert {r["step_queries"] for r in steps[:10]} == {6}  # ES: 3 antithetic pairs
    cge = {r["step_queries"] for r in steps[10:]}
    assert len(cge) == 1 and cge.pop() > 6  # |S| + 1 coordinate queries
    assert all(r["lr"] == 0.01 for r in steps[:10])  # phase 1: Adam, constant
    # phase 2: SGD 0.05 with a cosine over its own 12 steps; the record shows the lr after the step's update
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(1, 13)]
    assert [r["lr"] for r in steps[10:]] == pytest.approx(expected, rel=1e-12)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["phase"] == 2 and "momentum_buffer" in state["optimizer"]["state"][0]  # a fresh SGD, not Adam
    assert summary["queries"]["prune"] > 0  # ZO-GraSP ran at setup for the Sparse-CGE phase


@pytest.mark.parametrize("stop_at", [7, 10, 13])
def test_phase2_resumes_bitwise_before_at_and_after_the_switch(tmp_path, stop_at):
    stop_and_resume(_config, tmp_path, stop_at)
    lrs = [[r["lr"] for r in _metrics(tmp_path / run) if "loss" in r] for run in ("full", "half")]
    assert len(lrs[0]) == 22 and lrs[0] == lrs[1]


def test_phase2_is_reproducible_from_its_seed(tmp_path):
    p, cfg = _config()
    train(p, cfg, run_dir=tmp_path / "a")
    p, cfg = _config()
    train(p, cfg, run_dir=tmp_path / "b")
    a = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)["module"]
    b = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["module"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_search_then_sparse_cge_keeps_phase_1_dense(tmp_path):
    """sep-CMA-ES takes no coordinates: it moves every parameter, while the sampler (built for phase 2's
    Sparse-CGE) serves phase 2 only."""
    p, cfg = _config("estimator=sep-cma-es", "estimator.popsize=6", "phase2.after_steps=1", "run.max_steps=2",
                     drop=("estimator.q", "estimator.blocks"))
    assert cfg.sparsity is not None and cfg.sparsity.enabled
    before = torch.cat([v.reshape(-1) for v in p.setup(cfg).module.state_dict().values()])
    p, cfg = _config("estimator=sep-cma-es", "estimator.popsize=6", "phase2.after_steps=1", "run.max_steps=1",
                     drop=("estimator.q", "estimator.blocks"))
    train(p, cfg, run_dir=tmp_path)
    after = torch.cat([v.reshape(-1) for v in torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
                       ["module"].values()])
    assert int((after != before).sum()) == before.numel()


def test_phase2_settings_are_checked_in_one_line():
    with pytest.raises(ConfigError, match="phase2.estimator.q: phase2.estimator.kind='cge' has no q"):
        _config("phase2.estimator.q=3")
    with pytest.raises(ConfigError, match="phase 2 must be a zeroth-order estimator"):
        _config("phase2.estimator.kind=autograd")
    with pytest.raises(ConfigError, match="phase2.after_steps"):
        _config("phase2.after_steps=0")
    from blackbox_zo.problem import get_problem

    assert get_problem("cartpole").resolve_config().phase2 is None  # one phase unless a problem's defaults ask


def test_the_digits_default_is_two_phases_and_the_recipe_is_four_set_values():
    """The default: subspace CGE on the last layer for 186 steps (Adam, 64 images: `phase1`), then DeepZero's Sparse-CGE
    (docs/efficiency.md). DEEPZERO_RECIPE (the efficiency study's sparse-cge) and the --set values docs/digits.md
    gives for it are one config: `phase2=none` takes the preset's phase1 with it."""
    from blackbox_zo.config import deep_merge

    p = DigitsProblem()
    default = p.resolve_config()
    assert default.estimator.kind == "subspace-cge" and default.estimator.blocks == ["6"]
    assert default.estimator.rank == 16 and default.phase2.after_steps == 186 and default.run.epochs == 12
    assert default.phase1.optimizer.name == "adam" and default.phase1.batch_size == default.phase2.batch_size == 64
    assert default.phase2.estimator.kind == "cge" and default.sparsity.enabled and default.data.batch_size == 16
    sets = ["estimator=cge", "estimator.mu=0.005", "run.epochs=10", "phase2=none"]
    by_sets = resolve_config(p.config_model, p.default_config(), overrides=sets)
    assert by_sets == resolve_config(p.config_model, deep_merge(p.default_config(), DEEPZERO_RECIPE))
    assert by_sets.phase2 is None and by_sets.phase1 is None and by_sets.estimator.kind == "cge"
    assert by_sets.optimizer.name == "sgd" and by_sets.optimizer.lr == 0.1 and by_sets.data.batch_size == 16
    assert " ".join(f"--set {s}" for s in sets) in (Path(__file__).parents[1] / "docs" / "digits.md").read_text()


def test_the_es_last_digits_default_is_nine_set_values():
    """ES on the last layer then Sparse-CGE (ES_LAST_THEN_SPARSE_CGE, the efficiency study's es-last+sparse-cge;
    the default from 6e93f03 to the subspace-CGE default), as docs/training.md spells it over today's default."""
    from blackbox_zo.config import deep_merge
    from problems.digits import ES_LAST_THEN_SPARSE_CGE

    p = DigitsProblem()
    sets = ["estimator=es", "estimator.q=28", "estimator.mu=0.1", 'estimator.blocks=["6"]', "run.epochs=36",
            "phase2.after_steps=536", "phase1.optimizer.name=adam", "phase1.optimizer.lr=0.2", "phase1.batch_size=64"]
    by_sets = p.resolve_config(overrides=sets)
    assert by_sets == resolve_config(p.config_model, deep_merge(p.default_config(), ES_LAST_THEN_SPARSE_CGE))
    assert by_sets.estimator.kind == "es" and by_sets.phase1.batch_size == by_sets.phase2.batch_size == 64
    shown = " ".join(f"--set {s}" for s in sets).replace('estimator.blocks=["6"]', """'estimator.blocks=["6"]'""")
    assert shown in (Path(__file__).parents[1] / "docs" / "training.md").read_text()


def test_the_previous_digits_default_is_eight_set_values():
    """sep-CMA-ES then Sparse-CGE on 16-image batches (SEP_CMA_THEN_SPARSE_CGE, the efficiency study's
    sep-cma-es+sparse-cge), as docs/training.md spells it over today's default."""
    from blackbox_zo.config import deep_merge
    from problems.digits import SEP_CMA_THEN_SPARSE_CGE

    p = DigitsProblem()
    sets = ["estimator=sep-cma-es", "estimator.mu=0.02", "estimator.popsize=28", "run.epochs=15",
            "phase2.after_steps=715", "phase2.optimizer.name=sgd", "phase2.optimizer.lr=0.05", "phase2.batch_size=none"]
    by_sets = p.resolve_config(overrides=sets)
    assert by_sets == resolve_config(p.config_model, deep_merge(p.default_config(), SEP_CMA_THEN_SPARSE_CGE))
    assert by_sets.phase1 is None and by_sets.data.batch_size == 16 and by_sets.phase2.batch_size is None
    assert " ".join(f"--set {s}" for s in sets) in (Path(__file__).parents[1] / "docs" / "training.md").read_text()


def test_phase1_applies_to_a_two_phase_run_only(tmp_path):
    """phase1's optimizer and batch size drive phase 1 (the records' lr; 22 batches of 64 an epoch), phase 2
    keeps its own; a user's phase1 on a one-phase run is refused in one line."""
    p, cfg = _config("phase1.optimizer.name=adam", "phase1.optimizer.lr=0.03", "optimizer.lr=0.5", "data.batch_size=16",
                     "phase1.batch_size=64", "phase2.batch_size=64", drop=("phase1", "phase2.batch_size"))
    summary = train(p, cfg, run_dir=tmp_path)
    steps = [r for r in _metrics(tmp_path) if "loss" in r]
    assert summary["steps"] == 22 and {r["lr"] for r in steps[:10]} == {0.03}  # 1,437 // 64 batches, Adam 0.03
    assert steps[10]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 12)), rel=1e-12)
    with pytest.raises(ConfigError, match="phase1.batch_size: phase1 holds the first phase's settings of a two-phase run"):
        _config("phase2=none", "phase1.batch_size=64", drop=("phase1", "phase2.batch_size", "phase2.after_steps",
                                                              "phase2.optimizer.name", "phase2.optimizer.lr",
                                                              "phase2.optimizer.momentum"))


def test_choosing_another_estimator_drops_the_defaults_phase2():
    """The default's phase 2 belongs to the default's phase 1: `--set estimator=rge` is a one-phase RGE run
    (and the first-order reference works), while a phase2 setting given by the user is kept."""
    p = DigitsProblem()
    assert p.resolve_config(overrides=["estimator=rge"]).phase2 is None
    assert p.resolve_config(overrides=["estimator=autograd"]).phase2 is None
    assert p.resolve_config(overrides=["estimator.mu=0.05"]).phase2.after_steps == 186  # same kind: kept
    assert p.resolve_config(overrides=["estimator=rge"]).phase1 is None  # the preset's phase-1 optimizer leaves too
    # the preset's phase-1 values (sep-CMA-ES's sigma_0 as mu, its popsize) leave with its phase 2: the chosen
    # kind starts from its own defaults, and what the user sets is kept
    rge = p.resolve_config(overrides=["estimator=rge"]).estimator
    assert rge.mu == type(rge).model_fields["mu"].default != p.default_config()["estimator"]["mu"]
    assert p.resolve_config(overrides=["estimator=rge", "estimator.mu=0.03"]).estimator.mu == 0.03
    kept = p.resolve_config(overrides=["estimator=rge", "phase2.after_steps=10"])
    assert kept.phase2.after_steps == 10 and kept.phase2.estimator.kind == "cge"
    with pytest.raises(ConfigError, match="phase2 needs a zeroth-order estimator in phase 1"):
        p.resolve_config(overrides=["estimator=autograd", "phase2.after_steps=10"])


def test_phase2_batch_size_gives_phase_2_its_own_batches_and_resumes_bitwise(tmp_path):
    """phase2.batch_size: phase 1 runs whole epochs of data.batch_size (22 batches of 64), phase 2 its own
    (89 of 16, the same order rule per epoch); the run's steps, phase 2's cosine and a resume on either side
    of the switch follow them."""
    sizes = []
    extra = ["run.epochs=2", "phase2.after_steps=22", "phase2.batch_size=16"]

    def config(*more):
        return _config(*extra, *more)

    p, cfg = config()
    summary = train(p, cfg, run_dir=tmp_path / "look", callbacks=[
        lambda t, r: sizes.append(int(t.batches.batch(t.pos.epoch, t.pos.index - 1)[0].shape[0])) if "loss" in r
        else None])
    assert summary["steps"] == 22 + 89 and sizes == [64] * 22 + [16] * 89
    lrs = [r["lr"] for r in _metrics(tmp_path / "look") if "loss" in r][22:]
    assert lrs == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * k / 89)) for k in range(1, 90)], rel=1e-12)
    stop_and_resume(config, tmp_path / "resume", 40)  # in phase 2, on its own batches


def test_phase2_batch_size_needs_phase_1_in_whole_epochs(tmp_path):
    p, cfg = _config("phase2.batch_size=16")  # phase 1 = 10 steps of an epoch of 22
    with pytest.raises(ConfigError, match=r"phase2.after_steps=10 must be a whole number of epochs \(22 steps each"):
        train(p, cfg, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="phase2.batch_size"):
        _config("phase2.batch_size=0")


def test_a_phase_batch_size_on_batches_that_cannot_change_size_is_one_line(tmp_path):
    """A bare oracle's batch source (one repeated batch) has no other size: phase1/phase2.batch_size is refused
    before any file is written."""
    import fault_oracles
    from blackbox_zo.problem import OracleProblem

    p = OracleProblem(fault_oracles.NAME)
    for which in ("phase1.batch_size=4", "phase2.batch_size=4"):
        cfg = resolve_config(p.config_model, p.default_config(), overrides=[
            "run.progress=false", "estimator=rge", "phase2.after_steps=2", which])
        with pytest.raises(ConfigError, match=rf"{which.split('=')[0]}: this problem's batches \(RepeatedBatch\) "
                                              "have no other size"):
            train(p, cfg, run_dir=tmp_path / "run")
        assert not any((tmp_path / "run").iterdir())
