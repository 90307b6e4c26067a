"""Ask/tell: a training run driven from outside, one step at a time, on a run directory.

For black boxes that cannot be called from Python (a lab instrument, a job queue, a person),
the engine hands each step's query plan out and takes the losses back:

    run = AskTellRun.create("external", config, "runs/my-instrument", x0=x0)   # or: blackbox-zo init-ask
    ask = run.ask()                      # ask.id, ask.points [P, d]: evaluate each row
    run.tell(ask.id, losses)             # [P] losses in the rows' order: the step is taken and checkpointed

or from the shell, across days, each command a fresh process:

    blackbox-zo init-ask external --set external.dim=10 --set estimator=es --out RUN_DIR
    blackbox-zo ask RUN_DIR --out points.npz       # points, ask_id, step, epoch, index, seed
    blackbox-zo tell RUN_DIR answer.npz            # arrays losses [P] and ask_id (or losses.npy --ask-id ID)

A step is exactly the trainer's step (blackbox_zo/trainer.py): the same plan from the same
seed, the same `combine` (or a search's `tell`), the same optimizer, scheduler, metrics line,
epoch-end evaluation and final summary, so a run driven by ask/tell ends bitwise where the
same run driven in-process ends (tested) — given the same loss values.

The run directory is an ordinary one (config.json, metrics.jsonl, checkpoint.pt with its
rotation, summary.json) plus `ask.json`, the pending ask (its id, step and a digest of its
points), written atomically. Every `tell` checkpoints the state after its step before it
clears the pending ask, so a process killed anywhere leaves a run that continues where it
was: a pending ask whose step the checkpoint has passed is stale and is never applied twice.
Bad input — a wrong count, a NaN, an answer to a stale ask, a file that is not an answer —
raises `AskTellError` (one line; the CLI exits 2) and changes nothing.

`PROBLEM` is `external` (a pure black box: theta of `external.dim` numbers, starting at
`x0`; the loss values come only from outside) or any registered problem or oracle, whose
data, model and evaluation then stay in-process while the training losses come from
outside: they must be the losses of the asked points on the batch at (`epoch`, `index`)
of the problem's batch source.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from . import rundir
from .config import ConfigError, Strict, TrainConfig, deep_merge, resolve_config
from .evolution import is_search
from .oracle import Oracle, OracleError, ParamSpace, QueryBudgetExceeded, QueryLedger, job_ledger
from .problem import Problem, TrainingSetup, get_problem
from .rng import seed_everything
from .runtime import resolve_device, tune_allocator
from .trainer import RunWarning, Trainer

__all__ = ["Ask", "AskTellError", "RunComplete", "AskTellRun", "ExternalProblem", "ExternalConfig", "ExternalSection", "ASK_NAME",
           "read_answer", "write_points"]

ASK_NAME = "ask.json"
_LOCK_NAME = ".asktell.lock"


class AskTellError(ConfigError):
    """Bad input to ask/tell (a wrong count, a NaN, a stale ask, a wrong file): one line, exit 2, nothing changed."""


class RunComplete(Exception):
    """The run has no step left to ask for (completed, or stopped by its query budget)."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


# ------------------------------------------------------------------- the external problem


class ExternalSection(Strict):
    """The `external` section: a black box known only by its number of parameters."""

    dim: int = Field(1, ge=1, le=100_000_000, description="number of parameters of the black box")
    steps_per_epoch: int = Field(10, ge=1, description="steps between metrics summaries (there is no data)")


class ExternalConfig(TrainConfig):
    external: ExternalSection = Field(default_factory=ExternalSection,
                                      description="the black box outside Python: its dimension, steps per epoch")


class _NoPythonOracle(Oracle):
    """theta in R^dim whose losses come only from outside (ask/tell)."""

    name = "external"

    def __init__(self, dim: int, evaluate: Callable[[Tensor], Tensor] | None = None):
        self.space = ParamSpace([("theta", (dim,))])
        self._evaluate = evaluate

    def losses(self, thetas: Tensor, batch: Any) -> Tensor:
        if self._evaluate is None:
            raise OracleError("the 'external' problem has no Python oracle: its losses come from "
                              "`blackbox-zo tell` (see docs/ask-tell.md)")
        return self._evaluate(thetas)


