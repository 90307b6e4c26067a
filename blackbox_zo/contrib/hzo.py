"""Hierarchical zeroth-order (HZO) gradient estimation for staged models (Cao, Ma, Tian; paper 003).

NOT PART OF THE ENGINE. HZO perturbs the *activations* between the stages of a white-box
staged model and reads the stages' outputs back; the engine's contract (`Oracle`: parameter
vectors in, loss values out) gives neither, so HZO cannot be written as a query plan. It
therefore lives in `blackbox_zo.contrib`: not in the estimator registry (no
`estimator.kind=hzo`), not run by `blackbox_zo.plan.execute`, not sharded under torchrun, and
its ledger counts *stage* queries, a unit of its own. `blackbox-zo experiment hzo` and the
estimator study use it directly.

WHAT IS OUR RECONSTRUCTION. Only HZO's abstract, TL;DR and figure captions were available
(`shared/papers/003_*.txt`). They state: the depth of the network is split at the midpoint
recursively ("divide-and-conquer ... decomposes the depth dimension"); "recursive
Jacobian-target propagation" gives updates "equivalent to backpropagation in direction"
(their Theorem 1); the query complexity drops from O(M L^2) to O(M L log L) for width M and
depth L (a recurrence-based proof); errors stay stable near the unitary Lipschitz limit
L_lip ~ 1 (Theorem 3), most reliably in residual networks (Fig. 1); convolutional layers use
"spatial parallel perturbation". Everything below that goes beyond those sentences is ours:

* Staged model. h_0 = x, h_l = f_l(h_{l-1}; w_l) for l = 1..L, and the per-sample loss is a
  last, weight-free stage h_{L+1} = loss(h_L, y) (the quantity is mean_b h_{L+1, b}). Stages
  must be sample-independent (no batch-norm in training mode), because one perturbation of
  activation unit j is applied to every sample of the batch at once and read back per sample.
* Targets are vector-Jacobian products. For a segment (a, b] of stages with known target
  delta_b = d loss / d h_b, the midpoint m = (a + b) // 2 gets
      delta_m[s, j] = sum_o delta_b[s, o] (F_{m->b}(h_m + mu_a e_j)[s, o] - h_b[s, o]) / mu_a,
  a forward finite difference on the ACTIVATION UNIT j of h_m (not on weights) through the
  right half F_{m->b} = f_b o ... o f_{m+1} (central: +/- mu_a, twice the cost; mu_a = `activation_mu`, default mu). Then the
  segment splits into (a, m] with target delta_m and (m, b] with target delta_b, recursively
  ("targets propagated down the recursion"). The top segment is (0, L+1] with delta_{L+1} = 1/B.
* Local weight updates. A single-stage segment (l-1, l] turns its target into the weight
  gradient by a finite difference on that stage alone:
      g[w_l, k] = sum delta_l (f_l(h_{l-1}; w_l + mu e_k) - h_l) / mu,
  i.e. coordinate-wise ZO on the local objective <delta_l, f_l(h_{l-1}; w)>, whose gradient is
  what the local target t_l = h_l - eta delta_l gives to first order. Cost d_l one-stage
  evaluations (not d_l full forward passes as weight CGE).
* Cost unit: one STAGE QUERY = one stage evaluated on the whole batch for one perturbation.
  A full forward pass is L + 1 stage queries. With forward differences the count is exact:
      forward pass                 L + 1
      activation differences       sum over splits (a, m, b) of  M_m * (b - m)
      local weight differences     sum_l d_l   (only the coordinates in `coords` if given)
  For equal widths M and n = L + 1 = 2^k this is M (n/2) log2(n) for the midpoint split
  (T(n) = 2 T(n/2) + M n/2), against M n (n-1)/2 for `split="direct"` (every delta_l from the
  loss: the O(M L^2) standard scheme) and M (n-1) for `split="chain"` (layer-by-layer, O(M L),
  but its errors compound through L finite differences instead of log2 L).
* Spatial parallel perturbation (our reading). If every stage of a right half is a
  resolution-preserving local map with receptive radius r_i (a 3x3 conv: 1), an input
  position affects only outputs within Chebyshev radius R = sum r_i. Perturbing all positions
  of one channel on a stride-k lattice, k = 2R + 1, at once leaves every output affected by at
  most one perturbed input, so the single-unit differences are recovered exactly as sums of
  the product map over the k x k window around each lattice point. A segment then costs
  C k^2 instead of C H W perturbations (when k < H or k < W).

Everything here sees values only: stage outputs and per-sample losses, never a graph.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..estimators import Estimate
from ..oracle import DEFAULT_MEMORY_CAP_BYTES, NonFiniteLossError, ParamSpace, QueryLedger

__all__ = ["StagedModel", "TorchStages", "HZO", "HZOCounts", "split_point"]


# ----------------------------------------------------------------------------- protocol


class StagedModel(ABC):
    """A network cut into stages, each a value-only function (activations in -> activations out).

    Subclasses implement the four value functions; the engine calls the `query_*` wrappers,
    which charge the ledger (one unit per stage evaluation per perturbation copy), run under
    no_grad and reject non-finite values — the staged analogue of `Oracle.query`.
    Stages are numbered 1..num_stages; theta[stage_slice(l)] are stage l's weights.
    """

    space: ParamSpace
    num_stages: int
    memory_cap_bytes: int = DEFAULT_MEMORY_CAP_BYTES

    @abstractmethod
    def stage_slice(self, l: int) -> slice: ...

    @abstractmethod
    def stage(self, l: int, w: Tensor, h: Tensor) -> Tensor:
        """f_l(h; w): [N, ...] -> [N, ...] with weights w [d_l]; sample-independent."""

    @abstractmethod
    def stage_multi(self, l: int, ws: Tensor, h: Tensor) -> Tensor:
        """f_l(h; w_p) for P weight vectors ws [P, d_l] on the same h [N, ...] -> [P, N, ...]."""

    @abstractmethod
    def sample_losses(self, h: Tensor, targets: Tensor) -> Tensor:
        """Per-sample losses [N] of the last activations h [N, ...] (targets [N, ...])."""

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(h_0, targets) from a batch; (x, y) by default."""
        x, y = batch
        return x, y

    def receptive_radius(self, l: int) -> int | None:
        """Chebyshev radius of stage l if it is a resolution-preserving local map, else None."""
        return None

    # -- accounting wrappers ------------------------------------------------------------

    @property
    def ledger(self) -> QueryLedger:
        ledger = self.__dict__.get("_ledger")
        if ledger is None:
            ledger = self.__dict__["_ledger"] = QueryLedger()
        return ledger

    @ledger.setter
    def ledger(self, value: QueryLedger) -> None:
        self.__dict__["_ledger"] = value

    def query_stage(self, l: int, w: Tensor, h: Tensor, copies: int) -> Tensor:
        self.ledger.charge(copies)
        with torch.no_grad():
            out = self.stage(l, w, h)
        return _finite(out, f"stage {l}")

    def query_stage_multi(self, l: int, ws: Tensor, h: Tensor) -> Tensor:
        self.ledger.charge(ws.shape[0])
        with torch.no_grad():
            out = self.stage_multi(l, ws, h)
        return _finite(out, f"stage {l}")

    def query_losses(self, h: Tensor, targets: Tensor, copies: int) -> Tensor:
        self.ledger.charge(copies)
        with torch.no_grad():
            out = self.sample_losses(h, targets)
        return _finite(out, "loss stage")


