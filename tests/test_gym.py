"""GymPolicyOracle: returns against a plain gymnasium loop, common random numbers, batching, the problems."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

gym = pytest.importorskip("gymnasium")

from blackbox_zo.oracle import check_oracle  # noqa: E402
from oracles.gym import GymPolicyOracle, ObsNormalizer, episode_seeds, mlp_policy  # noqa: E402

SEEDS = [3, 14, 159]


def random_thetas(oracle: GymPolicyOracle, p: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return oracle.initial_theta() + scale * torch.randn(p, oracle.space.dim, generator=gen)


def reference_return(env_id: str, policy: nn.Module, seed: int, max_steps: int) -> float:
    """One episode in a plain `gym.make` env, one step at a time, actions computed here from
    the policy's outputs (argmax / tanh squashing written out again): independent of the
    oracle's vector envs, batching, masking and action conversion."""
    env = gym.make(env_id, max_episode_steps=max_steps)
    obs, _ = env.reset(seed=seed)
    total = 0.0
    for _ in range(max_steps):
        with torch.no_grad():
            out = policy(torch.as_tensor(obs, dtype=torch.float32))
        if isinstance(env.action_space, gym.spaces.Discrete):
            action = int(out.argmax())
        else:
            low, high = env.action_space.low, env.action_space.high
            action = (low + (np.tanh(out.double().numpy()) + 1) / 2 * (high - low)).astype(np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        if terminated or truncated:
            break
    env.close()
    return total


def policy_with(oracle: GymPolicyOracle, theta: torch.Tensor) -> nn.Module:
    import copy

    policy = copy.deepcopy(oracle.policy)
    oracle.space.load_into(policy, theta)
    return policy


@pytest.fixture(scope="module")
def cartpole():
    oracle = GymPolicyOracle("CartPole-v1", vectorization="vector", max_episode_steps=200, hidden=(8,))
    yield oracle
    oracle.close()


@pytest.fixture(scope="module")
def pendulum():
    oracle = GymPolicyOracle("Pendulum-v1", vectorization="vector", max_episode_steps=60, hidden=(8,))
    yield oracle
    oracle.close()


@pytest.mark.parametrize("env_id,steps", [("CartPole-v1", 200), ("Pendulum-v1", 60)])
@pytest.mark.parametrize("vectorization", ["sync", "vector"])
def test_returns_match_a_plain_gymnasium_loop(env_id, steps, vectorization):
    oracle = GymPolicyOracle(env_id, vectorization=vectorization, max_episode_steps=steps)
    thetas = random_thetas(oracle, 4)
    returns = oracle.episode_returns(thetas, SEEDS)
    expected = torch.tensor([[reference_return(env_id, policy_with(oracle, t), s, steps) for s in SEEDS]
                             for t in thetas], dtype=torch.float64)
    # CartPole rewards are 1 per step: counts must be equal. Pendulum: the reference sums the
    # same float64 rewards in the same order; the numpy-vectorised path may differ in the last
    # bits of sin/cos/%, which the dynamics amplify to ~1e-9 relative over 60 steps.
    torch.testing.assert_close(returns, expected, rtol=1e-8 if env_id == "Pendulum-v1" else 0, atol=0)
    assert returns.std() > 0  # the policies differ: the comparison is not between constants
    oracle.close()


def test_loss_is_minus_mean_return(cartpole):
    thetas = random_thetas(cartpole, 3)
    torch.testing.assert_close(cartpole.losses(thetas, SEEDS),
                               -cartpole.episode_returns(thetas, SEEDS).mean(1).float())


@pytest.mark.parametrize("name", ["cartpole", "pendulum"])
def test_common_random_numbers(name, request):
    oracle = request.getfixturevalue(name)
    theta = random_thetas(oracle, 1, scale=0.5)[0]
    # The same theta in several rows of one call, next to other policies: identical losses.
    rows = torch.stack([theta, theta + 0.3, theta, theta - 0.2, theta])
    losses = oracle.losses(rows, SEEDS)
    assert losses[0] == losses[2] == losses[4]
    assert torch.equal(oracle.losses(rows, SEEDS), losses)  # and again in a second call
    # Different seeds give different episodes: the seeds, not luck, fix the randomness.
    assert not torch.equal(oracle.episode_returns(rows[:1], [1, 2, 3]), oracle.episode_returns(rows[:1], SEEDS))


def test_a_perturbation_changes_the_loss_only_through_the_policy(cartpole):
    """Adding the same constant to both output biases leaves every argmax action unchanged, so
    with CRN the loss is bitwise the same; without CRN (other starts) it would differ."""
    thetas = random_thetas(cartpole, 6, scale=0.5, seed=1)
    bias = cartpole.space[cartpole.space.names[-1]].slice
    shifted = thetas.clone()
    shifted[:, bias] += 0.37
    assert torch.equal(cartpole.losses(shifted, SEEDS), cartpole.losses(thetas, SEEDS))
    # ...whereas moving one bias alone changes actions, and the loss of at least one policy.
    one = thetas.clone()
    one[:, bias.start] += 2.0
    assert not torch.equal(cartpole.losses(one, SEEDS), cartpole.losses(thetas, SEEDS))


@pytest.mark.parametrize("name", ["cartpole", "pendulum"])
def test_batched_equals_one_at_a_time_and_chunked(name, request):
    oracle = request.getfixturevalue(name)
    thetas = random_thetas(oracle, 7)
    batched = oracle.episode_returns(thetas, SEEDS)
    one_by_one = torch.cat([oracle.episode_returns(t[None], SEEDS) for t in thetas])
    assert torch.equal(batched, one_by_one)
    max_envs = oracle.max_envs
    oracle.max_envs = 2 * len(SEEDS)  # 7 policies in chunks of 2
    try:
        assert torch.equal(oracle.episode_returns(thetas, SEEDS), batched)
    finally:
        oracle.max_envs = max_envs


@pytest.mark.parametrize("name", ["cartpole", "pendulum"])
def test_batched_mlp_matches_vmap_functional_call(name, request):
    oracle = request.getfixturevalue(name)
    assert oracle.fast_mlp
    thetas = random_thetas(oracle, 5)
    fast = oracle.episode_returns(thetas, SEEDS)
    oracle.fast_mlp = False
    try:
        slow = oracle.episode_returns(thetas, SEEDS)
    finally:
        oracle.fast_mlp = True
    assert torch.equal(fast, slow)


def test_any_policy_module_goes_through_vmap():
    class Linear2(nn.Module):  # not a Sequential: the generic functional_call + vmap path
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, 4))

        def forward(self, obs):
            return obs @ self.w.T

    oracle = GymPolicyOracle("CartPole-v1", Linear2(), vectorization="vector", max_episode_steps=100)
    assert not oracle.fast_mlp and oracle.space.dim == 8
    thetas = random_thetas(oracle, 3)
    expected = [[reference_return("CartPole-v1", policy_with(oracle, t), s, 100) for s in SEEDS] for t in thetas]
    assert oracle.episode_returns(thetas, SEEDS).tolist() == expected


