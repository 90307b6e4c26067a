"""Subspace CGE: a linear layer's gradient from loss values, along the directions it can lie in.

For a linear layer z_i = W h_i + b (W [out, in], inputs h_i, rows i = 1..B of the batch), the
batch loss L depends on [W | b] only through the products [W | b] a_i, a_i = [h_i; 1], so

    dL/d[W | b] = sum_i g_i a_i^T,   g_i = dL/dz_i,

a matrix whose rows all lie in the row space of the batch's augmented inputs A = [H | 1]
(B x (in + 1)). Let v_1..v_r be the top-r right singular vectors of A (an SVD of a 64 x 257
matrix on digits: about 1 ms of CPU, an eighth of a step). The out * r matrices D_kj = e_k v_j^T
are orthonormal (in the Frobenius inner product) and span {G : every row of G lies in
span(v_1..v_r)}; coordinate-wise forward differences along them (DeepZero eq. (1), CGE, in this
orthonormal basis),

    c_kj = (L([W | b] + mu D_kj) - L([W | b])) / mu,     estimate = sum_kj c_kj D_kj,

give the projection of the gradient on that subspace, up to the finite-difference error
(forward: |c_kj - <grad, D_kj>| <= M mu / 2 with M the loss's curvature along D_kj; central:
O(mu^2)). With r = rank(A) the subspace holds the gradient and the estimate is the gradient
itself, with out * rank(A) + 1 queries instead of the out * (in + 1) + 1 of CGE on the layer;
with r < rank(A) it is the gradient projected on the rows' top-r principal directions (the
directions in which the batch's inputs vary most; the rest of the gradient's energy lies
along inputs' directions of smaller singular values, sum_i g_i (a_i . v) v^T).

Queries per step: out * r + 1 (forward) or 2 out r (central), whatever in is. It is still a
weight perturbation judged by loss values only (the oracle's loss is never differentiated),
but it needs the layer's inputs on the batch, which a model-loss oracle computes anyway (its
population forward keeps the unperturbed prefix for the perturbed queries): a white-box model
with a black-box loss. An oracle that exposes them implements

    layer_inputs(theta, batch, name) -> Tensor [rows, in]

(`oracles.model_loss.ModelLossOracle` does, for any nn.Linear of its module); a pure black box
(ask/tell, a remote classifier) does not, and the trainer refuses the estimator for it with one
line before the first step (`check_support`).

Determinism: the SVD of the same matrix is the same on one machine; each v_j's sign is fixed
(its entry of largest magnitude made positive, as scikit-learn's `svd_flip`). The estimate
c_kj D_kj does not depend on the sign in exact arithmetic (both factors flip), but a forward
difference along -D is not minus the one along D to the last bit, so the sign is fixed anyway.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Protocol, runtime_checkable

import torch
from pydantic import Field
from torch import Tensor

from .config import ConfigError, EstimatorConfig
from .estimators import Estimate, PlanEstimator, scatter_coords
from .oracle import Oracle, ParamSpace
from .plan import ExplicitDirections, QueryPlan
from .registry import ESTIMATORS

__all__ = ["SubspaceCGE", "SubspaceCGEConfig", "LayerInputs", "layer_blocks", "input_subspace",
           "subspace_directions"]


@runtime_checkable
class LayerInputs(Protocol):
    """An oracle that can say what a linear layer of its model sees on a batch (white-box model)."""

    def layer_inputs(self, theta: Tensor, batch: Any, name: str) -> Tensor:
        """The inputs [rows, in] of the linear layer `name` at parameters theta on `batch` (every
        leading dimension flattened into rows), computed without a query: no loss value is involved."""


class SubspaceCGEConfig(EstimatorConfig):
    """kind=subspace-cge: CGE on a linear layer along e_k v_j^T, v_j the batch inputs' top-r singular vectors."""

    uses_sparsity: ClassVar[bool] = False  # it searches one layer's input subspace, not a coordinate set
    kind: Literal["subspace-cge"] = Field(
        "subspace-cge", description="CGE on a linear layer in the row space of its inputs (needs an oracle with "
        "layer_inputs, e.g. a model's loss)")
    mu: float = Field(1e-3, gt=0, description="finite-difference step, for every estimator; here along unit "
                      "directions e_k v_j^T of the layer's [W | b]")
    rank: int = Field(16, ge=1, le=4096, description="r: singular vectors of the batch's inputs [H | 1] per step; "
                      "out * r + 1 queries a step (forward); r >= rank([H | 1]) gives the layer's exact gradient")
    blocks: Optional[list[str]] = Field(
        None, min_length=1, max_length=1, description="the linear layer, by module name (e.g. [\"6\"]: a "
        "Sequential's layer 6, weight and bias); none: the last 2-D weight block of the parameter space")


