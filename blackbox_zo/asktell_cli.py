"""The ask/tell commands: `blackbox-zo init-ask`, `ask`, `tell` (blackbox_zo/asktell.py does the work).

Exit codes as everywhere (docs/reliability.md): 0 done, 2 bad input or settings (one line,
nothing changed), 130/143 interrupted; `ask` exits 3 when the run has no step left to ask
for (completed, or stopped by its query budget), so a driving script can loop on it.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys

EXIT_COMPLETE = 3


def _quote(path) -> str:
    return shlex.quote(str(path))


def _bad_input(command):
    """AskTellError (bad input, nothing changed) is one line and exit 2; the rest as every command."""
    from .cli import _err, _one_line_errors

    @_one_line_errors
    @functools.wraps(command)
    def run(args) -> int:
        from .asktell import AskTellError

        try:
            return command(args)
        except AskTellError as exc:
            return _err(str(exc))

    return run


@_bad_input
def cmd_init_ask(args) -> int:
    import numpy as np

    from .asktell import AskTellError, AskTellRun
    from .config import load_config_file

    x0 = None
    if args.x0:
        try:
            x0 = np.load(args.x0, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
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


@_bad_input
def cmd_ask(args) -> int:
    from .asktell import AskTellRun, RunComplete, write_points

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


@_bad_input
def cmd_tell(args) -> int:
    from .asktell import AskTellRun, read_answer
    from .trainer import _human

    losses, ask_id = read_answer(args.losses, args.ask_id)  # a wrong file is refused before the run is opened
    run = AskTellRun.open(args.run_dir)
    record = run.tell(ask_id, losses)
    summary = record.get("summary")
    if summary is not None:
        from .cli import _format_final

        print(_format_final(summary))
        return 0
    evals = " ".join(f"{k[5:]}={v:.4f}" for k, v in run.trainer.last_eval.items())
    print(f"step {record['step']} told: loss {record['loss']:.6g} | queries {_human(record['queries'])}"
          f"{f' | {evals}' if evals else ''}; next: blackbox-zo ask {_quote(run.run_dir)} --out points.npz")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register init-ask, ask and tell on the `blackbox-zo` parser."""
    p = sub.add_parser("init-ask", help="create a run driven from outside by ask / tell", description=(
        "Create a run directory whose training losses come from outside (blackbox-zo ask / tell). PROBLEM is "
        "'external' (a black box of external.dim parameters: --set external.dim=D) or any registered problem or "
        "oracle (its data and evaluation stay in-process). Settings: the problem's defaults <- --config <- --set."))
    p.add_argument("problem")
    p.add_argument("--out", metavar="RUN_DIR", help="the new run directory (default: run.out_dir/PROBLEM/<timestamp>)")
    p.add_argument("--x0", metavar="FILE.npy", help="initial parameters, d numbers (default: the problem's)")
    p.add_argument("--config", help="TOML or JSON file with settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set estimator=sep-cma-es --set external.dim=20")
    p.set_defaults(fn=cmd_init_ask)

    p = sub.add_parser("ask", help="write the points of a run's next step", description=(
        "Write the next step's points to a .npz (arrays points [P, d], ask_id, step, epoch, index, seed). The same "
        "ask again until it is told. Exit 3 when the run has no step left."))
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, metavar="POINTS.npz")
    p.set_defaults(fn=cmd_ask)

    p = sub.add_parser("tell", help="give a run the losses of its pending ask", description=(
        "Take the pending step with these losses: LOSSES.npy ([P], the rows' order) with --ask-id, or an .npz "
        "with arrays 'losses' and 'ask_id'. The step is checkpointed; bad input changes nothing (exit 2)."))
    p.add_argument("run_dir")
    p.add_argument("losses", metavar="LOSSES")
    p.add_argument("--ask-id", help="the ask_id of points.npz these losses answer")
    p.set_defaults(fn=cmd_tell)
