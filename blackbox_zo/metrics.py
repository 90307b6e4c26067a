"""Where a run's records go: the `MetricsLogger` protocol and its JSONL implementation.

The trainer hands every record to each logger it was given: one record per step
(``step, epoch, loss, queries, step_queries, lr, wall_s``), one per evaluation (``eval/NAME``
metrics, plus ``eval_missing`` when one was left out), and at the end the run's summary
(the contents of summary.json). Under torchrun only the main rank logs. A logger for another
sink (TensorBoard, MLflow, ...) implements the three methods and is passed to
`blackbox_zo.train(..., loggers=[...])`; the loop does not change.

`JsonlLogger` writes ``metrics.jsonl`` in the run directory, one JSON object per line, the
file a resume cuts back to the records its checkpoint has seen (`truncate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

from . import rundir

__all__ = ["MetricsLogger", "JsonlLogger"]


@runtime_checkable
class MetricsLogger(Protocol):
    """A sink for a run's records."""

    def log(self, record: Mapping[str, Any]) -> None:
        """One step or evaluation record (JSON-serialisable values)."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The run's summary when it stops (completed, budget, interrupted or a fault); may come more than once
        if a run is resumed in the same process."""

    def close(self) -> None:
        """Flush and release what the logger holds; the trainer calls it once, when `fit` returns or raises."""


class JsonlLogger:
    """metrics.jsonl: one record per line, appended as it comes (a torn last line is cut off on resume)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines = 0

    def __repr__(self) -> str:
        return f"JsonlLogger({str(self.path)!r})"

    def log(self, record: Mapping[str, Any]) -> None:
        rundir.append_line(self.path, json.dumps(dict(record)))
        self.lines += 1

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Nothing: the summary has its own file, summary.json, written by the run directory."""

    def close(self) -> None:
        """Nothing held open: every record is appended and closed at once."""

    def truncate(self, lines: int) -> None:
        """Keep the first `lines` records (what a resumed checkpoint has seen)."""
        rundir.truncate_lines(self.path, lines)
        self.lines = lines
