"""Where the CPU time of a whole `blackbox-zo train digits` run goes: imports, data, pruning, the
optimizer's construction, the steps (split into the oracle's base and coordinate queries, the
optimizer step) and the plot.

    .venv/bin/python benchmarks/profile_train_digits.py --recipe        # DeepZero's recipe, 10 epochs
    .venv/bin/python benchmarks/profile_train_digits.py                 # the digits default (two phases)
    .venv/bin/python benchmarks/profile_train_digits.py --recipe --set run.epochs=2

The run is the CLI's own (`python -m blackbox_zo train digits --set run.progress=false`, in this
process), with CPU seconds (`time.process_time`) summed per phase by wrapping the functions named in
the table. The phases nest (the steps contain the oracle calls), so they do not add up to the total;
"other" is the total less the top-level phases. The engine is imported as `blackbox_zo.cli.main` does it
(`cli.load_engine`: the collector paused during the import, then tuned; blackbox_zo/collector.py),
and the CPU seconds spent in Python's cyclic garbage collector are summed across all phases
(`gc.callbacks`). `--recipe` adds the --set values of DeepZero's recipe (bench_train_digits.py's
RECIPE_SETTINGS). The machine is shared: compare phases of one run, or runs at similar load. Besides
the table, the modules that dominate the import time are named: run
`python -X importtime -m blackbox_zo train digits ...` for the full tree.
"""

from __future__ import annotations

import argparse
import functools
import gc
import runpy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPENT: dict[str, float] = {}
IMPORTS = "imports (torch, the engine, torch._dynamo)"
# bench_train_digits.RECIPE_SETTINGS (not imported from there: it imports torch, which would leave the
# imports phase nothing to measure)
RECIPE_SETTINGS = ["estimator=cge", "estimator.mu=0.005", "run.epochs=10", "phase2=none"]
IN_LOOP = [False]


def timed(owner: object, name: str, label: str, loop_only: bool = False) -> None:
    """Sum the CPU seconds of owner.name under `label` (only inside the training loop if loop_only)."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if loop_only and not IN_LOOP[0]:
            return fn(*args, **kwargs)
        t = time.process_time()
        is_loop = label == "training loop"
        IN_LOOP[0] = IN_LOOP[0] or is_loop
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] = SPENT.get(label, 0.0) + time.process_time() - t
            if is_loop:
                IN_LOOP[0] = False

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=[], help="extra --set for the run (e.g. run.epochs=2)")
    ap.add_argument("--recipe", action="store_true", help="DeepZero's recipe (estimator=cge, mu 0.005, 10 epochs, "
                    "phase2=none), before any --set")
    args = ap.parse_args(argv)
    if args.recipe:
        args.set = [*RECIPE_SETTINGS, *args.set]
    gc_spent = [0.0, 0.0]  # CPU s in Python's cyclic collector, start of the current collection

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_spent[1] = time.process_time()
        else:
            gc_spent[0] += time.process_time() - gc_spent[1]

    gc.callbacks.append(on_gc)
    start = time.process_time()
    before = set(sys.modules)
    import blackbox_zo.cli

    if hasattr(blackbox_zo.cli, "load_engine"):
        blackbox_zo.cli.load_engine(with_optimizer=True)  # as `blackbox-zo train` loads it: torch, the engine, torch._dynamo
    else:  # a revision before load_engine (this script copied into an older tree): what its main() imported
        import blackbox_zo._commands  # noqa: F401

    SPENT[IMPORTS] = time.process_time() - start
    import blackbox_zo.trainer as trainer
    import oracles.model_loss as model_loss
    import problems.digits as digits

    top = {"problem setup (data, ZO-GraSP pruning)": (digits.DigitsProblem, "setup"),
           "Trainer() (the optimizer)": (trainer.Trainer, "__init__"),
           "training loop": (trainer.Trainer, "_loop"),
           "plot (training.png)": (trainer, "plot_metrics")}
    nested = {"  data (load_digits_split)": (digits, "load_digits_split"),
              "  ZO-GraSP pruning (386 queries)": (digits, "build_sparse_sampler"),
              "  ZO steps (estimate)": (trainer.Trainer, "_zo_step"),
              "    base queries": (model_loss.ModelLossOracle, "losses"),
              "    coordinate queries": (model_loss.ModelLossOracle, "coordinate_losses"),
              "  optimizer + scheduler + metrics line": (trainer.Trainer, "advance"),
              "  evaluation, checkpoint (per epoch)": (trainer.Trainer, "end_epoch")}
    for label, (owner, name) in {**top, **nested}.items():
        timed(owner, name, label, loop_only=label.startswith("    "))
    with tempfile.TemporaryDirectory(prefix="profile_train_digits_") as out:
        sys.argv = ["blackbox_zo", "train", "digits", "--set", "run.progress=false", "--set", f"run.out_dir={out}",
                    *[x for s in args.set for x in ("--set", s)]]
        try:
            runpy.run_module("blackbox_zo", run_name="__main__")
        except SystemExit as exc:
            if exc.code:
                raise
    total = time.process_time() - start
    gc.callbacks.remove(on_gc)
    heavy = [m for m in ("torch._dynamo", "sklearn", "matplotlib.pyplot", "matplotlib.figure", "scipy", "sympy")
             if m in sys.modules and m not in before]
    print(f"\n{'phase':<48} {'CPU s':>7} {'%':>6}")
    rows = [IMPORTS, "problem setup (data, ZO-GraSP pruning)",
            "  data (load_digits_split)", "  ZO-GraSP pruning (386 queries)",
            "Trainer() (the optimizer)", "training loop", "  ZO steps (estimate)",
            "    base queries", "    coordinate queries", "  optimizer + scheduler + metrics line",
            "  evaluation, checkpoint (per epoch)", "plot (training.png)"]
    for label in rows:
        v = SPENT.get(label, 0.0)
        print(f"{label:<48} {v:7.2f} {100 * v / total:6.1f}")
    other = total - sum(SPENT.get(k, 0.0) for k in [rows[0], *top])
    print(f"{'other (CLI, config, run directory, summary)':<48} {other:7.2f} {100 * other / total:6.1f}")
    print(f"{'total':<48} {total:7.2f}")
    print(f"{'of it in the cyclic garbage collector (any phase)':<48} {gc_spent[0]:7.2f} {100 * gc_spent[0] / total:6.1f}"
          f"   (before the process exits: one more full collection, not counted)")
    print(f"modules imported during the run: {', '.join(heavy) or 'none of the heavy ones'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