def test_sync_and_vector_cartpole_agree_exactly():
    sync = GymPolicyOracle("CartPole-v1", vectorization="sync", max_episode_steps=300)
    vec = GymPolicyOracle("CartPole-v1", vectorization="auto", max_episode_steps=300)
    assert vec.vectorization == "vector" and sync.vectorization == "sync"
    thetas = random_thetas(sync, 12, scale=1.5)
    assert torch.equal(sync.episode_returns(thetas, SEEDS), vec.episode_returns(thetas, SEEDS))
    sync.close()
    vec.close()


def test_async_vector_env_gives_the_same_losses():
    make = dict(max_episode_steps=50, hidden=(4,))
    sync = GymPolicyOracle("CartPole-v1", vectorization="sync", **make)
    asyn = GymPolicyOracle("CartPole-v1", vectorization="async", **make)
    thetas = random_thetas(sync, 2)
    try:
        assert torch.equal(sync.losses(thetas, SEEDS[:2]), asyn.losses(thetas, SEEDS[:2]))
    finally:
        asyn.close()
        sync.close()


def test_episode_length_is_capped():
    # A policy that balances (push towards the pole's lean) survives far longer than 25 steps...
    policy = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        policy[0].weight.copy_(torch.tensor([[0, 0, -1.0, -1.0], [0, 0, 1.0, 1.0]]))
        policy[0].bias.zero_()
    oracle = GymPolicyOracle("CartPole-v1", policy, vectorization="vector", max_episode_steps=25)
    theta = oracle.space.flatten_module(policy)
    assert reference_return("CartPole-v1", policy, 3, 200) > 100
    # ...but each episode counts 25 rewards at most.
    assert oracle.episode_returns(theta[None], SEEDS).tolist() == [[25.0] * 3]