def layer_blocks(space: ParamSpace, name: str | None) -> tuple[str, Any, Any]:
    """(layer name, its weight Block [out, in], its bias Block or None). ValueError, one line, when the
    space has no 2-D `name.weight` (none given: the last 2-D `*.weight` block)."""
    if name is None:
        weights = [b for b in space if b.name.endswith(".weight") and len(b.shape) == 2]
        if not weights:
            raise ValueError(f"subspace-cge: no 2-D '*.weight' block in the parameter space (blocks: "
                             f"{', '.join(space.names)}); set estimator.blocks to the linear layer")
        name = weights[-1].name[: -len(".weight")]
    names = set(space.names)
    if f"{name}.weight" not in names:
        raise ValueError(f"subspace-cge: estimator.blocks={name!r} names no layer with a trainable weight "
                         f"(blocks: {', '.join(space.names)})")
    weight = space[f"{name}.weight"]
    if len(weight.shape) != 2:
        raise ValueError(f"subspace-cge: {name}.weight has shape {list(weight.shape)}, not [out, in]: only a "
                         "linear layer's gradient lies in its inputs' row space")
    bias = space[f"{name}.bias"] if f"{name}.bias" in names else None
    return name, weight, bias


def input_subspace(inputs: Tensor, rank: int, with_bias: bool) -> Tensor:
    """V [r', in (+1)]: the top-r' right singular vectors of [H | 1] (or H), r' = min(rank, rows, cols), each
    with its entry of largest magnitude positive (a deterministic sign)."""
    h = inputs.reshape(-1, inputs.shape[-1])
    if with_bias:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)
    _, _, vh = torch.linalg.svd(h, full_matrices=False)
    v = vh[: min(rank, vh.shape[0])]
    pivot = v.abs().argmax(dim=1, keepdim=True)
    return v * torch.sign(v.gather(1, pivot))


def subspace_directions(v: Tensor, out: int, weight_numel: int, with_bias: bool) -> Tensor:
    """[out * r, out * in (+ out)]: row (k, j) is D_kj = e_k v_j^T laid out as the layer's flat [weight, bias]
    coordinates (weight row-major [out, in], then bias [out]). Rows are orthonormal when V's rows are."""
    r = v.shape[0]
    eye = torch.eye(out, dtype=v.dtype, device=v.device)
    n_in = weight_numel // out
    w = (eye[:, None, :, None] * v[None, :, None, :n_in]).reshape(out * r, weight_numel)
    if not with_bias:
        return w
    b = (eye[:, None, :] * v[None, :, None, n_in]).reshape(out * r, out)
    return torch.cat([w, b], dim=1)


