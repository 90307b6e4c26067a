"""TensorBoard and MLflow as loggers of a run (`run.loggers`), resumed without duplicated points.

`metrics.jsonl` stays the run's own record; a tracker gets the same records (the trainer's
`MetricsLogger` seam, blackbox_zo/metrics.py), the resolved config as hyperparameters, the
summary when the run stops and, for MLflow, the PNGs, config.json and summary.json as
artifacts (TensorBoard: the training plot as an image). Each tracker is an optional extra imported only when chosen; `check_loggers` says in
one line which package is missing before a run starts (docs/tracking.md).

Every numeric field of a record is a scalar, on two x-axes: `by_step/NAME` at x = the step and
`by_queries/NAME` at x = the query count (``queries``, the job's ledger total, setup queries
included). A step record also gives `by_step/queries` and `by_queries/step`; an evaluation
record gives its `eval/...` metrics only (its epoch and wall time are the step's). Points carry
the wall-clock time of the run (the first start plus ``wall_s``), so a tracker's "relative
time" axis is the training time without the pauses between a stop and its resume.

A resume continues the same tracker run and nobody sees a point twice:

* **TensorBoard** writes as records come (flushed at each checkpoint) into
  ``RUN_DIR/tensorboard/by_step`` and ``.../by_queries``. A resume opens each writer with
  `purge_step` = the x of the first record it may lack or that a checkpoint did not cover
  (TensorBoard's reader then hides every older point at or past it) and writes again, from
  metrics.jsonl, the kept records at or past that x.
* **MLflow** has no way to take a point back, so it receives a record once a checkpoint holds
  it (at each checkpoint: every `run.checkpoint_every_steps` steps, else every epoch, and at
  every stop). The number of records it holds is a run tag written in the same `log_batch`; a
  resume sends the kept records past it (the run id is in ``RUN_DIR/trackers.json``). When a
  resume must fall back to an older checkpoint than MLflow has seen (the newest was damaged),
  the resume goes to a new MLflow run, filled from metrics.jsonl, and says so.
* A tracker added on resume is first filled with every record of metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import rundir
from .config import ConfigError

__all__ = [
    "TRACKERS",
    "STATE_NAME",
    "TENSORBOARD_DIR",
    "AXES",
    "MLFLOW_LINES_TAG",
    "TrackerWarning",
    "RunHistory",
    "scalar_points",
    "check_loggers",
    "default_tracking_uri",
    "TensorBoardLogger",
    "MlflowLogger",
    "open_trackers",
    "note_resume",
]

TRACKERS = ("tensorboard", "mlflow")
STATE_NAME = "trackers.json"  # the MLflow run id, the TensorBoard records flushed, the wall-clock origin
TENSORBOARD_DIR = "tensorboard"
AXES = ("by_step", "by_queries")
MLFLOW_LINES_TAG = "blackbox_zo.records"  # records of metrics.jsonl this MLflow run holds

# logger -> (modules it imports, the extra that installs them)
_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
}
_SQL_MODULES = ("sqlalchemy", "alembic")  # MLflow's SQLite store (mlflow-skinny leaves them out)
_CONTEXT_FIELDS = ("epoch", "wall_s")  # a step's own: an evaluation record repeats them
_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch
_MLFLOW_PARAMS = 100  # ... and of params


class TrackerWarning(RuntimeWarning):
    """A tracker could not take a record or an artifact; the run goes on (metrics.jsonl has it)."""


# ------------------------------------------------------------------------------- records


def scalar_points(record: Mapping[str, Any]) -> dict[str, tuple[int, dict[str, float]]]:
    """axis -> (x, {name: value}) for one record of metrics.jsonl (the rule in the module docstring)."""
    step_record = "loss" in record
    values: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "queries") or (not step_record and key in _CONTEXT_FIELDS):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # e.g. eval_missing, a sentence
        values[key] = float(value)
    by_step, by_queries = dict(values), dict(values)
    if step_record:
        by_step["queries"] = float(record["queries"])
        by_queries["step"] = float(record["step"])
    return {"by_step": (int(record["step"]), by_step), "by_queries": (int(record["queries"]), by_queries)}


@dataclass
class RunHistory:
    """What a tracker needs to start or continue: the run, its settings and what metrics.jsonl keeps."""

    run_dir: Path
    problem: str
    config: dict[str, Any]  # the resolved config (model_dump)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl as a resume keeps it
    elapsed: float = 0.0  # training seconds before this session
    resumed: bool = False
    out_dir: Path = Path("runs")


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and (obj or not prefix):  # an empty section (oracle.options = {}) is a value
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _artifact_location(uri: str) -> str | None:
    """Beside a local SQLite store (runs/mlflow.db -> runs/mlartifacts/), not MLflow's default ./mlruns in
    whatever directory the command ran from; a server or another database keeps its own artifact root."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def _param(value: Any) -> str:
    """A setting as an MLflow param: a string as it is, anything else as JSON (true, null, [1, 2])."""
    return (value if isinstance(value, str) else json.dumps(value))[:6000]


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise rundir.RunDirError(f"{path} is damaged ({type(exc).__name__}: {exc}); remove it to start the "
                                 "trackers' runs afresh") from None
    return state if isinstance(state, dict) else {}


