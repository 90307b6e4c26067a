"""The `blackbox-zo` command: list, train, eval, check-oracle, check-simulator, experiment.

Every way a command can fail ends in one line on stderr and an exit code
(docs/reliability.md): 0 done (a run stopped by its query budget is done too), 1 a run
stopped on a fault of the oracle or of a rank (a checkpoint is kept: it says how to
resume), 2 usage, configuration or environment (a bad setting, a refused resume, a damaged
checkpoint, a directory that cannot be written, a missing device or optional package),
128 + N for signal N (130 Ctrl-C, 143 SIGTERM). `BLACKBOX_ZO_DEBUG=1` re-raises instead,
with the full traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .config import ConfigError, parse_overrides, resolve_config
from .runtime import tune_allocator

EXIT_FAULT = 1
EXIT_USAGE = 2
PROG = "blackbox-zo"


def _err(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _debug() -> bool:
    return os.environ.get("BLACKBOX_ZO_DEBUG", "").strip() not in ("", "0", "false", "no")


def _format_final(summary: dict) -> str:
    from .trainer import _human

    q = summary.get("queries", {})
    metric_keys = [k for k, v in summary.items() if isinstance(v, float) and k not in ("wall_s", "oracle_queries_per_s")]
    metrics = " ".join(f"{k}={summary[k]:.4f}" for k in metric_keys)
    label = "" if summary.get("zeroth_order", True) else " [FIRST-ORDER REFERENCE, not ZO]"
    phases = ", ".join(f"{k} {_human(v)}" for k, v in q.items() if k != "total" and v)
    stopped = summary.get("stopped", "completed")
    why = "" if stopped == "completed" else f" | stopped: {stopped} after step {summary.get('steps')}"
    return (f"{summary['problem']}{label}: {metrics} | queries {_human(q.get('total', 0))}"
            f"{f' ({phases})' if phases else ''} | wall {summary['wall_s']:.1f}s | {summary.get('run_dir')}{why}")


def _resume_command(problem: str, run_dir) -> str:
    from . import parallel

    launcher = PROG
    if parallel.world_size() > 1:
        launcher = f"torchrun --nproc-per-node {parallel.world_size()} -m blackbox_zo"
    return f"{launcher} train {shlex.quote(problem)} --resume {shlex.quote(str(run_dir))}"


def _unknown_name(name: str, exc: Exception) -> int:
    """An unknown name, unless a plug-in of that name failed to import: then its import error."""
    from .registry import plugin_errors

    for key, err in sorted(plugin_errors().items()):
        if key.split(":", 1)[-1] == name:
            return _err(f"plug-in {name!r} ({key.split(':', 1)[0]}) failed to import: {err}")
    return _err(str(exc))


def _one_line_errors(command):
    """Every command (`args.fn`) ends a fault in one line and an exit code, called from main() or not."""

    @functools.wraps(command)
    def run(args) -> int:
        from .interrupts import Interrupted
        from .problem import ProblemSetupError
        from .rundir import RunDirError
        from .runtime import DeviceError

        try:
            return command(args)
        except Interrupted as exc:
            print(f"{PROG}: {exc.describe()}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted by SIGINT", file=sys.stderr)
            return 130
        except (ConfigError, RunDirError, DeviceError, ProblemSetupError) as exc:
            if _debug():
                raise
            return _err(str(exc))
        except ImportError as exc:  # an optional extra that is not installed (phiflow, gymnasium, onnxruntime)
            if _debug():
                raise
            return _err(f"a package this needs is not installed: {exc}")
        except OSError as exc:  # the environment: a full disk, a missing or unwritable path
            if _debug():
                raise
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            return _err(f"{exc.strerror or exc}{where}")

    return run


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings as `blackbox-zo: warning: ...`, one line each, above a progress bar if one is drawn."""
    from .trainer import RunWarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{PROG}: warning: {' '.join(str(message).split())}"
        try:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
        except Exception:  # noqa: BLE001 - a warning must never stop a run
            print(text, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RunWarning)  # every run's warnings, even twice in one process
        warnings.showwarning = show
        yield


@_one_line_errors
def cmd_list(args) -> int:
    from .estimators import available_estimators
    from .oracle import available_oracles
    from .problem import available_experiments, available_problems
    from .registry import SIMULATORS, plugin_errors

    sections = (("oracles (each can be trained directly: blackbox-zo train NAME)", available_oracles()),
                ("problems", available_problems()),
                ("experiments", available_experiments()),
                ("estimators (--set estimator.kind=NAME; autograd: the first-order reference)", available_estimators()),
                ("simulators (blackbox-zo train sol --set sol.simulator=NAME; blackbox-zo check-simulator NAME)",
                 SIMULATORS.available()))
    for title, items in sections:
        print(f"{title}:")
        for name, obj in items.items():
            doc = getattr(obj, "description", "") or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            print(f"  {name:<22} {doc}")
    errors = plugin_errors()
    if errors:
        print("failed to load:")
        for key, err in sorted(errors.items()):
            print(f"  {key:<22} {err}")
    return 0


