"""The same `blackbox-zo train digits` settings at two git revisions over several seeds, paired by seed.

    .venv/bin/python benchmarks/seed_study.py --revs main,HEAD --seeds 0-9 \\
        --set estimator=cge --set estimator.mu=0.005 --set run.epochs=10 --set phase2=none   # DeepZero's recipe
    .venv/bin/python benchmarks/seed_study.py --revs main,HEAD --seeds 0-9                   # the default

For a change that alters results (not only speed): is revision B better, worse, or
indistinguishable from A? Each revision is exported with `git archive` (as bench_train_digits.py
does) and run once per seed with `--set run.seed=S --set run.threads=1` and the given `--set`
values; runs go one at a time, A then B for each seed. Printed: each seed's final test accuracy at
both revisions, mean ± std (sample std), the wins / losses / ties of B, and two paired tests over
the seeds from scipy.stats: Student's t on the differences (ttest_rel) and the Wilcoxon signed-rank
test (wilcoxon; ties, i.e. zero differences, are dropped). `--json FILE` also writes every number.
Accuracy is a deterministic function of machine, revision and seed (docs/results.md), so one run per
(revision, seed) is the whole measurement; the seeds are the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from scipy import stats

from bench_train_digits import export, module_sha256


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,3,5' or '0-4,7' -> the seeds in order."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def run_once(tree: Path, out: Path, seed: int, settings: list[str]) -> dict:
    cmd = [sys.executable, "-m", "blackbox_zo", "train", "digits", "--set", "run.progress=false",
           "--set", f"run.out_dir={out}", "--set", "run.threads=1", "--set", f"run.seed={seed}",
           *[x for s in settings for x in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seed_study: seed {seed} in {tree} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    run_dir = sorted(out.glob("digits/*/summary.json"))[-1].parent
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"test_acc": summary["test_acc"], "queries": summary["queries"]["total"],
            "sha256": module_sha256(run_dir / "checkpoint.pt")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--revs", default="main,HEAD", help="two git revisions A,B (default main,HEAD)")
    ap.add_argument("--seeds", default="0-9", help="run.seed values, e.g. 0-9 or 0,2,5 (default 0-9)")
    ap.add_argument("--set", action="append", default=[], help="a --set for both revisions (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    ap.add_argument("--a-from", type=Path, help="take A's runs from this --json of an earlier study (same A commit, "
                    "settings and seeds; a run is deterministic) instead of running A again")
    args = ap.parse_args(argv)
    revs = [r.strip() for r in args.revs.split(",") if r.strip()]
    if len(revs) != 2:
        ap.error("--revs needs two revisions A,B")
    seeds = parse_seeds(args.seeds)
    if len(seeds) < 2:
        ap.error("--seeds needs at least two seeds for a paired test")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="seed_study_") as tmp:
        tmp = Path(tmp)
        trees = [export(r, tmp / "src") for r in revs]
        earlier = {}
        if args.a_from:
            old = json.loads(args.a_from.read_text())
            if old["commits"][0] != trees[0].name or old["settings"] != args.set:
                ap.error(f"--a-from {args.a_from}: A there is {old['commits'][0]} with {old['settings']}, "
                         f"here {trees[0].name} with {args.set}")
            earlier = {r["seed"]: r["a"] for r in old["runs"]}
            if not set(seeds) <= set(earlier):
                ap.error(f"--a-from {args.a_from} lacks seeds {sorted(set(seeds) - set(earlier))}")
        print(f"train digits {' '.join('--set ' + s for s in args.set) or '(default)'}; "
              f"A = {revs[0]} ({trees[0].name}), B = {revs[1]} ({trees[1].name}); seeds {args.seeds}", flush=True)
        for seed in seeds:
            a = earlier[seed] if seed in earlier else run_once(trees[0], tmp / f"a{seed}", seed, args.set)
            b = run_once(trees[1], tmp / f"b{seed}", seed, args.set)
            rows.append({"seed": seed, "a": a, "b": b})
            same = " (same checkpoint)" if a["sha256"] == b["sha256"] else ""
            print(f"  seed {seed}: A {a['test_acc']:.4f}  B {b['test_acc']:.4f}  B - A {b['test_acc'] - a['test_acc']:+.4f}"
                  f"  queries {a['queries']} / {b['queries']}{same}", flush=True)
        commits = [t.name for t in trees]
    acc_a = [r["a"]["test_acc"] for r in rows]
    acc_b = [r["b"]["test_acc"] for r in rows]
    diff = [b - a for a, b in zip(acc_a, acc_b)]
    wins, losses = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
    t = stats.ttest_rel(acc_b, acc_a) if any(diff) else None
    w = stats.wilcoxon(acc_b, acc_a) if wins + losses > 0 else None
    out = {"revs": revs, "commits": commits, "settings": args.set, "seeds": seeds, "runs": rows,
           "mean_a": statistics.mean(acc_a), "std_a": statistics.stdev(acc_a),
           "mean_b": statistics.mean(acc_b), "std_b": statistics.stdev(acc_b),
           "wins_b": wins, "losses_b": losses, "ties": len(diff) - wins - losses,
           "ttest_rel_p": None if t is None else float(t.pvalue), "wilcoxon_p": None if w is None else float(w.pvalue)}
    print(f"\nA {revs[0]}: {out['mean_a']:.4f} ± {out['std_a']:.4f}   B {revs[1]}: {out['mean_b']:.4f} ± {out['std_b']:.4f}"
          f"   (mean ± sample std over {len(seeds)} seeds)")
    print(f"B better on {wins}, worse on {losses}, equal on {out['ties']};  paired t-test p = "
          f"{'n/a' if t is None else f'{t.pvalue:.3f}'},  Wilcoxon p = {'n/a' if w is None else f'{w.pvalue:.3f}'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
