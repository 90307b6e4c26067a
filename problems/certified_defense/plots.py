"""The certified-accuracy curve (certified accuracy vs l2 radius), shared by `blackbox-zo certify` and
`blackbox-zo experiment certified-defense`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from blackbox_zo.rundir import atomic_write_bytes

__all__ = ["plot_certified_accuracy"]

# one style per row, whichever command drew it ("fo" is the experiment's name for FO-DS's row)
STYLES = {"none": ("tab:gray", ":"), "mse": ("tab:blue", "--"), "fo": ("tab:green", "-."),
          "fo-ds": ("tab:green", "-."), "zo-ae-ds": ("tab:purple", (0, (3, 1, 1, 1))), "zo": ("tab:red", "-"),
          "denoiser": ("tab:red", "-")}


class Certified(Protocol):
    def accuracy_at(self, radii: Sequence[float]) -> Sequence[float]: ...


def plot_certified_accuracy(path: Path, curves: dict[str, tuple[str, Sequence[Certified]]], r_max: float,
                            title: str, marks: Sequence[float] = ()) -> None:
    """One line per row key: (label, results), the mean over the results (seeds) of their certified
    accuracy at every radius; a vertical line at the largest certifiable radius and faint ones at
    `marks` (the table's radii). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0.0, max(1.0, r_max + 0.05), 301)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, (label, results) in curves.items():
        color, ls = STYLES.get(key, (None, "-"))
        mean = np.mean([r.accuracy_at(grid) for r in results], axis=0)
        ax.plot(grid, mean, color=color, ls=ls, lw=1.8, label=label)
    ax.axvline(r_max, color="k", lw=0.8, alpha=0.5)
    ax.text(r_max, 0.02, " largest certifiable radius\n sigma*Phi^-1(alpha^(1/N))", fontsize=8, va="bottom")
    for r in marks:
        ax.axvline(r, color="k", lw=0.4, alpha=0.2)
    ax.set_xlabel("l2 radius r")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.0)
    ax.set_xlim(0, grid[-1])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
