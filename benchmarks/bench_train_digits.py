"""The whole `blackbox-zo train digits` run at two git revisions, alternately, same machine, same load.

    .venv/bin/python benchmarks/bench_train_digits.py                       # main vs HEAD, 3 runs each
    .venv/bin/python benchmarks/bench_train_digits.py --revs baseline-3895ab4-dirs,HEAD --repeats 5

Issue 18's reference is 3895ab4. Since the seeded-direction sampler changed (fixed blocks, branch
grasp-dirs) the recipe's result differs from 3895ab4's (its ZO-GraSP mask uses RGE directions), so
the bitwise comparison is against `baseline-3895ab4-dirs`: 3895ab4 with only that sampler applied
(blackbox_zo/plan.py's `SeededDirections` and `PlanLosses.directions_sum`; its speed is that of
3895ab4, bench_directions.py). `--revs 3895ab4,HEAD` still times the same work, but reports NO for
the bitwise check.

Each revision is exported with `git archive` into a temporary directory and run from there
(`python -m blackbox_zo train digits --set run.progress=false`, this venv's packages, that
revision's code first on sys.path). Runs alternate A, B, A, B, ... so a change in the machine's
load hits both. Per run: CPU seconds of the child (user + system, what the run costs; less
sensitive to other jobs on a shared machine than wall time) and wall seconds. Reported: the
medians and the median of the per-pair ratios A / B. Every run's final line and checkpoint
(sha256 over the module tensors, sorted keys) must be identical across revisions: the speed-up is
for the same result, bit for bit.

`--loop-cpu` also times the training loop alone (`Trainer._loop`: the steps, the per-epoch
evaluation and checkpoint; not the imports, the data, ZO-GraSP, the optimizer's construction or the
plot) in the same runs: the child then starts through a small launcher (LOOP_TIMER) that wraps
`Trainer._loop` with `time.process_time` when the trainer module is imported, importing nothing
itself, so the CLI loads the engine as usual. Same method at every revision.

What is timed is DeepZero's recipe (the digits default before the two-phase default): a revision
that has the `phase2` setting gets the recipe's `--set` values (`RECIPE_SETTINGS`, as in
docs/digits.md), an older one runs its default, which was the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str, into: Path) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"bench_train_digits: unknown revision {rev!r}: {sha.stderr.strip()}")
    dest = into / sha.stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], check=True,
                             capture_output=True).stdout
    tar = into / "rev.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as tf:
        tf.extractall(dest, filter="data")
    tar.unlink()
    return dest


def module_sha256(path: Path) -> str:
    state = torch.load(path, weights_only=True)["module"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


# Runs `python -m blackbox_zo ...` (sys.argv[1:]) with Trainer._loop timed in CPU seconds (stderr line
# "loop_cpu_s=..."); the wrap happens when blackbox_zo.trainer is first imported (a meta path hook), so the
# launcher imports nothing before the CLI does.
LOOP_TIMER = """
import importlib.abc, importlib.util, runpy, sys, time
spent = [0.0]

def wrap(module):
    inner = module.Trainer._loop

    def _loop(self, *args, **kwargs):
        start = time.process_time()
        try:
            return inner(self, *args, **kwargs)
        finally:
            spent[0] += time.process_time() - start

    module.Trainer._loop = _loop

class AfterTrainer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "blackbox_zo.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            wrap(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AfterTrainer())
sys.argv = ["blackbox_zo", *sys.argv[1:]]
try:
    runpy.run_module("blackbox_zo", run_name="__main__", alter_sys=True)
finally:
    print(f"loop_cpu_s={spent[0]:.4f}", file=sys.stderr)
"""

RECIPE_SETTINGS = ["estimator=cge", "estimator.mu=0.005", "run.epochs=10", "phase2=none"]


def recipe_settings(tree: Path) -> list[str]:
    """The --set values that make `train digits` DeepZero's recipe in this revision (none before phase2)."""
    if "phase2" not in (tree / "blackbox_zo" / "config.py").read_text():
        return []
    return [x for s in RECIPE_SETTINGS for x in ("--set", s)]


