"""Run settings as pydantic models; files in TOML or JSON; `--set key.path=value` overrides.

A problem's settings are the sections its config model declares: every problem has
`estimator`, `optimizer`, `schedule`, `run` and `parallel` (`TrainConfig`); a problem adds
`data` and `sparsity` only if it uses them, and sections of its own (`model`, `gym`, ...).

Three sections are *tagged*: which settings they hold depends on one field, the tag
(`estimator.kind`, `optimizer.name`, `schedule.name`; `sparsity.enabled`). Each value of
the tag has its own model (`RGEConfig` has `q`, `CGEConfig` has not), so a validated config
holds, and `config.json` records, only the settings the run uses. A registered estimator
brings its own model (its class attribute `config_model`; a plug-in without one gets
`EstimatorConfig`: `kind`, `mu`, `scheme`). The `sparsity` section applies only to an
estimator whose model sets `uses_sparsity` (Sparse-CGE: `cge`).

`resolve_config` reads defaults <- file <- `--set` overrides and keeps the rule that no
setting is silently ignored: a setting the user gave (in the file or with `--set`) that the
resolved config does not use is refused with one line naming it; a default that does not
apply (e.g. `estimator.q` of a problem whose default is RGE, after `--set estimator=cge`)
is dropped. The same resolution reads a run's saved config.json, so run directories written
before the sections were split (with every section and every estimator field) still load.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, \
    model_serializer, model_validator
from pydantic_core import PydanticCustomError

from .registry import ESTIMATORS

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib

__all__ = [
    "Strict",
    "Tagged",
    "FIRST_ORDER_REFERENCE",
    "EstimatorSettings",
    "FirstOrderReference",
    "EstimatorConfig",
    "CGEConfig",
    "RGEConfig",
    "InterpolationConfig",
    "LinearInterpolationConfig",
    "OptimizerConfig",
    "SGDConfig",
    "AdamConfig",
    "ScheduleConfig",
    "ConstantSchedule",
    "CosineSchedule",
    "StepSchedule",
    "DataConfig",
    "RunConfig",
    "SparsitySection",
    "SparsityOff",
    "SparsityConfig",
    "SparsityField",
    "ParallelConfig",
    "PhaseTwoConfig",
    "TrainConfig",
    "ENGINE_SECTIONS",
    "active_sparsity",
    "uses_sparsity",
    "section_model",
    "ConfigError",
    "load_config_file",
    "parse_overrides",
    "deep_merge",
    "unused_settings",
    "resolve_config",
    "format_validation_error",
]

_NONE_WORDS = ("none", "null")


def _admits_none(annotation: Any) -> bool:
    return annotation is type(None) or type(None) in typing.get_args(annotation)


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored.

    A setting that may be unset takes the string "none" (or "null") for unset, in a file as
    on the command line (TOML has no null).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _none_words(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = None
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if (field is not None and isinstance(value, str) and value.strip().lower() in _NONE_WORDS
                    and _admits_none(field.annotation)):
                out = dict(data) if out is None else out
                out[key] = None
        return data if out is None else out


class Tagged(Strict):
    """A section whose settings depend on one of its fields, the tag (`estimator.kind`, ...).

    The root class of a section lists its variants (`variant(value)`); validating the root
    with a dict validates the variant its tag names instead, so the result holds that
    variant's settings only (and an unknown setting of it is an error at its own location).
    """

    tag: ClassVar[str]
    section: ClassVar[str]  # the section's name in messages

    @classmethod
    def variant(cls, value: Any) -> Optional[type["Tagged"]]:
        """The model for tag `value`, or None if the tag names none (the tag's validator then says so)."""
        return None

    @classmethod
    def variants(cls) -> dict[Any, type["Tagged"]]:
        """Every tag value and its model."""
        return {}

    @classmethod
    def default_tag(cls) -> Any:
        return cls.model_fields[cls.tag].default

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, dict):
            target = cls.variant(data.get(cls.tag, cls.default_tag()))
            if target is None:  # an unknown tag: the tag's own error, not one per setting of no variant
                return handler({cls.tag: data[cls.tag]})
            if target is not cls and issubclass(target, cls):
                return target.model_validate(data)
        return handler(data)


