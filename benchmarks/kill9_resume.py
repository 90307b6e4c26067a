"""kill -9 at random points, resume, and compare with an uninterrupted run, bitwise.

    python benchmarks/kill9_resume.py [--trials 10] [--kills-per-trial 2] [--seed 0]

One uninterrupted reference run of `blackbox-zo train digits` (2 epochs, a checkpoint every
7 steps, so checkpoints fall mid-epoch and on a rotation); then TRIALS trials, each a fresh run
of the same command that is killed with SIGKILL at a random moment, resumed with `--resume`,
killed again, and resumed to the end. A kill lands in start-up and setup (pruning) with
probability 1/4, at a moment uniform over the reference's time before its first step; else in
training: after a line of metrics.jsonl drawn uniformly from the reference's lines (steps
and evaluations) has been written by this process, plus a delay uniform over one step's
time, so kills fall anywhere in a step, a checkpoint write or an evaluation. A trial
passes when

* the final parameters (every tensor of the checkpoint's module state) are bitwise those of
  the reference run,
* metrics.jsonl holds every step exactly once with the reference's loss values, bitwise,
* summary.json reports the reference's query counts and test accuracy.

A kill before the run directory exists leaves nothing to resume (the trial starts again);
that is counted, not hidden. Prints one line per kill (where it landed, what the resume
found) and the totals: kills, resumes, failures, data lost. Exit status 1 if any trial fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = ["--set", "run.epochs=2", "--set", "run.checkpoint_every_steps=7", "--set", "run.progress=false"]


def cli(out_dir: Path, resume: Path | None) -> list[str]:
    args = [sys.executable, "-m", "blackbox_zo", "train", "digits"]
    if resume is not None:
        return args + ["--resume", str(resume)]
    return args + SETTINGS + ["--set", f"run.out_dir={out_dir}"]


def run_dir_of(out_dir: Path) -> Path | None:
    runs = sorted((out_dir / "digits").glob("*")) if (out_dir / "digits").exists() else []
    return runs[0] if runs else None


def digest(run: Path) -> str:
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["module"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def step_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def where(run: Path | None) -> str:
    """What a kill left behind."""
    if run is None:
        return "before the run directory existed"
    names = {p.name for p in run.iterdir()}
    temps = sorted(n for n in names if n.startswith("."))
    if "checkpoint.pt" not in names and "checkpoint.prev.pt" not in names:
        lines = len((run / "metrics.jsonl").read_text().splitlines()) if "metrics.jsonl" in names else 0
        return f"before the first checkpoint ({lines} metrics lines)"
    state = None
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        if name in names:
            try:
                state = torch.load(run / name, map_location="cpu", weights_only=True)
                break
            except Exception:  # noqa: BLE001 - the resume will report it
                continue
    step = state["position"][2] if state else "?"
    extra = []
    if "checkpoint.pt" not in names:
        extra.append("between the renames of a rotation")
    if temps:
        extra.append(f"mid-write ({', '.join(temps)})")
    if "summary.json" in names:
        extra.append("after summary.json")
    return f"newest checkpoint step {step}" + (f", {'; '.join(extra)}" if extra else "")


def kill_moment(proc: subprocess.Popen, out: Path, rng: random.Random, startup: float, step_time: float,
                lines: int) -> tuple[float, str] | None:
    """Wait for the moment to kill (see the module's docstring); None if the process ended first."""
    started = time.time()
    if rng.random() < 0.25:
        delay = rng.uniform(0.0, startup)
        try:
            proc.wait(timeout=delay)
            return None
        except subprocess.TimeoutExpired:
            return delay, "start-up/setup"
    target = rng.randint(1, lines)  # the metrics line after which to kill, then a fraction of a step later
    while True:
        run = run_dir_of(out)
        metrics = run / "metrics.jsonl" if run is not None else None
        try:
            if metrics is not None and metrics.stat().st_mtime >= started and \
                    len(metrics.read_text().splitlines()) >= target:
                break
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    try:
        proc.wait(timeout=rng.uniform(0.0, step_time))
        return None
    except subprocess.TimeoutExpired:
        return time.time() - started, f"training (after metrics line {target})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--kills-per-trial", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    work = Path(tempfile.mkdtemp(prefix="kill9-"))
    try:
        t0 = time.time()
        proc = subprocess.Popen(cli(work / "ref", None), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        first = None
        while proc.poll() is None:
            run = run_dir_of(work / "ref")
            if first is None and run is not None and (run / "metrics.jsonl").exists():
                first = time.time() - t0
            time.sleep(0.01)
        wall = time.time() - t0
        if proc.returncode != 0 or first is None:
            print(proc.communicate()[1])
            return 1
        ref_run = run_dir_of(work / "ref")
        ref_digest, ref_losses = digest(ref_run), step_losses(ref_run)
        ref_summary = json.loads((ref_run / "summary.json").read_text())
        startup, train_time = first, wall - first
        ref_lines = len((ref_run / "metrics.jsonl").read_text().splitlines())
        step_time = train_time / len(ref_losses)
        print(f"reference: {len(ref_losses)} steps in {wall:.1f} s wall ({startup:.1f} s to the first step), "
              f"parameters sha256 {ref_digest[:16]}...")

        kills = resumes = failures = lost = 0
        for trial in range(args.trials):
            out = work / f"trial{trial}"
            kills_left = args.kills_per_trial
            notes = []
            while True:
                run = run_dir_of(out)
                proc = subprocess.Popen(cli(out, run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                resumes += run is not None
                if kills_left:
                    moment = kill_moment(proc, out, rng, startup, step_time, ref_lines)
                    if moment is not None:
                        proc.kill()  # SIGKILL: no handler runs, no file is closed
                        proc.wait()
                        kills += 1
                        kills_left -= 1
                        notes.append(f"killed in {moment[1]} at {moment[0]:.2f}s: {where(run_dir_of(out))}")
                        continue
                    notes.append("finished before the kill")
                    kills_left = 0
                _, err = proc.communicate()
                if proc.returncode != 0:
                    notes.append(f"resume failed ({proc.returncode}): {err.strip()[-300:]}")
                break
            run = run_dir_of(out)
            ok = proc.returncode == 0 and run is not None
            problems = []
            if ok:
                if digest(run) != ref_digest:
                    problems.append("parameters differ")
                got = step_losses(run)
                if got != ref_losses:
                    missing = len({s for s, _ in ref_losses} - {s for s, _ in got})
                    lost += missing
                    problems.append(f"metrics differ ({len(got)} step lines, {missing} missing)")
                summary = json.loads((run / "summary.json").read_text())
                for key in ("queries", "test_acc", "test_loss", "steps"):
                    if summary.get(key) != ref_summary.get(key):
                        problems.append(f"summary {key} {summary.get(key)} != {ref_summary.get(key)}")
            else:
                problems.append("did not finish")
            failures += bool(problems)
            print(f"trial {trial}: {'OK' if not problems else 'FAIL ' + '; '.join(problems)} | " + " | ".join(notes))
        print(f"kills: {kills}, resumes: {resumes}, trials: {args.trials}, failures: {failures}, "
              f"metrics steps lost: {lost}")
        return 1 if failures else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