@pytest.mark.parametrize("name", ["cartpole", "pendulum"])
def test_check_oracle_passes(name, request):
    oracle = request.getfixturevalue(name)
    report = check_oracle(oracle, SEEDS[:2])
    assert report.ok, str(report)


def test_observation_normalisation_is_updated_once_per_step_and_keeps_crn():
    oracle = GymPolicyOracle("Pendulum-v1", vectorization="vector", max_episode_steps=40, obs_norm=True)
    norm = oracle.policy[0]
    assert isinstance(norm, ObsNormalizer) and oracle.fast_mlp
    theta = oracle.initial_theta()
    rows = torch.stack([theta, theta + 0.1, theta])
    before = oracle.losses(rows, SEEDS)
    assert norm.count == 0  # losses never touch the statistics
    oracle.on_step(theta, SEEDS)
    assert oracle.ledger.total == 1  # the unperturbed rollout is a query, and is charged
    assert norm.count == 40 * len(SEEDS)  # Pendulum never ends early: 40 observations per episode
    # The statistics are those of the observed states: cos, sin in [-1, 1], |theta_dot| <= 8.
    obs = []
    oracle.episode_returns(theta[None], SEEDS, record_obs=obs)
    torch.testing.assert_close(norm.mean, torch.cat(obs).mean(0), rtol=1e-5, atol=1e-6)
    after = oracle.losses(rows, SEEDS)
    assert after[0] == after[2] and not torch.equal(after, before)  # CRN within the step; a new normalisation
    assert torch.equal(oracle.losses(rows, SEEDS), after)
    assert {"0.mean", "0.var", "0.count"} <= set(oracle.policy.state_dict())  # checkpoints carry them
    # The fast MLP path normalises exactly as the module does.
    oracle.fast_mlp = False
    assert torch.equal(oracle.losses(rows, SEEDS), after)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="vectorization must be one of"):
        GymPolicyOracle("CartPole-v1", vectorization="threads")
    with pytest.raises(ValueError, match="'vector' is available for CartPole and Pendulum only"):
        GymPolicyOracle("MountainCar-v0", vectorization="vector")
    with pytest.raises(ValueError, match="max_episode_steps must be >= 1"):
        GymPolicyOracle("CartPole-v1", max_episode_steps=0)
    with pytest.raises(ValueError, match="at least one episode seed"):
        GymPolicyOracle("CartPole-v1").losses(torch.zeros(1, 58), [])


def test_episode_seeds_are_reproducible_and_test_seeds_are_fresh():
    assert episode_seeds(0, 5, 4) == episode_seeds(0, 5, 4)
    assert episode_seeds(0, 5, 4) != episode_seeds(0, 6, 4)
    train = {s for step in range(200) for s in episode_seeds(0, step, 8)}
    test = set(episode_seeds(0, 0, 20, test=True))
    assert not train & test and min(test) >= 2**30


