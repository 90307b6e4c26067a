"""FO-GraSP: exact GraSP scores by double backward. A first-order REFERENCE for tests and
experiments only; the zeroth-order path (blackbox_zo.sparsity) never imports this module.

GraSP (Wang et al. 2020; DeepZero eq. (2)): S = -theta * (H g), g = grad l(theta),
H g = grad_theta [ g(theta) . stopgrad(g) ] (one Hessian-vector product by double backward).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from blackbox_zo.oracle import ParamSpace
from blackbox_zo.sparsity import GraspScores

__all__ = ["fo_grasp_scores"]


def fo_grasp_scores(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    space: ParamSpace | None = None,
) -> GraspScores:
    """Exact eq. (2) at the module's current parameters on the batch (x, y), flat in `space` order."""
    space = space or ParamSpace.from_module(module)
    params = space.params_of(module)
    with torch.enable_grad():
        loss = loss_fn(module(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        z = sum((g * g.detach()).sum() for g in grads)  # g . stopgrad(g): its gradient is H g
        hg = torch.autograd.grad(z, params)
    theta = space.flatten(params)
    hg_flat = space.flatten(list(hg))
    return GraspScores(scores=-theta * hg_flat, hessian_grad=hg_flat, grad=space.flatten([g.detach() for g in grads]),
                       queries=0)
