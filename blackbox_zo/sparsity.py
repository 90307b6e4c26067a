"""DeepZero gradient sparsity: ZO-GraSP scores, layer-wise pruning ratios, dynamic Sparse-CGE.

The pipeline (DeepZero, Sec. 4 and Algorithms 1-2 of `shared/papers/001_*.txt`):

1. **ZO-GraSP** (eq. (3)): at initialization, on one balanced batch,
   ``S = -theta * (g(theta + mu g) - g(theta)) / mu`` with ``g`` an RGE estimate
   (q directions). Both RGE calls use the same seed, hence the same directions and the
   same batch (common random numbers), so the difference measures the
   Hessian-gradient product ``H g`` of eq. (2) and not fresh estimator noise.
   Cost: exactly ``2 (q + 1)`` queries (forward RGE), charged to the ``prune`` phase.
2. **Ranking**: GraSP (Wang et al. 2020) removes the weights with the *largest*
   scores; the DeepZero reference code keeps the largest ``|score|`` (option
   ``ranking="abs"``).
3. **Layer-wise pruning ratios (LPR)**: the global ranking at a target sparsity gives
   each block of the `ParamSpace` a number of kept coordinates; the mask itself is
   then thrown away (the model stays dense).
4. **Dynamic sparse sampler** (Algorithm 2, lines 3-4): every K epochs a fresh random
   coordinate set per block obeying that block's ratio; the trainer hands it to CGE
   as ``coords`` (Sparse-CGE). The set of period ``p = epoch // K`` is a pure function
   of ``(seed, p)``, so a resumed run continues the same sequence.

Baselines: random ratios (uniform: every block keeps the same fraction) and magnitude
ratios (global ``|theta|`` ranking). FO-GraSP (exact ``H g`` by double backward) lives
in `problems/experiments/fo_grasp_reference.py` and is never used on the ZO path.

Interaction with momentum / weight decay: Sparse-CGE writes zeros into the unselected
coordinates of ``p.grad``; ``torch.optim.SGD`` still moves them by their momentum
buffer and their weight decay (as in the DeepZero reference code). `freeze_unselected`
is the masked alternative (``sparsity.freeze_unselected=true``). See docs/sparsity.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from .estimators import RGE
from .oracle import Oracle, ParamSpace

__all__ = [
    "GraspScores",
    "zo_grasp_scores",
    "prunable_mask",
    "pruning_order_key",
    "global_keep_mask",
    "LayerRatios",
    "layer_ratios",
    "uniform_ratios",
    "magnitude_scores",
    "random_scores",
    "DynamicSparseSampler",
    "balanced_indices",
    "build_sparse_sampler",
    "grasp_query_cost",
    "freeze_unselected",
]

Ranking = Literal["largest", "abs"]


# ------------------------------------------------------------------------- ZO-GraSP


@dataclass
class GraspScores:
    scores: Tensor  # [d], S of eq. (3) (or eq. (2) for the FO reference)
    hessian_grad: Tensor  # [d], the estimate of H g
    grad: Tensor  # [d], the gradient estimate at theta used as the direction
    queries: int


def grasp_query_cost(q: int) -> int:
    """Queries of `zo_grasp_scores` with forward RGE: two estimates of q + 1 queries each."""
    return 2 * (int(q) + 1)


def zo_grasp_scores(
    oracle: Oracle,
    theta: Tensor,
    batch: Any,
    *,
    q: int = 192,
    mu: float = 5e-3,
    seed: int = 0,
    distribution: Literal["gaussian", "sphere"] = "gaussian",
) -> GraspScores:
    """ZO-GraSP scores, DeepZero eq. (3): S = -theta * (g(theta + mu g) - g(theta)) / mu.

    `g` is a forward RGE with q directions; one step `mu` serves both the RGE finite
    differences and the Hessian-gradient difference, as in DeepZero. The two RGE calls are
    query plans with the same `seed`, hence the same q directions (common random numbers: a
    seeded direction depends only on the seed and its index, not on the oracle's chunk, which
    may change between the calls), and the same batch. All 2(q + 1) queries are charged to the `prune` phase.
    """
    if q < 1:
        raise ValueError(f"ZO-GraSP: q must be >= 1, got {q}")
    if not mu > 0:
        raise ValueError(f"ZO-GraSP: mu must be > 0, got {mu}")
    rge = RGE(q=q, mu=mu, distribution=distribution, scheme="forward")
    with torch.no_grad(), oracle.ledger.phase("prune"):
        oracle.ledger.ensure_available(grasp_query_cost(q))
        g0 = rge.estimate(oracle, theta, batch, seed=seed)
        g1 = rge.estimate(oracle, theta + mu * g0.grad, batch, seed=seed)
    hg = (g1.grad - g0.grad) / mu
    return GraspScores(scores=-theta * hg, hessian_grad=hg, grad=g0.grad, queries=g0.queries + g1.queries)


def magnitude_scores(theta: Tensor) -> Tensor:
    """Pruning scores of magnitude pruning: the smallest |theta| is pruned first."""
    return -theta.abs()


def random_scores(d: int, seed: int) -> Tensor:
    """Uniformly random scores (a random global mask; its per-block ratios are ~ uniform)."""
    return torch.rand(d, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


# -------------------------------------------------------------------- masks, ratios


def prunable_mask(space: ParamSpace, weights_only: bool = True, device: torch.device | str | None = None) -> Tensor:
    """Bool [d]: coordinates that may be sparsified. By default only blocks with >= 2 dims
    (conv / linear weights); biases and norm parameters (1-D) always stay dense."""
    mask = torch.zeros(space.dim, dtype=torch.bool, device=device)
    for b in space:
        if not weights_only or len(b.shape) >= 2:
            mask[b.slice] = True
    return mask


def pruning_order_key(scores: Tensor, ranking: Ranking = "largest") -> Tensor:
    """Key whose largest entries are pruned first.

    "largest": GraSP (Wang et al. 2020) removes the weights with the largest S = -theta * Hg
    (removing them reduces the gradient flow least, or even increases it).
    "abs": the DeepZero reference code passes |S| to `torch.nn.utils.prune.L1Unstructured`,
    which removes the *smallest* |S| and keeps the largest |S|; the key is therefore -|S|.
    """
    if ranking == "largest":
        return scores
    if ranking == "abs":
        return -scores.abs()
    raise ValueError(f"ranking must be 'largest' or 'abs', got {ranking!r}")


def global_keep_mask(scores: Tensor, sparsity: float, prunable: Tensor, ranking: Ranking = "largest") -> Tensor:
    """Bool [d]: the global mask at `sparsity` (fraction of prunable coordinates removed).

    Exactly round((1 - sparsity) * n_prunable) prunable coordinates are kept: those with
    the smallest pruning key (ties by index, deterministic). Non-prunable ones are kept.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scores.shape != prunable.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and prunable {tuple(prunable.shape)} differ in shape")
    if not torch.isfinite(scores).all():
        raise ValueError("pruning scores contain NaN or inf")
    key = pruning_order_key(scores, ranking).to(torch.float64)
    idx = torch.nonzero(prunable).squeeze(1)
    n_keep = int(round((1.0 - sparsity) * idx.numel()))
    order = torch.argsort(key[idx], stable=True)  # ascending: the first n_keep are kept
    keep = ~prunable.clone()
    keep[idx[order[:n_keep]]] = True
    return keep


