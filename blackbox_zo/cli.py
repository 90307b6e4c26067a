"""The `blackbox-zo` command: list, train, config, eval, compare, check-oracle, check-simulator, experiment,
init-ask, ask, tell (and the commands of installed packages).

This module only parses the command line; the commands live in `blackbox_zo._commands`,
imported when a command runs, so that `blackbox-zo --help` does not import torch. Exit
codes and the one-line error contract are described there and in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Callable, Sequence

from .collector import import_engine, tune_collector
from .registry import CLI_COMMANDS

__all__ = ["PROG", "build_parser", "load_engine", "main"]

PROG = "blackbox-zo"


def _commands() -> ModuleType:
    # The one function-level import between this package's modules: the commands import the
    # engine (torch, ~1-5 s), which parsing a command line (and --help) must not pay for.
    from . import _commands

    return _commands


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """`args.fn`: runs command `name` (with its one-line errors, without main()'s signal handling)."""

    def run(args: argparse.Namespace) -> int:
        return _commands().run_command(name, args)

    run.__name__ = run.__qualname__ = f"command_{name.replace('-', '_')}"
    return run


_SET_HELP = "override a setting, e.g. --set optimizer.lr=0.05 --set estimator=rge"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Zeroth-order training through loss-value-only oracles (DeepZero and friends).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list oracles, problems, experiments, estimators and simulators (built-in and "
                                   "plug-ins)")
    p.set_defaults(fn=_command("list"))

    p = sub.add_parser("train", help="train a problem by queries", add_help=False, description=(
        "Train PROBLEM. Settings: the problem's defaults <- --config FILE (TOML/JSON) <- --set key.path=value; "
        "a setting the problem does not use is refused. Writes runs/<problem>/<timestamp>/ (config.json, "
        "metrics.jsonl, checkpoint.pt, summary.json, training.png). Ctrl-C (or SIGTERM) finishes the step in "
        "flight, saves a checkpoint and prints the command that resumes."))
    p.add_argument("problem", nargs="?", help="a problem or a registered oracle (blackbox-zo list)")
    p.add_argument("-h", "--help", action="store_true",
                   help="show this help, and with PROBLEM its settings (defaults, ranges, descriptions)")
    p.add_argument("--config", help="TOML or JSON file with settings (blackbox-zo config PROBLEM writes one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    p.add_argument("--resume", metavar="RUN_DIR", help=(
        "continue the run in RUN_DIR from its checkpoint; --config/--set may change only run.epochs, run.max_steps, "
        "run.query_budget and the other settings listed in docs/reliability.md"))
    p.set_defaults(fn=_command("train"), subparser=p)

    p = sub.add_parser("config", help="print a problem's resolved settings as TOML (edit, then train --config FILE)",
                       description="Print PROBLEM's settings (its defaults <- --config <- --set) as TOML, with each "
                       "setting's description; pass the file back with: blackbox-zo train PROBLEM --config FILE.")
    p.add_argument("problem")
    p.add_argument("--config", help="TOML or JSON file with settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)
    p.set_defaults(fn=_command("config"))

    p = sub.add_parser("eval", help="evaluate the checkpoint of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=_command("eval"))

    p = sub.add_parser("compare", help="overlay runs' curves and tabulate their summaries (PNG, Markdown, CSV)",
                       description="Compare run directories: one figure (the metric and the training loss against "
                       "queries and wall time, one line per run, labelled by the settings that differ), one table "
                       "(final metric, queries, wall time, queries to --target), as compare.png, compare.md and "
                       "compare.csv. Runs of different problems are refused unless --force.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--metric", help="the metric to compare: an evaluation metric (test_acc, eval_loss, ...) or loss "
                   "(the training loss); default: the problem's headline metric if the runs evaluated it, else loss")
    p.add_argument("--target", type=float, help="also tabulate the queries each run took to reach this value")
    p.add_argument("--goal", choices=("min", "max"), help="lower or higher is better (default: min for a loss or an "
                   "error, else max)")
    p.add_argument("--out", help="directory for compare.png/.md/.csv (default: runs/compare/<timestamp>)")
    p.add_argument("--force", action="store_true", help="compare runs of different problems")
    p.set_defaults(fn=_command("compare"))

    p = sub.add_parser("check-oracle", help="run the conformance checks on a registered oracle")
    p.add_argument("name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="oracle.options.KEY=VALUE (the factory's keyword arguments) or estimator.mu=VALUE "
                        "(the finite-difference step the loss must respond to; default 0.005)")
    p.set_defaults(fn=_command("check-oracle"))

    p = sub.add_parser("check-simulator", help="run the conformance checks on a registered simulator (solver in the loop)")
    p.add_argument("name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="options.KEY=VALUE: the simulator's options (keyword arguments of its factory)")
    p.set_defaults(fn=_command("check-simulator"))

    p = sub.add_parser("experiment", help="run a named experiment (arguments after NAME go to it; try NAME --help)")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_command("experiment"))

    # a run driven from outside, step by step (blackbox_zo/asktell.py, docs/ask-tell.md)
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
    p.set_defaults(fn=_command("init-ask"))

    p = sub.add_parser("ask", help="write the points of a run's next step", description=(
        "Write the next step's points to a .npz (arrays points [P, d], ask_id, step, epoch, index, seed). The same "
        "ask again until it is told. Exit 3 when the run has no step left."))
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, metavar="POINTS.npz")
    p.set_defaults(fn=_command("ask"))

    p = sub.add_parser("tell", help="give a run the losses of its pending ask", description=(
        "Take the pending step with these losses: LOSSES.npy ([P], the rows' order) with --ask-id, or an .npz "
        "with arrays 'losses' and 'ask_id'. The step is checkpointed; bad input changes nothing (exit 2)."))
    p.add_argument("run_dir")
    p.add_argument("losses", metavar="LOSSES")
    p.add_argument("--ask-id", help="the ask_id of points.npz these losses answer")
    p.set_defaults(fn=_command("tell"))

    # commands of installed packages (entry-point group blackbox_zo.commands, e.g. certify, serve-onnx):
    # their classes only declare arguments, so building the parser stays light
    for name, command in CLI_COMMANDS.available().items():
        command = command() if isinstance(command, type) else command
        p = sub.add_parser(name, help=command.help, description=getattr(command, "description", None))
        command.add_arguments(p)
        p.set_defaults(fn=_command(name), plugin_command=command)
    return parser


def load_engine(with_optimizer: bool = False) -> ModuleType:
    """The commands module, loaded as the `blackbox-zo` process loads it: Python's collector paused
    while the engine imports, its objects frozen, the collector tuned (blackbox_zo/collector.py: 0.7
    to 0.9 CPU s of a digits run). `with_optimizer` (a command that trains) also loads torch._dynamo,
    which torch.optim imports when an optimizer is built (its add_param_group and step wrappers):
    frozen with the rest, the run's collections skip its objects too."""
    tune_collector()
    commands = import_engine(f"{__package__}._commands")
    if with_optimizer:
        try:
            import_engine("torch._dynamo")
        except Exception:  # noqa: BLE001 - only a head start: the optimizer imports it (or fails) as before
            pass
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trains = args.command == "train" and not args.help  # `train PROBLEM --help` only prints the settings
    return load_engine(with_optimizer=trains).run_command(args.command, args, process=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
