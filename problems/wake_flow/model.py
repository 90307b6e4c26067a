"""Corrector networks C_theta for the wake flow (DeepZero Appx. H; Um et al. 2020).

As in the reference code: the network sees the velocity on the cell grid (the x-faces
without the last x-face, the y-faces without the last y-face: ``[B, 2, nx, ny]``) and
the Reynolds number as a constant third channel, each divided by its standard deviation
over the training data (std of the absolute values, as the reference computes it); its
two output channels are multiplied back by the velocity standard deviations and padded
with a zero last face to the staggered layout, so the outermost faces are never corrected.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WakeCorrector", "make_corrector", "CORRECTOR_SIZES"]


class WakeCorrector(nn.Module):
    """conv 5x5 3->h1, ReLU, [conv 5x5 h1->h2, ReLU, ...] conv 5x5 -> 2 ('same' zero padding)."""

    def __init__(self, channels: tuple[int, ...], out_init_scale: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 5, padding=2), nn.ReLU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, 2, 5, padding=2))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():  # a small last layer: training starts close to the uncorrected solver
            self.net[-1].weight.mul_(out_init_scale)
            self.net[-1].bias.mul_(out_init_scale)
        self.register_buffer("in_scale", torch.ones(3))  # 1 / std of (|ux|, |uy|, |Re|)
        self.register_buffer("out_scale", torch.ones(2))  # std of (|ux|, |uy|)

    def set_normalisation(self, std_ux: float, std_uy: float, std_re: float) -> None:
        for name, v in (("std_ux", std_ux), ("std_uy", std_uy), ("std_re", std_re)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.in_scale.copy_(torch.tensor([1 / std_ux, 1 / std_uy, 1 / std_re]))
        self.out_scale.copy_(torch.tensor([std_ux, std_uy]))

    def forward(self, state: Tensor, reynolds: Tensor) -> Tensor:
        """state [B, 2, nx+1, ny+1] (padded staggered), reynolds [B] -> correction, same layout."""
        b, _, nx1, ny1 = state.shape
        vel = state[:, :, : nx1 - 1, : ny1 - 1]  # the cell grid: drop the last face of each component
        re = (reynolds.reshape(b, 1, 1, 1) * self.in_scale[2]).expand(b, 1, nx1 - 1, ny1 - 1)
        x = torch.cat([vel * self.in_scale[:2].view(1, 2, 1, 1), re.to(vel)], dim=1)
        out = self.net(x) * self.out_scale.view(1, 2, 1, 1)
        return nn.functional.pad(out, (0, 1, 0, 1))


# name -> hidden channels. "paper": the reference's 56,898-parameter network (Appx. H).
CORRECTOR_SIZES = {"paper": (32, 64), "medium": (16,), "small": (8,), "tiny": (4,)}


def make_corrector(size: str, out_init_scale: float = 0.1) -> WakeCorrector:
    if size not in CORRECTOR_SIZES:
        raise ValueError(f"corrector size must be one of {', '.join(CORRECTOR_SIZES)}, got {size!r}")
    return WakeCorrector(CORRECTOR_SIZES[size], out_init_scale=out_init_scale)
