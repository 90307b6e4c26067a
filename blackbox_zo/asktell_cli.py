"""The ask/tell commands: `blackbox-zo init-ask`, `ask`, `tell` (blackbox_zo/asktell.py does the work).

The parsers are registered in blackbox_zo/cli.py and the commands in blackbox_zo/_commands.py,
which wraps them in the one-line error contract (docs/reliability.md): 0 done, 2 bad input or
settings (`AskTellError` is a `ConfigError`: one line, nothing changed), 130/143 interrupted.
`ask` exits 3 when the run has no step left to ask for (completed, or stopped by its query
budget), so a driving script can loop on it.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np

from .asktell import AskTellError, AskTellRun, RunComplete, read_answer, write_points
from .config import load_config_file
from .progress import final_line, human

__all__ = ["EXIT_COMPLETE", "cmd_init_ask", "cmd_ask", "cmd_tell"]

EXIT_COMPLETE = 3


def _quote(path) -> str:
    return shlex.quote(str(path))


def cmd_init_ask(args: argparse.Namespace) -> int:
    x0 = None
    if args.x0:
        try:
            x0 = np.load(args.x0, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
            raise AskTellError(f"cannot read --x0 {args.x0} as .npy: {type(exc).__name__}: {exc}") from None
        if not isinstance(x0, np.ndarray) or x0.dtype.kind not in "fiu":
            raise AskTellError(f"--x0 {args.x0} must hold one array of numbers")
    settings = load_config_file(args.config) if args.config else {}
    run = AskTellRun.create(args.problem, settings, args.out, overrides=args.set, x0=x0)
    t = run.trainer
    print(f"created {run.run_dir}: problem {run.problem.name}, d = {t.space.dim}, estimator "
          f"{run.config.estimator.kind}, {t.total_steps} steps; next: blackbox-zo ask {_quote(run.run_dir)} "
          "--out points.npz")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    run = AskTellRun.open(args.run_dir)
    try:
        ask = run.ask()
    except RunComplete as exc:
        print(f"complete: {exc}", file=sys.stderr)
        return EXIT_COMPLETE
    path = write_points(ask, args.out)
    n, d = ask.points.shape
    print(f"ask {ask.id}: {n} points (d = {d}) of step {ask.step} (epoch {ask.epoch}, batch {ask.index}) in {path}; "
          f"answer with: blackbox-zo tell {_quote(run.run_dir)} LOSSES.npy --ask-id {ask.id}")
    return 0


def cmd_tell(args: argparse.Namespace) -> int:
    losses, ask_id = read_answer(args.losses, args.ask_id)  # a wrong file is refused before the run is opened
    run = AskTellRun.open(args.run_dir)
    record = run.tell(ask_id, losses)
    summary = record.get("summary")
    if summary is not None:
        print(final_line(summary))
        return 0
    evals = " ".join(f"{k}={v:.4f}" for k, v in run.trainer.last_eval.items())
    print(f"step {record['step']} told: loss {record['loss']:.6g} | queries {human(record['queries'])}"
          f"{f' | {evals}' if evals else ''}; next: blackbox-zo ask {_quote(run.run_dir)} --out points.npz")
    return 0
