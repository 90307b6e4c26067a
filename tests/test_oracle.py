import pytest
import torch
from torch import nn

from blackbox_zo.estimators import CGE
from blackbox_zo.oracle import (
    NonFiniteLossError,
    Oracle,
    OracleError,
    ParamSpace,
    QueryBudgetExceeded,
    QueryLedger,
    UnknownNameError,
    check_oracle,
    coordinate_losses_in_chunks,
    make_oracle,
    register_oracle,
)
from oracles.model_loss import ModelLossOracle


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))


def small_batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 4, 4, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def test_param_space_views_share_memory_and_roundtrip():
    m = small_cnn()
    space = ParamSpace.from_module(m)
    assert space.dim == sum(p.numel() for p in m.parameters())
    theta = space.flatten_module(m)
    views = space.views(theta)
    assert all(v.data_ptr() == theta[b.slice].data_ptr() for v, b in zip(views.values(), space))
    theta2 = theta + 1.0
    space.load_into(m, theta2)
    assert torch.equal(space.flatten_module(m), theta2)
    last = space.blocks[-1]
    idx = space.block_index(torch.tensor([0, last.offset, space.dim - 1]))
    assert idx.tolist() == [0, len(space) - 1, len(space) - 1]
    batched = space.views(torch.zeros(5, space.dim))
    assert batched[last.name].shape == (5, *last.shape)


def test_model_loss_oracle_passes_check_and_matches_module():
    m = small_cnn()
    oracle = ModelLossOracle(m)
    batch = small_batch()
    report = check_oracle(oracle, batch)
    assert report.ok, str(report)
    # losses() at the module's own theta equals the plain forward (batch statistics in train mode)
    theta = oracle.initial_theta()
    ref = nn.functional.cross_entropy(m(batch[0]), batch[1])
    torch.testing.assert_close(oracle.losses(theta.unsqueeze(0), batch)[0], ref.detach(), rtol=1e-5, atol=1e-6)


def test_perturbed_evaluations_never_touch_running_stats():
    m = small_cnn()
    oracle = ModelLossOracle(m)
    batch = small_batch()
    bn = m[1]
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    CGE().estimate(oracle, oracle.initial_theta(), batch)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])
    oracle.on_step(oracle.initial_theta(), batch)  # the once-per-step unperturbed update
    assert not torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == int(before[1]) + 1


class Broken(Oracle):
    def __init__(self, mode):
        self.mode = mode
        self.name = f"broken-{mode}"
        self.space = ParamSpace([("w", (4,))])
        self.w = nn.Parameter(torch.ones(4))

    def losses(self, thetas, batch):
        if self.mode == "shape":
            return thetas.sum(1, keepdim=True)
        if self.mode == "random":
            return thetas.sum(1) + torch.rand(thetas.shape[0])
        if self.mode == "graph":
            return thetas @ self.w
        if self.mode == "nan":
            return thetas.sum(1) * float("nan")
        if self.mode in ("coords", "base"):  # coordinate_losses / base_loss disagrees below
            return thetas.pow(2).sum(1)
        raise AssertionError

    def base_loss(self, theta, batch):
        if self.mode == "base":
            return theta.pow(2).sum().reshape(1) + 1e-3
        return super().base_loss(theta, batch)

    def coordinate_losses(self, theta, coords, mu, batch):
        if self.mode == "coords":
            return torch.zeros(coords.numel())
        return super().coordinate_losses(theta, coords, mu, batch)


@pytest.mark.parametrize("mode,failing", [
    ("shape", "shape"), ("random", "deterministic"), ("graph", "no autograd"), ("nan", "finite"),
    ("coords", "coordinate_losses agrees with losses"), ("base", "base_loss agrees with losses"),
])
def test_check_oracle_catches_broken_oracles(mode, failing):
    report = check_oracle(Broken(mode), None, torch.ones(4))
    assert not report.ok
    assert failing in [r.name for r in report.results if not r.passed]