class _State:
    """RUN_DIR/trackers.json, rewritten atomically whenever a tracker's part of it changes."""

    def __init__(self, history: RunHistory):
        self.path = history.run_dir / STATE_NAME
        self.data = _read_state(history.run_dir)
        if "wall_origin" not in self.data:  # the epoch time at which the run's training clock read 0
            self.data["wall_origin"] = time.time() - history.elapsed

    @property
    def wall_origin(self) -> float:
        return float(self.data["wall_origin"])

    def update(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = value
        rundir.atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


# --------------------------------------------------------------------------- availability


def default_tracking_uri(out_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file under the runs' directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


def _missing(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is None  # None: an import that is known to fail
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def check_loggers(loggers: Sequence[str], out_dir: str | Path = "runs") -> None:
    """ConfigError (one line, exit 2) if a chosen tracker's package is not installed; imports nothing."""
    for name in loggers:
        if name not in _NEEDS:
            continue
        modules, extra = _NEEDS[name]
        if name == "mlflow" and default_tracking_uri(out_dir).startswith("sqlite:"):
            modules = modules + _SQL_MODULES
        missing = [m for m in modules if _missing(m)]
        if missing:
            raise ConfigError(f"run.loggers includes {name!r}, which needs {', '.join(missing)} (not installed): "
                              f"pip install 'blackbox-zo[{extra}]', or leave {name!r} out of run.loggers")


def _warn(message: str) -> None:
    warnings.warn(message, TrackerWarning, stacklevel=3)


# ---------------------------------------------------------------------------- TensorBoard


class TensorBoardLogger:
    """Scalars into RUN_DIR/tensorboard/{by_step,by_queries}; the config as hparams; the summary as text,
    the training plot as an image."""

    def __init__(self, history: RunHistory, state: _State):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.run_dir, self.logdir = history.run_dir, history.run_dir / TENSORBOARD_DIR
        self.started_ns = time.time_ns()
        self.state, self.origin = state, state.wall_origin
        records = history.records
        kept = len(records)
        existed = any(self.logdir.glob("*/events.out.tfevents.*"))
        flushed = int(state.data.get("tensorboard", {}).get("records", 0)) if existed else 0
        self.writers: dict[str, Any] = {}
        replay: dict[str, list[dict[str, Any]]] = {}
        for axis in AXES:
            if not existed:  # new, or added on resume: everything metrics.jsonl keeps
                purge, replay[axis] = None, list(records)
            elif kept == 0:
                purge, replay[axis] = 0, []
            else:
                # the first record TensorBoard may lack (not flushed) or hold in a version the resume takes
                # back (past the checkpoint): hide every point at or past its x, write those records again
                x = scalar_points(records[min(flushed, kept - 1)])[axis][0]
                purge = x
                replay[axis] = [r for r in records if scalar_points(r)[axis][0] >= x]
            self.writers[axis] = SummaryWriter(str(self.logdir / axis), purge_step=purge, flush_secs=30)
        if not existed or kept == 0:  # (a purge from 0 hides the hparams written before)
            params = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                      for k, v in _flat(history.config).items()}
            exp, ssi, sei = hparams(params, {})
            self.writers["by_step"].file_writer.add_summary(ssi)  # the HParams tab infers the rest from the scalars
        for axis in AXES:
            for record in replay[axis]:
                self._write(axis, record)
        self.records = kept
        self.checkpointed(kept)

    def __repr__(self) -> str:
        return f"TensorBoardLogger({str(self.logdir)!r})"

    def _write(self, axis: str, record: Mapping[str, Any]) -> None:
        x, values = scalar_points(record)[axis]
        wall = self.origin + float(record.get("wall_s", 0.0))
        writer = self.writers[axis]
        for name, value in values.items():
            writer.add_scalar(f"{axis}/{name}", value, global_step=x, walltime=wall)

    def log(self, record: Mapping[str, Any]) -> None:
        for axis in AXES:
            self._write(axis, record)
        self.records += 1

    def checkpointed(self, records: int) -> None:
        """A checkpoint holds `records` records: flush, and note how many TensorBoard has for sure."""
        for writer in self.writers.values():
            writer.flush()
        self.state.update("tensorboard", {"dir": TENSORBOARD_DIR, "records": self.records})

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        step = int(summary.get("stop_step") or summary.get("steps") or 0)
        wall = self.origin + float(summary.get("wall_s") or 0.0)
        text = "```json\n" + json.dumps(dict(summary), indent=2) + "\n```"
        self.writers["by_step"].add_text("summary", text, global_step=step, walltime=wall)
        for path in sorted(self.run_dir.glob("*.png")):  # the plots this stop drew (none after a fault)
            if path.stat().st_mtime_ns >= self.started_ns:
                self._image(f"plots/{path.stem}", path.read_bytes(), step, wall)
        self.checkpointed(self.records)

    def _image(self, tag: str, png: bytes, step: int, wall: float) -> None:
        """The PNG file's bytes as they are (no decoding): TensorBoard's Images tab shows them."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
            return
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self.writers["by_step"].file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]),
                                                        step, wall)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


# --------------------------------------------------------------------------------- MLflow

_STATUS = {"completed": "FINISHED", "query budget": "FINISHED", "interrupted": "KILLED"}


class MlflowLogger:
    """Metrics (sent at each checkpoint), params, summary tags and artifacts of one MLflow run."""

    def __init__(self, history: RunHistory, state: _State):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic"):  # "creating tables" on a new store: not the user's news
            logging.getLogger(name).setLevel(logging.WARNING)
        self.history, self.state, self.origin = history, state, state.wall_origin
        saved = state.data.get("mlflow", {})
        self.uri = saved.get("tracking_uri") or default_tracking_uri(history.out_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        records = history.records
        kept = len(records)
        self.run_id: str | None = saved.get("run_id")
        self.committed = 0
        if self.run_id:
            try:
                run = self.client.get_run(self.run_id)
            except Exception as exc:  # noqa: BLE001 - the store is the user's: say what was looked for
                raise rundir.RunDirError(f"the MLflow run {self.run_id} of {history.run_dir} is not in {self.uri} "
                                         f"({type(exc).__name__}); set MLFLOW_TRACKING_URI to its store, or remove "
                                         f"{history.run_dir / STATE_NAME} to log to a new run") from None
            self.committed = int(run.data.tags.get(MLFLOW_LINES_TAG, "0"))
            if self.committed > kept:
                old = self.run_id
                _warn(f"the MLflow run {old} holds {self.committed} records, more than the {kept} of the checkpoint "
                      f"this resume starts from (the newest one was damaged); MLflow cannot take points back, so "
                      f"the run goes on in a new MLflow run, filled from metrics.jsonl")
                self.client.set_tag(old, "blackbox_zo.superseded", "true")
                self.run_id, self.committed = None, 0
            else:
                self.client.update_run(self.run_id, status="RUNNING")
                self._log_changed_params(run.data.params)
        if not self.run_id:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or history.problem
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                experiment_id = self.client.create_experiment(experiment, artifact_location=_artifact_location(self.uri))
            run = self.client.create_run(experiment_id, run_name=history.run_dir.name, tags={
                "blackbox_zo.run_dir": str(history.run_dir.resolve()), "blackbox_zo.problem": history.problem,
                MLFLOW_LINES_TAG: "0"})
            self.run_id = run.info.run_id
            params = [Param(k, _param(v)) for k, v in _flat(history.config).items()]
            for i in range(0, len(params), _MLFLOW_PARAMS):
                self.client.log_batch(self.run_id, params=params[i:i + _MLFLOW_PARAMS])
            state.update("mlflow", {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id})
        self._tag = RunTag
        self.pending = list(records[self.committed:])  # records [committed, committed + len(pending))
        self.records = kept
        self.uploaded: set[str] = set()
        self.failed = False
        self.checkpointed(kept)

    def __repr__(self) -> str:
        return f"MlflowLogger({self.uri!r}, run_id={self.run_id!r})"

    def _log_changed_params(self, logged: Mapping[str, str]) -> None:
        """A resume may change a few settings (rundir.RESUMABLE_SETTINGS); params cannot change, tags can."""
        from mlflow.entities import Param, RunTag

        flat = {k: _param(v) for k, v in _flat(self.history.config).items()}
        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        changed = [RunTag(f"resumed_with.{k}", v) for k, v in flat.items() if k in logged and logged[k] != v]
        for i in range(0, max(len(new), len(changed)), _MLFLOW_PARAMS):
            self.client.log_batch(self.run_id, params=new[i:i + _MLFLOW_PARAMS], tags=changed[i:i + _MLFLOW_PARAMS])

    def log(self, record: Mapping[str, Any]) -> None:
        self.pending.append(dict(record))
        self.records += 1

    def checkpointed(self, records: int) -> None:
        """A checkpoint holds the first `records` records: send those MLflow has not got, with the count."""
        from mlflow.entities import Metric

        while self.committed < records and self.pending:
            metrics, n = [], 0
            for record in self.pending[: records - self.committed]:
                points = [Metric(f"{axis}/{name}", value, int(1000 * (self.origin + float(record.get("wall_s", 0)))),
                                 x)
                          for axis, (x, values) in scalar_points(record).items() for name, value in values.items()]
                if metrics and len(metrics) + len(points) > _MLFLOW_BATCH:
                    break
                metrics += points
                n += 1
            try:  # the points and the count in one call: a SQL store writes both or neither
                self.client.log_batch(self.run_id, metrics=metrics,
                                      tags=[self._tag(MLFLOW_LINES_TAG, str(self.committed + n))])
            except Exception as exc:  # noqa: BLE001 - a tracker must not stop a run; the next checkpoint retries
                if not self.failed:
                    _warn(f"MLflow did not take records {self.committed + 1}-{self.committed + n} ({type(exc).__name__}: "
                          f"{exc}); they are in metrics.jsonl, and sent again at the next checkpoint or resume")
                self.failed = True
                return
            self.committed += n
            del self.pending[:n]

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(f"summary.{k}", str(v)[:5000]) for k, v in _flat(dict(summary)).items()]
        try:
            for i in range(0, len(tags), _MLFLOW_PARAMS):
                self.client.log_batch(self.run_id, tags=tags[i:i + _MLFLOW_PARAMS])
            self.log_artifacts(self.history.run_dir)
            self.client.set_terminated(self.run_id, _STATUS.get(str(summary.get("stopped")), "FAILED"))
        except Exception as exc:  # noqa: BLE001
            _warn(f"MLflow did not take the summary ({type(exc).__name__}: {exc}); it is in summary.json")

    def log_artifacts(self, run_dir: Path) -> None:
        """config.json, summary.json and every PNG of the run directory (again if it changed)."""
        for path in sorted([*Path(run_dir).glob("*.png"), Path(run_dir) / rundir.CONFIG_NAME,
                            Path(run_dir) / rundir.SUMMARY_NAME]):
            if not path.is_file():
                continue
            stamp = f"{path.name}:{path.stat().st_mtime_ns}"
            if stamp in self.uploaded:
                continue
            try:
                self.client.log_artifact(self.run_id, str(path))
                self.uploaded.add(stamp)
            except Exception as exc:  # noqa: BLE001
                _warn(f"MLflow did not take the artifact {path.name} ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        """Nothing held open (each call of the client is complete)."""


def note_resume(run_dir: Path, kept: int) -> None:
    """Every resume, whichever loggers it has: TensorBoard holds at most `kept` records that are still
    the run's (so a TensorBoard left out now and added back later purges what this resume takes back)."""
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        return
    data = _read_state(run_dir)
    board = data.get("tensorboard")
    if isinstance(board, dict) and int(board.get("records", 0)) > kept:
        data["tensorboard"] = {**board, "records": kept}
        rundir.atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def open_trackers(history: RunHistory, loggers: Sequence[str]) -> list[Any]:
    """The chosen trackers, started or continued on `history` (main rank only)."""
    if not any(name in TRACKERS for name in loggers):
        return []
    state = _State(history)
    out: list[Any] = []
    kinds = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}
    try:
        for name in loggers:
            if name in kinds:
                try:
                    out.append(kinds[name](history, state))
                except (ConfigError, rundir.RunDirError):
                    raise
                except Exception as exc:  # the tracker's own error (a store it cannot open, ...): one line
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    raise rundir.RunDirError(f"cannot start the {name} logger of {history.run_dir}: "
                                             f"{type(exc).__name__}: {first}") from exc
    except BaseException:
        for tracker in out:
            tracker.close()
        raise
    return out
