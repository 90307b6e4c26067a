"""A gymnasium environment as a loss oracle: loss(theta) = - mean episode return of policy(theta).

A batch is a list of episode seeds. Every perturbed policy of one step is run on the
same seeds (common random numbers, CRN): the finite difference l(theta + mu e_j) - l(theta)
then measures the change of the policy, not the luck of different initial states.
The policy is deterministic (argmax for Discrete actions, tanh-squashed mean for Box
actions), so one (theta, seed) pair always gives one return.

All P perturbed policies x E episodes of one call run side by side as P*E
sub-environments of one vector environment, and the P policies are evaluated as ONE
batched forward per time step, never a Python loop over perturbations:

* environments: `vectorization="sync"` (gymnasium `SyncVectorEnv`, the default),
  `"async"` (`AsyncVectorEnv`, one worker process per sub-environment: only worth it for
  slow simulators), `"vector"` (gymnasium's own numpy-vectorised implementation,
  `gym.make_vec(..., vectorization_mode="vector_entry_point")`, used where we know how
  to seed each sub-environment individually: CartPole; for Pendulum, which has none in
  numpy, a transcription of its step over arrays), or `"auto"` (vector where supported,
  else sync). Each is checked against SyncVectorEnv's returns by the tests, and
  `benchmarks/bench_gym.py` measures the difference.
* policy: a plain MLP (`nn.Sequential` of Linear and elementwise activations, optionally
  led by an `ObsNormalizer`) is evaluated with batched matrix products
  (`torch.baddbmm` over the P parameter sets); any other module goes through
  `torch.func.functional_call` + `vmap`. Both give the same numbers (tested).

Sub-episodes that have ended are masked: their later rewards do not count, and the
rollout stops as soon as every sub-episode has ended or the length cap is reached.

gymnasium is an optional dependency (`pip install blackbox-zo[gym]`), imported lazily.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from blackbox_zo.oracle import Oracle, ParamSpace

__all__ = ["GymPolicyOracle", "ObsNormalizer", "mlp_policy", "episode_seeds", "VECTORIZATIONS"]

VECTORIZATIONS = ("auto", "sync", "async", "vector")


def _gym():
    try:
        import gymnasium
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("GymPolicyOracle needs gymnasium: pip install 'blackbox-zo[gym]'") from exc
    return gymnasium


# ------------------------------------------------------------------------- policies


class ObsNormalizer(nn.Module):
    """(obs - mean) / std, clipped to +-clip, with running statistics kept in buffers.

    The statistics are buffers (not parameters): they are not part of theta, they are
    saved with the module's state_dict (so checkpoints and resume carry them), and the
    oracle updates them only in `on_step`, once per step from the unperturbed policy,
    so every perturbation of one step sees the same normalisation (CRN is preserved).
    """

    def __init__(self, size: int, clip: float = 5.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = float(clip), float(eps)
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, obs: Tensor) -> Tensor:
        return ((obs - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, obs: Tensor) -> None:
        """Merge a batch of observations [N, size] (Chan et al.'s parallel mean/variance)."""
        obs = obs.reshape(-1, self.mean.numel()).to(self.mean.dtype)
        n = obs.shape[0]
        if n == 0:
            return
        b_mean, b_var = obs.mean(0), obs.var(0, unbiased=False)
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)