def test_mlp_policy_starts_at_the_zero_action():
    policy = mlp_policy(3, 1, (8,))
    assert torch.equal(policy(torch.randn(5, 3)), torch.zeros(5, 1))


# ---------------------------------------------------------------------- problems and CLI


def test_cartpole_problem_through_the_cli(tmp_path, capsys):
    from blackbox_zo.cli import main

    args = ["train", "cartpole", "--set", f"run.out_dir={tmp_path}", "--set", "run.progress=false",
            "--set", "run.epochs=2", "--set", "gym.steps_per_epoch=2", "--set", "gym.episodes_per_step=2",
            "--set", "gym.test_episodes=3", "--set", "gym.max_episode_steps=100"]
    assert main(args) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert final.startswith("cartpole: test_return=")
    (run_dir,) = (tmp_path / "cartpole").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    # 4 steps x (58 + 1) forward-CGE queries, one evaluation (20 -> 3 episodes = 1 query) per epoch.
    assert summary["queries"]["train"] == 4 * 59 and summary["queries"]["eval"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] <= -8 for r in records if "loss" in r)  # loss = -return; CartPole pays >= 8 per episode
    assert (run_dir / "training.png").stat().st_size > 0


@pytest.mark.parametrize("override,message", [
    ("gym.episodes_per_step=0", "gym.episodes_per_step: Input should be greater than or equal to 1"),
    ("gym.vectorization=threads", "gym.vectorization: Input should be 'auto', 'sync', 'async' or 'vector'"),
])
def test_cartpole_config_errors_are_one_line(tmp_path, capsys, override, message):
    from blackbox_zo.cli import main

    assert main(["train", "cartpole", "--set", f"run.out_dir={tmp_path}", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_gym_experiment_compares_at_equal_queries(tmp_path, capsys):
    from problems.gym_control import experiment

    code = experiment(["--problems", "cartpole", "--seeds", "0", "--out", str(tmp_path),
                       "--set", "run.epochs=1", "--set", "gym.steps_per_epoch=2", "--set", "gym.episodes_per_step=2",
                       "--set", "gym.test_episodes=2", "--set", "gym.max_episode_steps=60",
                       "--rge-set", "estimator.mu=0.2"])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["problem"], r["estimator"]) for r in rows] == [("cartpole", "cge"), ("cartpole", "rge")]
    assert rows[0]["queries"] == rows[1]["queries"] == 2 * 59 + 1  # RGE q = d: the same queries per step
    assert (rows[0]["mu"], rows[1]["mu"]) == (0.05, 0.2)  # --rge-set reached the RGE run only
    assert "| cartpole | cge | 0.05 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    assert (tmp_path / "gym_cge_vs_rge.png").stat().st_size > 0


# ------------------------------------------------------------- acceptance (opt-in, slow)


@pytest.mark.slow
def test_cartpole_default_run_reaches_475():
    from blackbox_zo.config import resolve_config
    from blackbox_zo.problem import get_problem
    from blackbox_zo.trainer import train

    problem = get_problem("cartpole")
    config = resolve_config(problem.config_model, problem.default_config(), None, ["run.progress=false"])
    summary = train(problem, config)
    assert summary["test_return"] >= 475, summary


@pytest.mark.slow
def test_pendulum_default_run_improves_on_the_zero_policy():
    from blackbox_zo.config import resolve_config
    from blackbox_zo.problem import get_problem
    from blackbox_zo.trainer import train

    problem = get_problem("pendulum")
    config = resolve_config(problem.config_model, problem.default_config(), None, ["run.progress=false"])
    setup = problem.setup(config)
    zero = setup.evaluate(setup.module)["test_return"]
    summary = train(problem, config)
    assert summary["test_return"] > zero + 300, (zero, summary)
