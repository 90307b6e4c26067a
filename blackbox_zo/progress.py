"""What a run shows while it works and when it ends: the progress bar, counts, the final line.

The bar (tqdm, on stderr) shows steps, loss, queries, queries per second and the last
evaluation; in a log file (CI, nohup) it redraws every 10 s instead of 10 times a second,
since every redraw is a new line there. Messages printed while a bar is drawn go above it
(`write`).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from tqdm.auto import tqdm

__all__ = ["human", "progress_bar", "write", "final_line"]


def human(x: float) -> str:
    """A count in K/M/G with two decimals: 367956 -> '367.96K'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def progress_bar(total: int, *, initial: int = 0, enabled: bool = True, desc: str = "") -> tqdm:
    """The training bar (drawn on stderr; `enabled=False` gives a bar that draws nothing)."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, leave=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)


def write(message: str, file: Any = None) -> None:
    """Print one line above the progress bar if one is drawn (stderr by default)."""
    tqdm.write(message, file=file if file is not None else sys.stderr)


def final_line(summary: Mapping[str, Any]) -> str:
    """The one line a run ends with: metrics, queries by phase, wall time, run directory, why it stopped."""
    q = summary.get("queries", {})
    metric_keys = [k for k, v in summary.items() if isinstance(v, float) and k not in ("wall_s", "oracle_queries_per_s")]
    metrics = " ".join(f"{k}={summary[k]:.4f}" for k in metric_keys)
    label = "" if summary.get("zeroth_order", True) else " [FIRST-ORDER REFERENCE, not ZO]"
    phases = ", ".join(f"{k} {human(v)}" for k, v in q.items() if k != "total" and v)
    stopped = summary.get("stopped", "completed")
    why = "" if stopped == "completed" else f" | stopped: {stopped} after step {summary.get('steps')}"
    return (f"{summary['problem']}{label}: {metrics} | queries {human(q.get('total', 0))}"
            f"{f' ({phases})' if phases else ''} | wall {summary['wall_s']:.1f}s | {summary.get('run_dir')}{why}")