def _maybe_init_distributed(config) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group before anything else."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from . import parallel

        parallel.init_from_env(config)


def _resolve_device(problem, config) -> None:
    from .runtime import resolve_device

    config.run.device = resolve_device(config.run.device, tuple(getattr(problem, "devices", ("cpu",))),
                                       f"problem {problem.name!r}")


@_one_line_errors
def cmd_train(args) -> int:
    from . import rundir
    from .interrupts import Interrupted
    from .oracle import UnknownNameError
    from .parallel import ParallelError
    from .problem import get_problem
    from .trainer import TrainingError, _is_main_process, train

    try:
        problem = get_problem(args.problem)
    except UnknownNameError as exc:
        return _unknown_name(args.problem, exc)
    if args.resume:
        # the run's own settings <- --config <- --set; train() refuses any change outside
        # rundir.RESUMABLE_SETTINGS before it writes anything
        raw = rundir.read_run_config(args.resume)
        rundir.check_same_problem(args.resume, raw, problem.name)
        config = resolve_config(problem.config_model, raw, args.config, args.set)
    else:
        config = resolve_config(problem.config_model, problem.default_config(), args.config, args.set)
    _resolve_device(problem, config)
    try:
        _maybe_init_distributed(config)
    except ParallelError as exc:
        return _err(str(exc))
    main = _is_main_process()
    run_dir = Path(args.resume) if args.resume else (rundir.make_run_dir(config.run.out_dir, problem.name)
                                                       if main else None)
    try:
        summary = train(problem, config, run_dir=None if args.resume else run_dir, resume=args.resume)
    except Interrupted as exc:
        if main:
            msg = exc.describe()
            if exc.run_dir is not None and exc.checkpoint_step is not None:
                msg += f"; resume with: {_resume_command(problem.name, exc.run_dir)}"
            print(f"{PROG}: {msg}", file=sys.stderr)
        return exc.exit_code
    except TrainingError as exc:
        msg = f"{PROG}: training stopped: {exc}"
        if exc.run_dir is not None and exc.checkpoint_step is not None:
            msg += (f"; checkpoint of step {exc.checkpoint_step} kept; resume with: "
                    f"{_resume_command(problem.name, exc.run_dir)}")
        print(msg, file=sys.stderr)
        return EXIT_FAULT
    except ParallelError as exc:  # a rank died, hung past parallel.timeout_s, or diverged
        print(f"{PROG}: parallel run failed: {exc}", file=sys.stderr)
        return EXIT_FAULT
    except rundir.WriteError as exc:  # e.g. the disk filled up during the run
        if run_dir is not None and (run_dir / rundir.CONFIG_NAME).is_file():
            kept = ("its last checkpoint is kept" if rundir.find_checkpoint(run_dir) else
                    "no checkpoint was written yet, so it starts over")
            return _err(f"{exc}; the run stopped and {kept}: fix that, then resume with: "
                        f"{_resume_command(problem.name, run_dir)}")
        return _err(str(exc))
    if main:
        print(_format_final(summary))
    return 0


@_one_line_errors
def cmd_eval(args) -> int:
    from . import rundir
    from .oracle import UnknownNameError
    from .problem import get_problem
    from .trainer import RunWarning, Trainer, TrainingError

    run_dir = Path(args.run_dir)
    raw = rundir.read_run_config(run_dir)
    try:
        problem = get_problem(raw.get("problem", ""))
    except UnknownNameError as exc:
        return _unknown_name(raw.get("problem", ""), exc)
    config = resolve_config(problem.config_model, raw)
    _resolve_device(problem, config)
    loaded = rundir.load_checkpoint(run_dir)  # before setup: a damaged file is named at once
    if loaded.note:
        warnings.warn(loaded.note, RunWarning, stacklevel=1)
    setup = problem.setup(config)
    trainer = Trainer(setup, config, None, problem_name=problem.name)
    trainer.load_state(loaded.state)
    try:
        metrics = trainer.evaluate()
    except TrainingError as exc:
        print(f"{PROG}: evaluation failed: {exc}", file=sys.stderr)
        return EXIT_FAULT
    print(json.dumps({"run_dir": str(run_dir), "step": loaded.step, "checkpoint": loaded.path.name, **metrics},
                     indent=2))
    return 0


