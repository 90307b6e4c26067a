"""Seconds per GymPolicyOracle.losses call (one CGE step's worth of policies): sync vs vector envs, vmap vs baddbmm.

    python benchmarks/bench_gym.py                  # cartpole and pendulum, the problems' default sizes
    python benchmarks/bench_gym.py --repeats 5 --threads 1

One call evaluates P = d + 1 policies (a forward-CGE step of the default 8-unit MLP) on E
episodes each, i.e. P*E sub-environments stepped side by side. Paths:
  sync+vmap     SyncVectorEnv (one Python env per sub-environment), policies by vmap(functional_call)
  sync+bmm      SyncVectorEnv, policies by batched matrix products (the plain-MLP fast path)
  vector+vmap   numpy-vectorised env, policies by vmap (isolates what baddbmm buys)
  vector+bmm    numpy-vectorised env (gymnasium's CartPoleVectorEnv / our Pendulum transcription)
                seeded per sub-environment, batched matrix products: what vectorization="auto" picks
The policies are perturbations (0.05) of one policy; for CartPole one that balances, so
most episodes run the full 500 steps as late in training. The same thetas and seeds are
used for every path, and the returns are checked to agree (rtol 1e-8). Ratios are against sync+vmap, measured in this run. Results go to
runs/bench_gym/<time>/results.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oracles.gym import GymPolicyOracle, episode_seeds  # noqa: E402

CASES = {  # env id, episodes per step, episode cap: the problems' defaults
    "cartpole": ("CartPole-v1", 8, 500),
    "pendulum": ("Pendulum-v1", 8, 200),
}
PATHS = (("sync+vmap", "sync", False), ("sync+bmm", "sync", True), ("vector+vmap", "vector", False),
         ("vector+bmm", "vector", True))


def time_path(env_id: str, episodes: int, cap: int, vectorization: str, fast_mlp: bool, repeats: int):
    oracle = GymPolicyOracle(env_id, vectorization=vectorization, max_episode_steps=cap, hidden=(8,))
    oracle.fast_mlp = fast_mlp
    gen = torch.Generator().manual_seed(0)
    theta = oracle.initial_theta() + 0.5 * torch.randn(oracle.space.dim, generator=gen)
    if env_id.startswith("CartPole"):
        # Late training, where the time goes: hidden unit 0 = tanh(pole angle + angular velocity)
        # pushes the cart under the pole, so the perturbed policies mostly balance for all 500 steps.
        views = oracle.space.views(theta)
        views["0.weight"][0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
        views["0.bias"][0] = 0.0
        views["2.weight"].zero_()
        views["2.weight"][:, 0] = torch.tensor([-1.0, 1.0])
        views["2.bias"].zero_()
    thetas = theta + 0.05 * torch.randn(oracle.space.dim + 1, oracle.space.dim, generator=gen)
    seeds = episode_seeds(0, 0, episodes)
    returns = oracle.episode_returns(thetas, seeds)  # warm-up: builds and caches the vector env
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        oracle.losses(thetas, seeds)
        times.append(time.perf_counter() - start)
    oracle.close()
    return statistics.median(times), returns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="cartpole,pendulum")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from blackbox_zo.runtime import tune_allocator

    tune_allocator()  # as a training run does (BLACKBOX_ZO_MALLOC_TUNING=0 turns it off)
    out = Path(args.out or Path("runs") / "bench_gym" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        env_id, episodes, cap = CASES[case]
        reference = None
        for label, vectorization, fast in PATHS:
            seconds, returns = time_path(env_id, episodes, cap, vectorization, fast, args.repeats)
            if reference is None:
                reference = (seconds, returns)
            agree = torch.allclose(returns, reference[1], rtol=1e-8, atol=0)
            rows.append({"case": case, "path": label, "sub_envs": returns.numel(), "mean_return": float(returns.mean()),
                         "s_per_call": round(seconds, 4), "speedup_vs_sync_vmap": round(reference[0] / seconds, 1),
                         "returns_agree": agree})
            print(f"{case:<9} {label:<11} {returns.numel():>4} sub-envs  {seconds:8.3f} s/call  "
                  f"x{reference[0] / seconds:6.1f}  returns agree: {agree}", flush=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"threads {args.threads}, load average {load:.1f}, median of {args.repeats}", "",
             "| case | path | sub-envs | s per call | speed-up vs sync+vmap | returns agree |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['path']} | {r['sub_envs']} | {r['s_per_call']:.3f} | {r['speedup_vs_sync_vmap']:.1f}x "
              f"| {r['returns_agree']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}")
    return 0 if all(r["returns_agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