# ------------------------------------------------------------------------------ estimator

FIRST_ORDER_REFERENCE = "autograd"  # not an estimator: the trainer's backprop reference path


class EstimatorSettings(Tagged):
    """The `estimator` section: `kind` picks a registered estimator, whose model holds its settings."""

    tag: ClassVar[str] = "kind"
    section: ClassVar[str] = "estimator"
    uses_sparsity: ClassVar[bool] = False  # the `sparsity` section applies (the estimator honours `coords`)

    kind: str = Field(
        "cge", description="an estimator registered by name (blackbox-zo list: cge, rge, linear-interpolation, "
        "plug-ins); 'autograd' is the first-order reference (backprop, not ZO)")

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        if kind == FIRST_ORDER_REFERENCE or kind in ESTIMATORS:
            return kind
        names = [repr(n) for n in [*ESTIMATORS.names(), FIRST_ORDER_REFERENCE]]
        raise PydanticCustomError("unknown_estimator", "Input should be {expected}",
                                  {"expected": ", ".join(names[:-1]) + " or " + names[-1]})

    @classmethod
    def variant(cls, value: Any) -> Optional[type[Tagged]]:
        if value == FIRST_ORDER_REFERENCE:
            return FirstOrderReference
        if isinstance(value, str) and value in ESTIMATORS:
            return getattr(ESTIMATORS.get(value), "config_model", None) or EstimatorConfig
        return None

    @classmethod
    def variants(cls) -> dict[Any, type[Tagged]]:
        return {**{name: cls.variant(name) for name in ESTIMATORS.names()}, FIRST_ORDER_REFERENCE: FirstOrderReference}


class FirstOrderReference(EstimatorSettings):
    """kind=autograd: the problem's differentiable loss, backpropagated (a labelled reference, not ZO)."""

    kind: Literal["autograd"] = Field("autograd", description="the first-order reference: backprop, not ZO")


class EstimatorConfig(EstimatorSettings):
    """The settings every zeroth-order estimator has (a plug-in estimator without a `config_model` gets these)."""

    mu: float = Field(5e-3, gt=0, description="finite-difference step, for every estimator")
    scheme: Literal["forward", "central"] = Field(
        "forward", description="forward: (l(x + mu u) - l(x)) / mu, one query per direction + 1; "
        "central: (l(x + mu u) - l(x - mu u)) / (2 mu), two per direction, error O(mu^2)")


class CGEConfig(EstimatorConfig):
    """kind=cge: coordinate-wise estimate, one coordinate per query (DeepZero eq. 1); takes `sparsity`."""

    uses_sparsity: ClassVar[bool] = True
    kind: Literal["cge"] = Field("cge", description="coordinate-wise gradient estimate (CGE; Sparse-CGE with sparsity)")


class RGEConfig(EstimatorConfig):
    """kind=rge: q random directions per step."""

    kind: Literal["rge"] = Field("rge", description="randomized gradient estimate (RGE)")
    q: int = Field(192, ge=1, description="random directions per step")
    distribution: Literal["gaussian", "sphere"] = Field(
        "gaussian", description="directions u ~ N(0, I), or uniform on the unit sphere (scaled by d)")


class InterpolationConfig(Strict):
    """Linear interpolation with sparse recovery (blackbox_zo.estimators.LinearInterpolation); step = estimator.mu."""

    m: Optional[int] = Field(None, ge=1, description="directions per step; none: m = d (exact solve)")
    directions: Literal["orthonormal", "dct", "rademacher", "gaussian", "coordinate"] = Field(
        "orthonormal", description="rows of Q: Haar orthonormal (QR, O(d m^2)), randomised DCT (orthonormal, O(d m)), "
        "Rademacher, Gaussian (unit rows) or the coordinate axes (m = d: CGE)")
    lam: float = Field(0.02, ge=0, lt=1, description="LASSO lambda as a fraction of ||Q^T b||_inf (m < d)")
    max_iters: int = Field(1000, ge=1, le=100_000, description="FISTA iterations at most (m < d)")
    tol: float = Field(1e-6, gt=0, lt=1, description="FISTA relative-change stopping tolerance (m < d)")
    warm_start: bool = Field(True, description="start FISTA from the previous step's solution (m < d)")
    debias: bool = Field(True, description="refit the recovered support by least squares when it has <= m/2 entries")


