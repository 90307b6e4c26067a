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


def _suffix_members(space: ParamSpace, module: nn.Module, first_perturbed: str, p: int, seed: int = 0):
    """Members equal to the module's theta in every block before `first_perturbed`, perturbed from it on."""
    theta = space.flatten_module(module)
    thetas = _members(space, module, p, 0.1, seed)
    thetas[:, : space[first_perturbed].offset] = theta[: space[first_perturbed].offset]
    return thetas


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,first_perturbed,shared", [
    ("digits", "2.weight", ["0"]),  # the first conv the same in every member
    ("digits", "6.weight", ["0", "2"]),  # the linear layer only: the whole conv stack once
    ("bn-grouped", "3.weight", ["0"]),  # a norm layer (affine parameters in the space) in the shared prefix
    ("mlp", "3.weight", ["2.0"]),  # a nested Sequential
])
def test_a_prefix_the_same_in_every_member_is_computed_once(name, first_perturbed, shared, dtype):
    """Layers whose parameters (in the space) agree in all members run once, as plain layers on the shared
    input (their forward hooks fire once, with the batch's own shape); the losses still equal a loop of
    plain forwards to the tolerance of the grouped path."""
    module, shape, classes = _models()[name]
    module = module.to(dtype).train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (12,), generator=gen)
    space = ParamSpace.from_module(module)
    thetas = _suffix_members(space, module, first_perturbed, 6)
    modules = dict(module.named_modules())
    calls: dict[str, list[tuple[int, ...]]] = {n: [] for n in modules if n}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: calls[n].append(tuple(o.shape))) for n in calls]
    try:
        with torch.no_grad():
            got = PopulationForward(module, space).losses(thetas, x, y, F.cross_entropy)
    finally:
        for h in hooks:
            h.remove()
    for n in shared:
        assert len(calls[n]) == 1 and calls[n][0][0] == 12, (n, calls[n])  # once, on the batch (not P x anything)
    perturbed = first_perturbed.rsplit(".", 1)[0]
    assert calls[perturbed] == []  # the first perturbed layer takes the batched kernels, not the plain module
    ref = _reference(module, space, thetas, x, y)
    assert (ref.max() - ref.min()) > 1e-3
    torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=0)


