"""The commands behind `blackbox-zo` (blackbox_zo/cli.py parses the command line and calls them).

Every way a command can fail ends in one line on stderr and an exit code
(docs/reliability.md): 0 done (a run stopped by its query budget is done too), 1 a run
stopped on a fault of the oracle or of a rank (a checkpoint is kept: it says how to
resume), 2 usage, configuration or environment (a bad setting, a setting the problem does
not use, a refused resume, a damaged checkpoint, a directory that cannot be written, a
missing device or optional package), 128 + N for signal N (130 Ctrl-C, 143 SIGTERM).
`BLACKBOX_ZO_DEBUG=1` re-raises instead, with the full traceback.

A private module: it imports the engine (torch), which `blackbox-zo --help` should not pay for.
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
from typing import Any, Callable, Iterator

from . import asktell_cli, parallel, rundir
from .compare import compare_runs, headline_metrics, write_comparison
from .config import ConfigError, parse_overrides, resolve_config
from .config_text import config_toml, settings_help
from .estimators import available_estimators
from .interrupts import Interrupted, raise_on_signals
from .oracle import available_oracles, check_oracle
from .parallel import ParallelError
from .problem import (OracleTrainConfig, Problem, ProblemSetupError, available_experiments, available_problems,
                      get_experiment, get_problem)
from .progress import final_line, write
from .registry import CHECKS, SIMULATORS, UnknownNameError, plugin_errors
from .runtime import DeviceError, resolve_device, tune_allocator
from .trainer import RunWarning, Trainer, TrainingError, train

__all__ = ["PROG", "EXIT_FAULT", "EXIT_USAGE", "COMMANDS", "run_command", "cmd_list", "cmd_train", "cmd_config",
           "cmd_eval", "cmd_compare", "cmd_check_oracle", "cmd_check_simulator", "cmd_experiment"]

PROG = "blackbox-zo"
EXIT_FAULT = 1
EXIT_USAGE = 2


def _err(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _debug() -> bool:
    return os.environ.get("BLACKBOX_ZO_DEBUG", "").strip() not in ("", "0", "false", "no")


def _resume_command(problem: str, run_dir: Any) -> str:
    launcher = PROG
    if parallel.world_size() > 1:
        launcher = f"torchrun --nproc-per-node {parallel.world_size()} -m blackbox_zo"
    return f"{launcher} train {shlex.quote(problem)} --resume {shlex.quote(str(run_dir))}"


def _unknown_name(name: str, exc: Exception) -> int:
    """An unknown name, unless a plug-in of that name failed to import: then its import error."""
    for key, err in sorted(plugin_errors().items()):
        if key.split(":", 1)[-1] == name:
            return _err(f"plug-in {name!r} ({key.split(':', 1)[0]}) failed to import: {err}")
    return _err(str(exc))


def _one_line_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Every command ends a fault in one line and an exit code, called from main() or not."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except Interrupted as exc:
            print(f"{PROG}: {exc.describe()}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted by SIGINT", file=sys.stderr)
            return 130
        except (ConfigError, rundir.RunDirError, DeviceError, ProblemSetupError) as exc:
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
def _one_line_warnings() -> Iterator[None]:
    """Warnings as `blackbox-zo: warning: ...`, one line each, above a progress bar if one is drawn."""

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{PROG}: warning: {' '.join(str(message).split())}"
        try:
            write(text)
        except Exception:  # noqa: BLE001 - a warning must never stop a run
            print(text, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RunWarning)  # every run's warnings, even twice in one process
        warnings.showwarning = show
        yield


_JOINED_GROUP: list[bool] = []  # non-empty when this command joined a process group; run_command leaves it


def _leave_distributed(code: int, unwinding: BaseException | None = None) -> int:
    """End the process group this command joined, before the command returns, on every exit path.

    Not left to interpreter exit: a gloo worker thread still alive during finalization can
    abort the process (see parallel.shutdown). A successful command meets its peers at a
    barrier first; a failing one (non-zero code, exception) leaves at once, since a peer may
    be gone and must not be waited for up to parallel.timeout_s.
    """
    if not _JOINED_GROUP:
        return code
    _JOINED_GROUP.clear()
    try:
        parallel.shutdown(barrier=code == 0, unwinding=unwinding)
    except ParallelError as exc:
        print(f"{PROG}: parallel teardown failed: {exc}", file=sys.stderr)
        return code or 1
    return code


def _problem(name: str) -> Problem | int:
    try:
        return get_problem(name)
    except UnknownNameError as exc:
        return _unknown_name(name, exc)


def _resolve_device(problem: Problem, config: Any) -> None:
    config.run.device = resolve_device(config.run.device, tuple(getattr(problem, "devices", ("cpu",))),
                                       f"problem {problem.name!r}")


# ------------------------------------------------------------------------------ commands


@_one_line_errors
def cmd_list(args: argparse.Namespace) -> int:
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


def _train_help(args: argparse.Namespace) -> int:
    print(args.subparser.format_help(), end="")
    if args.problem is None:
        print(f"\n{PROG} train PROBLEM --help lists the settings of PROBLEM ({PROG} list: the problems).")
        return 0
    problem = _problem(args.problem)
    if isinstance(problem, int):
        return problem
    print()
    print(settings_help(problem))
    return 0


@_one_line_errors
def cmd_train(args: argparse.Namespace) -> int:
    if args.help:
        return _train_help(args)
    if args.problem is None:
        args.subparser.print_usage(sys.stderr)
        return _err("train: the following arguments are required: problem")
    problem = _problem(args.problem)
    if isinstance(problem, int):
        return problem
    if args.resume:
        # the run's own settings <- --config <- --set; train() refuses any change outside
        # rundir.RESUMABLE_SETTINGS before it writes anything
        raw = rundir.read_run_config(args.resume)
        rundir.check_same_problem(args.resume, raw, problem.name)
        config = problem.resolve_config(args.config, args.set, base=raw)
    else:
        config = problem.resolve_config(args.config, args.set)
    _resolve_device(problem, config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: join the process group before anything else
        try:
            if parallel.init_from_env(config):
                _JOINED_GROUP.append(True)
        except ParallelError as exc:
            return _err(str(exc))
    main = parallel.is_main_process()
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
        print(final_line(summary))
    return 0


@_one_line_errors
def cmd_config(args: argparse.Namespace) -> int:
    problem = _problem(args.problem)
    if isinstance(problem, int):
        return problem
    config = problem.resolve_config(args.config, args.set)
    print(config_toml(config, problem), end="")
    return 0


@_one_line_errors
def cmd_eval(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    raw = rundir.read_run_config(run_dir)
    problem = _problem(raw.get("problem", ""))
    if isinstance(problem, int):
        return problem
    config = problem.resolve_config(None, (), base=raw)
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
def cmd_compare(args: argparse.Namespace) -> int:
    problems = []
    for d in args.run_dirs:  # the registry is asked only for what the runs' config.json name
        raw = rundir.read_run_config(Path(d)) if (Path(d) / rundir.CONFIG_NAME).is_file() else {}
        problems.append(str(raw.get("problem", "")))
    comparison = compare_runs([Path(d) for d in args.run_dirs], metric=args.metric, target=args.target,
                              goal=args.goal, force=args.force, headline=headline_metrics(problems, get_problem))
    out = Path(args.out) if args.out else rundir.make_run_dir("runs", "compare")
    paths = write_comparison(comparison, out)
    print(paths["md"].read_text(), end="")
    print(f"\nwritten: {paths['md']}, {paths['csv'].name}, {paths['png'].name}")
    return 0


@_one_line_errors
def cmd_check_oracle(args: argparse.Namespace) -> int:
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
def cmd_check_simulator(args: argparse.Namespace) -> int:
    """The conformance check of a registered simulator. The engine knows simulators by name only:
    the check is the one registered for the kind (CHECKS["simulator"], next to the protocol in oracles/)."""
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
def cmd_experiment(args: argparse.Namespace) -> int:
    try:
        fn = get_experiment(args.name)
    except UnknownNameError as exc:
        return _unknown_name(args.name, exc)
    return int(fn(list(args.args)) or 0)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list,
    "train": cmd_train,
    "config": cmd_config,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "check-oracle": cmd_check_oracle,
    "check-simulator": cmd_check_simulator,
    "experiment": cmd_experiment,
    # ask / tell (blackbox_zo/asktell_cli.py): AskTellError is a ConfigError, so bad input is one line, exit 2
    "init-ask": _one_line_errors(asktell_cli.cmd_init_ask),
    "ask": _one_line_errors(asktell_cli.cmd_ask),
    "tell": _one_line_errors(asktell_cli.cmd_tell),
}


def run_command(name: str, args: argparse.Namespace, *, process: bool = False) -> int:
    """Run command `name`. `process=True` (the `blackbox-zo` process itself) first tunes the
    allocator and turns SIGTERM into an exception like Ctrl-C, so every command ends a signal in one
    line, and leaves the process group a command joined before returning (see _leave_distributed)."""
    command = COMMANDS.get(name) or _one_line_errors(args.plugin_command.run)  # a plug-in command (CLI_COMMANDS)
    if not process:
        return command(args)
    tune_allocator()  # experiments and eval allocate like training does
    with _one_line_warnings(), raise_on_signals():
        try:
            code = command(args)
        except BaseException as exc:
            _leave_distributed(1, exc)
            raise
        return _leave_distributed(code)