class LinearInterpolationConfig(EstimatorConfig):
    """kind=linear-interpolation: solve Q g = b for m directions (LASSO when m < d)."""

    kind: Literal["linear-interpolation"] = Field(
        "linear-interpolation", description="gradient by linear interpolation with sparse recovery")
    interp: InterpolationConfig = Field(default_factory=InterpolationConfig,
                                        description="the directions and the sparse-recovery solve")


# ------------------------------------------------------------------------------ optimizer


class OptimizerConfig(Tagged):
    """The `optimizer` section: a torch.optim optimizer that steps on the ZO estimate in p.grad."""

    tag: ClassVar[str] = "name"
    section: ClassVar[str] = "optimizer"

    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="torch.optim.SGD, Adam or AdamW")
    lr: float = Field(0.1, gt=0, description="learning rate (before the schedule)")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (sgd, adam) or decoupled decay (adamw)")

    @classmethod
    def variant(cls, value: Any) -> Optional[type[Tagged]]:
        return {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig}.get(value) if isinstance(value, str) else None

    @classmethod
    def variants(cls) -> dict[Any, type[Tagged]]:
        return {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig}


class SGDConfig(OptimizerConfig):
    name: Literal["sgd"] = Field("sgd", description="torch.optim.SGD")
    momentum: float = Field(0.9, ge=0, lt=1, description="heavy-ball momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (when momentum > 0)")


class AdamConfig(OptimizerConfig):
    name: Literal["adam", "adamw"] = Field("adam", description="torch.optim.Adam or AdamW")
    betas: tuple[float, float] = Field((0.9, 0.999), description="decay rates of the first and second moments")


# ------------------------------------------------------------------------------- schedule


class ScheduleConfig(Tagged):
    """The `schedule` section: the learning rate per step (a LambdaLR)."""

    tag: ClassVar[str] = "name"
    section: ClassVar[str] = "schedule"

    name: Literal["constant", "cosine", "step"] = Field(
        "cosine", description="after the warm-up: constant lr, cosine decay over the run, or x gamma every few epochs")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from lr/10 over this many epochs")

    @classmethod
    def variant(cls, value: Any) -> Optional[type[Tagged]]:
        return cls.variants().get(value) if isinstance(value, str) else None

    @classmethod
    def variants(cls) -> dict[Any, type[Tagged]]:
        return {"constant": ConstantSchedule, "cosine": CosineSchedule, "step": StepSchedule}


class ConstantSchedule(ScheduleConfig):
    name: Literal["constant"] = Field("constant", description="constant lr after the warm-up")


class CosineSchedule(ScheduleConfig):
    name: Literal["cosine"] = Field("cosine", description="cosine decay from lr to lr x min_lr_ratio over the run")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")


class StepSchedule(ScheduleConfig):
    name: Literal["step"] = Field("step", description="lr x gamma every step_every_epochs epochs")
    step_every_epochs: int = Field(10, ge=1, description="epochs between two decays")
    gamma: float = Field(0.1, gt=0, le=1, description="factor of each decay")


# ---------------------------------------------------------------------- data, run, parallel


class DataConfig(Strict):
    """The `data` section of a problem that draws mini-batches from a data set."""

    batch_size: int = Field(64, ge=1, description="examples per step (one query evaluates one batch)")
    seed: int = Field(0, ge=0, description="seed of the train/test split")


