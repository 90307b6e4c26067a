"""Correctors C_theta for any simulator, sized from its state shape (DeepZero Appx. H; Um et al. 2020).

* a **grid** state ``(channels, *grid)`` with a 1-, 2- or 3-D grid gets a convolutional
  corrector: ``depth`` hidden conv layers of ``width`` channels (kernel ``kernel``, 'same'
  padding in the simulator's padding mode, ReLU), then a conv back to ``channels``;
* a **vector** state ``(D,)`` gets an MLP: ``depth`` hidden layers of ``width`` units, ReLU,
  then a linear layer back to D.

Both see the state divided by the training data's scale (per channel, or per entry of a
vector) and every condition divided by its scale, as constant extra channels (grid) or extra
inputs (vector), as the reference code feeds the Reynolds number; the output is multiplied
back by the state's scale and by the simulator's mask (padding is never corrected). The last
layer starts at `out_init_scale` times its default initialisation: corrections compound over
a rollout, so a default-sized random correction starts far worse than none.

With ``conserve=True`` the correction has zero mean over the valid entries of each channel
(of the whole vector for a vector state): it moves a conserved quantity around but never
adds or removes any. A conservative simulator (finite volumes on a periodic domain, such as
`oracles.burgers`) keeps each channel's total exactly, and so does its high-fidelity twin
averaged onto the coarse cells; an unconstrained corrector instead learns a small bias that
compounds over a rollout into a drift of the total (on the Burgers example it made the
smooth, high-viscosity test run worse than no correction at all; docs/sol.md).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["GridCorrector", "VectorCorrector", "build_corrector", "corrector_kind", "unshrunk"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def corrector_kind(state_shape: tuple[int, ...], requested: str = "auto") -> str:
    """'conv' for (channels, *grid) with a 1- to 3-D grid, 'mlp' for a vector (D,); or what was asked."""
    if requested == "mlp":
        return "mlp"
    if requested == "conv" and not 2 <= len(state_shape) <= 4:
        raise ValueError(f"a convolutional corrector needs a state (channels, *grid) with a 1- to 3-D grid, "
                         f"got state_shape {state_shape}; use sol.corrector=mlp")
    if requested in ("conv", "auto") and 2 <= len(state_shape) <= 4:
        return "conv"
    if requested == "auto":
        return "mlp"
    raise ValueError(f"corrector must be auto, conv or mlp, got {requested!r}")


class _Scaled(nn.Module):
    def _scales(self, state_scale: Tensor, cond_scale: Tensor, mask: Tensor | None, state_shape: tuple[int, ...]):
        self.register_buffer("state_scale", state_scale.detach().clone().float())
        self.register_buffer("cond_scale", cond_scale.detach().clone().float().reshape(-1))
        self.register_buffer("mask", (torch.ones(state_shape) if mask is None else mask.detach().clone()).float())

    def _conserved(self, correction: Tensor, reduce: tuple[int, ...]) -> Tensor:
        """`correction * mask`, minus its mean over the valid entries of `reduce` when conserving."""
        correction = correction * self.mask
        if not self.conserve:
            return correction
        count = self.mask.sum(tuple(d - 1 for d in reduce), keepdim=True)
        return (correction - correction.sum(reduce, keepdim=True) / count) * self.mask

    def _shrink_last(self, layer: nn.Module, out_init_scale: float) -> None:
        with torch.no_grad():
            layer.weight.mul_(out_init_scale)
            layer.bias.mul_(out_init_scale)


class GridCorrector(_Scaled):
    """Convolutional corrector for states (channels, *grid); conditions [B] or [B, C]."""

    def __init__(self, state_shape: tuple[int, ...], n_cond: int, *, width: int = 8, depth: int = 2, kernel: int = 5,
                 padding: Literal["zeros", "circular", "replicate", "reflect"] = "zeros", out_init_scale: float = 1e-2,
                 state_scale: Tensor | None = None, cond_scale: Tensor | None = None, mask: Tensor | None = None,
                 conserve: bool = False):
        super().__init__()
        self.conserve = bool(conserve)
        channels, grid = state_shape[0], tuple(state_shape[1:])
        if len(grid) not in _CONV:
            raise ValueError(f"GridCorrector needs a 1- to 3-D grid, got state_shape {state_shape}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (for 'same' padding), got {kernel}")
        conv = _CONV[len(grid)]
        self.channels, self.grid, self.n_cond = channels, grid, int(n_cond)
        layers: list[nn.Module] = []
        c_in = channels + self.n_cond
        for _ in range(depth):
            layers += [conv(c_in, width, kernel, padding=kernel // 2, padding_mode=padding), nn.ReLU()]
            c_in = width
        layers.append(conv(c_in, channels, kernel, padding=kernel // 2, padding_mode=padding))
        self.net = nn.Sequential(*layers)
        self._shrink_last(self.net[-1], out_init_scale)
        self._scales(torch.ones(channels) if state_scale is None else state_scale,
                     torch.ones(self.n_cond) if cond_scale is None else cond_scale, mask, tuple(state_shape))

    def forward(self, state: Tensor, conditions: Tensor) -> Tensor:
        b, ones = state.shape[0], [1] * len(self.grid)
        x = state / self.state_scale.view(1, -1, *ones)
        c = conditions.reshape(b, -1).to(x) / self.cond_scale
        c = c.view(b, self.n_cond, *ones).expand(b, self.n_cond, *self.grid)
        out = self.net(torch.cat([x, c], 1)) * self.state_scale.view(1, -1, *ones)
        return self._conserved(out, tuple(range(2, 2 + len(self.grid))))


class VectorCorrector(_Scaled):
    """MLP corrector for vector states (D,); conditions [B] or [B, C]."""

    def __init__(self, state_shape: tuple[int, ...], n_cond: int, *, width: int = 32, depth: int = 2,
                 out_init_scale: float = 1e-2, state_scale: Tensor | None = None, cond_scale: Tensor | None = None,
                 mask: Tensor | None = None, conserve: bool = False):
        super().__init__()
        self.conserve = bool(conserve)
        self.state_shape, self.n_cond = tuple(state_shape), int(n_cond)
        dim = int(torch.tensor(state_shape).prod())
        layers: list[nn.Module] = []
        d_in = dim + self.n_cond
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ReLU()]
            d_in = width
        layers.append(nn.Linear(d_in, dim))
        self.net = nn.Sequential(*layers)
        self._shrink_last(self.net[-1], out_init_scale)
        self._scales(torch.ones(self.state_shape) if state_scale is None else state_scale.expand(self.state_shape),
                     torch.ones(self.n_cond) if cond_scale is None else cond_scale, mask, self.state_shape)

    def forward(self, state: Tensor, conditions: Tensor) -> Tensor:
        b = state.shape[0]
        x = (state / self.state_scale).reshape(b, -1)
        c = conditions.reshape(b, -1).to(x) / self.cond_scale
        out = self.net(torch.cat([x, c], 1)).reshape(state.shape) * self.state_scale
        return self._conserved(out, tuple(range(1, state.dim())))


def build_corrector(state_shape: tuple[int, ...], n_cond: int, *, kind: str = "auto", width: int = 8, depth: int = 2,
                    kernel: int = 5, padding: str = "zeros", out_init_scale: float = 1e-2,
                    state_scale: Tensor | None = None, cond_scale: Tensor | None = None,
                    mask: Tensor | None = None, conserve: bool = False) -> nn.Module:
    """The corrector for `state_shape` (module docstring); `kind` is auto, conv or mlp."""
    if corrector_kind(tuple(state_shape), kind) == "conv":
        return GridCorrector(tuple(state_shape), n_cond, width=width, depth=depth, kernel=kernel, padding=padding,
                             out_init_scale=out_init_scale, state_scale=state_scale, cond_scale=cond_scale, mask=mask,
                             conserve=conserve)
    return VectorCorrector(tuple(state_shape), n_cond, width=width, depth=depth, out_init_scale=out_init_scale,
                           state_scale=state_scale, cond_scale=cond_scale, mask=mask, conserve=conserve)


def unshrunk(corrector: nn.Module, out_init_scale: float) -> nn.Module:
    """A copy of `corrector` with its last layer divided by `out_init_scale`: the default-scale
    initialisation the shrink started from. ZO-GraSP scores S = -theta * Hg of a layer scaled
    by 1e-2 are ~1e-2 of the others, so a global ranking prunes that layer entirely; scored
    here, every layer competes at its natural scale (problems/sol/problem.py: sol.grasp_at)."""
    copy = deepcopy(corrector)
    last = copy.net[-1]
    with torch.no_grad():
        last.weight.div_(out_init_scale)
        last.bias.div_(out_init_scale)
    return copy
