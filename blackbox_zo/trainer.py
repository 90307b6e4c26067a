"""The ZO training loop: estimate -> p.grad -> any torch.optim optimizer and LR scheduler.

Per step: flatten theta, let the oracle see the unperturbed point once (`on_step`),
estimate the gradient from loss values only, write it into `p.grad`, step the optimizer
and the scheduler. Checkpoints hold everything a bitwise-identical resume needs.

Every way a run ends goes through one path (docs/reliability.md): the state is
checkpointed at a step boundary (for a failed step: the state before it, parameters
untouched), `summary.json` says why (`stopped`: completed, query budget, interrupted,
non-finite, oracle error, error) and at which step (numbered as in metrics.jsonl), and the
run can be resumed. The loop's helpers live in modules of their own: files of the run
directory in `blackbox_zo.rundir`, signals in `blackbox_zo.interrupts`, the optimizer and
schedule in `blackbox_zo.optim`, random-number state in `blackbox_zo.rng`, the records in
`blackbox_zo.metrics` (the `MetricsLogger` seam), the plot in `blackbox_zo.plots`, the
progress bar and counts in `blackbox_zo.progress`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import parallel, rundir
from .config import FIRST_ORDER_REFERENCE, ConfigError, TrainConfig, active_sparsity, resolve_config
from .estimators import Estimate, make_estimator
from .evolution import SearchStep, is_search
from .interrupts import GracefulStop, Interrupted, agreed_signal, signal_name
from .metrics import JsonlLogger, MetricsLogger
from .optim import build_optimizer, build_scheduler
from .oracle import NonFiniteLossError, OracleError, QueryBudgetExceeded, QueryLedger, job_ledger
from .plots import plot_metrics, read_metrics
from .registry import ESTIMATORS
from .problem import Problem, TrainingSetup
from .progress import human, progress_bar, write
from .rng import rng_state, seed_everything, set_rng_state, step_seed
from .runtime import resolve_device, tune_allocator
from .sparsity import freeze_unselected
from .trackers import TRACKERS, RunHistory, check_loggers, note_resume, open_trackers

__all__ = [
    "FlatParams",
    "TrainingError",
    "Trainer",
    "train",
    "check_resume_config",
    "RunWarning",
    "ZeroSignalWarning",
    "ZERO_SIGNAL_WINDOW",
    "ZERO_SIGNAL_FRACTION",
]

# The zero-signal guard: warn once when every finite difference of a step is exactly 0, or
# when at least this fraction of them is, on average over this many consecutive steps.
ZERO_SIGNAL_WINDOW = 5
ZERO_SIGNAL_FRACTION = 0.95


class RunWarning(RuntimeWarning):
    """Something a user of a run should know that does not stop it (the CLI prints one line)."""


class ZeroSignalWarning(RunWarning):
    """The finite differences of a step were (nearly) all exactly zero: mu is below the loss's resolution."""


class TrainingError(RuntimeError):
    """A run stopped on a fault: names the step (numbered as in metrics.jsonl) and the oracle.

    `reason` is what summary.json records ("non-finite", "oracle error"); `step` the step
    that failed; after `Trainer.fit`, `checkpoint_step` is the step the kept checkpoint
    holds (a failed step leaves the parameters untouched) and `run_dir` where it is.
    """

    def __init__(self, message: str, *, reason: str = "error", step: int | None = None):
        super().__init__(message)
        self.reason, self.step = reason, step
        self.checkpoint_step: int | None = None
        self.run_dir: Path | None = None
        self.summary: dict[str, Any] | None = None


class FlatParams(nn.Module):
    """Parameters for an oracle that owns no module: one nn.Parameter per ParamSpace block."""

    def __init__(self, space, theta: Tensor):
        super().__init__()
        self.space = space
        self.blocks = nn.ParameterDict(
            {b.name.replace(".", "__"): nn.Parameter(v.clone()) for b, v in zip(space, space.views(theta).values())}
        )

    def params_in_order(self) -> list[nn.Parameter]:
        return [self.blocks[b.name.replace(".", "__")] for b in self.space]


class _PhasedBatches:
    """Phase 1's batches for epochs before `from_epoch`, phase 2's (another batch size) from there on."""

    def __init__(self, first: Any, second: Any, from_epoch: int):
        self.first, self.second, self.from_epoch = first, second, from_epoch

    def num_batches(self, epoch: int) -> int:
        return (self.first if epoch < self.from_epoch else self.second).num_batches(epoch)

    def batch(self, epoch: int, index: int) -> Any:
        return (self.first if epoch < self.from_epoch else self.second).batch(epoch, index)


def _phase_one(config: TrainConfig) -> Any:
    """The `phase1` section when it applies (a two-phase run), else None."""
    return config.phase1 if config.phase2 is not None else None


