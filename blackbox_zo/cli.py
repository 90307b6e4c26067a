"""The `blackbox-zo` command: list, train, eval, check-oracle, experiment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .config import ConfigError, resolve_config
from .runtime import tune_allocator

EXIT_USAGE = 2


def _err(msg: str) -> int:
    print(f"blackbox-zo: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _format_final(summary: dict) -> str:
    from .trainer import _human

    q = summary.get("queries", {})
    metric_keys = [k for k, v in summary.items() if isinstance(v, float) and k not in ("wall_s", "oracle_queries_per_s")]
    metrics = " ".join(f"{k}={summary[k]:.4f}" for k in metric_keys)
    label = "" if summary.get("zeroth_order", True) else " [FIRST-ORDER REFERENCE, not ZO]"
    phases = ", ".join(f"{k} {_human(v)}" for k, v in q.items() if k != "total" and v)
    return (f"{summary['problem']}{label}: {metrics} | queries {_human(q.get('total', 0))}"
            f"{f' ({phases})' if phases else ''} | wall {summary['wall_s']:.1f}s | {summary.get('run_dir')}")


def cmd_list(args) -> int:
    from .oracle import PLUGIN_ERRORS, available_oracles
    from .problem import available_experiments, available_problems

    sections = (("oracles (each can be trained directly: blackbox-zo train NAME)", available_oracles()),
                ("problems", available_problems()),
                ("experiments", available_experiments()))
    for title, items in sections:
        print(f"{title}:")
        for name, obj in items.items():
            doc = getattr(obj, "description", "") or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            print(f"  {name:<22} {doc}")
    if PLUGIN_ERRORS:
        print("failed to load:")
        for key, err in sorted(PLUGIN_ERRORS.items()):
            print(f"  {key:<22} {err}")
    return 0


_JOINED_GROUP: list[bool] = []  # non-empty when this command joined a process group; main() leaves it


def _maybe_init_distributed(config) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group before anything else."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from . import parallel

        if parallel.init_from_env(config):
            _JOINED_GROUP.append(True)


def _leave_distributed(code: int, unwinding: BaseException | None = None) -> int:
    """End the process group this command joined, before main() returns, on every exit path.

    Not left to interpreter exit: a gloo worker thread still alive during finalization can
    abort the process (see parallel.shutdown). A successful command meets its peers at a
    barrier first; a failing one (non-zero code, exception) leaves at once, since a peer may
    be gone and must not be waited for up to parallel.timeout_s.
    """
    if not _JOINED_GROUP:
        return code
    _JOINED_GROUP.clear()
    from . import parallel

    try:
        parallel.shutdown(barrier=code == 0, unwinding=unwinding)
    except parallel.ParallelError as exc:
        print(f"blackbox-zo: parallel teardown failed: {exc}", file=sys.stderr)
        return code or 1
    return code


def cmd_train(args) -> int:
    from .oracle import UnknownNameError
    from .problem import get_problem
    from .trainer import TrainingError, make_run_dir, train

    try:
        problem = get_problem(args.problem)
    except UnknownNameError as exc:
        return _err(str(exc))
    try:
        if args.resume:
            cfg_file = Path(args.resume) / "config.json"
            if not cfg_file.is_file():
                return _err(f"--resume: no config.json in {args.resume}")
            config = resolve_config(problem.config_model, json.loads(cfg_file.read_text()), None, args.set)
        else:
            config = resolve_config(problem.config_model, problem.default_config(), args.config, args.set)
    except ConfigError as exc:
        return _err(str(exc))
    from .parallel import ParallelError

    try:
        _maybe_init_distributed(config)
    except ParallelError as exc:
        return _err(str(exc))
    from .trainer import _is_main_process

    run_dir = Path(args.resume) if args.resume else (make_run_dir(config.run.out_dir, problem.name) if _is_main_process() else None)
    from .problem import ProblemSetupError

    try:
        summary = train(problem, config, run_dir=None if args.resume else run_dir, resume=args.resume)
    except ProblemSetupError as exc:  # e.g. a dataset that is not on disk: one line, no run left behind
        if not args.resume and run_dir is not None and {p.name for p in run_dir.iterdir()} <= {"config.json"}:
            (run_dir / "config.json").unlink(missing_ok=True)
            run_dir.rmdir()
        return _err(str(exc))
    except TrainingError as exc:
        print(f"blackbox-zo: training stopped: {exc}", file=sys.stderr)
        return 1
    except ParallelError as exc:  # a rank died, hung past parallel.timeout_s, or diverged
        print(f"blackbox-zo: parallel run failed: {exc}", file=sys.stderr)
        return 1
    if _is_main_process():
        print(_format_final(summary))
    return 0


def cmd_eval(args) -> int:
    import torch

    from .problem import get_problem
    from .trainer import CHECKPOINT_NAME, Trainer

    run_dir = Path(args.run_dir)
    cfg_file, ckpt = run_dir / "config.json", run_dir / CHECKPOINT_NAME
    for f in (cfg_file, ckpt):
        if not f.is_file():
            return _err(f"not a run directory (missing {f.name}): {run_dir}")
    raw = json.loads(cfg_file.read_text())
    try:
        problem = get_problem(raw.get("problem", ""))
        config = resolve_config(problem.config_model, raw)
    except (ConfigError, KeyError) as exc:
        return _err(str(exc))
    from .problem import ProblemSetupError

    try:
        setup = problem.setup(config)
    except ProblemSetupError as exc:
        return _err(str(exc))
    trainer = Trainer(setup, config, None, problem_name=problem.name)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    trainer.module.load_state_dict(state["module"])
    metrics = trainer.evaluate()
    print(json.dumps({"run_dir": str(run_dir), "step": state["position"][2], **metrics}, indent=2))
    return 0


def cmd_check_oracle(args) -> int:
    from .oracle import UnknownNameError, available_oracles, check_oracle

    known = available_oracles()
    if args.name not in known:
        return _err(str(UnknownNameError(f"unknown oracle {args.name!r}; known: {', '.join(known) or '(none)'}")))
    factory = known[args.name]
    try:
        if callable(getattr(factory, "example", None)):
            oracle, batch = factory.example()
        else:
            oracle = factory()
            batch = oracle.example_batch()
    except Exception as exc:
        print(f"[FAIL] construct {args.name}: {type(exc).__name__}: {exc}")
        return 1
    report = check_oracle(oracle, batch)
    print(report)
    return 0 if report.ok else 1


def cmd_experiment(args) -> int:
    from .oracle import UnknownNameError
    from .problem import get_experiment

    try:
        fn = get_experiment(args.name)
    except UnknownNameError as exc:
        return _err(str(exc))
    return int(fn(list(args.args)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackbox-zo",
        description="Zeroth-order training through loss-value-only oracles (DeepZero and friends).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list oracles, problems and experiments (built-in and plug-ins)")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("train", help="train a problem by queries", description=(
        "Train PROBLEM. Settings: the problem's defaults <- --config FILE (TOML/JSON) <- --set key.path=value. "
        "Writes runs/<problem>/<timestamp>/ (config.json, metrics.jsonl, checkpoint.pt, summary.json, training.png)."))
    p.add_argument("problem")
    p.add_argument("--config", help="TOML or JSON file with settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optimizer.lr=0.05 --set estimator=rge")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate the checkpoint of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("check-oracle", help="run the conformance checks on a registered oracle")
    p.add_argument("name")
    p.set_defaults(fn=cmd_check_oracle)

    p = sub.add_parser("experiment", help="run a named experiment (arguments after NAME go to it; try NAME --help)")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()  # experiments and eval allocate like training does
    try:
        code = args.fn(args)
    except BaseException as exc:
        _leave_distributed(1, exc)
        raise
    return _leave_distributed(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
