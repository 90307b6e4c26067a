"""The ZO training loop: estimate -> p.grad -> any torch.optim optimizer and LR scheduler.

Per step: flatten theta, let the oracle see the unperturbed point once (`on_step`),
estimate the gradient from loss values only, write it into `p.grad`, step the optimizer
and the scheduler. Checkpoints hold everything a bitwise-identical resume needs.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .config import FIRST_ORDER_REFERENCE, OptimizerConfig, ScheduleConfig, TrainConfig
from . import parallel
from .estimators import Estimate, make_estimator
from .oracle import NonFiniteLossError, OracleError, QueryBudgetExceeded
from .problem import Problem, TrainingSetup
from .runtime import tune_allocator

__all__ = [
    "FlatParams",
    "TrainingError",
    "Trainer",
    "train",
    "build_optimizer",
    "build_scheduler",
    "make_run_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingError(RuntimeError):
    """A run stopped: names the step and the oracle; the parameters were not touched."""


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


# ----------------------------------------------------------------------------- builders


def build_optimizer(cfg: OptimizerConfig, params: Sequence[Tensor]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: ScheduleConfig, optimizer, total_steps: int, steps_per_epoch: int):
    """Per-step LambdaLR: linear warm-up from lr/10, then constant / cosine / step decay."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / max(1, warmup)
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_every_epochs)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------ files


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temp file in the same directory and rename: never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def make_run_dir(out_dir: str | Path, problem: str) -> Path:
    base = Path(out_dir) / problem
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        run_dir = base / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a fresh run directory under {base}")


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _step_seed(run_seed: int, step: int) -> int:
    return (run_seed * 1_000_003 + step * 7_919 + 12_345) % (2**62)


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
    ):
        self.setup, self.config, self.problem_name = setup, config, problem_name
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.oracle = setup.oracle
        self.space = self.oracle.space
        if setup.module is not None:
            self.module = setup.module
            self.params = self.space.params_of(self.module)
        else:
            self.module = FlatParams(self.space, self.oracle.initial_theta())
            self.params = self.module.params_in_order()
        self.is_main = _is_main_process()
        # estimator.kind resolves through the estimator registry; None: the first-order reference path
        self.estimator = None if config.estimator.kind == FIRST_ORDER_REFERENCE else make_estimator(config.estimator)
        if self.estimator is None and setup.fo_loss is None:
            raise TrainingError(f"estimator 'autograd' needs a differentiable fo_loss; problem {problem_name!r} has none")
        # Forward parallelism (DeepZero eq. 5): under torchrun the executor evaluates every rank's share of
        # each query plan and all-reduces the losses, so every rank computes the same estimate and step.
        self.parallel: parallel.PlanSharder | None = None
        if parallel.is_active():
            pcfg = config.parallel
            from tqdm.auto import tqdm

            self.parallel = parallel.PlanSharder(
                balance_steps=pcfg.balance_steps, check_every_steps=pcfg.check_every_steps,
                log=tqdm.write if config.run.progress else None)
            parallel.sum_ledger_over_ranks(self.oracle.ledger)  # setup-time queries (e.g. pruning) ran on every rank
        self.optimizer = build_optimizer(config.optimizer, self.params)
        self.steps_per_epoch = setup.train_batches.num_batches(0)
        total = config.run.epochs * self.steps_per_epoch
        self.total_steps = min(total, config.run.max_steps) if config.run.max_steps else total
        self.scheduler = build_scheduler(config.schedule, self.optimizer, total, self.steps_per_epoch)
        self.pos = _Position()
        self.elapsed = 0.0  # wall seconds of training so far, across resumes
        self.metrics_lines = 0
        self.last_eval: dict[str, float] = {}
        self.skipped_steps = 0
        self.stopped_reason = "completed"
        if self.oracle.ledger.budget is None and config.run.query_budget is not None:
            self.oracle.ledger.budget = config.run.query_budget

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "format": 1,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "ledger": self.oracle.ledger.state_dict(),
            "position": [self.pos.epoch, self.pos.index, self.pos.step],
            "elapsed": self.elapsed,
            "metrics_lines": self.metrics_lines,
            "last_eval": dict(self.last_eval),
            "skipped_steps": self.skipped_steps,
        }
        if self.setup.coord_sampler is not None and hasattr(self.setup.coord_sampler, "state_dict"):
            state["coord_sampler"] = self.setup.coord_sampler.state_dict()
        if hasattr(self.estimator, "state_dict"):  # e.g. the warm start of linear interpolation
            state["estimator"] = self.estimator.state_dict()
        return state

    def save_checkpoint(self) -> None:
        if self.run_dir is None or not self.is_main:
            return
        state = self.state_dict()
        atomic_write_bytes(self.run_dir / CHECKPOINT_NAME, lambda fh: torch.save(state, fh))

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.oracle.ledger.load_state_dict(state["ledger"])
        self.pos = _Position(*state["position"])
        self.elapsed = float(state["elapsed"])
        self.metrics_lines = int(state["metrics_lines"])
        self.last_eval = dict(state["last_eval"])
        self.skipped_steps = int(state["skipped_steps"])
        if "coord_sampler" in state and self.setup.coord_sampler is not None:
            self.setup.coord_sampler.load_state_dict(state["coord_sampler"])
        if "estimator" in state and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(state["estimator"])
        if self.run_dir is not None and self.is_main:  # drop metrics written after the checkpoint
            mfile = self.run_dir / "metrics.jsonl"
            if mfile.exists():
                lines = mfile.read_text().splitlines(keepends=True)[: self.metrics_lines]
                atomic_write_text(mfile, "".join(lines))

    # -- logging ---------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(self, record)
        if self.run_dir is None or not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.metrics_lines += 1

    def evaluate(self) -> dict[str, float]:
        if self.setup.evaluate is None:
            return {}
        out: dict[str, float] = {}
        if self.is_main:  # under torchrun only the main rank evaluates; the others receive its results
            was_training = self.module.training
            self.module.eval()
            try:
                with torch.no_grad(), self.oracle.ledger.phase("eval"):
                    out = {k: float(v) for k, v in self.setup.evaluate(self.module).items()}
            finally:
                self.module.train(was_training)
        if self.parallel is not None:
            out = parallel.share_from_main(out, self.oracle.ledger)
        self.last_eval = out
        return out

    # -- one step --------------------------------------------------------------------

    def _zo_step(self, batch: Any) -> Estimate | None:
        theta = self.space.flatten(self.params)
        epoch, step = self.pos.epoch, self.pos.step
        sampler = self.setup.coord_sampler
        coords = sampler.coords(epoch) if sampler is not None else None
        if self.parallel is not None and self.parallel.due_for_check(step):
            self.parallel.check_agreement(step, parameters_and_buffers=self.module.state_dict(), coordinates=coords,
                                          batch=batch)
        try:
            self.oracle.on_step(theta, batch)
            est = self.estimator.estimate(self.oracle, theta, batch, coords=coords,
                                          seed=_step_seed(self.config.run.seed, step), sharder=self.parallel)
            if not torch.isfinite(est.grad).all():
                raise NonFiniteLossError("gradient estimate has non-finite entries")
        except QueryBudgetExceeded:
            raise
        except (OracleError, NonFiniteLossError) as exc:
            msg = f"step {step} (epoch {epoch}) of oracle {self.oracle.name!r}: {exc}"
            if self.config.run.nan_policy == "skip":
                warnings.warn(f"skipping {msg}", RuntimeWarning, stacklevel=2)
                self.skipped_steps += 1
                return None
            raise TrainingError(msg + " (parameters left unchanged)") from exc
        self.space.write_grad(self.params, est.grad)
        return est

    def _optimizer_step(self) -> None:
        """optimizer.step(); with `sparsity.freeze_unselected` the coordinates outside this
        step's Sparse-CGE set (and their optimizer state) are left untouched."""
        sampler, sparsity = self.setup.coord_sampler, getattr(self.config, "sparsity", None)
        if self.estimator is None or sampler is None or not getattr(sparsity, "freeze_unselected", False):
            self.optimizer.step()
            return
        from .sparsity import freeze_unselected

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
        cfg = self.config.run
        tune_allocator()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.pos.step, disable=not (cfg.progress and self.is_main),
                   desc=self.problem_name, dynamic_ncols=True, leave=True,
                   # in a log file (CI, nohup) every redraw is a new line: redraw every 10 s there
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)
        session_start = time.perf_counter()
        session_queries = self.oracle.ledger.total
        start_elapsed = self.elapsed
        batches = self.setup.train_batches
        self.module.train()
        try:
            while self.pos.epoch < cfg.epochs and self.pos.step < self.total_steps:
                nb = batches.num_batches(self.pos.epoch)
                while self.pos.index < nb and self.pos.step < self.total_steps:
                    batch = batches.batch(self.pos.epoch, self.pos.index)
                    if self.estimator is None:
                        loss, queries = self._fo_step(batch), 0
                        ok = True
                    else:
                        est = self._zo_step(batch)
                        ok = est is not None
                        loss, queries = (est.base_loss, est.queries) if ok else (float("nan"), 0)
                    if ok:
                        self._optimizer_step()
                    self.scheduler.step()
                    self.pos.index += 1
                    self.pos.step += 1
                    self.elapsed = start_elapsed + time.perf_counter() - session_start
                    record = {"step": self.pos.step, "epoch": self.pos.epoch, "loss": loss,
                              "queries": self.oracle.ledger.total, "step_queries": queries,
                              "lr": self.optimizer.param_groups[0]["lr"], "wall_s": round(self.elapsed, 4)}
                    self._log(record)
                    rate = (self.oracle.ledger.total - session_queries) / max(1e-9, time.perf_counter() - session_start)
                    # eval metrics are prefixed so a metric named like a column ("loss") cannot collide
                    bar.set_postfix({"loss": f"{loss:.4f}", "queries": _human(self.oracle.ledger.total),
                                     "qps": _human(rate), **{f"eval/{k}": f"{v:.4f}" for k, v in self.last_eval.items()}},
                                    refresh=False)  # update() redraws, at most every mininterval
                    bar.update(1)
                    if cfg.checkpoint_every_steps and self.pos.step % cfg.checkpoint_every_steps == 0:
                        self.save_checkpoint()
                if self.pos.index >= nb:  # epoch finished
                    done_epoch = self.pos.epoch
                    self.pos.epoch += 1
                    self.pos.index = 0
                    last = self.pos.epoch >= cfg.epochs or self.pos.step >= self.total_steps
                    if (done_epoch + 1) % cfg.eval_every_epochs == 0 or last:
                        metrics = self.evaluate()
                        if metrics:
                            self._log({"step": self.pos.step, "epoch": done_epoch, "queries": self.oracle.ledger.total,
                                       "wall_s": round(self.elapsed, 4), **{f"eval/{k}": v for k, v in metrics.items()}})
                    if not cfg.checkpoint_every_steps:
                        self.save_checkpoint()
        except QueryBudgetExceeded as exc:
            self.stopped_reason = f"query budget: {exc}"
            bar.write(f"stopping: {exc}")
        finally:
            bar.close()
        if self.stopped_reason != "completed" or not self.last_eval:
            self.evaluate()
        self.save_checkpoint()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        ledger = self.oracle.ledger
        summary = {
            "problem": self.problem_name,
            "estimator": self.config.estimator.kind if self.estimator is not None else "autograd (first-order reference, not ZO)",
            "zeroth_order": self.estimator is not None,
            **self.last_eval,
            "queries": {**ledger.counts, "total": ledger.total},
            "wall_s": round(self.elapsed, 3),
            "oracle_queries_per_s": round(ledger.rate(), 1),
            "steps": self.pos.step,
            "epochs_completed": self.pos.epoch,
            "skipped_steps": self.skipped_steps,
            "stopped": self.stopped_reason,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }
        if self.run_dir is not None and self.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            try:
                plot_metrics(self.run_dir)
            except Exception as exc:  # a plot must never lose a finished run
                warnings.warn(f"could not write plots: {exc}", RuntimeWarning, stacklevel=2)
        return summary


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_metrics(run_dir: Path) -> Path | None:
    """training.png: loss and evaluation metrics against queries and against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r and r["loss"] == r["loss"]]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not steps:
        return None
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    fig, axes = plt.subplots(2 if keys else 1, 2, figsize=(10, 7 if keys else 3.5), squeeze=False)
    for col, xkey, xlabel in ((0, "queries", "loss queries"), (1, "wall_s", "wall time [s]")):
        ax = axes[0][col]
        ax.plot([r[xkey] for r in steps], [r["loss"] for r in steps], lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        if all(r["loss"] > 0 for r in steps):  # e.g. a negative return as loss: keep a linear axis
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if keys:
            ax = axes[1][col]
            for k in keys:
                ax.plot([r[xkey] for r in evals if k in r], [r[k] for r in evals if k in r], marker="o", ms=3, label=k[5:])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("evaluation")
            ax.legend()
            ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).parent.name}: {Path(run_dir).name}")
    fig.tight_layout()
    out = Path(run_dir) / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def train(
    problem: Problem,
    config: TrainConfig,
    run_dir: Path | None = None,
    resume: Path | None = None,
    callbacks: Sequence[Callable[[Trainer, dict], None]] = (),
) -> dict[str, Any]:
    """Set up `problem` with `config` and train; `resume` continues the run in that directory."""
    tune_allocator()  # once per process; see blackbox_zo/runtime.py (BLACKBOX_ZO_MALLOC_TUNING=0 opts out)
    torch.manual_seed(config.run.seed)
    np.random.seed(config.run.seed % 2**32)
    random.seed(config.run.seed)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    if resume is not None:
        run_dir = Path(resume)
    if run_dir is not None and _is_main_process():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(run_dir) / "config.json", config.model_dump_json(indent=2) + "\n")
    setup = problem.setup(config)
    trainer = Trainer(setup, config, run_dir, problem_name=problem.name, callbacks=callbacks)
    if resume is not None:
        ckpt = Path(resume) / CHECKPOINT_NAME
        if not ckpt.exists():
            raise TrainingError(f"no checkpoint to resume from: {ckpt}")
        trainer.load_checkpoint(ckpt)
    summary = trainer.fit()
    if run_dir is not None and _is_main_process():
        try:
            problem.report(Path(run_dir), summary)
        except Exception as exc:
            warnings.warn(f"problem report failed: {exc}", RuntimeWarning, stacklevel=2)
    return summary
