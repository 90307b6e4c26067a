"""HZO (blackbox_zo.contrib.hzo) against autograd, its exact query-count formulas, and its contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blackbox_zo.contrib.hzo import HZO, StagedModel, TorchStages, split_point
from blackbox_zo.oracle import NonFiniteLossError
from problems.experiments.hzo import autograd_grad, cosine, make_staged_cnn


class TanhResidual(nn.Module):
    def __init__(self, channels, scale):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = scale

    def forward(self, h):
        return h + self.scale * self.conv(torch.tanh(h))


def smooth_residual_cnn(depth=5, channels=2, size=6, seed=0):
    """A smooth (tanh) residual CNN near unit Lipschitz (branch scale 1/sqrt(depth)), float64."""
    torch.manual_seed(seed)
    body = [TanhResidual(channels, 1 / math.sqrt(depth)) for _ in range(depth)]
    net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), *body, nn.Flatten(), nn.Linear(channels * size * size, 4))
    return net.double(), [1] * (depth + 1) + [None, None]  # flatten and linear are not local maps


def batch_for(size=6, n=3, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("split", ["midpoint", "direct", "chain"])
def test_hzo_equals_backprop_on_a_smooth_residual_net(split):
    # Central differences: truncation mu^2/6 |f'''| ~ 1e-9 relative at mu = 1e-4, rounding
    # 1e-16 / 1e-4 = 1e-12; targets pass through at most log2(n) = 3 (midpoint) or n = 8 (chain)
    # finite differences, each through Jacobians of norm ~1 (the unit-Lipschitz regime), so the
    # error stays O(1e-8). Measured ~6e-10; 1e-6 fails on any wrong target or weight slice.
    net, radii = smooth_residual_cnn()
    x, y = batch_for()
    g, loss = autograd_grad(net, x, y)
    staged = TorchStages(net, radii=radii)
    est = HZO(mu=1e-4, scheme="central", split=split).estimate(staged, staged.theta(), (x, y))
    assert float((est.grad - g).norm() / g.norm()) < 1e-6
    assert abs(est.base_loss - loss) < 1e-12


def test_cosine_to_backprop_on_a_relu_residual_cnn_in_float32():
    # The Fig. 1 setting at small size: ReLU, float32, forward differences, mu = 1e-3. ReLU is
    # piecewise linear, so a forward difference is exact except where a pre-activation lies within
    # ~mu of its kink (a fraction ~1e-3 of units) and for float32 rounding (6e-8 |h| / mu ~ 1e-4
    # relative per entry). Both keep 1 - cos at the 1e-4..1e-3 level (measured 1 - cos < 1e-4);
    # a wrong sign, slice or scale anywhere drops it far below 0.999.
    net, radii = make_staged_cnn(depth=6, channels=2, residual=True, seed=0)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    g, _ = autograd_grad(net, x, y)
    staged = TorchStages(net, radii=radii)
    est = HZO(mu=1e-3).estimate(staged, staged.theta(), (x, y))
    assert cosine(est.grad, g) > 0.999


def test_spatial_parallel_perturbation_is_exact_and_cheaper():
    # Perturbing a stride-k lattice at once (k = 2R + 1) leaves each output touched by one
    # perturbed unit, so the window sums equal the one-unit differences up to summation order.
    net, radii = smooth_residual_cnn(depth=3, channels=2, size=8)
    x, y = batch_for(size=8)
    staged = TorchStages(net, radii=radii)
    theta = staged.theta()
    fast = HZO(mu=1e-4, spatial_parallel=True)
    slow = HZO(mu=1e-4, spatial_parallel=False)
    a = fast.estimate(staged, theta, (x, y))
    b = slow.estimate(staged, theta, (x, y))
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    assert a.queries < b.queries
    # every split whose right half is local: C * k^2 perturbations instead of C * H * W
    lattice_splits = 0
    for (lo, mid, hi, n_pert) in fast.last_counts.splits:
        radius = sum(radii[l - 1] for l in range(mid + 1, hi + 1)) if hi <= staged.num_stages and all(
            radii[l - 1] is not None for l in range(mid + 1, hi + 1)) else None
        if mid <= 4 and radius is not None and 2 * radius + 1 < 8:  # conv activations h_0..h_4
            assert n_pert == 2 * (2 * radius + 1) ** 2
            lattice_splits += 1
    assert lattice_splits >= 2  # (0,3] at k = 5 and (1,3] at k = 3 in this 7-stage net


class EqualWidthMLP(StagedModel):
    """L stages h -> tanh(W h + b), all of width M; loss = per-sample 1/2 ||h_L - t||^2."""

    def __init__(self, n_stages, width, seed=0):
        from blackbox_zo.oracle import ParamSpace

        gen = torch.Generator().manual_seed(seed)
        self.num_stages, self.width = n_stages, width
        self.space = ParamSpace([(f"{l}", (width * width + width,)) for l in range(n_stages)])
        self.theta = torch.randn(self.space.dim, generator=gen, dtype=torch.float64) / math.sqrt(width)

    def stage_slice(self, l):
        return self.space.blocks[l - 1].slice

    def _apply(self, w, h):
        m = self.width
        return torch.tanh(h @ w[..., : m * m].reshape(*w.shape[:-1], m, m).transpose(-1, -2) + w[..., m * m :].unsqueeze(-2))

    def stage(self, l, w, h):
        return self._apply(w, h)

    def stage_multi(self, l, ws, h):
        return self._apply(ws, h.unsqueeze(0))

    def sample_losses(self, h, targets):
        return 0.5 * ((h - targets) ** 2).sum(-1)


@pytest.mark.parametrize("n", [4, 8, 16])
def test_query_counts_follow_the_closed_forms(n):
    # n = L + 1 stages including the loss, all activations of width M. Forward differences:
    #   midpoint: T(n) = 2 T(n/2) + M n/2  ->  M (n/2) log2 n     (HZO's O(M L log L))
    #   direct:   sum_{j=1}^{n-1} M j      ->  M n (n - 1) / 2    (O(M L^2))
    #   chain:    M per split, n - 1 splits ->  M (n - 1)
    # plus n for the clean forward pass and d for the local weight differences.
    width = 3
    model = EqualWidthMLP(n - 1, width)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, width, generator=gen, dtype=torch.float64), torch.randn(2, width, generator=gen, dtype=torch.float64))
    d = model.space.dim
    expected = {"midpoint": width * n // 2 * int(math.log2(n)), "direct": width * n * (n - 1) // 2, "chain": width * (n - 1)}
    for split, activation in expected.items():
        before = model.ledger.total
        est = HZO(split=split).estimate(model, model.theta, batch)
        assert est.queries == model.ledger.total - before == n + activation + d, split
    # central differences double every difference, and coords restrict the weight part
    coords = torch.tensor([0, 5, d - 1])
    est = HZO(scheme="central").estimate(model, model.theta, batch, coords=coords)
    assert est.queries == n + 2 * expected["midpoint"] + 2 * coords.numel()
    mask = torch.ones(d, dtype=torch.bool)
    mask[coords] = False
    assert torch.all(est.grad[mask] == 0) and torch.all(est.grad[coords] != 0)


def test_hzo_on_a_custom_staged_model_matches_autograd():
    # The protocol with no torch modules: the same function written for autograd is the reference.
    model = EqualWidthMLP(5, 4, seed=1)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    theta = model.theta.clone().requires_grad_(True)
    h = x
    for l in range(1, 6):
        h = model.stage(l, theta[model.stage_slice(l)], h)
    (g,) = torch.autograd.grad(model.sample_losses(h, t).mean(), theta)
    est = HZO(mu=1e-5, scheme="central").estimate(model, model.theta, (x, t))
    assert float((est.grad - g).norm() / g.norm()) < 1e-6  # same error budget as the CNN test


def test_values_only_no_autograd_graph():
    calls = []

    class Watch(nn.Module):
        def forward(self, h):
            calls.append(torch.is_grad_enabled())
            return h

    net, radii = make_staged_cnn(depth=2, channels=2)
    net = nn.Sequential(*net[:2], Watch(), *net[2:])
    staged = TorchStages(net, radii=[1, 1, 0, 1, None])
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    est = HZO().estimate(staged, staged.theta(), (x, y))
    assert calls and not any(calls)
    assert est.grad.grad_fn is None and not est.grad.requires_grad


def test_bad_stages_and_values_fail_clearly():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(128, 10))
    with pytest.raises(ValueError, match="batch-norm"):
        TorchStages(net)
    net.eval()
    TorchStages(net)  # eval-mode norm layers are sample-independent: accepted

    class NaNStage(nn.Module):
        def forward(self, h):
            return h * float("nan")

    staged = TorchStages(nn.Sequential(nn.Flatten(), NaNStage(), nn.Linear(4, 3)))
    with pytest.raises(NonFiniteLossError):
        HZO().estimate(staged, staged.theta(), (torch.rand(2, 1, 2, 2), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="split"):
        HZO(split="bisect")
    with pytest.raises(ValueError, match="split"):
        split_point(0, 4, "thirds")


@pytest.mark.slow
def test_hzo_trains_digits():
    # Acceptance (opt-in, ~35 CPU seconds): one epoch of HZO on a residual staged CNN reaches the
    # accuracy backprop reaches with the same recipe (measured: 0.917 vs 0.914; chance is 0.1).
    # HZO's gradient has cosine ~1 to backprop here, so the two runs may differ by a few test
    # images (0.03 = 11 of 360), never by a failed training.
    from problems.experiments.hzo import train_digits_hzo

    results, _ = train_digits_hzo(depth=2, channels=4, epochs=1, batch_size=32, lr=0.05, mu=1e-3, progress=False)
    hzo, fo = results
    assert hzo["test_acc"] > 0.88 and abs(hzo["test_acc"] - fo["test_acc"]) < 0.03
    assert hzo["stage_queries"] > 0 and fo["stage_queries"] == 0