class RunConfig(Strict):
    """The `run` section: length, seeds, checkpoints, budget, fault policy, device."""

    epochs: int = Field(10, ge=1, description="passes over the training batches")
    seed: int = Field(0, ge=0, description="seed of the model's initialisation, the batch order and the estimators")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps in total (none: no limit)")
    eval_every_epochs: int = Field(1, ge=1, description="evaluate every this many epochs (and at the end)")
    checkpoint_every_steps: Optional[int] = Field(None, ge=1, description="checkpoint every N steps (none: once "
                                                  "per epoch)")
    out_dir: str = Field("runs", description="run directories go to OUT_DIR/<problem>/<timestamp>/")
    query_budget: Optional[int] = Field(None, ge=1, description="loss values for the whole job: setup (pruning), "
                                        "training and evaluation queries charged to the oracle (none: unlimited)")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss (in training or evaluation): stop the run, or skip that step / "
        "record that metric as missing and go on")
    progress: bool = Field(True, description="draw a progress bar (steps, loss, queries, queries/s, ETA)")
    device: str = Field("cpu", pattern=r"^\s*(auto|cpu|cuda(:\d+)?|mps)\s*$",
                        description="auto (CUDA if the problem supports it and one is there, else cpu), cpu, "
                        "cuda, cuda:N, mps; an explicit device never falls back")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (none: torch's default)")
    oracle_retries: int = Field(3, ge=0, le=100, description="retries of a query that failed with "
                                "TransientOracleError (other errors stop the run at once)")
    oracle_retry_backoff_s: float = Field(1.0, ge=0, le=600, description="wait before retry k is this x 2^(k-1) s "
                                          "(at most 60 s)")
    loggers: list[Literal["jsonl", "tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"], description="where the records go besides metrics.jsonl (always "
        "written): tensorboard (RUN_DIR/tensorboard/), mlflow (MLFLOW_TRACKING_URI, else "
        "sqlite:///OUT_DIR/mlflow.db); each needs its extra (pip install 'blackbox-zo[tensorboard,mlflow]'); "
        "may change on resume (docs/tracking.md)")

    @field_validator("loggers", mode="before")
    @classmethod
    def _jsonl_first(cls, value: Any) -> Any:
        """'tensorboard,mlflow' or a list; metrics.jsonl is always on, each logger once, in a fixed order."""
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            names = [v.strip().lower() if isinstance(v, str) else v for v in value]
            return ["jsonl", *[n for n in ("tensorboard", "mlflow") if n in names],
                    *[n for n in names if n not in ("jsonl", "tensorboard", "mlflow")]]
        return value


class ParallelConfig(Strict):
    """Forward parallelism under torchrun (blackbox_zo.parallel); a single process has no use for it."""

    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl if run.device is cuda, else gloo")
    timeout_s: float = Field(300.0, gt=0, le=86400, description="a rank that waits this long for another fails the job")
    check_every_steps: int = Field(50, ge=0, description="checksum of parameters, batch and coordinates across ranks "
                                   "every N steps (0: never)")
    balance_steps: int = Field(3, ge=1, le=1000, description="first steps, timed per parameter block, before shards "
                               "are balanced by cost")


# ------------------------------------------------------------------------------- sparsity


class SparsitySection(Tagged):
    """The `sparsity` section: DeepZero's gradient sparsity, for an estimator that takes it (cge)."""

    tag: ClassVar[str] = "enabled"
    section: ClassVar[str] = "sparsity"

    enabled: bool = Field(False, description="Sparse-CGE: each step estimates a ZO-GraSP-shaped subset of coordinates")

    @classmethod
    def variant(cls, value: Any) -> Optional[type[Tagged]]:
        return {False: SparsityOff, True: SparsityConfig}.get(value) if isinstance(value, bool) else None

    @classmethod
    def variants(cls) -> dict[Any, type[Tagged]]:
        return {False: SparsityOff, True: SparsityConfig}


class SparsityOff(SparsitySection):
    enabled: Literal[False] = Field(False, description="dense: every coordinate, every step")


class SparsityConfig(SparsitySection):
    """DeepZero gradient sparsity (blackbox_zo.sparsity): ZO-GraSP -> layer-wise ratios -> dynamic Sparse-CGE."""

    enabled: Literal[True] = Field(True, description="Sparse-CGE on a fresh coordinate set every few epochs")
    method: Literal["zo-grasp", "random", "magnitude"] = Field(
        "zo-grasp", description="where the layer-wise ratios come from: ZO-GraSP scores (queries, phase prune), "
        "uniform (random), or |theta| at init (magnitude)")
    sparsity: float = Field(0.9, ge=0, lt=1, description="fraction of prunable coordinates left out of each step")
    ranking: Literal["largest", "abs"] = Field(
        "largest", description="zo-grasp: GraSP prunes the largest scores; 'abs' ranks by |score| "
        "(reference-code variant)")
    q: int = Field(192, ge=1, description="zo-grasp: RGE directions of the score estimate")
    mu: float = Field(5e-3, gt=0, description="zo-grasp: step for both RGE and the Hessian-gradient difference")
    samples_per_class: int = Field(25, ge=1, description="zo-grasp: examples per class in the pruning batch "
                                   "(classification problems; wake-flow prunes on wake.prune_windows windows)")
    resample_every_epochs: int = Field(5, ge=1, description="K: a fresh coordinate set every K epochs")
    weights_only: bool = Field(True, description="sparsify only conv/linear weights (>= 2-D blocks)")
    freeze_unselected: bool = Field(
        False, description="coordinates outside a step's set do not move (momentum/decay masked); "
        "false: plain torch.optim, as the DeepZero reference code")


# A problem that uses gradient sparsity declares `sparsity: SparsityField = None` (None: the
# section does not apply to the run's estimator, or the problem's defaults leave it out).
SparsityField = Annotated[Optional[SerializeAsAny[SparsitySection]],
                          Field(description="DeepZero's gradient sparsity, for an estimator that takes it (cge)")]


# ------------------------------------------------------------------------ the second phase


class PhaseTwoConfig(Strict):
    """The `phase2` section: after `after_steps` steps, the run goes on with another estimator, a fresh
    optimizer and its own schedule (e.g. a query-efficient ES first, then the DeepZero recipe's cheap
    Sparse-CGE queries). The run's `estimator`, `optimizer` and `schedule` are phase 1's; the schedule of
    each phase spans that phase's steps."""

    after_steps: int = Field(..., ge=1, description="steps of phase 1 (the run's estimator, optimizer and "
                             "schedule); phase 2 takes the rest of the run")
    estimator: SerializeAsAny[EstimatorSettings] = Field(default_factory=CGEConfig,
                                                         description="phase 2's estimator")
    optimizer: SerializeAsAny[OptimizerConfig] = Field(default_factory=SGDConfig,
                                                       description="phase 2's optimizer (fresh state at the switch)")
    schedule: SerializeAsAny[ScheduleConfig] = Field(default_factory=CosineSchedule,
                                                     description="phase 2's lr schedule, over phase 2's steps")

    @field_validator("estimator")
    @classmethod
    def _zeroth_order(cls, est: EstimatorSettings) -> EstimatorSettings:
        if est.kind == FIRST_ORDER_REFERENCE:
            raise PydanticCustomError("phase2_autograd", "phase 2 must be a zeroth-order estimator, not "
                                      "'{kind}'", {"kind": est.kind})
        return est


# ---------------------------------------------------------------------------- the config


class TrainConfig(Strict):
    """The sections every problem has. A problem's config subclasses this and declares `data`,
    `sparsity` (as `Optional[SparsitySection] = None`) and sections of its own only if it uses them."""

    # dotted settings this config once had (a run directory may hold them) and has no more: read from a
    # saved config.json they are dropped, given by the user they are refused
    retired_settings: ClassVar[tuple[str, ...]] = ()

    problem: str = Field("", description="the problem these settings are for (the CLI records it)")
    estimator: SerializeAsAny[EstimatorSettings] = Field(default_factory=CGEConfig,
                                                         description="how the gradient is estimated from loss values")
    optimizer: SerializeAsAny[OptimizerConfig] = Field(default_factory=SGDConfig,
                                                       description="the torch.optim optimizer")
    schedule: SerializeAsAny[ScheduleConfig] = Field(default_factory=CosineSchedule,
                                                     description="the learning rate per step")
    run: RunConfig = Field(default_factory=RunConfig, description="length, seeds, checkpoints, budget, device")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="forward parallelism under torchrun")
    phase2: Optional[PhaseTwoConfig] = Field(None, description="a second phase: another estimator, optimizer and "
                                             "schedule after phase2.after_steps steps (none: one phase)")

    @model_validator(mode="after")
    def _sparsity_needs_its_estimator(self) -> "TrainConfig":
        sparsity = getattr(self, "sparsity", None)
        if self.phase2 is not None and self.estimator.kind == FIRST_ORDER_REFERENCE:
            raise PydanticCustomError("phase2_autograd", "phase2 needs a zeroth-order estimator in phase 1, not "
                                      "estimator.kind='{kind}'", {"kind": self.estimator.kind})
        if sparsity is not None and not uses_sparsity(self):
            if sparsity.enabled:
                raise PydanticCustomError(
                    "sparsity_estimator", "sparsity.enabled=true needs an estimator that takes gradient sparsity "
                    "(Sparse-CGE: estimator.kind=cge), not estimator.kind={kind!r}", {"kind": self.estimator.kind})
            self.__dict__["sparsity"] = None  # "off" for an estimator that has no such thing: not recorded
        return self

    @model_serializer(mode="wrap")
    def _without_absent_sections(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# The engine's sections a problem may or may not declare; a setting in one of them is refused
# by a problem without it (rather than reported as unknown).
ENGINE_SECTIONS: dict[str, type[Strict]] = {"data": DataConfig, "sparsity": SparsitySection}


def uses_sparsity(config: Any) -> bool:
    """Some estimator of the run (phase 1's or phase 2's) takes gradient sparsity."""
    phase2 = getattr(config, "phase2", None)
    return type(config.estimator).uses_sparsity or (phase2 is not None and type(phase2.estimator).uses_sparsity)


def active_sparsity(config: Any) -> Optional[SparsityConfig]:
    """The run's gradient-sparsity settings if sparsity is on (a `SparsityConfig`), else None."""
    sparsity = getattr(config, "sparsity", None)
    return sparsity if isinstance(sparsity, SparsityConfig) else None


def section_model(field_annotation: Any) -> Optional[type[BaseModel]]:
    """The model class of a section field (through Optional[...] and SerializeAsAny[...]), or None."""
    candidates = [field_annotation, *typing.get_args(field_annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
        origin_args = typing.get_args(c)
        for a in origin_args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                return a
    return None


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


# ---------------------------------------------------------------------- files and overrides


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
        # "none" stays a string here: Strict turns it into None only where the field admits None, so a
        # setting whose own value is the word "none" (estimator.shaping=none) keeps it.
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
        parts.append(f"{loc + ': ' if loc else ''}{err['msg']}{shown}")
    return "invalid config: " + "; ".join(parts)


# ------------------------------------------------------------------- settings that are unused


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None))) else repr(value)


