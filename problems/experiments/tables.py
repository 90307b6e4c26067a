"""Small output helpers shared by the estimator and HZO experiments: CSV + Markdown tables, run folders."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from blackbox_zo.rundir import atomic_write_text

__all__ = ["write_table", "markdown_table", "experiment_dir", "fmt"]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], stem: Path, columns: Sequence[str] | None = None) -> str:
    """Write stem.csv and stem.md (atomically); returns the Markdown text."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(f"{stem}.csv"), buf.getvalue())
    text = markdown_table(rows, columns)
    atomic_write_text(Path(f"{stem}.md"), text)
    return text


def experiment_dir(out: str | None, name: str) -> Path:
    path = Path(out) if out else Path("runs") / "experiments" / name / datetime.now().strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path