def _finite(t: Tensor, what: str) -> Tensor:
    if not torch.isfinite(t).all():
        raise NonFiniteLossError(f"{what} returned {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    return t


class TorchStages(StagedModel):
    """A staged model from torch modules: `net` is an nn.Sequential whose children are the stages.

    `loss_fn(out, y)` must return per-sample losses (e.g. `F.cross_entropy(..., reduction="none")`).
    `radii[l-1]` is stage l's receptive radius for spatial parallel perturbation (None: not local).
    """

    def __init__(self, net: nn.Sequential, loss_fn=None, radii: Sequence[int | None] | None = None):
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError("HZO needs sample-independent stages: put batch-norm layers in eval mode (net.eval())")
        self.net = net
        self.stages = list(net.children())
        self.num_stages = len(self.stages)
        self.loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
        self.space = ParamSpace.from_module(net)
        self.radii = list(radii) if radii is not None else [None] * self.num_stages
        if len(self.radii) != self.num_stages:
            raise ValueError(f"radii has {len(self.radii)} entries for {self.num_stages} stages")
        self._slices, self._names = [], []
        for l in range(1, self.num_stages + 1):
            prefix = f"{l - 1}."
            blocks = [b for b in self.space if b.name.startswith(prefix)]
            start = blocks[0].offset if blocks else 0
            stop = blocks[-1].stop if blocks else 0
            self._slices.append(slice(start, stop))
            self._names.append([(b.name[len(prefix):], b.shape, b.offset - start, b.numel) for b in blocks])

    def stage_slice(self, l: int) -> slice:
        return self._slices[l - 1]

    def receptive_radius(self, l: int) -> int | None:
        return self.radii[l - 1]

    def _params(self, l: int, w: Tensor) -> dict[str, Tensor]:
        return {name: w[..., off : off + n].reshape(*w.shape[:-1], *shape) for name, shape, off, n in self._names[l - 1]}

    def stage(self, l: int, w: Tensor, h: Tensor) -> Tensor:
        return functional_call(self.stages[l - 1], self._params(l, w), (h,), strict=False)

    def stage_multi(self, l: int, ws: Tensor, h: Tensor) -> Tensor:
        module = self.stages[l - 1]
        return vmap(lambda p: functional_call(module, p, (h,), strict=False))(self._params(l, ws))

    def sample_losses(self, h: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(h, targets)

    def theta(self) -> Tensor:
        return self.space.flatten_module(self.net)


# ---------------------------------------------------------------------------- estimator


def split_point(a: int, b: int, split: str) -> int:
    """Where segment (a, b] (b - a >= 2) is cut: HZO's midpoint, or the two reference schemes."""
    if split == "midpoint":
        return (a + b) // 2
    if split == "direct":
        return a + 1  # every target straight from the loss: O(M L^2)
    if split == "chain":
        return b - 1  # layer by layer: O(M L), errors compound L times
    raise ValueError(f"split must be 'midpoint', 'direct' or 'chain', got {split!r}")


@dataclass
class HZOCounts:
    """Stage queries of the last estimate, by kind (forward differences: exact formula in the module doc)."""

    forward: int = 0
    activation: int = 0
    weights: int = 0
    splits: list[tuple[int, int, int, int]] = field(default_factory=list)  # (a, mid, b, perturbations)

    @property
    def total(self) -> int:
        return self.forward + self.activation + self.weights


class HZO:
    """Hierarchical ZO estimate of the weight gradient of a `StagedModel` (see the module doc).

    estimate(model, theta, batch, coords=None, seed=None) -> Estimate, where
    Estimate.queries counts STAGE queries (a full forward pass is num_stages + 1 of them).
    """

    def __init__(
        self,
        mu: float = 1e-3,
        activation_mu: float | None = None,
        scheme: Literal["forward", "central"] = "forward",
        split: Literal["midpoint", "direct", "chain"] = "midpoint",
        spatial_parallel: bool = True,
    ):
        activation_mu = mu if activation_mu is None else activation_mu
        if not mu > 0 or not activation_mu > 0:
            raise ValueError(f"mu and activation_mu must be > 0, got mu={mu}, activation_mu={activation_mu}")
        if scheme not in ("forward", "central"):
            raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        split_point(0, 2, split)  # validates the name
        self.mu, self.activation_mu = float(mu), float(activation_mu)
        self.scheme, self.split, self.spatial_parallel = scheme, split, spatial_parallel
        self.last_counts = HZOCounts()

    def __repr__(self) -> str:
        return f"HZO(mu={self.mu}, activation_mu={self.activation_mu}, scheme={self.scheme!r}, split={self.split!r}, spatial_parallel={self.spatial_parallel})"

    def estimate(self, model: StagedModel, theta: Tensor, batch: Any, coords: Tensor | None = None, seed=None) -> Estimate:
        counts = self.last_counts = HZOCounts()
        start_total = model.ledger.total
        L = model.num_stages
        ws = [None] + [theta[model.stage_slice(l)] for l in range(1, L + 1)]
        h0, targets = model.split_batch(batch)
        n_batch = h0.shape[0]
        hs = [h0]
        for l in range(1, L + 1):
            hs.append(model.query_stage(l, ws[l], hs[-1], copies=1))
        hs.append(model.query_losses(hs[L], targets, copies=1))
        counts.forward = L + 1
        deltas = {L + 1: torch.full((n_batch,), 1.0 / n_batch, dtype=hs[L + 1].dtype, device=theta.device)}
        grad = torch.zeros_like(theta)
        keep = None
        if coords is not None:
            keep = torch.zeros(theta.numel(), dtype=torch.bool, device=theta.device)
            keep[coords.to(device=theta.device, dtype=torch.long)] = True
        stack = [(0, L + 1)]
        while stack:
            a, b = stack.pop()
            if b - a == 1:
                if b <= L:
                    counts.weights += self._local_weights(model, ws, hs, b, deltas[b], grad, keep)
                continue
            mid = split_point(a, b, self.split)
            deltas[mid], perturbations = self._target(model, ws, hs, targets, mid, b, deltas[b])
            counts.activation += perturbations * (b - mid) * (2 if self.scheme == "central" else 1)
            counts.splits.append((a, mid, b, perturbations))
            stack.append((mid, b))
            stack.append((a, mid))
        queries = model.ledger.total - start_total
        assert queries == counts.total, (queries, counts)  # the ledger and the formula agree
        return Estimate(grad, queries, float(hs[L + 1].mean()))

    # -- targets: finite differences on activation units ---------------------------------

    def _right_half(self, model, ws, targets, mid, b, h: Tensor, copies: int) -> Tensor:
        for l in range(mid + 1, b + 1):
            if l <= model.num_stages:
                h = model.query_stage(l, ws[l], h, copies=copies)
            else:
                h = model.query_losses(h, targets.repeat(copies, *([1] * (targets.dim() - 1))), copies=copies)
        return h

    def _lattice(self, model, hs, mid, b) -> int | None:
        """Lattice stride k for spatial parallel perturbation of h_mid through (mid, b], or None."""
        if not self.spatial_parallel or b > model.num_stages or hs[mid].dim() != 4 or hs[b].dim() != 4:
            return None
        radii = [model.receptive_radius(l) for l in range(mid + 1, b + 1)]
        if any(r is None for r in radii) or hs[mid].shape[-2:] != hs[b].shape[-2:]:
            return None
        k = 2 * sum(radii) + 1
        height, width = hs[mid].shape[-2:]
        return k if (k < height or k < width) else None

    def _target(self, model, ws, hs, targets, mid, b, delta_b) -> tuple[Tensor, int]:
        """delta_mid = J_{mid->b}^T delta_b by finite differences on the units of h_mid."""
        h = hs[mid]
        n_batch, unit_shape = h.shape[0], h.shape[1:]
        k = self._lattice(model, hs, mid, b)
        if k is None:  # one perturbation per unit
            group = torch.arange(math.prod(unit_shape), device=h.device).view(unit_shape)
        else:  # one perturbation per (channel, lattice offset)
            channels, height, width = unit_shape
            ii = torch.arange(height, device=h.device) % k
            jj = torch.arange(width, device=h.device) % k
            kh, kw = min(k, height), min(k, width)
            group = (torch.arange(channels, device=h.device).view(-1, 1, 1) * kh + ii.view(1, -1, 1)) * kw + jj.view(1, 1, -1)
        n_groups = int(group.max()) + 1
        widest = max(t[0].numel() for t in hs[mid : b + 1])
        per_copy = n_batch * widest * h.element_size() * 4  # a few live activations per copy
        chunk = max(1, model.memory_cap_bytes // max(1, per_copy))
        base_out = hs[b]
        contributions = []
        for g0 in range(0, n_groups, chunk):
            gs = torch.arange(g0, min(n_groups, g0 + chunk), device=h.device)
            pattern = (group.unsqueeze(0) == gs.view(-1, *([1] * group.dim()))).to(h.dtype)  # [G, *units]
            copies = gs.numel()

            def run(step: float) -> Tensor:
                perturbed = (h.unsqueeze(0) + step * pattern.unsqueeze(1)).reshape(copies * n_batch, *unit_shape)
                return self._right_half(model, ws, targets, mid, b, perturbed, copies).view(copies, *base_out.shape)

            if self.scheme == "forward":
                diff = (run(self.activation_mu) - base_out.unsqueeze(0)) / self.activation_mu
            else:
                diff = (run(self.activation_mu) - run(-self.activation_mu)) / (2 * self.activation_mu)
            prod = diff * delta_b.unsqueeze(0)  # [G, B, *out]
            if k is None:
                contributions.append(prod.reshape(copies, n_batch, -1).sum(-1))  # [G, B]
            else:
                contributions.append(prod.sum(2))  # [G, B, H, W]: sum over output channels
        contrib = torch.cat(contributions)
        if k is None:
            return contrib.T.reshape(n_batch, *unit_shape).contiguous(), n_groups
        # Sum each product map over the k x k window around every position (zero padding), then
        # read position (c, i, j) from its own group's map: exact, as windows of one group are disjoint.
        radius = (k - 1) // 2
        ones = torch.ones(1, 1, k, k, dtype=contrib.dtype, device=contrib.device)
        windows = F.conv2d(contrib.reshape(-1, 1, *contrib.shape[-2:]), ones, padding=radius).view(contrib.shape)
        channels, height, width = unit_shape
        g_index = group.reshape(-1)  # group of every unit (c, i, j)
        i_index = torch.arange(height, device=h.device).view(1, -1, 1).expand(channels, height, width).reshape(-1)
        j_index = torch.arange(width, device=h.device).view(1, 1, -1).expand(channels, height, width).reshape(-1)
        out = windows[g_index, :, i_index, j_index]  # [C*H*W, B]
        return out.T.reshape(n_batch, *unit_shape).contiguous(), n_groups

    # -- local weight updates -------------------------------------------------------------

    def _local_weights(self, model, ws, hs, l, delta_l, grad, keep) -> int:
        """Gradient of stage l's weights from its target: coordinate differences on this stage only."""
        sl = model.stage_slice(l)
        d_l = sl.stop - sl.start
        if d_l == 0:
            return 0
        local = torch.arange(d_l, device=grad.device)
        if keep is not None:
            local = local[keep[sl]]
        if local.numel() == 0:
            return 0
        w, h_in, base_out = ws[l], hs[l - 1], hs[l]
        per_copy = base_out.numel() * base_out.element_size() * 4
        chunk = max(1, model.memory_cap_bytes // max(1, per_copy))
        for c0 in range(0, local.numel(), chunk):
            c = local[c0 : c0 + chunk]
            rows = torch.arange(c.numel(), device=grad.device)

            def run(step: float) -> Tensor:
                wp = w.unsqueeze(0).repeat(c.numel(), 1)
                wp[rows, c] += step
                return model.query_stage_multi(l, wp, h_in)

            if self.scheme == "forward":
                diff = (run(self.mu) - base_out.unsqueeze(0)) / self.mu
            else:
                diff = (run(self.mu) - run(-self.mu)) / (2 * self.mu)
            grad[sl.start + c] = (diff * delta_l.unsqueeze(0)).reshape(c.numel(), -1).sum(1)
        return local.numel() * (2 if self.scheme == "central" else 1)