@dataclass
class LayerRatios:
    """Per block: how many coordinates a step estimates (`keep`) out of `numel`."""

    keep: dict[str, int]
    numel: dict[str, int]
    prunable: dict[str, bool] = field(default_factory=dict)

    def pruning_ratio(self, name: str) -> float:
        return 1.0 - self.keep[name] / self.numel[name]

    @property
    def total_keep(self) -> int:
        return sum(self.keep.values())

    def prunable_sparsity(self) -> float:
        """Global sparsity over the prunable blocks."""
        n = sum(v for k, v in self.numel.items() if self.prunable.get(k, True))
        kept = sum(v for k, v in self.keep.items() if self.prunable.get(k, True))
        return 1.0 - kept / max(1, n)

    def as_dict(self) -> dict[str, Any]:
        return {
            name: {"keep": self.keep[name], "numel": self.numel[name], "prunable": self.prunable.get(name, True),
                   "pruning_ratio": round(self.pruning_ratio(name), 6)}
            for name in self.keep
        }


def layer_ratios(space: ParamSpace, keep_mask: Tensor, prunable: Tensor | None = None) -> LayerRatios:
    """LPRs: the number of kept coordinates of each block under a global mask."""
    if keep_mask.shape != (space.dim,):
        raise ValueError(f"keep_mask must have shape ({space.dim},), got {tuple(keep_mask.shape)}")
    prunable = prunable_mask(space, weights_only=False) if prunable is None else prunable
    return LayerRatios(
        keep={b.name: int(keep_mask[b.slice].sum()) for b in space},
        numel={b.name: b.numel for b in space},
        prunable={b.name: bool(prunable[b.slice].any()) for b in space},
    )


