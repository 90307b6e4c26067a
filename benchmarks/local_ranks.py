"""What the two-rank benchmarks share: two spawned local processes on a free port, and the dense
digits CGE step they time (the digits CNN at batch 64, all 3,818 coordinates, feature reuse)."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable


def run_two_processes(target: Callable[..., None], args: tuple, timeout: float) -> tuple[list[Any], float]:
    """Spawn `target(rank, port, *args, queue)` for ranks 0 and 1 (a free localhost port for their group);
    each puts one result on the queue. Returns (the two results in arrival order, the 1-minute load
    average before the start)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load = os.getloadavg()[0]
    procs = [ctx.Process(target=target, args=(rank, port, *args, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():  # a rank that hangs must not outlive the benchmark
                p.kill()
    return results, load


def dense_digits_cge():
    """(x, y, oracle, theta0, drift, estimator): the step bench_parallel's dense mode times, seeded as
    there; callers move theta by `drift` and take a new batch every step."""
    import torch

    from blackbox_zo.estimators import CGE
    from blackbox_zo.runtime import tune_allocator
    from oracles.model_loss import ModelLossOracle
    from problems.digits import load_digits_split, make_digits_cnn

    tune_allocator()
    x, y, _, _ = load_digits_split(0)
    torch.manual_seed(0)
    oracle = ModelLossOracle(make_digits_cnn(8))
    theta0 = oracle.initial_theta()
    drift = 1e-3 * torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(2))
    return x, y, oracle, theta0, drift, CGE(mu=5e-3)
