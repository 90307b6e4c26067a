"""Today's seeded-direction sampler put into an older tree's blackbox_zo/plan.py.

Parity tests run the code of an old commit beside this tree and compare results bit for bit. Since
the sampler draws its directions in fixed blocks (direction i depends only on (seed, i, d, dtype)),
every RGE / ES / ZO-GraSP result differs from an old commit's for that reason alone; such a test
splices this tree's `SeededDirections` (with its helpers) and `PlanLosses.directions_sum` into the
old plan.py, so that what it compares is everything else. The old plan.py must have the same
layout (the sampler's block before `class ExplicitDirections`, `directions_sum` before the
executor's banner), as every commit since the query plans (3895ab4 and later) has.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_END = "@dataclass(frozen=True, eq=False)\nclass ExplicitDirections:"
_EXECUTOR = "# --------------------------------------------------------------------------- executor"


def splice_current_sampler(tree: Path) -> None:
    """Rewrite tree/blackbox_zo/plan.py with this tree's sampler and directions_sum."""
    now = (ROOT / "blackbox_zo" / "plan.py").read_text()
    path = tree / "blackbox_zo" / "plan.py"
    old = path.read_text()
    sampler = now[now.index("# A seeded direction stream is drawn in fixed blocks") : now.index(_END)]
    summing = now[now.index("    def directions_sum(self, weights: Tensor)") : now.index(_EXECUTOR)]
    start = old.index("@dataclass(frozen=True)\nclass SeededDirections:")
    old = old[:start] + sampler + old[old.index(_END) :]
    start = old.index("    def directions_sum(self, weights: Tensor)")
    old = old[:start] + summing + old[old.index(_EXECUTOR) :]
    old = old.replace("from typing import Any, Iterator, Literal", "from typing import Any, Iterable, Iterator, Literal")
    path.write_text(old)