def run_once(tree: Path, out: Path, extra: list[str], loop_cpu: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    launch = ["-c", LOOP_TIMER] if loop_cpu else ["-m", "blackbox_zo"]
    cmd = [sys.executable, *launch, "train", "digits", "--set", "run.progress=false",
           "--set", f"run.out_dir={out}", *recipe_settings(tree), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"bench_train_digits: run in {tree} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("digits:")][-1]
    result = line.split(" | wall")[0]
    ckpt = sorted(out.glob("digits/*/checkpoint.pt"))[-1]
    loop = [float(ln.split("=", 1)[1]) for ln in proc.stderr.splitlines() if ln.startswith("loop_cpu_s=")]
    return {"cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), "wall": wall,
            "result": result, "sha256": module_sha256(ckpt), "loop": loop[-1] if loop else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--revs", default="main,HEAD", help="two git revisions, A,B (default main,HEAD); B / A is the speed-up")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each revision")
    ap.add_argument("--loop-cpu", action="store_true", help="also time the training loop alone (Trainer._loop, "
                    "CPU s), in the same runs")
    ap.add_argument("--set", action="append", default=[], help="extra --set for both (e.g. run.epochs=2)")
    args = ap.parse_args(argv)
    revs = [r.strip() for r in args.revs.split(",") if r.strip()]
    if len(revs) != 2 or args.repeats < 1:
        ap.error("--revs needs two revisions A,B and --repeats >= 1")
    extra = [x for s in args.set for x in ("--set", s)]
    with tempfile.TemporaryDirectory(prefix="bench_train_digits_") as tmp:
        tmp = Path(tmp)
        trees = [export(r, tmp / "src") for r in revs]
        print(f"digits training, {revs[0]} ({trees[0].name}) vs {revs[1]} ({trees[1].name}), {args.repeats} runs each, "
              f"alternating; load average {os.getloadavg()[0]:.2f}", flush=True)
        runs: list[list[dict]] = [[], []]
        for k in range(args.repeats):
            for i in ((0, 1) if k % 2 == 0 else (1, 0)):
                r = run_once(trees[i], tmp / f"runs{i}_{k}", extra, args.loop_cpu)
                runs[i].append(r)
                loop = f"  loop {r['loop']:6.2f} CPU s" if r["loop"] is not None else ""
                print(f"  {revs[i]:<8} run {k + 1}: {r['cpu']:6.2f} CPU s  {r['wall']:6.2f} wall s{loop}   {r['result']}  "
                      f"sha256 {r['sha256'][:16]}", flush=True)
    results = {r["result"] for rs in runs for r in rs}
    hashes = {r["sha256"] for rs in runs for r in rs}
    same = len(results) == 1 and len(hashes) == 1
    cpu = [statistics.median(r["cpu"] for r in rs) for rs in runs]
    wall = [statistics.median(r["wall"] for r in rs) for rs in runs]
    pair_cpu = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(*runs))
    pair_wall = statistics.median(a["wall"] / b["wall"] for a, b in zip(*runs))
    print(f"\nmedian CPU s: {revs[0]} {cpu[0]:.2f}, {revs[1]} {cpu[1]:.2f}  ->  {revs[1]} is {cpu[0] / cpu[1]:.2f}x "
          f"faster (median of per-pair ratios {pair_cpu:.2f}x; target 2x)")
    print(f"median wall s: {revs[0]} {wall[0]:.2f}, {revs[1]} {wall[1]:.2f}  ->  {wall[0] / wall[1]:.2f}x "
          f"(per-pair {pair_wall:.2f}x); load average now {os.getloadavg()[0]:.2f}")
    if args.loop_cpu:
        loop = [statistics.median(r["loop"] for r in rs) for rs in runs]
        pair_loop = statistics.median(a["loop"] / b["loop"] for a, b in zip(*runs))
        print(f"training loop only (Trainer._loop, CPU s): {revs[0]} {loop[0]:.2f}, {revs[1]} {loop[1]:.2f}  ->  "
              f"{loop[0] / loop[1]:.2f}x (per-pair {pair_loop:.2f}x); the whole process above is the issue's measure")
    print(f"same result and checkpoint bit for bit: {'yes' if same else 'NO'} ({sorted(hashes)[0][:16]}...)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