def _phase_batches(batches: Any, config: TrainConfig) -> Any:
    """The run's batch source: the problem's, or with `phase1.batch_size` / `phase2.batch_size` each phase's
    (ConfigError, one line, when the problem's batches cannot change size, or when the two phases' sizes differ
    and phase 1 does not end at an epoch boundary)."""
    p1, p2 = _phase_one(config), config.phase2
    first_size = p1.batch_size if p1 is not None else None
    second_size = p2.batch_size if p2 is not None else None
    if first_size is None and second_size is None:
        return batches
    resize = getattr(batches, "with_batch_size", None)
    if resize is None:
        which = "phase1.batch_size" if first_size is not None else "phase2.batch_size"
        raise ConfigError(f"{which}: this problem's batches ({type(batches).__name__}) have no other size")
    first = resize(first_size) if first_size is not None else batches
    if (second_size or getattr(batches, "batch_size", None)) == getattr(first, "batch_size", None):
        return first  # both phases on batches of one size
    second = resize(second_size) if second_size is not None else batches
    per_epoch = first.num_batches(0)
    if p2.after_steps % per_epoch:
        whole = max(per_epoch, p2.after_steps // per_epoch * per_epoch)
        raise ConfigError(f"phase2.after_steps={p2.after_steps} must be a whole number of epochs ({per_epoch} steps "
                          f"each, e.g. {whole}) when the phases' batch sizes differ")
    return _PhasedBatches(first, second, p2.after_steps // per_epoch)


# ---------------------------------------------------------------------------- trainer


@dataclass
class _Position:
    epoch: int = 0
    index: int = 0  # next batch within the epoch
    step: int = 0  # optimizer steps taken


class Trainer:
    def __init__(
        self,
        setup: TrainingSetup,
        config: TrainConfig,
        run_dir: Path | None = None,
        problem_name: str = "problem",
        callbacks: Sequence[Callable[["Trainer", dict], None]] = (),
        loggers: Sequence[MetricsLogger] = (),
    ):
        self.setup, self.config, self.problem_name = setup, config, problem_name
        self.space = setup.oracle.space
        for est_cfg in (config.estimator, config.phase2.estimator if config.phase2 is not None else None):
            if getattr(est_cfg, "blocks", None):  # a name that selects no block: one line, before any file
                self._block_coords(est_cfg.blocks)
        self.batches = _phase_batches(setup.train_batches, config)  # phase2.batch_size: its own batches from its epoch
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        # metrics.jsonl of the run directory, then any other sink (TensorBoard, MLflow, ...); main rank only
        self.metrics_log = JsonlLogger(self.run_dir / rundir.METRICS_NAME) if self.run_dir is not None else None
        self.loggers: list[MetricsLogger] = [*([self.metrics_log] if self.metrics_log else []), *loggers]
        self.oracle = setup.oracle
        self.space = self.oracle.space
        for est_cfg in (config.estimator, config.phase2.estimator if config.phase2 is not None else None):
            # an estimator that needs more of the oracle than loss values (subspace-cge: a layer's inputs) says
            # so here, in one line, before any file or query
            check = getattr(ESTIMATORS.get(est_cfg.kind), "check_support", None) if (
                est_cfg is not None and est_cfg.kind in ESTIMATORS) else None
            if check is not None:
                check(est_cfg, self.oracle)
        if setup.module is not None:
            self.module = setup.module
            self.params = self.space.params_of(self.module)
        else:
            self.module = FlatParams(self.space, self.oracle.initial_theta())
            self.params = self.module.params_in_order()
        self.is_main = parallel.is_main_process()
        # estimator.kind resolves through the estimator registry; None: the first-order reference path
        self.estimator = None if config.estimator.kind == FIRST_ORDER_REFERENCE else make_estimator(config.estimator)
        if self.estimator is None and setup.fo_loss is None:
            raise TrainingError(f"estimator 'autograd' needs a differentiable fo_loss; problem {problem_name!r} has none")
        # Forward parallelism (DeepZero eq. 5): under torchrun the executor evaluates every rank's share of
        # each query plan and all-reduces the losses, so every rank computes the same estimate and step.
        self.parallel: parallel.PlanSharder | None = None
        if parallel.is_active():
            pcfg = config.parallel
            self.parallel = parallel.PlanSharder(
                balance_steps=pcfg.balance_steps, check_every_steps=pcfg.check_every_steps,
                log=write if config.run.progress else None)
            parallel.sum_ledger_over_ranks(self.oracle.ledger)  # setup-time queries (e.g. pruning) ran on every rank
        self.estimator_config = config.estimator  # the current phase's estimator settings
        p1 = _phase_one(config)  # a two-phase run's first phase may have its own optimizer and schedule
        self.optimizer = build_optimizer(p1.optimizer if p1 is not None and p1.optimizer is not None else
                                         config.optimizer, self.params)
        self.steps_per_epoch = self.batches.num_batches(0)
        total = sum(self.batches.num_batches(e) for e in range(config.run.epochs))
        self.total_steps = min(total, config.run.max_steps) if config.run.max_steps else total
        # phase2: phase 1's schedule spans its own steps, phase 2's the rest of the run (enter_phase)
        self.schedule_steps = total  # what a schedule spans: run.epochs, not run.max_steps (a resume may change it)
        self.phase = 1
        self.phase2_at = config.phase2.after_steps if config.phase2 is not None else None
        self.scheduler = build_scheduler(p1.schedule if p1 is not None and p1.schedule is not None else
                                         config.schedule, self.optimizer, total if self.phase2_at is None else
                                         self.phase2_at, self.steps_per_epoch)
        self.pos = _Position()
        self.elapsed = 0.0  # wall seconds of training so far, across resumes
        self.metrics_lines = 0
        self.last_eval: dict[str, float] = {}
        self.eval_step: int | None = None  # the step last_eval (or eval_missing) belongs to
        self.eval_missing: str | None = None  # why the last evaluation's metrics are missing (nan_policy=skip)
        self.skipped_steps = 0
        self.stopped_reason = "completed"
        self.stop_detail: str | None = None
        self.stop_step: int | None = None
        self.stop_signal: int | None = None
        self.checkpoint_step: int | None = None  # the step the newest checkpoint holds
        self.warnings: list[str] = []
        self.summary_error: str | None = None  # why summary.json could not be written on a fault path
        self._zero_fractions: deque[float] = deque(maxlen=ZERO_SIGNAL_WINDOW)
        self._zero_warned = False
        self._torch_rng_at_step_start: Tensor | None = None
        ledger = self.oracle.ledger
        if ledger.budget is None and config.run.query_budget is not None:
            ledger.budget = config.run.query_budget
        ledger.max_retries, ledger.retry_backoff_s = config.run.oracle_retries, config.run.oracle_retry_backoff_s

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        state = {
            "format": 1,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng if rng is not None else rng_state(),
            "ledger": self.oracle.ledger.state_dict(),
            "position": [self.pos.epoch, self.pos.index, self.pos.step],
            "elapsed": self.elapsed,
            "metrics_lines": self.metrics_lines,
            "last_eval": dict(self.last_eval),
            "eval_step": self.eval_step,
            "skipped_steps": self.skipped_steps,
            "phase": self.phase,
        }
        if self.setup.coord_sampler is not None and hasattr(self.setup.coord_sampler, "state_dict"):
            state["coord_sampler"] = self.setup.coord_sampler.state_dict()
        if hasattr(self.estimator, "state_dict"):  # e.g. the warm start of linear interpolation
            state["estimator"] = self.estimator.state_dict()
        if callable(getattr(self.oracle, "state_dict", None)):  # an oracle's own counters (e.g. diverged rollouts)
            state["oracle"] = self.oracle.state_dict()
        return state

    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> None:
        """checkpoint.pt, atomically; the one it replaces is kept as checkpoint.prev.pt."""
        if self.run_dir is not None and self.is_main:
            rundir.save_checkpoint(self.run_dir, self.state_dict(rng=rng))
            self._checkpointed()
        self.checkpoint_step = self.pos.step

    def _checkpointed(self) -> None:
        """Tell the loggers that want to know (`checkpointed(records)`: a tracker that cannot take a point
        back, blackbox_zo.trackers) how many records the checkpoint just written holds."""
        for logger in self.loggers:
            notify = getattr(logger, "checkpointed", None)
            if notify is None:
                continue
            try:
                notify(self.metrics_lines)
            except Exception as exc:  # noqa: BLE001 - a logger must never stop a run
                warnings.warn(f"the metrics logger {logger!r} failed at a checkpoint: {exc}", RunWarning, stacklevel=2)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from the checkpoint file `path` (see `resume_from` for a run directory)."""
        self.load_state(rundir.read_checkpoint(Path(path)))

    def resume_from(self, run_dir: Path) -> str | None:
        """Continue from the newest usable checkpoint of `run_dir`; returns a note when it had
        to fall back to the previous one (the damaged file is kept as checkpoint.damaged.pt)."""
        run_dir = Path(run_dir)
        loaded = rundir.load_checkpoint(run_dir)
        self.load_state(loaded.state)
        if self.is_main:
            rundir.remove_stale_temporaries(run_dir)
            if loaded.damaged is not None and loaded.damaged.exists():
                try:
                    os.replace(loaded.damaged, run_dir / rundir.DAMAGED_CHECKPOINT_NAME)
                except OSError as exc:
                    raise rundir.WriteError(f"cannot move the damaged {loaded.damaged} aside: {exc}") from exc
        return loaded.note

    def start_over(self) -> None:
        """A run directory with no checkpoint yet (stopped during setup or its first epoch): from step 0."""
        self.metrics_lines = 0
        if self.run_dir is not None and self.is_main:
            rundir.remove_stale_temporaries(self.run_dir)
            self.metrics_log.truncate(0)

    def enter_phase(self, phase: int) -> None:
        """Phase 2 (config `phase2`): its estimator, a fresh optimizer and its schedule over the rest of run.epochs.

        Called at the first step boundary at or after `phase2.after_steps`, and by `load_state` for a
        checkpoint taken in phase 2 (before the optimizer's and estimator's states are loaded)."""
        if phase == self.phase:
            return
        p2 = self.config.phase2
        if phase != 2 or self.phase != 1 or p2 is None:
            raise ValueError(f"cannot go from phase {self.phase} to phase {phase} (phase2 is "
                             f"{'set' if p2 is not None else 'not set'})")
        self.phase, self.estimator_config = 2, p2.estimator
        self.estimator = make_estimator(p2.estimator)
        for p in self.params:
            p.grad = None
        self.optimizer = build_optimizer(p2.optimizer, self.params)
        self.scheduler = build_scheduler(p2.schedule, self.optimizer, max(1, self.schedule_steps - self.phase2_at),
                                         self.batches.num_batches(self.config.run.epochs - 1))

    def _enter_due_phase(self) -> None:
        if self.phase2_at is not None and self.phase == 1 and self.pos.step >= self.phase2_at:
            self.enter_phase(2)

    def load_state(self, state: dict[str, Any]) -> None:
        if int(state.get("phase", 1)) != self.phase:  # the phase's own optimizer, schedule and estimator first
            self.enter_phase(int(state.get("phase", 1)))
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.oracle.ledger.load_state_dict(state["ledger"])
        self.pos = _Position(*state["position"])
        self.elapsed = float(state["elapsed"])
        self.metrics_lines = int(state["metrics_lines"])
        self.last_eval = dict(state["last_eval"])
        self.eval_step = state.get("eval_step")  # absent in older checkpoints: the end evaluates again
        self.skipped_steps = int(state["skipped_steps"])
        self.checkpoint_step = self.pos.step
        if "coord_sampler" in state and self.setup.coord_sampler is not None:
            self.setup.coord_sampler.load_state_dict(state["coord_sampler"])
        if "estimator" in state and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(state["estimator"])
        if "oracle" in state and callable(getattr(self.oracle, "load_state_dict", None)):
            self.oracle.load_state_dict(state["oracle"])
        # the budget, the retry policy and the other resumable settings come from this run's config
        ledger, run = self.oracle.ledger, self.config.run
        ledger.budget, ledger.max_retries, ledger.retry_backoff_s = run.query_budget, run.oracle_retries, \
            run.oracle_retry_backoff_s
        if self.metrics_log is not None and self.is_main:  # drop metrics written after the checkpoint
            self.metrics_log.truncate(self.metrics_lines)

    # -- logging ---------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(self, record)
        if not self.is_main:
            return
        for logger in self.loggers:
            logger.log(record)
        self.metrics_lines += 1  # records so far: a resume keeps this many lines of metrics.jsonl

    def _warn(self, message: str, category: type[Warning] = RunWarning) -> None:
        """Once per run, on the main rank; recorded in summary.json's `warnings`."""
        self.warnings.append(message)
        if self.is_main:
            warnings.warn(message, category, stacklevel=3)

    def evaluate(self) -> dict[str, float]:
        """The problem's metrics at the current parameters (main rank; shared under torchrun).

        nan_policy applies: a non-finite loss or metric stops the run (stop) or leaves the
        metric out of this evaluation and of summary.json (skip; `eval_missing` says why).
        An evaluation the query budget cannot pay for is left out the same way.
        """
        if self.setup.evaluate is None:
            return {}
        out: dict[str, float] = {}
        error: tuple[str, str] | None = None
        missing: str | None = None
        skip = self.config.run.nan_policy == "skip"
        if self.is_main:  # under torchrun only the main rank evaluates; the others receive its results
            was_training = self.module.training
            self.module.eval()
            try:
                with torch.no_grad(), self.oracle.ledger.phase("eval"):
                    out = {k: float(v) for k, v in self.setup.evaluate(self.module).items()}
            except QueryBudgetExceeded as exc:
                missing = f"evaluation not run: {exc}"
            except NonFiniteLossError as exc:
                if skip:
                    missing = f"evaluation skipped (run.nan_policy=skip): {exc}"
                else:
                    error = ("non-finite", str(exc))
            except OracleError as exc:
                error = ("oracle error", str(exc))
            finally:
                self.module.train(was_training)
            bad = sorted(k for k, v in out.items() if not math.isfinite(v))
            if bad and error is None:
                if skip:
                    out = {k: v for k, v in out.items() if k not in bad}
                    missing = f"non-finite {', '.join(bad)} left out (run.nan_policy=skip)"
                else:
                    error = ("non-finite", f"evaluation gave non-finite {', '.join(bad)}")
        if self.parallel is not None:
            box = {**out, "__error__": list(error) if error else None, "__missing__": missing}
            box = parallel.share_from_main(box, self.oracle.ledger)
            shared_error, missing = box.pop("__error__", None), box.pop("__missing__", None)
            error = tuple(shared_error) if shared_error else None
            out = box
        if error is not None:
            raise TrainingError(f"evaluation after step {self.pos.step} (oracle {self.oracle.name!r}): {error[1]}; "
                                "set run.nan_policy=skip to record such metrics as missing and go on"
                                if error[0] == "non-finite" else
                                f"evaluation after step {self.pos.step} (oracle {self.oracle.name!r}): {error[1]}",
                                reason=error[0], step=self.pos.step)
        if missing is not None:
            self._warn(f"step {self.pos.step}: {missing}")
        self.eval_missing = missing
        self.last_eval = out
        self.eval_step = self.pos.step
        return out

    # -- one step --------------------------------------------------------------------

    def step_inputs(self, batch: Any) -> tuple[Tensor, Tensor | None, int]:
        """(theta, the step's coordinates or None, the step's seed); checks agreement under torchrun."""
        theta = self.space.flatten(self.params)
        epoch, step = self.pos.epoch, self.pos.step  # `step` is 0-based here; messages say step + 1
        sampler = self.setup.coord_sampler
        # with two phases the sampler may serve one of them only: an estimator that takes no sparsity gets none
        takes = type(self.estimator_config).uses_sparsity
        blocks = getattr(self.estimator_config, "blocks", None)
        if blocks:  # the phase searches fixed parameter blocks (e.g. the last layer), not the sparsity set
            coords = self._block_coords(blocks)
        else:
            coords = sampler.coords(epoch) if sampler is not None and takes else None
        if self.parallel is not None and self.parallel.due_for_check(step):
            self.parallel.check_agreement(step, parameters_and_buffers=self.module.state_dict(), coordinates=coords,
                                          batch=batch)
        return theta, coords, step_seed(self.config.run.seed, step)

    def _block_coords(self, blocks: Sequence[str]) -> Tensor:
        """The flat coordinates of `estimator.blocks` (cached per phase: the list does not change within one)."""
        key = tuple(blocks)
        cached = getattr(self, "_blocks_cache", None)
        if cached is None or cached[0] != key:
            try:
                cached = (key, self.space.coords_of(key))
            except ValueError as exc:
                raise ConfigError(f"estimator.blocks: {exc}") from None
            self._blocks_cache = cached
        return cached[1]

    def _zo_step(self, batch: Any) -> Estimate | SearchStep | None:
        theta, coords, seed = self.step_inputs(batch)
        epoch, step = self.pos.epoch, self.pos.step
        try:
            self.oracle.on_step(theta, batch)
            if is_search(self.estimator):  # a distribution-adapting search proposes the next theta itself
                est = self.estimator.step(self.oracle, theta, batch, seed=seed, sharder=self.parallel)
            else:
                est = self.estimator.estimate(self.oracle, theta, batch, coords=coords, seed=seed,
                                              sharder=self.parallel)
            self.check_result(est)
        except QueryBudgetExceeded:
            raise
        except (OracleError, NonFiniteLossError) as exc:
            msg = f"step {step + 1} (epoch {epoch}) of oracle {self.oracle.name!r}: {exc}"
            non_finite = isinstance(exc, NonFiniteLossError)
            if non_finite and self.config.run.nan_policy == "skip":
                self._warn(f"skipping {msg}")
                self.skipped_steps += 1
                return None
            raise TrainingError(msg + " (parameters left unchanged)", reason="non-finite" if non_finite else
                                "oracle error", step=step + 1) from exc
        self.apply_result(est, coords)
        return est

    @staticmethod
    def check_result(est: Estimate | SearchStep) -> None:
        if isinstance(est, SearchStep):
            if not torch.isfinite(est.theta).all():
                raise NonFiniteLossError("the search proposed parameters with non-finite entries")
        elif not torch.isfinite(est.grad).all():
            raise NonFiniteLossError("gradient estimate has non-finite entries")

    def apply_result(self, est: Estimate | SearchStep, coords: Tensor | None) -> None:
        """An estimate goes into p.grad (the optimizer steps later); a search's proposal into the parameters."""
        if isinstance(est, SearchStep):
            with torch.no_grad():
                for p, v in zip(self.params, self.space.views(est.theta).values()):
                    p.copy_(v)
            return
        self._watch_signal(est, coords, self.pos.step + 1)
        self.space.write_grad(self.params, est.grad)

    def _watch_signal(self, est: Estimate, coords, step: int) -> None:
        """The zero-signal guard: warn once when (nearly) every finite difference is exactly 0."""
        if self._zero_warned:
            return
        # estimators leave the coordinates outside `coords` exactly 0, so the non-zeros are all inside it
        n = est.grad.numel() if coords is None else int(coords.numel())
        if n == 0:
            return
        zero = max(0.0, 1.0 - int(torch.count_nonzero(est.grad)) / n)
        self._zero_fractions.append(zero)
        window = self._zero_fractions
        mean = sum(window) / len(window)
        if zero < 1.0 and not (len(window) == window.maxlen and mean >= ZERO_SIGNAL_FRACTION):
            return
        self._zero_warned = True
        est_cfg = self.estimator_config
        what = (f"every finite difference of step {step} was exactly 0" if zero == 1.0 else
                f"{mean:.0%} of the finite differences of steps {step - len(window) + 1}-{step} were exactly 0")
        fix = (f"raise estimator.mu (now {est_cfg.mu:g}; e.g. --set estimator.mu={est_cfg.mu * 10:g})"
               + ("" if est_cfg.kind == "rge" else " or use estimator=rge (its directions move every parameter)"))
        self._warn(f"{what}: the loss does not change when a parameter moves by estimator.mu={est_cfg.mu:g}, "
                   f"so those coordinates get no gradient (mu is below the loss's resolution: a quantized or "
                   f"piecewise-constant loss?); {fix}", ZeroSignalWarning)

    def _optimizer_step(self) -> None:
        """optimizer.step(); with `sparsity.freeze_unselected` the coordinates outside this
        step's Sparse-CGE set (and their optimizer state) are left untouched."""
        if is_search(self.estimator):
            return  # the search has moved the parameters itself (apply_result)
        sampler, sparsity = self.setup.coord_sampler, active_sparsity(self.config)
        if self.estimator is None or sampler is None or sparsity is None or not sparsity.freeze_unselected:
            self.optimizer.step()
            return
        restore = freeze_unselected(self.optimizer, self.params, self.space, sampler.coords(self.pos.epoch))
        self.optimizer.step()
        restore()

    def _fo_step(self, batch: Any) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.setup.fo_loss(self.module, batch)
            loss.backward()
        return float(loss.detach())

    # -- the loop --------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the end (or the budget); returns the summary, also written to summary.json.

        Raises, after a checkpoint and summary.json are written: Interrupted (SIGINT/SIGTERM,
        stopped before the next step), TrainingError (a non-finite loss under
        nan_policy=stop, an oracle error). Under torchrun every rank takes the same path.
        """
        cfg = self.config.run
        tune_allocator()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        bar = progress_bar(self.total_steps, initial=self.pos.step, enabled=cfg.progress and self.is_main,
                           desc=self.problem_name)
        self.module.train()
        # a repeated signal stops a single process at once; under torchrun the launcher repeats
        # the user's signal itself, so only the first one counts there
        stop = GracefulStop(repeat_stops_at_once=self.parallel is None)
        try:
            with stop:
                if self.parallel is not None:  # every plan's all-reduce carries this rank's stop request
                    self.parallel.stop_source = lambda: stop.requested
                    self.parallel.take_agreed_stop()  # nothing carried over from before the loop
                try:
                    signum = self._loop(bar, stop)
                except QueryBudgetExceeded as exc:
                    self.record_stop("query budget", str(exc), self.pos.step)
                    signum = 0
                    write(f"stopping: {exc}")
                finally:
                    if self.parallel is not None:
                        self.parallel.stop_source = None
                if signum:
                    stop.repeat_stops_at_once = False  # stopping already: a repeat must not cut the writing short
                    self.record_stop("interrupted", f"stopped by {signal_name(signum)} after step {self.pos.step}",
                                  self.pos.step)
                    self.stop_signal = signum
                    self.save_checkpoint()
                    summary = self.finish(plots=False)  # quick: the plots come with the resumed run's end
                    self._barrier()  # the main rank has written before any rank exits
                    raise Interrupted(signum, step=self.pos.step, checkpoint_step=self.checkpoint_step,
                                      run_dir=self.run_dir, summary=summary)
                bar.close()
                if self.final_evaluation_due():
                    self.evaluate()
                self.save_checkpoint()
                return self.finish()
        except TrainingError as exc:  # a failed step or evaluation: the state before it is kept
            self.record_stop(exc.reason, str(exc), exc.step)
            rng = None
            if exc.step == self.pos.step + 1 and self._torch_rng_at_step_start is not None:
                rng = {**rng_state(), "torch": self._torch_rng_at_step_start}
            self.save_checkpoint(rng=rng)
            exc.summary = self._finish_quietly()
            exc.checkpoint_step, exc.run_dir = self.checkpoint_step, self.run_dir
            self._barrier()
            raise
        except Interrupted as exc:
            if exc.summary is None:  # a second signal cut the step in flight short: keep the last checkpoint
                exc.step, exc.checkpoint_step, exc.run_dir = self.pos.step, self.checkpoint_step, self.run_dir
                self.record_stop("interrupted", exc.describe(), self.pos.step)
                self.stop_signal = exc.signum
                exc.summary = self._finish_quietly()
            raise
        except parallel.ParallelError as exc:
            self.record_stop("parallel error", str(exc), self.pos.step + 1)
            self._finish_quietly()
            raise
        except rundir.RunDirError as exc:  # a file of the run cannot be written (disk full, ...)
            self.record_stop("write error", str(exc), self.pos.step)
            self._finish_quietly()
            raise
        except Exception as exc:  # a file that cannot be written, a bug: say so in summary.json if it can be
            self.record_stop("error", f"{type(exc).__name__}: {exc}", self.pos.step + 1)
            self._finish_quietly()
            raise
        finally:
            bar.close()
            self._close_loggers()

    def _close_loggers(self) -> None:
        if not self.is_main:
            return
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001 - a logger must not hide how the run ended
                warnings.warn(f"could not close the metrics logger {logger!r}: {exc}", RunWarning, stacklevel=2)

    def _loop(self, bar, stop: GracefulStop) -> int:
        """The steps and epoch ends; returns the signal number that stopped it (0: ran to the end)."""
        cfg = self.config.run
        session_start = time.perf_counter()
        session_queries = self.oracle.ledger.total
        start_elapsed = self.elapsed
        batches = self.batches
        while self.pos.epoch < cfg.epochs and self.pos.step < self.total_steps:
            nb = batches.num_batches(self.pos.epoch)
            while self.pos.index < nb and self.pos.step < self.total_steps:
                # one agreed decision per step: every rank stops before the same step
                signum = self._agreed_stop(stop)
                if signum:
                    return signum
                # torch's generator as the step found it (dropout in a model draws from it): a failed step's
                # checkpoint restarts the step from there (numpy's and Python's, 100x dearer to copy, are
                # left to the engine-free parts of a problem and saved as they are at the stop)
                self._enter_due_phase()
                self._torch_rng_at_step_start = torch.get_rng_state()
                batch = batches.batch(self.pos.epoch, self.pos.index)
                if self.estimator is None:
                    loss, queries = self._fo_step(batch), 0
                    ok = True
                else:
                    est = self._zo_step(batch)
                    ok = est is not None
                    loss, queries = (est.base_loss, est.queries) if ok else (float("nan"), 0)
                self.advance(ok, loss, queries, lambda: start_elapsed + time.perf_counter() - session_start)
                rate = (self.oracle.ledger.total - session_queries) / max(1e-9, time.perf_counter() - session_start)
                # eval metrics are prefixed so a metric named like a column ("loss") cannot collide
                bar.set_postfix({"loss": f"{loss:.4f}", "queries": human(self.oracle.ledger.total),
                                 "qps": human(rate), **{f"eval/{k}": f"{v:.4f}" for k, v in self.last_eval.items()}},
                                refresh=False)  # update() redraws, at most every mininterval
                bar.update(1)
            if self.pos.index >= nb:  # epoch finished
                self.end_epoch()
                if self.parallel is not None:  # an evaluation may have taken long: ask afresh
                    self.parallel.take_agreed_stop()
        return 0

    def _agreed_stop(self, stop: GracefulStop) -> int:
        """The stop decision every rank takes before a step. Under torchrun it rides on the last
        plan's all-reduce (`PlanSharder.take_agreed_stop`); an all-reduce of its own only when no
        plan was reduced since the last decision (a session's first step, after an epoch's end, a
        step without a plan)."""
        if self.parallel is None:
            return stop.requested
        carried = self.parallel.take_agreed_stop()
        return carried if carried is not None else agreed_signal(stop.requested)

    def advance(self, ok: bool, loss: float, queries: int, elapsed: Callable[[], float]) -> dict[str, Any]:
        """After a step's estimate: optimizer and scheduler step, position, the step's metrics line,
        the periodic checkpoint. `elapsed()` gives the run's training seconds so far."""
        if ok:
            self._optimizer_step()
        if not is_search(self.estimator):  # a search takes no optimizer step: its lr schedule would not apply
            self.scheduler.step()
        self.pos.index += 1
        self.pos.step += 1
        self.elapsed = elapsed()
        record = {"step": self.pos.step, "epoch": self.pos.epoch, "loss": loss,
                  "queries": self.oracle.ledger.total, "step_queries": queries,
                  "lr": self.optimizer.param_groups[0]["lr"], "wall_s": round(self.elapsed, 4),
                  **self._oracle_stats()}
        self._log(record)
        every = self.config.run.checkpoint_every_steps
        if every and self.pos.step % every == 0:
            self.save_checkpoint()
        return record

    def end_epoch(self) -> None:
        """The epoch's last step is done: evaluate when due, move to the next epoch, checkpoint."""
        cfg = self.config.run
        done_epoch = self.pos.epoch
        last = done_epoch + 1 >= cfg.epochs or self.pos.step >= self.total_steps
        if (done_epoch + 1) % cfg.eval_every_epochs == 0 or last:
            # evaluated before the epoch counter moves on: a failed evaluation leaves a checkpoint
            # that evaluates again on resume
            metrics = self.evaluate()
            if metrics or self.eval_missing:
                extra = {"eval_missing": self.eval_missing} if self.eval_missing else {}
                self._log({"step": self.pos.step, "epoch": done_epoch, "queries": self.oracle.ledger.total,
                           "wall_s": round(self.elapsed, 4), **{f"eval/{k}": v for k, v in metrics.items()},
                           **extra})
        self.pos.epoch += 1
        self.pos.index = 0
        if not cfg.checkpoint_every_steps:
            self.save_checkpoint()

    def final_evaluation_due(self) -> bool:
        """Whether the run's end must evaluate: summary.json's metrics belong to the last step, so a run that
        stops mid-epoch (run.max_steps, a fresh or a resumed run) evaluates rather than report an earlier
        epoch's metrics; a run stopped early (query budget) evaluates again."""
        return self.stopped_reason != "completed" or self.eval_step != self.pos.step

    @property
    def done(self) -> bool:
        """Every step of the run has been taken."""
        return self.pos.epoch >= self.config.run.epochs or self.pos.step >= self.total_steps

    def _oracle_stats(self) -> dict[str, Any]:
        """An oracle's own counters (`oracle.stats()`, e.g. diverged rollouts), as `oracle/<name>`."""
        stats = getattr(self.oracle, "stats", None)
        return {f"oracle/{k}": v for k, v in stats().items()} if callable(stats) else {}

    def record_stop(self, reason: str, detail: str | None, step: int | None) -> None:
        """Why, and at which step (numbered as in metrics.jsonl), the run stopped: what summary.json will say."""
        self.stopped_reason, self.stop_detail, self.stop_step = reason, detail, step

    def _barrier(self) -> None:
        """Under torchrun: wait until every rank (the main one writing its files) got here."""
        if self.parallel is not None:
            try:
                agreed_signal(0)
            except parallel.ParallelError:
                pass  # a rank is gone; nothing left to wait for

    def _finish_quietly(self) -> dict[str, Any] | None:
        """finish() on a fault path: a second failure (e.g. the disk is still full) must not hide the first."""
        try:
            return self.finish(plots=False)
        except Exception as exc:  # noqa: BLE001 - kept, never raised over the original error
            self.summary_error = f"{type(exc).__name__}: {exc}"
            return None

    def finish(self, plots: bool = True) -> dict[str, Any]:
        ledger = self.oracle.ledger
        summary = {
            "problem": self.problem_name,
            "estimator": self.config.estimator.kind if self.estimator is not None else "autograd (first-order reference, not ZO)",
            "zeroth_order": self.estimator is not None,
            **self.last_eval,
            "eval_step": self.eval_step,
            "queries": {**ledger.counts, "total": ledger.total},
            "queries_retried": ledger.retried,
            "wall_s": round(self.elapsed, 3),
            "oracle_queries_per_s": round(ledger.rate(), 1),
            "steps": self.pos.step,
            "epochs_completed": self.pos.epoch,
            "skipped_steps": self.skipped_steps,
            "stopped": self.stopped_reason,
            "stop_step": self.pos.step if self.stop_step is None else self.stop_step,
            "checkpoint_step": self.checkpoint_step,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }
        if self.phase2_at is not None:
            summary["phase2"] = {"estimator": self.config.phase2.estimator.kind, "from_step": self.phase2_at,
                                 "reached": self.phase == 2}
        if self.stop_detail:
            summary["stop_detail"] = self.stop_detail
        if self.stop_signal:
            summary["signal"] = signal_name(self.stop_signal)
        if self.eval_missing:
            summary["eval_missing"] = self.eval_missing
        if self.warnings:
            summary["warnings"] = list(self.warnings)
        if self.setup.summary is not None:
            try:
                summary.update(self.setup.summary())
            except Exception as exc:  # noqa: BLE001 - a problem's extra entries must never lose the summary
                summary["summary_error"] = f"{type(exc).__name__}: {exc}"
        if self._oracle_stats():
            summary["oracle_stats"] = {k[len("oracle/"):]: v for k, v in self._oracle_stats().items()}
        if not self.is_main:
            return summary
        if self.run_dir is not None:  # the run's own record first: a logger or a plot must never lose it
            rundir.write_summary(self.run_dir, summary)
        if self.run_dir is not None and plots:  # before the loggers' summary: a tracker keeps the plot
            try:
                plot_metrics(self.run_dir)
            except Exception as exc:  # a plot must never lose a finished run
                warnings.warn(f"could not write plots: {exc}", RunWarning, stacklevel=2)
        for logger in self.loggers:
            logger.log_summary(summary)
        return summary


def train(
    problem: Problem,
    config: TrainConfig,
    run_dir: Path | None = None,
    resume: Path | None = None,
    callbacks: Sequence[Callable[[Trainer, dict], None]] = (),
    loggers: Sequence[MetricsLogger] = (),
) -> dict[str, Any]:
    """Set up `problem` with `config` and train; `resume` continues the run in that directory.

    `callbacks` are called with (trainer, record) for every record, on every rank; `loggers`
    (`blackbox_zo.metrics.MetricsLogger`) receive the records and the summary on the main
    rank, besides the run directory's metrics.jsonl.

    In this order, so that a refusal leaves nothing behind: the device is resolved
    (`run.device`; DeviceError), a resume is checked against the run's config.json (only
    rundir.RESUMABLE_SETTINGS may differ; ResumeError), config.json of a new run is written,
    the problem is set up under the job's ledger (so `run.query_budget` covers its queries:
    a budget below what setup needs is a ConfigError before any query), the checkpoint is
    loaded (CheckpointError; a damaged newest one falls back to the previous), and only then
    does a resume record its changed settings in config.json. A setup that fails or is
    interrupted removes the new run directory it was given (if it holds nothing else).
    """
    tune_allocator()  # once per process; see blackbox_zo/runtime.py (BLACKBOX_ZO_MALLOC_TUNING=0 opts out)
    config = config.model_copy(deep=True)  # the resolved device and problem are recorded in it
    config.run.device = resolve_device(config.run.device, tuple(getattr(problem, "devices", ("cpu",))),
                                       f"problem {problem.name!r}")
    if not config.problem:
        config.problem = problem.name
    main = parallel.is_main_process()
    if resume is not None:
        run_dir = Path(resume)
        check_resume_config(run_dir, problem, config)
    wants_trackers = any(name in TRACKERS for name in config.run.loggers)
    if wants_trackers:  # a missing package is one line before anything is written or queried, on every rank
        try:
            if run_dir is None and main:
                raise ConfigError(f"run.loggers={config.run.loggers}: a tracker logs a run directory; "
                                  "give train() a run_dir (the CLI always does)")
            check_loggers(config.run.loggers, config.run.out_dir)
        except ConfigError:
            if run_dir is not None and resume is None and main:
                rundir.discard_if_unused(Path(run_dir))
            raise
    seed_everything(config.run.seed)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    fresh = run_dir is not None and main and resume is None
    if fresh:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise rundir.WriteError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from exc
        try:
            rundir.write_config(Path(run_dir), config)
        except rundir.WriteError:
            rundir.discard_if_unused(Path(run_dir))
            raise
    ledger = QueryLedger(budget=config.run.query_budget, max_retries=config.run.oracle_retries,
                         retry_backoff_s=config.run.oracle_retry_backoff_s)
    try:
        with job_ledger(ledger):
            setup = problem.setup(config)
    except QueryBudgetExceeded as exc:
        if fresh:
            rundir.discard_if_unused(Path(run_dir))
        phase = f"its {exc.phase!r} phase" if exc.phase else "it"
        needs = f"{exc.requested} queries" if exc.requested is not None else "more queries"
        raise ConfigError(f"run.query_budget={config.run.query_budget} is too small for this job's setup: "
                          f"{phase} needs {needs} before training starts ({exc.used or 0} used so far); "
                          f"set run.query_budget above {(exc.used or 0) + (exc.requested or 0)}") from None
    except BaseException as exc:
        if fresh:
            rundir.discard_if_unused(Path(run_dir))
        if isinstance(exc, KeyboardInterrupt):
            signum = getattr(exc, "signum", 2)
            raise Interrupted(signum, during="setup (nothing was kept)" if resume is None else
                              f"setup ({run_dir} is unchanged)") from None
        raise
    try:
        trainer = Trainer(setup, config, run_dir, problem_name=problem.name, callbacks=callbacks, loggers=loggers)
    except ConfigError:  # e.g. estimator.blocks names no parameter: nothing kept
        if fresh:
            rundir.discard_if_unused(Path(run_dir))
        raise
    if resume is not None:
        if rundir.find_checkpoint(run_dir):
            note = trainer.resume_from(run_dir)
        else:  # stopped (or killed) before its first checkpoint
            note = f"no checkpoint in {run_dir} yet: starting it from step 0"
            trainer.start_over()
        if note and main:
            warnings.warn(note, RunWarning, stacklevel=2)
        if main:  # the resume is on: record the settings it changed (RESUMABLE_SETTINGS only)
            rundir.write_config(run_dir, config)
            note_resume(run_dir, trainer.metrics_lines)  # for a tracker left out now and added back later
    trackers: list[Any] = []
    if wants_trackers and main and run_dir is not None:  # TensorBoard, MLflow: continued from what metrics.jsonl keeps
        history = RunHistory(run_dir=Path(run_dir), problem=problem.name, config=config.model_dump(mode="json"),
                             records=read_metrics(Path(run_dir)), elapsed=trainer.elapsed,
                             resumed=resume is not None, out_dir=Path(config.run.out_dir))
        trackers = open_trackers(history, config.run.loggers)
        trainer.loggers.extend(trackers)
    summary = trainer.fit()
    if run_dir is not None and main:
        try:
            problem.report(Path(run_dir), summary)
        except Exception as exc:
            warnings.warn(f"problem report failed: {exc}", RunWarning, stacklevel=2)
        for tracker in trackers:  # the report's plots too
            if hasattr(tracker, "log_artifacts"):
                tracker.log_artifacts(Path(run_dir))
    return summary


def check_resume_config(run_dir: Path, problem: Problem, config: TrainConfig) -> None:
    """Refuse (ResumeError, one line) to resume `run_dir` as another problem or with changed settings.

    The saved settings are read as the CLI reads them (`resolve_config`), so a config.json
    written before the sections were split (with settings the run did not use) compares
    by what the run used.
    """
    raw = rundir.read_run_config(run_dir)
    rundir.check_same_problem(run_dir, raw, problem.name)
    try:
        saved = resolve_config(problem.config_model, raw, name=problem.name)
    except ConfigError as exc:
        raise rundir.ResumeError(f"{run_dir}/config.json does not fit problem {problem.name!r} (is it a run of "
                                 f"another problem?): {exc}") from None
    if not saved.problem:
        saved.problem = problem.name
    rundir.check_resume(run_dir, saved.model_dump(), config.model_dump())