def uniform_ratios(space: ParamSpace, sparsity: float, prunable: Tensor) -> LayerRatios:
    """Every prunable block keeps the same fraction, distributed so the global count is exact
    (largest-remainder rounding)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    blocks = [b for b in space if bool(prunable[b.slice].any())]
    n_total = sum(b.numel for b in blocks)
    n_keep = int(round((1.0 - sparsity) * n_total))
    exact = [n_keep * b.numel / max(1, n_total) for b in blocks]
    keep = [int(x) for x in exact]
    for i in sorted(range(len(blocks)), key=lambda i: exact[i] - keep[i], reverse=True)[: n_keep - sum(keep)]:
        keep[i] += 1
    counts = {b.name: b.numel for b in space}
    counts.update({b.name: k for b, k in zip(blocks, keep)})
    return LayerRatios(keep=counts, numel={b.name: b.numel for b in space},
                       prunable={b.name: bool(prunable[b.slice].any()) for b in space})


# ------------------------------------------------------------------------- sampler


class DynamicSparseSampler:
    """Algorithm 2, lines 3-4: every K epochs a fresh random coordinate set obeying the LPRs.

    `coords(epoch)` returns the sorted flat coordinates of period `epoch // K`: for each
    block, `keep[block]` coordinates drawn uniformly without replacement. The draw is a
    pure function of (seed, period), so the sequence is reproducible and a resume from
    `load_state_dict` continues it exactly.
    """

    def __init__(self, space: ParamSpace, ratios: LayerRatios, every_k_epochs: int = 5, seed: int = 0):
        if every_k_epochs < 1:
            raise ValueError(f"every_k_epochs must be >= 1, got {every_k_epochs}")
        for b in space:
            k = ratios.keep.get(b.name)
            if k is None or not 0 <= k <= b.numel:
                raise ValueError(f"block {b.name!r}: keep count {k} outside [0, {b.numel}]")
        self.space, self.ratios = space, ratios
        self.every_k_epochs, self.seed = int(every_k_epochs), int(seed)
        self._period: int | None = None
        self._coords: Tensor | None = None
        self.resamples = 0  # how many distinct periods were drawn (for reports)

    @property
    def size(self) -> int:
        return self.ratios.total_keep

    def period(self, epoch: int) -> int:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return epoch // self.every_k_epochs

    def draw(self, period: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * int(period) + 17)
        parts = []
        for b in self.space:  # a loop over blocks (a handful), never over coordinates
            k = self.ratios.keep[b.name]
            if k == b.numel:
                parts.append(torch.arange(b.offset, b.stop))
            elif k > 0:
                parts.append(b.offset + torch.randperm(b.numel, generator=gen)[:k])
        if not parts:
            return torch.empty(0, dtype=torch.long)
        return torch.sort(torch.cat(parts)).values

    def coords(self, epoch: int) -> Tensor:
        p = self.period(epoch)
        if p != self._period or self._coords is None:
            self._coords, self._period = self.draw(p), p
            self.resamples += 1
        return self._coords

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "every_k_epochs": self.every_k_epochs,
            "keep": torch.tensor([self.ratios.keep[b.name] for b in self.space], dtype=torch.long),
            "period": -1 if self._period is None else int(self._period),
            "resamples": self.resamples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keep = [int(k) for k in state["keep"]]
        mine = [self.ratios.keep[b.name] for b in self.space]
        if keep != mine:  # the ratios come from the problem's setup; a mismatch means another run
            raise ValueError(f"coord sampler checkpoint has keep counts {keep}, this run has {mine}")
        self.seed, self.every_k_epochs = int(state["seed"]), int(state["every_k_epochs"])
        self.resamples = int(state.get("resamples", 0))
        period = int(state["period"])
        self._period = None if period < 0 else period
        self._coords = None if self._period is None else self.draw(self._period)


# ------------------------------------------------------- momentum / weight decay


def freeze_unselected(
    optimizer: torch.optim.Optimizer, params: list[Tensor], space: ParamSpace, coords: Tensor | None
) -> Callable[[], None]:
    """The masked alternative to plain `optimizer.step()` under Sparse-CGE.

    With plain SGD + momentum (the DeepZero reference code) a coordinate left out of this
    step's set still moves: its momentum buffer keeps pushing it and weight decay shrinks
    it. Call this *before* `optimizer.step()` and the returned `restore()` *after* it:
    the unselected coordinates of every parameter and of every per-coordinate optimizer
    state (momentum buffer, Adam moments) are put back, so they do not move at all and
    resume with their old state when they are drawn again. State tensors the step created
    get zeros there (their value had the coordinate never been stepped). Cost: one masked
    copy of theta and of the state per step, no queries.
    """
    if coords is None:
        return lambda: None
    selected = torch.zeros(space.dim, dtype=torch.bool)
    selected[coords.to(torch.long).cpu()] = True
    saved = []
    for p, block in zip(params, space):
        off = (~selected[block.slice]).view(block.shape).to(p.device)
        if not bool(off.any()):
            continue
        state = optimizer.state.get(p, {})
        before = {k: v[off].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
        saved.append((p, off, p.detach()[off].clone(), before))

    def restore() -> None:
        with torch.no_grad():
            for p, off, values, before in saved:
                p[off] = values
                for k, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v[off] = before[k] if k in before else 0

    return restore


# --------------------------------------------------------------------- the recipe


def balanced_indices(labels: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """Indices of `per_class` examples of each class (all of a class if it has fewer), seeded."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    gen = torch.Generator().manual_seed(int(seed))
    labels = labels.reshape(-1)
    out = []
    for c in torch.unique(labels).tolist():  # one draw per class
        idx = torch.nonzero(labels == c).squeeze(1)
        out.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    return torch.sort(torch.cat(out)).values


