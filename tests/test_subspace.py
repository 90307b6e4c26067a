"""Subspace CGE (blackbox_zo/subspace.py): CGE on a linear layer along e_k v_j^T, v_j the batch inputs'
top singular vectors. Checked against autograd on the digits CNN in float64: the exact gradient of the
batch loss for r = rank([H | 1]), its projection for r < rank, a closed-form bound for forward
differences; query counts, reproducibility, bitwise resume, and the one-line refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import SmoothBlocks
from resume_helpers import stop_and_resume

from blackbox_zo.config import ConfigError, TrainConfig, resolve_config
from blackbox_zo.estimators import make_estimator
from blackbox_zo.oracle import QueryLedger
from blackbox_zo.problem import TensorBatches, TrainingSetup
from blackbox_zo.rundir import CHECKPOINT_NAME
from blackbox_zo.subspace import SubspaceCGE, input_subspace, subspace_directions
from blackbox_zo.trainer import Trainer, train
from oracles.model_loss import ModelLossOracle
from problems.digits import DigitsProblem, load_digits_split, make_digits_cnn

LAYER = "6"  # the digits CNN's linear layer


@pytest.fixture(scope="module")
def digits64():
    """The width-2 digits CNN in float64 (linear layer 64 -> 10), a batch of 20 images: rank([H | 1]) = 16."""
    torch.manual_seed(0)
    module = make_digits_cnn(2).double()
    x, y, _, _ = load_digits_split(0)
    return module, (x[:20].double(), y[:20])


def layer_grad(module, batch):
    """Autograd's gradient of the batch loss w.r.t. the linear layer, as [W | b] [out, in + 1]."""
    m = copy.deepcopy(module)
    F.cross_entropy(m(batch[0]), batch[1]).backward()
    return torch.cat([m[6].weight.grad, m[6].bias.grad[:, None]], dim=1)


def flat(gab):
    """[W | b] [out, in + 1] -> the layer's flat coordinates (weight row-major, then bias)."""
    return torch.cat([gab[:, :-1].reshape(-1), gab[:, -1]])


def augmented_inputs(module, batch):
    with torch.no_grad():
        h = module[:6](batch[0])
    return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)


def test_full_rank_is_the_layers_gradient(digits64):
    """r >= rank([H | 1]): the subspace holds the gradient, so central differences give autograd's gradient.
    Tolerance 1e-8 (float64, mu = 1e-4): the central error is mu^2 / 6 times the third derivative along a
    unit direction (O(1) here: about 1e-9) plus roundoff eps |L| / mu (about 1e-12); gradient entries are
    about 1e-2. Every other coordinate of the estimate is exactly 0."""
    module, batch = digits64
    oracle = ModelLossOracle(module)
    theta = oracle.initial_theta()
    rank = int(torch.linalg.matrix_rank(augmented_inputs(module, batch)))
    assert rank == 16  # 20 images, 65 columns, but a few features are dead (ReLU) at this initialisation
    est = SubspaceCGE(rank=rank, mu=1e-4, scheme="central", layer=LAYER).estimate(oracle, theta, batch)
    coords = oracle.space.coords_of([LAYER])
    exact = flat(layer_grad(module, batch))
    assert float(exact.abs().max()) > 1e-2
    assert torch.allclose(est.grad[coords], exact, rtol=0, atol=1e-8)
    rest = torch.ones(theta.numel(), dtype=torch.bool)
    rest[coords] = False
    assert torch.count_nonzero(est.grad[rest]) == 0
    assert est.queries == 2 * 10 * rank
    wide = SubspaceCGE(rank=64, mu=1e-4, scheme="central", layer=LAYER).estimate(oracle, theta, batch)
    assert wide.queries == 2 * 10 * 20  # r clipped to min(rows, in + 1): the null space adds queries, not signal
    assert torch.allclose(wide.grad, est.grad, rtol=0, atol=1e-8)


@pytest.mark.parametrize("rank", [3, 8])
def test_lower_rank_is_the_gradient_projected_on_the_top_singular_vectors(digits64, rank):
    """r < rank([H | 1]): the estimate is G V V^T, V the top-r right singular vectors (same tolerance), and
    it misses a part of the gradient (so the test could not pass with the full gradient)."""
    module, batch = digits64
    oracle = ModelLossOracle(module)
    est = SubspaceCGE(rank=rank, mu=1e-4, scheme="central", layer=LAYER).estimate(oracle, oracle.initial_theta(),
                                                                                   batch)
    v = torch.linalg.svd(augmented_inputs(module, batch), full_matrices=False)[2][:rank].T
    g = layer_grad(module, batch)
    projected = flat(g @ v @ v.T)
    assert torch.allclose(est.grad[oracle.space.coords_of([LAYER])], projected, rtol=0, atol=1e-8)
    assert float((projected - flat(g)).norm()) > 1e-3 * float(g.norm())


