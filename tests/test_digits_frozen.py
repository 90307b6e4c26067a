"""digits' `model.frozen_convs`: the leading convolutions stay at their seeded initialisation, leave the
parameter space, and a population computes them once per batch (blackbox_zo/population.py)."""

from __future__ import annotations

import pytest
import torch

from resume_helpers import stop_and_resume

from blackbox_zo.config import ConfigError, resolve_config
from blackbox_zo.trainer import train
from problems.digits import DigitsProblem, make_digits_cnn

FAST = ["model.width=4", "model.frozen_convs=2", "data.batch_size=64", "estimator=sep-cma-es",
        "estimator.popsize=8", "estimator.mu=0.05", "phase2=none", "run.progress=false", "run.epochs=1",
        "run.checkpoint_every_steps=1"]


def _config(*extra):
    p = DigitsProblem()
    return p, resolve_config(p.config_model, p.default_config(), overrides=FAST + list(extra))


@pytest.mark.parametrize("frozen,dim", [(0, 4 * 9 + 4 + 8 * 4 * 9 + 8 + 8 * 16 * 10 + 10),
                                        (1, 8 * 4 * 9 + 8 + 8 * 16 * 10 + 10), (2, 8 * 16 * 10 + 10)])
def test_the_space_holds_the_unfrozen_layers_only(frozen, dim):
    p, cfg = _config(f"model.frozen_convs={frozen}")
    setup = p.setup(cfg)
    assert setup.oracle.space.dim == dim
    assert all(n.startswith("6.") for n in setup.oracle.space.names) == (frozen == 2)


def test_frozen_convs_keep_their_initialisation_and_the_rest_trains(tmp_path):
    p, cfg = _config("run.max_steps=12")
    summary = train(p, cfg, run_dir=tmp_path / "run")
    torch.manual_seed(cfg.run.seed)
    init = make_digits_cnn(4).state_dict()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["module"]
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(ckpt[k], init[k]), k
    assert not torch.equal(ckpt["6.weight"], init["6.weight"])
    assert summary["queries"]["train"] == 12 * 8


def test_frozen_convs_run_once_per_batch():
    """The conv stack is the same for every member: it runs once per batch, on the batch, however many
    population calls (chunks of a plan) that batch gets; a new batch runs it once again."""
    p, cfg = _config()
    setup = p.setup(cfg)
    oracle, module = setup.oracle, setup.module
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    theta = oracle.initial_theta()
    thetas = theta + 0.05 * torch.randn(8, theta.numel(), generator=gen)
    oracle.losses(thetas[:2], (x.clone(), y))  # the first call of a shape sizes the chunks (a 2-image forward)
    shapes = []
    hook = module[2].register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        first = oracle.losses(thetas[:4], (x, y))
        second = oracle.losses(thetas[4:], (x, y))
        assert shapes == [(64, 8, 8, 8)]
        x2 = x.flip(0)
        oracle.losses(thetas[:4], (x2, y))
        assert shapes == [(64, 8, 8, 8)] * 2
    finally:
        hook.remove()
    whole = oracle.losses(thetas, (x, y))
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-6, atol=0)


def test_a_run_with_frozen_convs_resumes_bitwise(tmp_path):
    stop_and_resume(_config, tmp_path, stop_at=5)


def test_frozen_convs_out_of_range_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="frozen_convs"):
        _config("model.frozen_convs=3")
