"""The batched population forward (blackbox_zo/population.py) against a loop of plain forwards.

Reference: for each of the P parameter vectors, the module itself (parameters loaded) or
`functional_call`, one member at a time. Tolerances: 1e-5 relative in float32 (the grouped
kernels add in another order; measured ~1e-7), 1e-10 in float64 (measured ~1e-16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from blackbox_zo.oracle import ParamSpace
from blackbox_zo.population import NotBatchableError, PopulationForward
from oracles.model_loss import ModelLossOracle
from problems.digits import make_digits_cnn

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _reference(module: nn.Module, space: ParamSpace, thetas, x, y, loss_fn=F.cross_entropy):
    """One plain forward per member; norm layers in training mode use batch statistics, update nothing."""
    norms = {n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training}
    buffers = {k: (None if k.rsplit(".", 1)[0] in norms else v) for k, v in module.named_buffers()}
    with torch.no_grad():
        return torch.stack([loss_fn(functional_call(module, {**space.views(t), **buffers}, (x,)), y) for t in thetas])


def _members(space: ParamSpace, module: nn.Module, p: int, scale: float, seed: int = 0):
    theta = space.flatten_module(module)
    gen = torch.Generator().manual_seed(seed)
    return theta + scale * torch.randn(p, theta.numel(), generator=gen, dtype=theta.dtype)


def _models():
    torch.manual_seed(0)
    return {
        "digits": (make_digits_cnn(8), (1, 8, 8), 10),
        "digits-w3": (make_digits_cnn(3), (1, 8, 8), 10),
        # batch norm (2-D and 1-D), a grouped strided convolution, average pooling, tanh, a bias-free linear
        "bn-grouped": (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                     nn.Conv2d(6, 8, 3, stride=2, groups=2), nn.AvgPool2d(2), nn.Flatten(),
                                     nn.Linear(8 * 3 * 3, 12), nn.BatchNorm1d(12), nn.Tanh(),
                                     nn.Linear(12, 5, bias=False)), (3, 16, 16), 5),
        # a parameter-free prefix on the shared input, then an MLP; a nested Sequential
        "mlp": (nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Sequential(nn.Linear(3 * 8 * 8, 7), nn.GELU()),
                              nn.Linear(7, 5)), (3, 16, 16), 5),
        "conv1d": (nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(),
                                 nn.Linear(4 * 8, 3)), (2, 16), 3),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("train_mode", [True, False])
def test_population_equals_a_loop_of_plain_forwards(name, dtype, train_mode):
    module, shape, classes = _models()[name]
    module = module.to(dtype).train(train_mode)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (12,), generator=gen)
    space = ParamSpace.from_module(module)
    thetas = _members(space, module, 7, 0.1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        got = PopulationForward(module, space).losses(thetas, x, y, F.cross_entropy)
    ref = _reference(module, space, thetas, x, y)
    assert got.shape == (7,)
    assert (ref.max() - ref.min()) > 1e-3  # the members differ: a mix-up between them would show
    torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=0)
    for k, v in module.state_dict().items():  # running statistics untouched
        assert torch.equal(v, before[k]), k


def test_frozen_parameters_are_the_modules_own():
    torch.manual_seed(0)
    module = make_digits_cnn(4)
    module[0].weight.requires_grad_(False)  # not in the space: every member uses the module's
    space = ParamSpace.from_module(module)
    assert "0.weight" not in space.names
    x, y = torch.rand(9, 1, 8, 8), torch.randint(0, 10, (9,))
    thetas = _members(space, module, 5, 0.1)
    got = PopulationForward(module, space).losses(thetas, x, y, F.cross_entropy)
    torch.testing.assert_close(got, _reference(module, space, thetas, x, y), rtol=1e-5, atol=0)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("module", [
    nn.Sequential(nn.Linear(4, 3), _Custom()),  # an unknown layer with parameters
    nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1), nn.Linear(3, 2)),  # unknown, after a perturbed layer
    nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)),  # random in training mode
    nn.Sequential(nn.Flatten(0), nn.Linear(4, 3)),  # a flatten the layouts do not cover
])
def test_unknown_layers_are_refused_and_the_oracle_keeps_vmap(module):
    space = ParamSpace.from_module(module)
    with pytest.raises(NotBatchableError):
        PopulationForward(module, space)
    oracle = ModelLossOracle(module, lambda out, y: out.pow(2).mean(), feature_reuse=False)
    assert oracle.population is None


def test_model_loss_oracle_uses_the_population_path_and_agrees_with_vmap():
    torch.manual_seed(0)
    module = make_digits_cnn(8)
    oracle = ModelLossOracle(module)
    assert oracle.population is not None
    gen = torch.Generator().manual_seed(2)
    batch = (torch.rand(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    thetas = _members(oracle.space, module, 40, 0.05)
    oracle.memory_cap_bytes = 6 * 2**20  # several chunks
    got = oracle.losses(thetas, batch)
    torch.testing.assert_close(got, oracle._vmapped_losses(thetas, batch), rtol=1e-5, atol=0)
    torch.testing.assert_close(got, _reference(module, oracle.space, thetas, *batch), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,k", [("digits", 6), ("digits", 2), ("mlp", 3), ("bn-grouped", 9)])
def test_members_that_share_the_first_layers_run_them_once(name, dtype, k):
    """A population that varies only from top-level layer k on (an ES restricted to late blocks) runs
    layers 0..k-1 once and the rest per member: the same losses as a loop of plain forwards. A norm
    layer among the shared ones (bn-grouped) keeps the whole population forward; so does a population
    that varies in the first layer."""
    module, shape, classes = _models()[name]
    module = module.to(dtype).train()
    oracle = ModelLossOracle(module)
    first = next(b.offset for b in oracle.space.blocks if int(b.name.split(".", 1)[0]) >= k)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(12, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (12,), generator=gen)
    thetas = _members(oracle.space, module, 9, 0.1)
    thetas[:, :first] = oracle.space.flatten_module(module)[:first]  # members agree on layers 0..k-1
    got = oracle.losses(thetas, (x, y))
    torch.testing.assert_close(got, _reference(module, oracle.space, thetas, x, y), rtol=TOL[dtype], atol=0)
    split = oracle._shared_prefix(thetas)
    if name == "bn-grouped":
        assert split is None
    else:
        assert split is not None and split[2] == first and len(oracle._prefix_cache) == 1
        varied = thetas.clone()
        varied[1, 0] += 0.5  # one member differs in the first parameter: no shared layer
        assert oracle._shared_prefix(varied) is None
        torch.testing.assert_close(oracle.losses(varied, (x, y)), _reference(module, oracle.space, varied, x, y),
                                   rtol=TOL[dtype], atol=0)