def test_forward_differences_within_the_cross_entropy_curvature_bound(digits64):
    """Forward scheme, coefficient by coefficient: |c_kj - <grad, D_kj>| <= mu / 2 * max curvature along D_kj,
    and for cross-entropy on logits z_i = W h_i + b the curvature along e_k v_j^T is
    (1/B) sum_i H_kk(z_i) (v_j . a_i)^2 <= sigma_j^2 / (4 B) (a softmax Jacobian's diagonal p (1 - p) <= 1/4):
    the bound is mu sigma_j^2 / (8 B). Queries: out * r + 1."""
    module, batch = digits64
    oracle = ModelLossOracle(module)
    oracle.ledger = QueryLedger()
    mu, rank = 1e-3, 6
    est = SubspaceCGE(rank=rank, mu=mu, layer=LAYER).estimate(oracle, oracle.initial_theta(), batch)
    assert est.queries == 10 * rank + 1 == oracle.ledger.total
    a = augmented_inputs(module, batch)
    _, sigma, vh = torch.linalg.svd(a, full_matrices=False)
    v = input_subspace(a[:, :-1], rank, with_bias=True)
    d = subspace_directions(v, 10, 10 * 64, with_bias=True)
    assert torch.allclose(d @ d.T, torch.eye(10 * rank, dtype=d.dtype), atol=1e-12)  # orthonormal directions
    coefficients = d @ est.grad[oracle.space.coords_of([LAYER])]
    exact = d @ flat(layer_grad(module, batch))
    bound = (mu * sigma[:rank] ** 2 / (8 * a.shape[0])).repeat(10) + 1e-12
    error = (coefficients - exact).abs()
    assert bool((error <= bound).all())
    assert float(error.max()) > 1e-3 * float(bound.max())  # the bound is not vacuous: forward is not exact


def test_sign_rule_and_bitwise_reproducible(digits64):
    """Each singular vector's largest entry is positive; the same theta and batch give the same estimate
    bitwise (the plan has no seed: it is a function of theta and the batch)."""
    module, batch = digits64
    a = augmented_inputs(module, batch)
    v = input_subspace(a[:, :-1], 8, with_bias=True)
    assert bool((v.gather(1, v.abs().argmax(1, keepdim=True)) > 0).all())
    assert torch.equal(v, input_subspace(a[:, :-1].clone(), 8, with_bias=True))
    oracle = ModelLossOracle(module)
    theta = oracle.initial_theta()
    one = SubspaceCGE(rank=8, layer=LAYER).estimate(oracle, theta, batch, seed=1)
    two = SubspaceCGE(rank=8, layer=LAYER).estimate(ModelLossOracle(module), theta.clone(), batch, seed=2)
    assert torch.equal(one.grad, two.grad)


def test_layer_inputs_are_the_layers_input_and_the_population_reuses_them(digits64):
    """layer_inputs is the input of the linear layer (population path and hook path alike), and the
    perturbed queries of the same step reuse it: the population forward's prefix is that tensor."""
    module, batch = digits64
    oracle = ModelLossOracle(module)
    theta = oracle.initial_theta()
    inputs = oracle.layer_inputs(theta, batch, LAYER)
    with torch.no_grad():
        assert torch.equal(inputs, module[:6](batch[0]))
    hooked = ModelLossOracle(module, population=False, feature_reuse=False)
    assert hooked.population is None and torch.equal(hooked.layer_inputs(theta, batch, LAYER), inputs)
    plan = SubspaceCGE(rank=4, layer=LAYER).step_plan(oracle, theta, batch)
    cached = oracle.population._prefix_cache[3]
    assert cached.data_ptr() == inputs.data_ptr()  # layer_inputs' rows are a view of the kept prefix
    oracle.losses(plan.materialize()[1:], batch)  # the perturbed members: the kept prefix, not a new one
    assert oracle.population._prefix_cache[3] is cached


def _digits(*extra):
    p = DigitsProblem()
    fast = ["model.width=2", "data.batch_size=64", "estimator=subspace-cge", "estimator.rank=4",
            'estimator.blocks=["6"]', "phase2=none", "optimizer.name=adam", "optimizer.lr=0.05", "run.progress=false",
            "run.epochs=1", "run.checkpoint_every_steps=1"]
    return p, resolve_config(p.config_model, p.default_config(), overrides=fast + list(extra))


def test_training_moves_only_the_layer_and_resumes_bitwise(tmp_path):
    """Through the trainer: 41 queries a step (10 * 4 + 1), only the linear layer moves, and a run stopped
    after 7 steps and resumed ends bitwise where the uninterrupted one ends."""
    p, cfg = _digits("run.max_steps=3")
    before = p.setup(cfg).module.state_dict()
    summary = train(p, cfg, tmp_path / "short")
    after = torch.load(tmp_path / "short" / CHECKPOINT_NAME, weights_only=True)["module"]
    assert summary["queries"]["train"] == 3 * 41 and summary["queries"].get("prune", 0) == 0
    for name in before:
        assert torch.equal(before[name], after[name]) != name.startswith("6."), name
    full, resumed, _, _ = stop_and_resume(_digits, tmp_path, stop_at=7)
    assert full["steps"] == resumed["steps"] == 22