def _tagged_unused(prefix: str, root: type[Tagged], value: dict[str, Any]) -> list[tuple[str, str]]:
    tag_value = value.get(root.tag, root.default_tag())
    variant = root.variant(tag_value)
    if variant is None:
        return []  # an unknown kind/name: validation says which ones exist
    known = {name for model in root.variants().values() for name in model.model_fields}
    own = [n for n in variant.model_fields]
    out = []
    for key in value:
        if key not in variant.model_fields and key in known:
            out.append((f"{prefix}.{key}", f"{prefix}.{root.tag}={_show(tag_value)} has no {key} "
                                           f"(its settings: {', '.join(own)})"))
    return out


def unused_settings(model: type[TrainConfig], data: dict[str, Any], name: str | None = None) -> list[tuple[str, str]]:
    """(dotted key, why) for every setting in `data` that a config of `model` would not use.

    Unused: a section of the engine the model does not declare (`data`, `sparsity`); a
    setting of another variant of a tagged section (`estimator.q` with kind=cge); the
    `sparsity` section with an estimator that takes none. Unknown keys are not listed here:
    validation names them.
    """
    fields = model.model_fields
    who = name or model.__name__
    out: list[tuple[str, str]] = []
    for key, value in data.items():
        if key not in fields:
            if key in ENGINE_SECTIONS:  # (phase2 is not listed: a second copy of estimator, optimizer, schedule)
                out.append((key, f"{who} has no {key} section (its sections: "
                                 f"{', '.join(k for k in fields if k not in ('problem', 'phase2'))})"))
            continue
        section = section_model(fields[key].annotation)
        if isinstance(value, dict) and section is not None and issubclass(section, Tagged):
            out += _tagged_unused(key, section, value)
        elif isinstance(value, dict) and section is PhaseTwoConfig:
            for sub, root in (("estimator", EstimatorSettings), ("optimizer", OptimizerConfig),
                              ("schedule", ScheduleConfig)):
                if isinstance(value.get(sub), dict):
                    out += _tagged_unused(f"{key}.{sub}", root, value[sub])
    for dotted in getattr(model, "retired_settings", ()):
        section, _, key = dotted.partition(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            out.append((dotted, f"{who} has no {dotted} (any more)"))
    if "sparsity" in fields and "sparsity" in data and data["sparsity"] is not None:
        est = data.get("estimator")
        kind = est.get("kind", EstimatorSettings.default_tag()) if isinstance(est, dict) else \
            getattr(est, "kind", EstimatorSettings.default_tag())
        variant = EstimatorSettings.variant(kind)
        phase2 = data.get("phase2")
        kind2 = (phase2.get("estimator") or {}).get("kind", EstimatorSettings.default_tag()) if isinstance(
            phase2, dict) and isinstance(phase2.get("estimator", {}), dict) else None
        variant2 = EstimatorSettings.variant(kind2) if kind2 is not None else None
        if variant is not None and not variant.uses_sparsity and not (variant2 is not None and variant2.uses_sparsity):
            out.append(("sparsity", f"estimator.kind={_show(kind)} takes no gradient sparsity "
                                    "(Sparse-CGE: estimator.kind='cge')"))
    return out


def _flat_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out += _flat_keys(v, key)
        else:
            out.append(key)
    return out


def _drop(data: dict[str, Any], dotted: str) -> None:
    *path, last = dotted.split(".")
    node: Any = data
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _drop_default_phase2(base: dict[str, Any], user: dict[str, Any], data: dict[str, Any]) -> None:
    """A `phase2` from the defaults belongs to the defaults' estimator: a user who picks another
    estimator.kind (and sets nothing of phase2) gets a one-phase run of that estimator, starting
    from that kind's own settings (the two-phase preset's estimator values, e.g. sep-CMA-ES's
    sigma_0 as `mu`, are dropped with its phase2 unless the user sets them)."""
    if not isinstance(base.get("phase2"), dict) or "phase2" in user:
        return
    user_estimator = user.get("estimator") if isinstance(user.get("estimator"), dict) else {}
    chosen = user_estimator.get("kind")
    default = base.get("estimator", {}).get("kind") if isinstance(base.get("estimator"), dict) else None
    if chosen is not None and chosen != default:
        data["phase2"] = None
        data["estimator"] = {k: v for k, v in data["estimator"].items() if k == "kind" or k in user_estimator}


def resolve_config(
    model: type[Strict],
    defaults: dict[str, Any] | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    name: str | None = None,
) -> Strict:
    """defaults <- file <- --set overrides, validated; raises ConfigError with one line.

    A setting from the file or the overrides that the result would not use is refused
    (naming it); one from `defaults` (a problem's defaults, or a run's saved config.json)
    that does not apply is dropped. `name` (the problem) is used in messages.
    """
    base = deep_merge({}, defaults or {})
    user: dict[str, Any] = {}
    if file is not None:
        user = deep_merge(user, load_config_file(file))
    user = deep_merge(user, parse_overrides(overrides))
    data = deep_merge(base, user)
    if isinstance(model, type) and issubclass(model, TrainConfig):
        _drop_default_phase2(base, user, data)
        given = _flat_keys(user)
        refused = []
        data = _copy(data)
        for key, why in unused_settings(model, data, name):
            mine = [g for g in given if g == key or g.startswith(key + ".") or key.startswith(g + ".")]
            if mine:
                refused.append(f"{', '.join(mine)}: {why}")
            else:
                _drop(data, key)
        if refused:
            raise ConfigError("setting not used: " + "; ".join(refused))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data)) from None