@ESTIMATORS.register("subspace-cge")
class SubspaceCGE(PlanEstimator):
    """CGE along D_kj = e_k v_j^T on one linear layer, v_j the top-r right singular vectors of the step's
    batch inputs [H | 1] (see the module doc): the layer's gradient projected on that subspace, exact for
    r = rank([H | 1]). out * r + 1 queries a step (forward), 2 out r (central)."""

    config_model = SubspaceCGEConfig

    def __init__(self, rank: int = 16, mu: float = 1e-3, scheme: Literal["forward", "central"] = "forward",
                 layer: str | None = None, chunk: int | None = None):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not mu > 0:
            raise ValueError(f"mu must be > 0, got {mu}")
        if scheme not in ("forward", "central"):
            raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
        self.rank, self.mu, self.scheme = int(rank), float(mu), scheme
        self.layer, self.chunk = layer, chunk

    @classmethod
    def from_config(cls, cfg: Any) -> "SubspaceCGE":
        return cls(rank=cfg.rank, mu=cfg.mu, scheme=cfg.scheme, layer=cfg.blocks[0] if cfg.blocks else None)

    @classmethod
    def check_support(cls, cfg: Any, oracle: Oracle) -> None:
        """ConfigError (one line) before a run starts when `oracle` cannot serve this estimator."""
        if not isinstance(oracle, LayerInputs):
            raise ConfigError(f"estimator=subspace-cge needs the inputs of a linear layer, and oracle "
                              f"{getattr(oracle, 'name', type(oracle).__name__)!r} is a black box that does not "
                              "expose them (no layer_inputs); use cge, rge or es")
        try:
            name, _, _ = layer_blocks(oracle.space, cfg.blocks[0] if cfg.blocks else None)
            check = getattr(oracle, "check_linear_layer", None)
            if check is not None:
                check(name)
        except ValueError as exc:
            raise ConfigError(f"estimator.blocks: {exc}") from None

    def __repr__(self) -> str:
        return f"SubspaceCGE(rank={self.rank}, mu={self.mu}, scheme={self.scheme!r}, layer={self.layer!r})"

    def layer_coords(self, space: ParamSpace) -> tuple[str, Tensor, int, int, bool]:
        """(layer, flat coordinates [weight, bias], out, weight numel, has bias)."""
        name, weight, bias = layer_blocks(space, self.layer)
        parts = [torch.arange(weight.offset, weight.stop)]
        if bias is not None:
            parts.append(torch.arange(bias.offset, bias.stop))
        return name, torch.cat(parts), int(weight.shape[0]), weight.numel, bias is not None

    def plan(self, theta, *, coords=None, seed=None, chunk=256, inputs: Tensor | None = None,
             space: ParamSpace | None = None) -> QueryPlan:
        """The directions D_kj for the batch whose layer inputs are `inputs` [rows, in]; `space` is the
        oracle's parameter space. No seed: the plan is a function of theta and the batch."""
        if inputs is None or space is None:
            raise ValueError("subspace-cge plans from the layer's inputs on the step's batch (inputs=, space=); "
                             "call estimate(oracle, ...) with an oracle that has layer_inputs")
        name, layer_coords, out, weight_numel, with_bias = self.layer_coords(space)
        if coords is not None and not torch.equal(coords.to(layer_coords.device, torch.long), layer_coords):
            raise ValueError(f"subspace-cge searches layer {name!r} (weight and bias); the step's coordinates "
                             "are another set (estimator.blocks must name the layer)")
        n_in = weight_numel // out
        if inputs.shape[-1] != n_in:
            raise ValueError(f"subspace-cge: layer {name!r} has {n_in} inputs, layer_inputs gave {inputs.shape[-1]}")
        v = input_subspace(inputs.to(theta.dtype), self.rank, with_bias)
        directions = subspace_directions(v, out, weight_numel, with_bias)
        return QueryPlan.along(theta, ExplicitDirections(directions, int(self.chunk or chunk)), self.mu, self.scheme,
                               layer_coords.to(theta.device), label="subspace-CGE estimate")

    def combine(self, plan, losses) -> Estimate:
        # orthonormal directions: the projection of the gradient is sum_kj c_kj D_kj
        acc = losses.directions_sum(losses.differences().to(plan.theta.dtype))
        return Estimate(scatter_coords(plan.theta, plan.coords, acc), losses.queries, losses.base_loss())

    def step_plan(self, oracle: Oracle, theta: Tensor, batch: Any, *, coords: Tensor | None = None,
                  seed: int | None = None, chunk: int | None = None) -> QueryPlan:
        """The plan for this batch: the layer's inputs from the oracle (no query), their SVD, the directions."""
        if not isinstance(oracle, LayerInputs):
            raise ValueError(f"subspace-cge needs an oracle with layer_inputs (a white-box model); "
                             f"{getattr(oracle, 'name', type(oracle).__name__)!r} has none")
        name = layer_blocks(oracle.space, self.layer)[0]
        inputs = oracle.layer_inputs(theta, batch, name)
        return self.plan(theta, coords=coords, chunk=chunk or self.chunk or max(1, oracle.chunk_size(theta)),
                         inputs=inputs, space=oracle.space)
