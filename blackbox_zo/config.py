"""Run settings as pydantic models; files in TOML or JSON; `--set key.path=value` overrides.

A problem extends `TrainConfig` with a section of its own (e.g. `model`), and the CLI
validates defaults <- file <- overrides before anything is written to disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .registry import ESTIMATORS

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib

__all__ = [
    "Strict",
    "EstimatorConfig",
    "FIRST_ORDER_REFERENCE",
    "InterpolationConfig",
    "EvolutionConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "DataConfig",
    "RunConfig",
    "ParallelConfig",
    "TrainConfig",
    "ConfigError",
    "load_config_file",
    "parse_overrides",
    "deep_merge",
    "resolve_config",
    "format_validation_error",
]


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InterpolationConfig(Strict):
    """Linear interpolation with sparse recovery (blackbox_zo.estimators.LinearInterpolation); step = estimator.mu."""

    m: Optional[int] = Field(None, ge=1, description="directions per step; None: m = d (exact solve)")
    directions: Literal["orthonormal", "dct", "rademacher", "gaussian", "coordinate"] = Field(
        "orthonormal", description="rows of Q: Haar orthonormal (QR, O(d m^2)), randomised DCT (orthonormal, O(d m)), ...")
    lam: float = Field(0.02, ge=0, lt=1, description="LASSO lambda as a fraction of ||Q^T b||_inf")
    max_iters: int = Field(1000, ge=1, le=100_000, description="FISTA iterations at most")
    tol: float = Field(1e-6, gt=0, lt=1, description="FISTA relative-change stopping tolerance")
    warm_start: bool = True
    debias: bool = True


class EvolutionConfig(Strict):
    """Evolution strategies (blackbox_zo.evolution): ES and Guided ES use estimator.q antithetic pairs and
    sigma = estimator.mu; sep-CMA-ES / CMA-ES start from sigma = estimator.mu."""

    shaping: Literal["centered-ranks", "nes", "none"] = Field(
        "centered-ranks", description="fitness shaping of ES / Guided ES: ranks in [-0.5, 0.5], NES utilities, or raw losses")
    popsize: Optional[int] = Field(None, ge=2, description="CMA-ES population lambda; None: 4 + floor(3 ln d)")
    guide_k: int = Field(1, ge=1, le=64, description="Guided ES: the last k estimates span the guiding subspace")
    guide_alpha: float = Field(0.5, gt=0, le=1, description="Guided ES: weight of the isotropic part (1: plain ES)")


FIRST_ORDER_REFERENCE = "autograd"  # not an estimator: the trainer's backprop reference path


class EstimatorConfig(Strict):
    kind: str = Field(
        "cge", description="an estimator registered by name (blackbox-zo list: cge, rge, linear-interpolation, es, "
        "guided-es, sep-cma-es, cma-es, plug-ins); 'autograd' is the first-order reference (not ZO)")
    mu: float = Field(5e-3, gt=0, description="finite-difference step, for every estimator")
    scheme: Literal["forward", "central"] = "forward"
    q: int = Field(192, ge=1, description="RGE directions; ES / Guided ES antithetic pairs (2q queries a step)")
    distribution: Literal["gaussian", "sphere"] = "gaussian"
    interp: InterpolationConfig = InterpolationConfig()
    es: EvolutionConfig = EvolutionConfig()

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        if kind == FIRST_ORDER_REFERENCE or kind in ESTIMATORS:
            return kind
        names = [repr(n) for n in [*ESTIMATORS.names(), FIRST_ORDER_REFERENCE]]
        raise PydanticCustomError("unknown_estimator", "Input should be {expected}",
                                  {"expected": ", ".join(names[:-1]) + " or " + names[-1]})


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Strict):
    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from lr/10")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    step_every_epochs: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)


class DataConfig(Strict):
    batch_size: int = Field(64, ge=1)
    seed: int = Field(0, ge=0, description="seed of the train/test split")


class RunConfig(Strict):
    epochs: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps in total")
    eval_every_epochs: int = Field(1, ge=1)
    checkpoint_every_steps: Optional[int] = Field(None, ge=1, description="default: once per epoch")
    out_dir: str = "runs"
    query_budget: Optional[int] = Field(None, ge=1, description="loss values for the whole job: setup (pruning), "
                                        "training and evaluation queries charged to the oracle")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss (in training or evaluation): stop the run, or skip that step / "
        "record that metric as missing and go on")
    progress: bool = True
    device: str = Field("cpu", pattern=r"^\s*(auto|cpu|cuda(:\d+)?|mps)\s*$",
                        description="auto (CUDA if the problem supports it and one is there, else cpu), cpu, "
                        "cuda, cuda:N, mps; an explicit device never falls back")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads")
    oracle_retries: int = Field(3, ge=0, le=100, description="retries of a query that failed with "
                                "TransientOracleError (other errors stop the run at once)")
    oracle_retry_backoff_s: float = Field(1.0, ge=0, le=600, description="wait before retry k is this x 2^(k-1) s "
                                          "(at most 60 s)")


class SparsityConfig(Strict):
    """DeepZero gradient sparsity (blackbox_zo.sparsity): ZO-GraSP -> layer-wise ratios -> dynamic Sparse-CGE."""

    enabled: bool = False
    method: Literal["zo-grasp", "random", "magnitude"] = Field(
        "zo-grasp", description="where the layer-wise ratios come from")
    sparsity: float = Field(0.9, ge=0, lt=1, description="fraction of prunable coordinates left out of each step")
    ranking: Literal["largest", "abs"] = Field(
        "largest", description="GraSP prunes the largest scores; 'abs' ranks by |score| (reference-code variant)")
    q: int = Field(192, ge=1, description="RGE directions of ZO-GraSP")
    mu: float = Field(5e-3, gt=0, description="ZO-GraSP step for both RGE and the Hessian-gradient difference")
    samples_per_class: int = Field(25, ge=1, description="balanced pruning batch")
    resample_every_epochs: int = Field(5, ge=1, description="K: a fresh coordinate set every K epochs")
    weights_only: bool = Field(True, description="sparsify only conv/linear weights (>= 2-D blocks)")
    freeze_unselected: bool = Field(
        False, description="coordinates outside a step's set do not move (momentum/decay masked); "
        "false: plain torch.optim, as the DeepZero reference code")


class ParallelConfig(Strict):
    """Forward parallelism under torchrun (blackbox_zo.parallel); ignored in a single process."""

    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl if run.device is cuda, else gloo")
    timeout_s: float = Field(300.0, gt=0, le=86400, description="a rank that waits this long for another fails the job")
    check_every_steps: int = Field(50, ge=0, description="checksum of parameters, batch and coordinates across ranks every N steps (0: never)")
    balance_steps: int = Field(3, ge=1, le=1000, description="first steps, timed per parameter block, before shards are balanced by cost")


class TrainConfig(Strict):
    problem: str = ""
    estimator: EstimatorConfig = EstimatorConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()
    sparsity: SparsityConfig = SparsityConfig()
    parallel: ParallelConfig = ParallelConfig()


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    raise ConfigError(f"config file must end in .toml or .json: {path}")


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        low = raw.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return raw


_SHORTHAND = {"estimator": "kind", "optimizer": "name", "schedule": "name"}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['optimizer.lr=0.01', 'estimator=rge'] -> nested dict.

    A bare section value (`estimator=rge`) is shorthand for the section's `kind`/`name`.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set has an empty key: {item!r}")
        value = _parse_value(raw.strip())
        if len(parts) == 1 and parts[0] in _SHORTHAND and not isinstance(value, dict):
            parts, value = [parts[0], _SHORTHAND[parts[0]]], value  # estimator=rge -> estimator.kind=rge
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if k in _SHORTHAND and not isinstance(v, dict) and isinstance(out.get(k), (dict, type(None))):
            v = {_SHORTHAND[k]: v}
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(exc: ValidationError, data: dict[str, Any] | None = None) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{loc}: {err['msg']}{shown}")
    return "invalid config: " + "; ".join(parts)


def resolve_config(
    model: type[Strict],
    defaults: dict[str, Any] | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Strict:
    """defaults <- file <- --set overrides, validated; raises ConfigError with one line."""
    data = dict(defaults or {})
    if file is not None:
        data = deep_merge(data, load_config_file(file))
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data)) from None