@_one_line_errors
def cmd_check_oracle(args) -> int:
    from .oracle import UnknownNameError, available_oracles, check_oracle
    from .oracle_problem import OracleTrainConfig

    known = available_oracles()
    if args.name not in known:
        return _unknown_name(args.name, UnknownNameError(
            f"unknown oracle {args.name!r}; known: {', '.join(known) or '(none)'}"))
    given = parse_overrides(args.set)
    extra = sorted(f"{k}.{kk}" if isinstance(v, dict) else k
                   for k, v in given.items() for kk in (v if isinstance(v, dict) else [None])
                   if not ((k == "oracle" and kk == "options") or (k == "estimator" and kk == "mu")))
    if extra:
        return _err(f"check-oracle --set takes oracle.options.KEY=VALUE and estimator.mu=VALUE, got {', '.join(extra)}")
    config = resolve_config(OracleTrainConfig, {}, None, args.set)
    options, mu = config.oracle.options, config.estimator.mu
    factory = known[args.name]
    try:
        if not options and callable(getattr(factory, "example", None)):
            oracle, batch = factory.example()
        else:
            oracle = factory(**options)
            batch = oracle.example_batch()
    except Exception as exc:  # third-party code: one line, naming what was tried
        print(f"[FAIL] construct {args.name}{f' with oracle.options={options}' if options else ''}: "
              f"{type(exc).__name__}: {exc}")
        return EXIT_FAULT
    report = check_oracle(oracle, batch, fd_mu=mu)
    print(report)
    return 0 if report.ok else EXIT_FAULT


@_one_line_errors
def cmd_check_simulator(args) -> int:
    """The conformance check of a registered simulator. The engine knows simulators by name only:
    the check is the one registered for the kind (CHECKS["simulator"], next to the protocol)."""
    from .registry import CHECKS, SIMULATORS, UnknownNameError

    if args.name not in SIMULATORS:
        return _unknown_name(args.name, UnknownNameError(
            f"unknown simulator {args.name!r}; known: {', '.join(SIMULATORS.available()) or '(none)'}"))
    given = parse_overrides(args.set)
    bad = sorted(k for k in given if k != "options") or (
        [] if isinstance(given.get("options", {}), dict) else ["options"])
    if bad:
        return _err(f"check-simulator --set takes options.KEY=VALUE (the simulator's options), got {', '.join(bad)}")
    try:
        check = CHECKS.get("simulator")
    except UnknownNameError as exc:
        return _unknown_name("simulator", exc)
    report = check(args.name, given.get("options", {}))
    print(report)
    return 0 if report.ok else EXIT_FAULT


@_one_line_errors
def cmd_experiment(args) -> int:
    from .oracle import UnknownNameError
    from .problem import get_experiment

    try:
        fn = get_experiment(args.name)
    except UnknownNameError as exc:
        return _unknown_name(args.name, exc)
    return int(fn(list(args.args)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Zeroth-order training through loss-value-only oracles (DeepZero and friends).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list oracles, problems, experiments, estimators and simulators (built-in and plug-ins)")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("train", help="train a problem by queries", description=(
        "Train PROBLEM. Settings: the problem's defaults <- --config FILE (TOML/JSON) <- --set key.path=value. "
        "Writes runs/<problem>/<timestamp>/ (config.json, metrics.jsonl, checkpoint.pt, summary.json, training.png). "
        "Ctrl-C (or SIGTERM) finishes the step in flight, saves a checkpoint and prints the command that resumes."))
    p.add_argument("problem")
    p.add_argument("--config", help="TOML or JSON file with settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optimizer.lr=0.05 --set estimator=rge")
    p.add_argument("--resume", metavar="RUN_DIR", help=(
        "continue the run in RUN_DIR from its checkpoint; --config/--set may change only run.epochs, run.max_steps, "
        "run.query_budget and the other settings listed in docs/reliability.md"))
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate the checkpoint of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("check-oracle", help="run the conformance checks on a registered oracle")
    p.add_argument("name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="oracle.options.KEY=VALUE (the factory's keyword arguments) or estimator.mu=VALUE "
                        "(the finite-difference step the loss must respond to; default 0.005)")
    p.set_defaults(fn=cmd_check_oracle)

    p = sub.add_parser("check-simulator", help="run the conformance checks on a registered simulator")
    p.add_argument("name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="options.KEY=VALUE: the simulator's options (keyword arguments of its factory)")
    p.set_defaults(fn=cmd_check_simulator)

    p = sub.add_parser("experiment", help="run a named experiment (arguments after NAME go to it; try NAME --help)")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()  # experiments and eval allocate like training does
    from .interrupts import raise_on_signals

    # SIGTERM raises like Ctrl-C does, so every command ends a signal in one line (see _one_line_errors)
    with _one_line_warnings(), raise_on_signals():
        return args.fn(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