class _StepIndex:
    """The batch of an external step is its position: the evaluator may use it for common random numbers."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch

    def num_batches(self, epoch: int) -> int:
        return self.steps_per_epoch

    def batch(self, epoch: int, index: int) -> Any:
        return None


class ExternalProblem(Problem):
    """A black box known only by its dimension (`external.dim`); theta starts at 0 (or `x0` at init-ask).

    `evaluate` (tests, or to replay a run in-process): a function [P, d] -> [P] that makes the
    problem trainable with `train()` too.
    """

    name = "external"
    description = "a black box outside Python: driven by blackbox-zo ask / tell (external.dim parameters)"
    config_model = ExternalConfig
    headline_metric = "loss"

    def __init__(self, evaluate: Callable[[Tensor], Tensor] | None = None):
        self._evaluate = evaluate

    def default_config(self) -> dict[str, Any]:
        return {"problem": "external", "estimator": {"kind": "es", "q": 8, "mu": 0.05},
                "optimizer": {"name": "adam", "lr": 0.05}, "schedule": {"name": "constant"},
                "run": {"epochs": 10}}

    def setup(self, config: ExternalConfig) -> TrainingSetup:
        oracle = _NoPythonOracle(config.external.dim, self._evaluate)
        return TrainingSetup(oracle=oracle, train_batches=_StepIndex(config.external.steps_per_epoch))


# ----------------------------------------------------------------------------- files


@dataclass
class Ask:
    """One step's points: evaluate each row of `points` and tell the losses in the same order."""

    id: str
    points: Tensor  # [P, d]
    step: int  # 1-based, as in metrics.jsonl
    epoch: int
    index: int  # the batch within the epoch
    seed: int  # the step's seed (an evaluator's own randomness can use it: common random numbers)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"points": self.points.detach().cpu().numpy(), "ask_id": np.array(self.id), "step": np.array(self.step),
                "epoch": np.array(self.epoch), "index": np.array(self.index), "seed": np.array(self.seed)}


