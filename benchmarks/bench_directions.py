"""Seeded directions: the block sampler (direction i from (seed, i, dim, dtype)) vs the old per-chunk draw.

    .venv/bin/python benchmarks/bench_directions.py               # draws + whole RGE / ES estimates on digits
    .venv/bin/python benchmarks/bench_directions.py --repeats 40 --no-estimates

`SeededDirections` draws its stream in fixed blocks of `block_rows(dim)` rows, each block from a
generator seeded `block_seed(seed, b)`, so no direction depends on the chunk it is drawn in. The
old sampler (kept here as `OldSeededDirections`, the code of main before the change) drew each chunk
with one `torch.randn(chunk, dim)` from one generator seeded once. Both are timed interleaved in the
same process, one intra-op thread, glibc's allocator tuned as in training, in CPU seconds (time.process_time: less distorted by other jobs
on a shared machine than wall time), and the ratio old / new is printed (> 1: the new one is faster).

Draw rows: the whole stream in the executor's chunks (what `execute` draws for one plan), for the
shapes the project runs: ZO-GraSP and RGE on the digits CNN (q = 192, d = 3,818; chunk 65 after a
batch is seen, 256 before), ES on digits' last layer (q = 28, d = 2,570, chunk 65), a ResNet-20-sized
vector (q = 16, d = 272,474, chunk 8) and a small test-sized one (q = 40, d = 40).
Estimate rows: a whole `RGE.estimate` (q = 192, forward) and `ES.estimate` (q = 28, antithetic)
on the digits CNN (batch 16), where the draw is one part of the step beside the forwards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blackbox_zo.estimators import RGE  # noqa: E402
from blackbox_zo.evolution import ES  # noqa: E402
from blackbox_zo.plan import QueryPlan, SeededDirections, execute  # noqa: E402
from blackbox_zo.runtime import tune_allocator  # noqa: E402


@dataclass(frozen=True)
class OldSeededDirections:
    """The sampler before the change (main at f6b7478): one generator, one torch.randn per chunk."""

    count: int
    dim: int
    seed: int
    chunk: int
    distribution: Literal["gaussian", "sphere"] = "gaussian"

    def chunks(self, like: Tensor) -> Iterator[Tensor]:
        gen = torch.Generator().manual_seed(int(self.seed))
        for start in range(0, self.count, self.chunk):
            n = min(self.chunk, self.count - start)
            u = torch.randn(n, self.dim, generator=gen, dtype=like.dtype).to(like.device)
            if self.distribution == "sphere":
                u = u / u.norm(dim=1, keepdim=True)
            yield u

    def stream(self, like: Tensor) -> "_OldStream":
        return _OldStream(self, like)

    def identity(self) -> tuple:
        return ("seeded-old", self.count, self.dim, int(self.seed), self.chunk, self.distribution)


class _OldStream:
    """The executor's `rows(start, stop)` on the old stream: chunks must be read in order, as it did."""

    def __init__(self, spec: OldSeededDirections, like: Tensor):
        self.chunks, self.next = spec.chunks(like), 0

    def rows(self, start: int, stop: int) -> Tensor:
        assert start == self.next, "the old stream is read chunk by chunk from its start"
        self.next = stop
        return next(self.chunks)


DRAWS = [  # name, count, dim, chunk, dtype
    ("ZO-GraSP / RGE, digits (chunk 65)", 192, 3818, 65, torch.float32),
    ("RGE, digits (chunk 256)", 192, 3818, 256, torch.float32),
    ("ES, digits last layer (chunk 65)", 28, 2570, 65, torch.float32),
    ("RGE, ResNet-20 size (chunk 8)", 16, 272_474, 8, torch.float32),
    ("RGE, test size, float64", 40, 40, 256, torch.float64),
]


def timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def draw_all(spec, like: Tensor) -> None:
    for _ in spec.chunks(like):
        pass


def bench_draws(repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    for name, count, dim, chunk, dtype in DRAWS:
        like = torch.zeros(1, dtype=dtype)
        old, new = [], []
        inner = max(1, int(2e6 // (count * dim)))  # ~2M numbers per timed sample: well above the clock's grain
        for r in range(repeats):
            for which, out in ((OldSeededDirections, old), (SeededDirections, new))[:: 1 if r % 2 == 0 else -1]:
                spec = which(count, dim, 1000 + r, chunk)
                out.append(timed(lambda: [draw_all(spec, like) for _ in range(inner)]) / inner)
        rows.append((name, old, new))
    return rows


def digits_oracle(batch: int):
    from oracles.model_loss import ModelLossOracle
    from problems.digits import load_digits_split, make_digits_cnn

    torch.manual_seed(0)
    module = make_digits_cnn()
    x, y, _, _ = load_digits_split(0)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:batch]
    oracle = ModelLossOracle(module, feature_reuse=False)
    return oracle, (x[idx], y[idx])


def bench_estimates(repeats: int) -> list[tuple[str, float, float]]:
    oracle, batch = digits_oracle(16)
    theta = oracle.initial_theta()
    execute(QueryPlan.at(theta.unsqueeze(0)), oracle, batch)  # a batch seen: the chunk settles, as in a run after its first step
    rows = []
    for name, est in (("RGE.estimate q=192 forward, digits", RGE(q=192, mu=5e-3)),
                      ("ES.estimate q=28 antithetic, digits", ES(q=28, mu=0.02))):
        chunk = max(1, oracle.chunk_size(theta))
        old, new = [], []

        def run(which, seed):
            plan = est.plan(theta, seed=seed, chunk=chunk)
            if which is OldSeededDirections:
                d = plan.directions
                plan = QueryPlan.along(theta, OldSeededDirections(d.count, d.dim, d.seed, d.chunk, d.distribution),
                                       plan.mu, plan.scheme, plan.coords, label=plan.label)
            est.combine(plan, execute(plan, oracle, batch))

        for r in range(repeats):
            for which, out in ((OldSeededDirections, old), (SeededDirections, new))[:: 1 if r % 2 == 0 else -1]:
                out.append(timed(lambda: run(which, 2000 + r)))
        rows.append((f"{name} (chunk {chunk})", old, new))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="interleaved samples of each path (default 20)")
    ap.add_argument("--no-estimates", dest="estimates", action="store_false", help="time the draws only")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(1)
    tune_allocator()  # as training does (Trainer.fit): blocks under 32 MiB come from the heap, no page faults
    print(f"seeded directions, old per-chunk draw vs blocks; CPU ms of {args.repeats} interleaved samples (median; "
          f"old / new of the medians and of the minima), 1 thread. On a shared machine the minimum is the better "
          f"estimate of the cost itself; compare the ratios, not the milliseconds\n")
    print(f"| {'case':<47} | old ms | new ms | old / new (median) | (min) |")
    print(f"|{'-' * 49}|-------:|-------:|-------------------:|------:|")
    rows = bench_draws(args.repeats) + (bench_estimates(max(3, args.repeats // 4)) if args.estimates else [])
    for name, old, new in rows:
        med_o, med_n = statistics.median(old), statistics.median(new)
        print(f"| {name:<47} | {med_o * 1e3:6.2f} | {med_n * 1e3:6.2f} | {med_o / med_n:17.2f}x | {min(old) / min(new):4.2f}x |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
