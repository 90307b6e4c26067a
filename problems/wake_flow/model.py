"""Corrector networks C_theta for the wake flow (DeepZero Appx. H; Um et al. 2020).

Input: the padded staggered velocity [B, 2, nx+1, ny+1] and the Reynolds number, each
divided by its standard deviation over the training data (as the reference normalises
its network input); output: a velocity correction in the same layout, multiplied back
by the velocity standard deviations and zeroed on the padding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from oracles.wake_flow import face_mask

__all__ = ["WakeCorrector", "make_corrector", "CORRECTOR_SIZES"]


class WakeCorrector(nn.Module):
    """conv 5x5 3->h1, ReLU, [conv 5x5 h1->h2, ReLU,] conv 5x5 -> 2, on normalised inputs."""

    def __init__(self, nx: int, ny: int, channels: tuple[int, ...], out_init_scale: float = 1.0):
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
        self.register_buffer("in_scale", torch.ones(3))  # 1 / std of (ux, uy, Re)
        self.register_buffer("out_scale", torch.ones(2))  # std of (ux, uy)
        self.register_buffer("mask", face_mask(nx, ny))

    def set_normalisation(self, std_ux: float, std_uy: float, std_re: float) -> None:
        for name, v in (("std_ux", std_ux), ("std_uy", std_uy), ("std_re", std_re)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.in_scale.copy_(torch.tensor([1 / std_ux, 1 / std_uy, 1 / std_re]))
        self.out_scale.copy_(torch.tensor([std_ux, std_uy]))

    def forward(self, state: Tensor, reynolds: Tensor) -> Tensor:
        b = state.shape[0]
        re = (reynolds.reshape(b, 1, 1, 1) * self.in_scale[2]).expand(b, 1, *state.shape[2:])
        x = torch.cat([state * self.in_scale[:2].view(1, 2, 1, 1), re], dim=1)
        return self.net(x) * self.out_scale.view(1, 2, 1, 1) * self.mask


# name -> hidden channels. "paper": the reference's 56,898-parameter network.
CORRECTOR_SIZES = {"paper": (32, 64), "small": (8,), "tiny": (4,)}


def make_corrector(size: str, nx: int, ny: int, out_init_scale: float = 0.1) -> WakeCorrector:
    if size not in CORRECTOR_SIZES:
        raise ValueError(f"corrector size must be one of {', '.join(CORRECTOR_SIZES)}, got {size!r}")
    return WakeCorrector(nx, ny, CORRECTOR_SIZES[size], out_init_scale=out_init_scale)
