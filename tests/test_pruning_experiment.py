"""The pruning-quality experiment (problems/experiments/pruning.py): masked FO training,
mask agreement, and a miniature end-to-end run of `blackbox-zo experiment pruning`."""

import csv

import pytest
import torch

from blackbox_zo.oracle import ParamSpace
from problems.digits import load_digits_split, make_digits_cnn
from problems.experiments.pruning import PruningSettings, main, mask_agreement, masked_fo_train


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_masked_training_keeps_pruned_weights_at_zero():
    torch.manual_seed(0)
    module = make_digits_cnn(4)
    init = {k: v.clone() for k, v in module.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    keep = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in module.named_parameters() if p.dim() >= 2}
    x, y, xt, yt = load_digits_split(0)
    acc = masked_fo_train(module, keep, (x[:320], y[:320], xt, yt), PruningSettings(epochs=1, width=4), seed=0)
    assert 0.0 <= acc <= 1.0
    for name, p in module.named_parameters():
        if name in keep:
            assert bool((p.detach()[~keep[name]] == 0).all()), name  # pruned: exactly zero after training
            assert bool((p.detach()[keep[name]] != init[name][keep[name]]).any()), name  # kept: trained
        else:
            assert not torch.equal(p.detach(), init[name]), name  # biases are dense and trained


def test_mask_agreement_by_hand():
    space = ParamSpace([("w", (2, 2)), ("b", (2,))])
    prunable = torch.tensor([True, True, True, True, False, False])
    keep_a = torch.tensor([True, True, False, False, True, True])
    keep_b = torch.tensor([False, True, True, False, True, True])
    key_a = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0])
    out = mask_agreement(space, key_a, -key_a, keep_a, keep_b, prunable)
    # {0,1} vs {1,2} among 4 weights: Jaccard 1/3; random sets of sizes 2 and 2 in 4: E|A&B| = 1, E J = 1/3.
    assert out["w"]["jaccard"] == pytest.approx(1 / 3) and out["w"]["jaccard_chance"] == pytest.approx(1 / 3)
    assert out["w"]["spearman"] == pytest.approx(-1.0)  # reversed order
    assert "b" not in out and out["all"]["kept_zo"] == 2


def test_experiment_end_to_end_small(tmp_path):
    code = main(["--sparsities", "0.5", "--seeds", "0", "--epochs", "1", "--width", "2", "--q", "4",
                 "--samples-per-class", "2", "--methods", "random,zo-grasp,fo-grasp", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    with open(tmp_path / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    # dense + random + 2 rankings x (ZO, FO) = 6 trainings for one seed and one sparsity
    assert sorted((r["method"], r["ranking"]) for r in rows) == sorted(
        [("dense", ""), ("random", ""), ("zo-grasp", "largest"), ("zo-grasp", "abs"), ("fo-grasp", "largest"),
         ("fo-grasp", "abs")])
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    table = (tmp_path / "pruning_table.md").read_text()
    assert "ZO-GraSP (largest S)" in table and "FO-GraSP (\\|S\\|)" in table and "| 50% |" in table
    agreement = (tmp_path / "agreement.md").read_text()
    assert "| 4 | 2.weight |" in agreement
    for name in ("pruning.png", "pruning_table.csv", "agreement.csv", "layer_ratios.csv", "summary.json"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("args,msg", [(["--sparsities", "1.2"], "--sparsities"), (["--methods", "snip"], "--methods"),
                                      (["--q", "0"], "--q")])
def test_experiment_rejects_bad_input(tmp_path, capsys, args, msg):
    assert main(args + ["--out", str(tmp_path / "x")]) == 2
    assert msg in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