def mlp_policy(obs_dim: int, out_dim: int, hidden: Sequence[int] = (8,), *, obs_norm: bool = False,
               zero_last: bool = True) -> nn.Sequential:
    """obs -> [ObsNormalizer] -> (Linear, Tanh) x len(hidden) -> Linear -> out_dim.

    zero_last: the output layer starts at zero (as ARS starts from the zero policy). A
    random output layer usually makes an argmax policy pick one action everywhere, and
    then no coordinate step of size mu changes a single action: the finite differences
    are all exactly zero and ZO training never leaves the plateau.
    """
    layers: list[nn.Module] = [ObsNormalizer(obs_dim)] if obs_norm else []
    width = obs_dim
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.Tanh()]
        width = int(h)
    last = nn.Linear(width, out_dim)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def episode_seeds(seed: int, step: int, episodes: int, *, test: bool = False) -> list[int]:
    """Episode seeds of one training step (or the fixed test set): a pure function of its arguments.

    Training seeds live in [0, 2**30), test seeds in [2**30, 2**31): a policy is never
    tested on an initial state it was trained on.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + (1 if test else 0)) % 2**62)
    seeds = torch.randint(0, 2**30, (episodes,), generator=gen)
    return [int(s) + (2**30 if test else 0) for s in seeds]


_ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Identity, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU)


def _is_plain_mlp(policy: nn.Module, param_names: set[str]) -> bool:
    """Sequential of [ObsNormalizer], Linear and elementwise activations, every Linear trainable."""
    if not isinstance(policy, nn.Sequential):
        return False
    for i, (name, m) in enumerate(policy.named_children()):
        if isinstance(m, nn.Linear):
            names = {f"{name}.weight"} | ({f"{name}.bias"} if m.bias is not None else set())
            if not names <= param_names:
                return False
        elif not (isinstance(m, _ELEMENTWISE) or (i == 0 and isinstance(m, ObsNormalizer))):
            return False
    return True


# --------------------------------------------------------------- seeded vector envs


def _make_env(env: str | Callable[[], Any], max_episode_steps: int | None, env_kwargs: dict[str, Any]):
    if callable(env):
        return env()
    # The passive env checker would run once per sub-environment; a registered env needs none.
    return _gym().make(env, max_episode_steps=max_episode_steps, disable_env_checker=True, **env_kwargs)


class _GymVector:
    """SyncVectorEnv / AsyncVectorEnv: sub-environment k is reset with seeds[k]."""

    def __init__(self, make: Callable[[], Any], n: int, asynchronous: bool):
        gym = _gym()
        cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
        self.env = cls([make] * n, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)

    def reset(self, seeds: list[int]) -> np.ndarray:
        obs, _ = self.env.reset(seed=seeds)
        return obs

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, _ = self.env.step(actions)
        return obs, reward, terminated, truncated

    def close(self) -> None:
        self.env.close()


class _CartPoleVector:
    """gymnasium's numpy-vectorised CartPole (`CartPoleVectorEnv`), seeded per sub-environment.

    `CartPoleVectorEnv.reset(seed=s)` draws all initial states from ONE generator, so
    sub-environment k's start would depend on k and the number of sub-environments, and
    CRN would be lost. We therefore set each column of its state to exactly the state a
    single `CartPole-v1` reset with seeds[k] produces (gymnasium's own reset computes it).
    The dynamics are the same equations applied to arrays; a test checks that returns
    agree with SyncVectorEnv's.
    """

    def __init__(self, env_id: str, n: int, max_episode_steps: int, env_kwargs: dict[str, Any]):
        gym = _gym()
        self.env = gym.make_vec(env_id, num_envs=n, vectorization_mode="vector_entry_point",
                                max_episode_steps=max_episode_steps, **env_kwargs)
        self.single = gym.make(env_id, disable_env_checker=True, **env_kwargs).unwrapped
        self._starts: dict[int, np.ndarray] = {}

    @staticmethod
    def supports(env_id: Any) -> bool:
        if _entry_point(env_id) != "gymnasium.envs.classic_control.cartpole:CartPoleEnv":
            return False
        return _gym().spec(env_id).vector_entry_point == "gymnasium.envs.classic_control.cartpole:CartPoleVectorEnv"

    def _start(self, seed: int) -> np.ndarray:
        if seed not in self._starts:
            if len(self._starts) > 4096:
                self._starts.clear()
            self.single.reset(seed=seed)
            self._starts[seed] = np.array(self.single.state, dtype=np.float64)
        return self._starts[seed]

    def reset(self, seeds: list[int]) -> np.ndarray:
        self.env.reset(seed=seeds[0])  # clears step counters and done flags
        inner = self.env.unwrapped
        inner.state = np.stack([self._start(s) for s in seeds], axis=1)  # [4, n]
        return inner.state.T.astype(np.float32)

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, _ = self.env.step(actions)
        return obs, reward, terminated, truncated

    def close(self) -> None:
        self.env.close()
        self.single.close()


class _PendulumVector:
    """Pendulum-v1 stepped for all sub-environments at once with numpy.

    gymnasium ships no numpy vector Pendulum (only a jax one), and SyncVectorEnv spends
    ~60 us of Python per sub-environment step. This is `PendulumEnv.step` written over
    arrays, with the same operations in the same order and the same dtypes (the torque
    stays float32 as in the single env); constants are read from a real `PendulumEnv`
    (so env_kwargs such as g apply), and each sub-environment starts in exactly the
    state `PendulumEnv.reset(seed=seeds[k])` produces. Tests compare its returns with
    SyncVectorEnv's. No truncation here: the oracle's loop caps the episode length.
    """

    def __init__(self, env_id: str, n: int, env_kwargs: dict[str, Any]):
        self.single = _gym().make(env_id, disable_env_checker=True, **env_kwargs).unwrapped
        self.n = n
        self.state = np.zeros((2, n))

    @staticmethod
    def supports(env_id: Any) -> bool:
        return _entry_point(env_id) == "gymnasium.envs.classic_control.pendulum:PendulumEnv"

    def reset(self, seeds: list[int]) -> np.ndarray:
        starts = {}
        for s in dict.fromkeys(seeds):
            self.single.reset(seed=s)
            starts[s] = np.array(self.single.state, dtype=np.float64)
        self.state = np.stack([starts[s] for s in seeds], axis=1)  # [2, n]: theta, theta_dot
        return self._obs()

    def _obs(self) -> np.ndarray:
        th, thdot = self.state
        return np.stack([np.cos(th), np.sin(th), thdot], axis=1).astype(np.float32)

    def step(self, actions: np.ndarray):
        e = self.single
        th, thdot = self.state
        u = np.clip(np.asarray(actions, dtype=np.float32), -e.max_torque, e.max_torque)[:, 0]
        costs = (((th + np.pi) % (2 * np.pi)) - np.pi) ** 2 + 0.1 * thdot**2 + 0.001 * (u**2)
        newthdot = thdot + (3 * e.g / (2 * e.l) * np.sin(th) + 3.0 / (e.m * e.l**2) * u) * e.dt
        newthdot = np.clip(newthdot, -e.max_speed, e.max_speed)
        self.state = np.stack([th + newthdot * e.dt, newthdot])
        done = np.zeros(self.n, dtype=bool)
        return self._obs(), -costs, done, done

    def close(self) -> None:
        self.single.close()


def _entry_point(env_id: Any) -> str | None:
    if not isinstance(env_id, str):
        return None
    gym = _gym()
    try:
        return gym.spec(env_id).entry_point
    except gym.error.Error:
        return None


# --------------------------------------------------------------------------- oracle


class GymPolicyOracle(Oracle):
    """Loss = - mean return of the policy over the batch's episodes (a batch = list of episode seeds).

    env: a registered gymnasium id ("CartPole-v1") or a zero-argument factory returning an Env.
    policy: a torch module mapping observations [.., obs_dim] to action outputs; its
        trainable parameters are theta. Default: `mlp_policy(obs_dim, n_out, hidden, obs_norm=obs_norm)`.
        Discrete(n): n outputs, the action is their argmax (a deterministic policy).
        Box: one output per action dimension, squashed into [low, high] by tanh
        (unbounded Box: used as is).
    hidden, obs_norm, seed: the default policy's hidden widths, whether an `ObsNormalizer`
        leads it, and the torch seed of its initial weights.
    max_episode_steps: episode length cap (also passed to gym.make for a registered id).
    vectorization: "sync" | "async" | "vector" | "auto", see the module docstring.
    max_envs: sub-environments per vector env; P*E larger than this runs in chunks.
    update_obs_norm: if the policy contains an ObsNormalizer, `on_step` rolls out the
        unperturbed policy on the step's seeds (one query) and merges its observations.
    """

    name = "gym-policy-v1"

    def __init__(
        self,
        env: str | Callable[[], Any] = "CartPole-v1",
        policy: nn.Module | None = None,
        *,
        max_episode_steps: int | None = None,
        hidden: Sequence[int] = (8,),
        obs_norm: bool = False,
        vectorization: str = "sync",
        max_envs: int = 512,
        update_obs_norm: bool = True,
        env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        if vectorization not in VECTORIZATIONS:
            raise ValueError(f"vectorization must be one of {', '.join(VECTORIZATIONS)}; got {vectorization!r}")
        if max_envs < 1:
            raise ValueError(f"max_envs must be >= 1, got {max_envs}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        gym = _gym()
        self.env_spec = env
        self.env_kwargs = dict(env_kwargs or {})
        fast = next((cls for cls in (_CartPoleVector, _PendulumVector) if cls.supports(env)), None)
        if vectorization == "vector" and fast is None:
            raise ValueError(f"vectorization 'vector' is available for CartPole and Pendulum only, not {env!r}; "
                             "use sync, async or auto")
        if vectorization == "auto":
            vectorization = "vector" if fast is not None else "sync"
        self._fast_vector = fast
        self.vectorization, self.max_envs, self.update_obs_norm = vectorization, int(max_envs), update_obs_norm
        probe = _make_env(env, max_episode_steps, self.env_kwargs)
        try:
            obs_space, act_space = probe.observation_space, probe.action_space
            spec_limit = getattr(getattr(probe, "spec", None), "max_episode_steps", None)
        finally:
            probe.close()
        if not isinstance(obs_space, gym.spaces.Box):
            raise TypeError(f"GymPolicyOracle needs a Box observation space, got {obs_space}")
        self.obs_dim = int(np.prod(obs_space.shape))
        if isinstance(act_space, gym.spaces.Discrete):
            self.discrete, self.n_out = True, int(act_space.n)
            self._action_start = int(act_space.start)
        elif isinstance(act_space, gym.spaces.Box):
            self.discrete, self.n_out = False, int(np.prod(act_space.shape))
            self._low = torch.as_tensor(act_space.low.reshape(-1), dtype=torch.float64)
            self._high = torch.as_tensor(act_space.high.reshape(-1), dtype=torch.float64)
            self._bounded = bool(np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high)))
            self._action_shape = act_space.shape
            self._action_dtype = act_space.dtype
        else:
            raise TypeError(f"GymPolicyOracle supports Discrete and Box action spaces, got {act_space}")
        self.max_episode_steps = int(max_episode_steps or spec_limit or 1000)
        if policy is None:
            torch.manual_seed(seed)
            policy = mlp_policy(self.obs_dim, self.n_out, hidden, obs_norm=obs_norm)
        self.policy = policy
        self.space = ParamSpace.from_module(policy)
        self._param_names = set(self.space.names)
        self.fast_mlp = _is_plain_mlp(policy, self._param_names)
        self._vec_envs: OrderedDict[int, Any] = OrderedDict()  # size -> vector env, least recent first

    # -- example for `blackbox-zo check-oracle gym-policy-v1` ---------------------------

    @classmethod
    def example(cls) -> tuple["GymPolicyOracle", list[int]]:
        oracle = cls("CartPole-v1", max_episode_steps=50, hidden=(4,))
        return oracle, oracle.example_batch()

    def example_batch(self) -> list[int]:
        return episode_seeds(0, 0, 2)

    # -- vector environments -------------------------------------------------------------

    def _vector_env(self, n: int):
        """A vector env with n sub-environments, cached (the two most recent sizes are kept)."""
        if n in self._vec_envs:
            self._vec_envs.move_to_end(n)
            return self._vec_envs[n]
        if self.vectorization == "vector" and self._fast_vector is _CartPoleVector:
            vec = _CartPoleVector(self.env_spec, n, self.max_episode_steps, self.env_kwargs)
        elif self.vectorization == "vector":
            vec = _PendulumVector(self.env_spec, n, self.env_kwargs)
        else:
            make = functools.partial(_make_env, self.env_spec, self.max_episode_steps, self.env_kwargs)
            vec = _GymVector(make, n, asynchronous=self.vectorization == "async")
        self._vec_envs[n] = vec
        while len(self._vec_envs) > 2:
            _, old = self._vec_envs.popitem(last=False)
            old.close()
        return vec

    def close(self) -> None:
        while self._vec_envs:
            _, vec = self._vec_envs.popitem()
            vec.close()

    def __del__(self):  # AsyncVectorEnv workers must not outlive the oracle
        try:
            self.close()
        except Exception:
            pass

    # -- the batched policy ----------------------------------------------------------------

    def _fixed_tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """Buffers and frozen parameters of the policy, passed unbatched to functional_call."""
        out = {n: b.to(dtype) if b.is_floating_point() else b for n, b in self.policy.named_buffers()}
        out.update({n: p.detach().to(dtype) for n, p in self.policy.named_parameters() if n not in self._param_names})
        return out

    def _batched_forward(self, params: dict[str, Tensor], dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """obs [P, E, obs_dim] -> outputs [P, E, n_out]: policy p on its own E observations."""
        if self.fast_mlp:
            def forward(obs: Tensor) -> Tensor:
                h = obs
                for name, m in self.policy.named_children():
                    if isinstance(m, nn.Linear):
                        w = params[f"{name}.weight"].transpose(1, 2)  # [P, in, out]
                        if m.bias is None:
                            h = torch.bmm(h, w)
                        else:
                            h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, w)
                    else:  # elementwise activation, or the ObsNormalizer (shared buffers)
                        h = m(h) if not isinstance(m, ObsNormalizer) else _normalise(m, h, dtype)
                return h

            return forward
        fixed = self._fixed_tensors(dtype)

        def one(p: dict[str, Tensor], obs: Tensor) -> Tensor:  # one policy, its E observations
            return functional_call(self.policy, {**fixed, **p}, (obs,), strict=False)

        return functools.partial(vmap(one), params)

    def _to_actions(self, out: Tensor) -> np.ndarray:
        """Policy outputs [N, n_out] -> actions the vector env accepts."""
        if self.discrete:
            return (out.argmax(-1) + self._action_start).numpy()
        out = out.to(torch.float64)
        act = self._low + (torch.tanh(out) + 1) * 0.5 * (self._high - self._low) if self._bounded else out
        return act.numpy().astype(self._action_dtype).reshape(out.shape[0], *self._action_shape)

    # -- rollouts ------------------------------------------------------------------------

    def episode_returns(self, thetas: Tensor, seeds: Sequence[int], record_obs: list | None = None) -> Tensor:
        """Undiscounted return of each policy on each episode: [P, d] x E seeds -> [P, E] (float64)."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("a batch must hold at least one episode seed")
        if thetas.dim() != 2 or thetas.shape[1] != self.space.dim:
            raise ValueError(f"thetas must be [P, {self.space.dim}], got {tuple(thetas.shape)}")
        per_chunk = max(1, self.max_envs // len(seeds))
        return torch.cat([self._rollout(thetas[i : i + per_chunk], seeds, record_obs)
                          for i in range(0, thetas.shape[0], per_chunk)])

    def _rollout(self, thetas: Tensor, seeds: list[int], record_obs: list | None) -> Tensor:
        n = thetas.shape[0] * len(seeds)
        # A policy forward here is tiny (n x a few dozen numbers); torch still hands some
        # elementwise ops (tanh) to its thread pool, and the hand-off costs far more than
        # the op: 30 ms instead of 4 us per call on a busy 2-core machine. One thread then.
        widest = max([self.obs_dim, self.n_out] + [int(p.shape[0]) for p in self.policy.parameters() if p.dim() == 2])
        if n * widest > 2**16 or torch.get_num_threads() == 1:
            return self._rollout_threads(thetas, seeds, record_obs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._rollout_threads(thetas, seeds, record_obs)
        finally:
            torch.set_num_threads(threads)

    def _rollout_threads(self, thetas: Tensor, seeds: list[int], record_obs: list | None) -> Tensor:
        n_pol, n_ep = thetas.shape[0], len(seeds)
        n = n_pol * n_ep
        vec = self._vector_env(n)
        policy = self._batched_forward(self.space.views(thetas), thetas.dtype)  # {name: [P, *shape]}, no copy
        # Sub-env k = (policy k // E, episode k % E): every policy sees the same E seeds.
        obs = vec.reset(seeds * n_pol)
        returns = np.zeros(n, dtype=np.float64)
        active = np.ones(n, dtype=bool)
        for _ in range(self.max_episode_steps):
            obs_t = torch.as_tensor(np.asarray(obs).reshape(n, -1)).to(thetas.dtype)
            if record_obs is not None:
                record_obs.append(obs_t[torch.as_tensor(active)])
            out = policy(obs_t.view(n_pol, n_ep, -1)).reshape(n, -1)
            obs, reward, terminated, truncated = vec.step(self._to_actions(out))
            returns += np.where(active, reward, 0.0)
            active &= ~(np.asarray(terminated) | np.asarray(truncated))
            if not active.any():
                break
        return torch.from_numpy(returns).view(n_pol, n_ep)

    # -- the Oracle contract -------------------------------------------------------------

    def losses(self, thetas: Tensor, batch: Any) -> Tensor:
        return -self.episode_returns(thetas, list(batch)).mean(1).to(thetas.dtype)

    def on_step(self, theta: Tensor, batch: Any) -> None:
        """Update the observation normaliser (if any) once, from the unperturbed policy.

        Runs before the estimate of the step, so all its perturbations see the same
        statistics (CRN). The rollout is one more loss value of the black box: charged.
        """
        norms = [m for m in self.policy.modules() if isinstance(m, ObsNormalizer)]
        if not (norms and self.update_obs_norm):
            return
        observed: list[Tensor] = []
        self.ledger.charge(1)
        with torch.no_grad():
            self.episode_returns(theta.unsqueeze(0), list(batch), record_obs=observed)
        norms[0].update(torch.cat(observed))  # the first normaliser sees raw observations

    def initial_theta(self) -> Tensor:
        return self.space.flatten_module(self.policy)

    def evaluate(self, module: nn.Module, seeds: Sequence[int]) -> dict[str, float]:
        """Returns of `module` (this oracle's policy, or one with the same parameter names) on `seeds`.

        One loss value of the black box: charged as one query (to the ledger's current phase).
        """
        theta = self.space.flatten_module(module)
        self.ledger.charge(1)
        with torch.no_grad():
            returns = self.episode_returns(theta.unsqueeze(0), seeds)[0]
        return {"test_return": float(returns.mean()), "test_return_std": float(returns.std(unbiased=False)),
                "test_return_min": float(returns.min())}


def _normalise(norm: ObsNormalizer, obs: Tensor, dtype: torch.dtype) -> Tensor:
    mean, var = norm.mean.to(dtype), norm.var.to(dtype)
    return ((obs - mean) / torch.sqrt(var + norm.eps)).clamp(-norm.clip, norm.clip)