def test_members_that_differ_anywhere_in_a_layer_take_the_per_member_path():
    """One coordinate of the first conv differs in one member: no sharing, and that member's loss is its own."""
    torch.manual_seed(0)
    module = make_digits_cnn(4)
    space = ParamSpace.from_module(module)
    thetas = _suffix_members(space, module, "6.weight", 4)
    thetas[2, 5] += 0.5  # a weight of the first conv, member 2 only
    x, y = torch.rand(10, 1, 8, 8), torch.randint(0, 10, (10,))
    calls = []
    hook = module[0].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        got = PopulationForward(module, space).losses(thetas, x, y, F.cross_entropy)
    finally:
        hook.remove()
    assert calls == []
    torch.testing.assert_close(got, _reference(module, space, thetas, x, y), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", list(_models()))
def test_the_forward_changes_neither_the_input_nor_the_parameters(name):
    """ReLU runs in place only on activations the forward made itself: the caller's batch and the module's
    parameters are untouched, also when the input reaches a ReLU unchanged (a ReLU first)."""
    module, shape, classes = _models()[name]
    module = nn.Sequential(nn.ReLU(), module)
    x = torch.randn(8, *shape)
    y = torch.randint(0, classes, (8,))
    space = ParamSpace.from_module(module)
    before_x, before_p = x.clone(), {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        got = PopulationForward(module, space).losses(_members(space, module, 3, 0.1), x, y, F.cross_entropy)
        got_shared = PopulationForward(module, space).losses(space.flatten_module(module).expand(3, -1), x, y,
                                                             F.cross_entropy)
    assert torch.equal(x, before_x)
    assert all(torch.equal(v, before_p[k]) for k, v in module.state_dict().items())
    assert torch.isfinite(got).all()
    with torch.no_grad():  # every member the module itself: every layer shared, the plain forward bitwise
        plain = F.cross_entropy(module.train()(x), y, reduction="none").mean()  # the population's reduction
    assert torch.equal(got_shared, plain.expand(3))


def test_the_kept_prefix_is_used_only_while_nothing_it_read_has_changed():
    """Chunks of one population on one batch share the prefix's output; changing the batch in place, a
    frozen parameter of the prefix or the training flag of a norm in it gives the fresh answer, equal to a
    loop of plain forwards."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                           nn.Flatten(), nn.Linear(6 * 6 * 6, 5))
    module[0].requires_grad_(False)  # outside the space
    space = ParamSpace.from_module(module)
    pop = PopulationForward(module, space)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(10, 1, 8, 8, generator=gen), torch.randint(0, 5, (10,), generator=gen)
    thetas = _suffix_members(space, module, "3.weight", 6)  # the norm's affine parameters the same in all

    def check():
        with torch.no_grad():
            got = torch.cat([pop.losses(thetas[:3], x, y, F.cross_entropy), pop.losses(thetas[3:], x, y,
                                                                                        F.cross_entropy)])
        torch.testing.assert_close(got, _reference(module, space, thetas, x, y), rtol=1e-5, atol=0)
        return got

    base = check()
    assert pop._prefix_cache is not None and pop._prefix_cache[0] is x
    x.mul_(2.0)  # the batch changed in place
    assert not torch.equal(check(), base)
    with torch.no_grad():
        module[0].weight.mul_(0.5)  # a frozen parameter of the prefix
    changed = check()
    module.eval()  # the norm now uses its running statistics
    assert not torch.equal(check(), changed)
    thetas[:, space["1.weight"].offset] += 0.25  # the norm's scale, in the space, changed in every member
    check()


def test_an_inference_mode_batch_is_never_kept():
    """Tensors made under torch.inference_mode have no version counter: the prefix is recomputed for them."""
    torch.manual_seed(0)
    module = make_digits_cnn(3)
    module[0].requires_grad_(False)
    space = ParamSpace.from_module(module)
    pop = PopulationForward(module, space)
    with torch.inference_mode():
        x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    thetas = _members(space, module, 4, 0.1)
    got = pop.losses(thetas, x, y, F.cross_entropy)
    assert pop._prefix_cache is None
    torch.testing.assert_close(got, _reference(module, space, thetas, x, y), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["digits", "bn-grouped"])
def test_cpu_chunks_change_no_bit(name, monkeypatch):
    """The oracle splits a population into CPU chunks whose largest activation stays under
    POPULATION_CPU_CHUNK_BYTES; ZO-GraSP's scores (hence the digits run) stay the same only if no
    loss changes by a bit: the members never meet in a kernel. Checked against chunks 4x larger."""
    import oracles.model_loss as model_loss

    module, shape, classes = _models()[name]
    oracle = ModelLossOracle(module)
    gen = torch.Generator().manual_seed(3)
    batch = (torch.rand(250, *shape, generator=gen), torch.randint(0, classes, (250,), generator=gen))
    thetas = _members(oracle.space, module, 67, 0.01)
    oracle.losses(thetas[:2], batch)  # measures the largest activation
    largest = max(oracle._activation_bytes.values())
    monkeypatch.setattr(model_loss, "POPULATION_CPU_CHUNK_BYTES", 4 * largest)  # chunks of 4 members
    small = oracle.losses(thetas, batch)
    monkeypatch.setattr(model_loss, "POPULATION_CPU_CHUNK_BYTES", 16 * largest)  # chunks of 16
    large = oracle.losses(thetas, batch)
    whole = oracle.population.losses(thetas, *batch, oracle.loss_fn)  # one chunk
    assert torch.equal(small, large) and torch.equal(small, whole)
    torch.testing.assert_close(small, _reference(module, oracle.space, thetas, *batch), rtol=1e-5, atol=0)