def write_points(ask: Ask, path: str | Path) -> Path:
    """points.npz (arrays points, ask_id, step, epoch, index, seed), written atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise AskTellError(f"--out must name a .npz file, got {path}")

    def write(fh):
        np.savez(fh, **ask.as_arrays())

    rundir.atomic_write_bytes(path, write)
    return path


def read_answer(path: str | Path, ask_id: str | None = None) -> tuple[np.ndarray, str | None]:
    """(losses, ask id) from LOSSES.npy (the id from --ask-id) or ANSWER.npz (arrays losses, ask_id).

    Never unpickles: `allow_pickle=False`. Raises AskTellError naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise AskTellError(f"losses file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise AskTellError(f"cannot read {path} as .npy/.npz: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = set(loaded.files)
            if "losses" not in keys:
                raise AskTellError(f"{path} has arrays {sorted(keys)}; an answer needs 'losses' (and 'ask_id')")
            losses = loaded["losses"]
            in_file = str(loaded["ask_id"]) if "ask_id" in keys else None
        if in_file is not None and ask_id is not None and in_file != ask_id:
            raise AskTellError(f"{path} answers ask {in_file}, but --ask-id says {ask_id}")
        ask_id = in_file or ask_id
    else:
        losses = loaded
    return losses, ask_id


def _digest(points: Tensor) -> str:
    return hashlib.blake2b(points.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One ask or tell at a time on a run directory (another process waits; POSIX file lock)."""
    try:
        fh = open(run_dir / _LOCK_NAME, "a")
    except OSError as exc:
        raise rundir.WriteError(f"cannot open {run_dir / _LOCK_NAME}: {exc.strerror or exc}") from exc
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------- runs


class AskTellRun:
    """A training run whose losses come from outside. `create` a new one or `open` one on disk, then
    alternate `ask()` and `tell(id, losses)`; every `tell` checkpoints. See the module docstring."""

    def __init__(self, run_dir: Path, problem: Problem, config: TrainConfig, trainer):
        self.run_dir, self.problem, self.config, self.trainer = Path(run_dir), problem, config, trainer
        self._pending: tuple[str, Any, Tensor | None, Any] | None = None  # (id, plan, coords, batch) in memory

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def _resolve_problem(problem: str | Problem) -> Problem:
        if isinstance(problem, Problem):
            return problem
        if problem == "external":
            return ExternalProblem()
        return get_problem(problem)

    @classmethod
    def _build(cls, problem: Problem, config: TrainConfig, run_dir: Path):
        tune_allocator()
        seed_everything(config.run.seed)  # as train() does before setup: the same model and data
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        ledger = QueryLedger(budget=config.run.query_budget, max_retries=config.run.oracle_retries,
                             retry_backoff_s=config.run.oracle_retry_backoff_s)
        with job_ledger(ledger):
            setup = problem.setup(config)
        trainer = Trainer(setup, config, run_dir, problem_name=problem.name)
        if trainer.estimator is None:
            raise ConfigError("estimator=autograd is the first-order reference: it has no query plan to ask for")
        if trainer.parallel is not None:
            raise ConfigError("ask/tell runs in one process (not under torchrun)")
        if config.phase2 is not None:
            raise ConfigError("phase2 is not supported by ask/tell: drive each phase as a run of its own")
        trainer.module.train()
        return trainer

    @classmethod
    def create(cls, problem: str | Problem, config: TrainConfig | dict[str, Any] | None = None,
               run_dir: str | Path | None = None, *, overrides: list[str] | None = None,
               x0: np.ndarray | Tensor | None = None) -> "AskTellRun":
        """A new run directory (default `run.out_dir/<problem>/<timestamp>`) with the checkpoint of step 0.

        `config`: a validated config, or a dict of settings over the problem's defaults; `overrides`:
        `--set` strings on top. `x0` replaces the initial parameters ([d]).
        """
        problem = cls._resolve_problem(problem)
        if not isinstance(config, TrainConfig):
            base = deep_merge(problem.default_config(), config or {})
            config = resolve_config(problem.config_model, base, None, overrides, name=problem.name)
        elif overrides:
            config = resolve_config(problem.config_model, config.model_dump(), None, overrides, name=problem.name)
        config = config.model_copy(deep=True)
        config.run.device = resolve_device(config.run.device, tuple(getattr(problem, "devices", ("cpu",))),
                                           f"problem {problem.name!r}")
        if not config.problem:
            config.problem = problem.name
        run_dir = Path(run_dir) if run_dir is not None else rundir.make_run_dir(config.run.out_dir, problem.name)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise AskTellError(f"{run_dir} exists and is not empty: give a new directory for the run")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise rundir.WriteError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from exc
        rundir.write_config(run_dir, config)
        try:
            trainer = cls._build(problem, config, run_dir)
            if x0 is not None:
                theta = torch.as_tensor(np.asarray(x0), dtype=trainer.space.flatten(trainer.params).dtype).reshape(-1)
                if theta.numel() != trainer.space.dim or not bool(torch.isfinite(theta).all()):
                    raise AskTellError(f"x0 must hold {trainer.space.dim} finite numbers (the problem's d), "
                                       f"got {theta.numel()}" + ("" if bool(torch.isfinite(theta).all()) else
                                                                  " with non-finite entries"))
                with torch.no_grad():
                    for p, v in zip(trainer.params, trainer.space.views(theta).values()):
                        p.copy_(v)
            trainer.save_checkpoint()
        except BaseException:
            for name in (rundir.CONFIG_NAME, rundir.CHECKPOINT_NAME, rundir.METRICS_NAME):
                (run_dir / name).unlink(missing_ok=True)
            rundir.discard_if_unused(run_dir)
            raise
        return cls(run_dir, problem, config, trainer)

    @classmethod
    def open(cls, run_dir: str | Path, problem: Problem | None = None) -> "AskTellRun":
        """The run in `run_dir`, at its newest checkpoint (`problem`: an instance to use instead of the
        registered one, e.g. an `ExternalProblem` with an evaluate function)."""
        run_dir = Path(run_dir)
        raw = rundir.read_run_config(run_dir)
        problem = cls._resolve_problem(problem or raw.get("problem", ""))
        rundir.check_same_problem(run_dir, raw, problem.name)
        config = resolve_config(problem.config_model, raw, name=problem.name)
        if not rundir.find_checkpoint(run_dir):
            raise AskTellError(f"{run_dir} has no checkpoint: it is not an ask/tell run (make one with "
                               "blackbox-zo init-ask)")
        trainer = cls._build(problem, config, run_dir)
        note = trainer.resume_from(run_dir)
        if note:
            warnings.warn(note, RunWarning, stacklevel=2)
        return cls(run_dir, problem, config, trainer)

    # -- state ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """No step left: every step taken, or stopped by the query budget (now or in an earlier process)."""
        t = self.trainer
        return t.done or t.stopped_reason != "completed" or self._summary().get("stopped") == "query budget"

    def _summary(self) -> dict[str, Any]:
        path = self.run_dir / rundir.SUMMARY_NAME
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            return {}

    def _pending_on_disk(self) -> dict[str, Any] | None:
        path = self.run_dir / ASK_NAME
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # a torn file from a killed process: as if no ask were pending

    def _complete(self) -> dict[str, Any]:
        """The end of fit(): the final evaluation (when not done yet), checkpoint, summary.json."""
        t = self.trainer
        if t.final_evaluation_due():
            t.evaluate()
        t.save_checkpoint()
        summary = t.finish()
        (self.run_dir / ASK_NAME).unlink(missing_ok=True)
        try:
            self.problem.report(self.run_dir, summary)
        except Exception as exc:  # noqa: BLE001 - a report must never lose a finished run
            warnings.warn(f"problem report failed: {exc}", RunWarning, stacklevel=2)
        return summary

    # -- ask -----------------------------------------------------------------------------

    def _plan(self):
        """The next step's plan, exactly as the trainer's step builds it: (plan, coords, batch)."""
        t = self.trainer
        batch = t.batches.batch(t.pos.epoch, t.pos.index)
        theta, coords, seed = t.step_inputs(batch)
        t.oracle.on_step(theta, batch)
        method = t.estimator
        chunk = method.chunk or max(1, t.oracle.chunk_size(theta))
        if is_search(method):
            plan = method.plan(theta, seed=seed, chunk=chunk)
        else:  # step_plan: an estimator may plan from the batch as the oracle sees it (subspace-cge)
            plan = method.step_plan(t.oracle, theta, batch, coords=coords, seed=seed, chunk=chunk)
        return plan, coords, batch, seed

    def ask(self) -> Ask:
        """The points of the next step (the same ask again until it is told). Raises RunComplete when
        there is no step left (the run completed, or its query budget cannot pay for the next step)."""
        with _locked(self.run_dir):
            started = time.perf_counter()
            t = self.trainer
            if self.done:
                summary = self._summary() or self._complete()
                raise RunComplete(f"{self.run_dir} is complete (stopped: {summary.get('stopped', 'completed')} "
                                  f"after step {summary.get('steps', t.pos.step)}); nothing to ask", summary)
            plan, coords, batch, seed = self._plan()
            try:
                t.oracle.ledger.ensure_available(plan.num_queries)
            except QueryBudgetExceeded as exc:
                t.record_stop("query budget", str(exc), t.pos.step)
                summary = self._complete()
                raise RunComplete(f"{self.run_dir} stopped: {exc}; nothing to ask", summary) from None
            points = plan.materialize()
            digest = _digest(points)
            step = t.pos.step + 1
            ask_id = f"{step:06d}-{digest[:8]}"
            pending = self._pending_on_disk()
            if pending is None or pending.get("id") != ask_id:
                rundir.atomic_write_text(self.run_dir / ASK_NAME, json.dumps(
                    {"id": ask_id, "step": step, "epoch": t.pos.epoch, "index": t.pos.index, "points": plan.num_queries,
                     "dim": int(points.shape[1]), "digest": digest, "asked_at": time.time(),
                     "engine_s": time.perf_counter() - started}) + "\n")
            self._pending = (ask_id, plan, coords, batch)
            return Ask(ask_id, points, step, t.pos.epoch, t.pos.index, seed)

    # -- tell ----------------------------------------------------------------------------

    def _check_id(self, ask_id: str | None) -> dict[str, Any]:
        t = self.trainer
        if self.done:
            raise AskTellError(f"{self.run_dir} is complete (summary.json): nothing to tell")
        pending = self._pending_on_disk()
        if pending is None or int(pending.get("step", -1)) != t.pos.step + 1:
            stale = "" if pending is None else f" (the pending ask {pending.get('id')} is stale: step {pending.get('step')})"
            raise AskTellError(f"no ask is pending for step {t.pos.step + 1} of {self.run_dir}{stale}: run "
                               f"blackbox-zo ask {self.run_dir} --out points.npz first")
        if ask_id is None:
            raise AskTellError(f"which ask do these losses answer? give --ask-id {pending['id']} (from points.npz), "
                               "or write an .npz with arrays 'losses' and 'ask_id'")
        if ask_id != pending["id"]:
            try:
                step = int(str(ask_id).split("-", 1)[0])
            except ValueError:
                step = None
            if step is not None and step <= t.pos.step:
                raise AskTellError(f"ask {ask_id} is stale: step {step} was already told; the run is at step "
                                   f"{t.pos.step + 1}, whose pending ask is {pending['id']}")
            raise AskTellError(f"ask {ask_id} is not the pending ask of {self.run_dir} ({pending['id']})")
        return pending

    def tell(self, ask_id: str | None, losses: np.ndarray | Tensor | list[float]) -> dict[str, Any]:
        """Take the step of ask `ask_id` with these losses ([P], in the order of its points); checkpoint.
        Returns the step's metrics record (with the summary under "summary" when the run ends there)."""
        with _locked(self.run_dir):
            started = time.perf_counter()
            t = self.trainer
            pending = self._check_id(ask_id)
            values = self._check_losses(losses, pending)
            if self._pending is None or self._pending[0] != ask_id:  # a fresh process: rebuild the plan
                plan, coords, batch, _ = self._plan()
                if _digest(plan.materialize()) != pending["digest"]:
                    raise AskTellError(f"the points of ask {ask_id} no longer match the run's state (was "
                                       f"{self.run_dir} changed since the ask?); ask again")
            else:
                _, plan, coords, batch = self._pending
            self._pending = None
            theta_dtype = t.space.flatten(t.params).dtype
            split = plan.split(torch.as_tensor(values, dtype=theta_dtype))
            method = t.estimator
            kept = copy.deepcopy(method.state_dict()) if hasattr(method, "state_dict") else None
            try:
                result = method.tell(plan, split) if is_search(method) else method.combine(plan, split)
                t.check_result(result)
            except Exception as exc:  # noqa: BLE001 - e.g. a non-finite update from finite losses: nothing applied
                if kept is not None:
                    method.load_state_dict(kept)
                raise AskTellError(f"these losses give no usable update ({type(exc).__name__}: {exc}); "
                                   "nothing was applied") from None
            with t.oracle.ledger.phase("train"):
                t.oracle.ledger.charge(plan.num_queries)
            t.apply_result(result, coords)
            engine_s = float(pending.get("engine_s", 0.0)) + time.perf_counter() - started
            base = t.elapsed
            record = t.advance(True, result.base_loss, result.queries, lambda: base + engine_s)
            nb = t.batches.num_batches(t.pos.epoch)
            if t.pos.index >= nb:
                t.end_epoch()
            if t.done:
                record["summary"] = self._complete()
            else:
                t.save_checkpoint()
                (self.run_dir / ASK_NAME).unlink(missing_ok=True)
            return record

    def _check_losses(self, losses: Any, pending: dict[str, Any]) -> np.ndarray:
        try:
            values = np.asarray(losses.detach().cpu().numpy() if isinstance(losses, Tensor) else losses)
        except Exception as exc:  # noqa: BLE001
            raise AskTellError(f"losses must be an array of numbers: {exc}") from None
        if values.dtype.kind not in "fiu":
            raise AskTellError(f"losses must be numbers, got an array of dtype {values.dtype}")
        n = int(pending["points"])
        if values.ndim == 2 and 1 in values.shape:
            values = values.reshape(-1)
        if values.ndim != 1 or values.size != n:
            raise AskTellError(f"ask {pending['id']} has {n} points: it needs {n} loss values, one per row in order; "
                               f"got an array of shape {tuple(values.shape)}")
        values = values.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            rows = ", ".join(str(int(i)) for i in bad[:8]) + (", ..." if bad.size > 8 else "")
            raise AskTellError(f"{bad.size} loss value(s) are NaN or infinite (rows {rows}); every point needs a "
                               "finite loss (re-evaluate those points, or give a large finite penalty)")
        return values