def test_ledger_counts_budget_and_phases(quadratic):
    theta = quadratic.initial_theta()
    quadratic.ledger = QueryLedger(budget=29)
    CGE().estimate(quadratic, theta, None)  # 13 queries
    with quadratic.ledger.phase("prune"):
        quadratic.query(theta.repeat(4, 1), None)
    assert quadratic.ledger.counts == {"train": 13, "prune": 4, "eval": 0}
    evaluated = quadratic.rows_evaluated
    with pytest.raises(QueryBudgetExceeded):
        CGE().estimate(quadratic, theta, None)  # 1 base query fits, the 12 coordinates would not
    assert quadratic.ledger.total <= 29
    assert quadratic.rows_evaluated - evaluated == quadratic.ledger.total - 17  # nothing evaluated unpaid


def test_oracle_errors_are_wrapped_and_non_finite_rejected(quadratic):
    class Raises(Oracle):
        name = "raises"
        space = ParamSpace([("w", (2,))])

        def losses(self, thetas, batch):
            raise RuntimeError("simulator crashed")

    with pytest.raises(OracleError, match="raises.*simulator crashed"):
        Raises().query(torch.zeros(1, 2), None)
    with pytest.raises(NonFiniteLossError):
        Broken("nan").query(torch.zeros(2, 4), None)
    with pytest.raises(OracleError, match="shape"):
        Broken("shape").query(torch.zeros(2, 4), None)


def test_registry_and_unknown_names():
    @register_oracle("test-quadratic-v1")
    class Q(Oracle):
        space = ParamSpace([("w", (3,))])

        def __init__(self, scale=1.0):
            self.scale = scale

        def losses(self, thetas, batch):
            return self.scale * thetas.pow(2).sum(1)

    oracle = make_oracle("test-quadratic-v1", scale=2.0)
    assert oracle.scale == 2.0
    with pytest.raises(UnknownNameError, match="known: .*test-quadratic-v1"):
        make_oracle("nope-v1")
    with pytest.raises(ValueError, match="already registered"):
        register_oracle("test-quadratic-v1")(object)


def test_coordinate_losses_in_chunks_is_one_call_per_chunk_and_equals_each_point_alone():
    """The loop shared by Oracle.coordinate_losses and ModelLossOracle's vmapped path: every
    perturbed point theta + mu e_j, at most `chunk` rows a call, in the order of coords."""
    gen = torch.Generator().manual_seed(0)
    theta, c = torch.randn(12, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    calls = []

    def losses(thetas, batch):  # row-wise: a row's value does not depend on the other rows
        calls.append(thetas.shape[0])
        return torch.log(torch.cosh(thetas - c)).sum(1) * batch

    coords = torch.tensor([3, 0, 11, 3, 7])
    alone = []
    for j in coords.tolist():
        point = theta.clone()
        point[j] += 1e-3
        alone.append(losses(point[None], 2.0))
    alone = torch.cat(alone)
    for chunk, expected_calls in ((1, [1] * 5), (2, [2, 2, 1]), (5, [5]), (64, [5])):
        calls.clear()
        got = coordinate_losses_in_chunks(losses, theta, coords, 1e-3, 2.0, chunk)
        assert calls == expected_calls
        assert torch.equal(got, alone)  # bitwise: the same arithmetic per row
    assert coordinate_losses_in_chunks(losses, theta, torch.tensor([], dtype=torch.long), 1e-3, 2.0, 4).numel() == 0
    assert torch.equal(theta, theta.clone())  # theta itself is never written


def test_model_loss_vmapped_coordinate_path_matches_plain_forwards():
    """ModelLossOracle without feature reuse: its chunked coordinate losses against one plain forward
    of the perturbed model per coordinate (vmap reorders float32 sums: 1e-6)."""
    model = small_cnn().eval()
    batch = small_batch()
    oracle = ModelLossOracle(model, nn.functional.cross_entropy, feature_reuse=False, population=False)
    assert oracle.reuse is None and oracle.population is None
    theta = oracle.space.flatten_module(model)
    coords = torch.tensor([0, 5, 27, 30, oracle.space.dim - 1])
    got = oracle.coordinate_losses(theta, coords, 1e-2, batch)
    buffers = dict(model.named_buffers())
    ref = []
    with torch.no_grad():
        for j in coords.tolist():
            point = theta.clone()
            point[j] += 1e-2
            params = {k: v[0] for k, v in oracle.space.views(point[None]).items()}
            out = torch.func.functional_call(model, {**params, **buffers}, (batch[0],))
            ref.append(nn.functional.cross_entropy(out, batch[1]).reshape(1))
    torch.testing.assert_close(got, torch.cat(ref), rtol=1e-6, atol=1e-6)