def build_sparse_sampler(
    oracle: Oracle,
    theta: Tensor,
    prune_batch: Any,
    cfg: Any,
    seed: int = 0,
) -> tuple[DynamicSparseSampler, dict[str, Any]]:
    """ZO-GraSP (or a baseline) -> LPRs -> `DynamicSparseSampler`, from a `SparsityConfig`.

    Returns the sampler and a JSON-able report (method, queries, per-block ratios).
    """
    space = oracle.space
    prunable = prunable_mask(space, weights_only=cfg.weights_only, device=theta.device)
    queries = 0
    if cfg.method == "zo-grasp":
        res = zo_grasp_scores(oracle, theta, prune_batch, q=cfg.q, mu=cfg.mu, seed=seed)
        queries = res.queries
        ratios = layer_ratios(space, global_keep_mask(res.scores, cfg.sparsity, prunable, cfg.ranking), prunable)
    elif cfg.method == "magnitude":
        ratios = layer_ratios(space, global_keep_mask(magnitude_scores(theta), cfg.sparsity, prunable), prunable)
    elif cfg.method == "random":
        ratios = uniform_ratios(space, cfg.sparsity, prunable)
    else:
        raise ValueError(f"sparsity.method must be zo-grasp, random or magnitude, got {cfg.method!r}")
    sampler = DynamicSparseSampler(space, ratios, every_k_epochs=cfg.resample_every_epochs, seed=seed)
    report = {
        "method": cfg.method,
        "ranking": cfg.ranking,
        "sparsity": cfg.sparsity,
        "prune_queries": queries,
        "coords_per_step": sampler.size,
        "layers": ratios.as_dict(),
    }
    return sampler, report