@pytest.mark.parametrize("blocks, message", [
    ('["0"]', r"estimator.blocks: subspace-cge: 0.weight has shape \[2, 1, 3, 3\], not \[out, in\]"),
    ('["4"]', r"estimator.blocks: no parameter block '4' \(blocks: 0.weight"),  # the pooling layer
])
def test_a_layer_that_is_not_linear_is_a_config_error(tmp_path, blocks, message):
    p, cfg = _digits(f"estimator.blocks={blocks}")
    with pytest.raises(ConfigError, match=message) as info:
        train(p, cfg, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not any((tmp_path / "run").iterdir())


def test_a_black_box_oracle_is_refused_in_one_line():
    """An oracle without layer_inputs (loss values only) cannot serve the estimator: the trainer says so
    before the first step, and a direct call says so too."""
    oracle = SmoothBlocks()
    cfg = resolve_config(TrainConfig, {"estimator": {"kind": "subspace-cge"}})
    setup = TrainingSetup(oracle=oracle, train_batches=TensorBatches(torch.zeros(4, 1), batch_size=2))
    with pytest.raises(ConfigError, match="oracle 'smooth-blocks' is a black box that does not expose them") as info:
        Trainer(setup, cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs an oracle with layer_inputs"):
        make_estimator(cfg.estimator).estimate(oracle, oracle.initial_theta(), None)
    with pytest.raises(ValueError, match="plans from the layer's inputs"):
        SubspaceCGE().plan(oracle.initial_theta())


def test_the_cli_refuses_a_black_box_and_a_convolution_in_one_line(tmp_path, capsys):
    """`init-ask` (the external problem: loss values from outside Python) and `train digits` with a conv layer
    exit 2 with one line and write nothing (no file: the directory named by --out may stay, empty)."""
    from cli_helpers import run_cli

    out = tmp_path / "ask"
    code, _, err = run_cli(["init-ask", "external", "--set", "external.dim=10", "--set", "estimator=subspace-cge",
                            "--out", out], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and not (out.exists() and any(out.iterdir()))
    assert "oracle 'external' is a black box that does not expose them (no layer_inputs)" in err
    code, _, err = run_cli(["train", "digits", "--set", "estimator=subspace-cge", "--set", 'estimator.blocks=["2"]',
                            "--set", f"run.out_dir={tmp_path / 'runs'}", "--set", "run.progress=false"], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert "estimator.blocks: subspace-cge: 2.weight has shape [16, 8, 3, 3], not [out, in]" in err
    assert not any((tmp_path / "runs").rglob("*.pt"))


def test_ask_tell_hands_out_the_subspace_plan_of_a_model_loss(tmp_path):
    """Ask/tell on digits (a model's loss, so the layer's inputs are there): the ask is the step's subspace plan
    (the base, then 10 x 4 points that differ from it in layer 6 only), and a tell of the oracle's own losses
    moves layer 6 only."""
    from blackbox_zo.asktell import AskTellRun

    p, cfg = _digits("run.max_steps=2")
    run = AskTellRun.create(p, cfg, tmp_path / "run")
    theta = run.trainer.space.flatten(run.trainer.params)
    ask = run.ask()
    assert ask.points.shape == (10 * 4 + 1, theta.numel()) and torch.equal(ask.points[0], theta)
    moved = (ask.points[1:] != theta).any(0)
    layer = torch.zeros_like(moved)
    layer[run.trainer.space.coords_of(["6"])] = True
    assert bool(moved.any()) and not bool((moved & ~layer).any())
    batch = run.trainer.batches.batch(0, 0)
    run.tell(ask.id, run.trainer.oracle.losses(ask.points, batch).numpy())
    after = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)["module"]
    changed = torch.cat([(after[b.name].reshape(-1) != theta[b.slice]) for b in run.trainer.space])
    assert bool(changed.any()) and not bool((changed & ~layer).any())


def test_a_2d_weight_that_is_not_an_nn_linear_is_refused():
    """A parameter of shape [out, in] is not enough: the gradient's row space argument needs z = W h + b, so the
    module must be an nn.Linear (one line, naming what it is)."""
    from torch import nn

    class Bilinearish(nn.Module):  # a 2-D weight used as x^T W x: not a linear layer
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return ((x @ self.weight) * x).sum(1, keepdim=True)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # feature reuse may decline this module
        oracle = ModelLossOracle(nn.Sequential(Bilinearish()), lambda out, y: ((out - y) ** 2).mean())
    cfg = resolve_config(TrainConfig, {"estimator": {"kind": "subspace-cge", "blocks": ["0"]}})
    with pytest.raises(ConfigError, match=r"estimator.blocks: layer '0' is not an nn.Linear of the model "
                                          r"\(Bilinearish\); subspace-cge needs one") as info:
        SubspaceCGE.check_support(cfg.estimator, oracle)
    assert "\n" not in str(info.value)
