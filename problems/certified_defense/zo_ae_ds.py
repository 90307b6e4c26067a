"""ZO-AE-DS: Zhang et al., "How to Robustify Black-Box ML Models? A Zeroth-Order Optimization
Perspective" (ICLR 2022, arXiv:2203.14195) - the baseline row of DeepZero's Table 2.

An autoencoder (encoder E, decoder Dec) sits between the denoiser D and the black box f. Dec
is frozen and merged with f into the query-only part, so the zeroth-order estimate is taken
over E's low-dimensional output z = E(D(x + delta)) instead of over parameters or pixels;
D and E are then trained first-order by the chain rule:

    l(theta, phi) = CE( f(Dec(z)), f(x) ),  z = E_phi(D_theta(x + delta))          (DS objective, = eq. (A2))
    d l / d(theta, phi) = (dz / d(theta, phi))^T  g_z,   g_z = CGE of z -> l over the d_z latent coordinates

Each image's loss depends on its own latent only, so one query perturbs coordinate j of every
image's latent at once and returns every image's partial derivative in j: a forward CGE costs
d_z + 1 loss values per step (each a batch of B images sent to f), the images go out in one
call. Two stages, as in the paper: (1) the AE is pretrained first-order on reconstruction
(clean images, white box: it is ours); (2) D (from the MSE-pretrained denoiser) and E are
trained end to end through the black box, Dec frozen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blackbox_zo.problem import TensorBatches
from blackbox_zo.rundir import atomic_write_bytes
from oracles.classifier import BlackBoxClassifier, log_probabilities
from oracles.smoothing import DnCNN, NoisyBatches

__all__ = ["AutoEncoder", "ZoAeDsSettings", "latent_cge", "pretrain_autoencoder", "train_zo_ae_ds", "AeDenoiser"]


class AutoEncoder(nn.Module):
    """A small convolutional AE for [C, H, W] images (H, W even): 2x down-sampling, then a linear latent."""

    def __init__(self, channels: int, height: int, width: int, latent: int, hidden: int = 16):
        super().__init__()
        if height % 2 or width % 2:
            raise ValueError(f"AutoEncoder needs even image sides, got {height}x{width}")
        h2, w2 = height // 2, width // 2
        self.latent = int(latent)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * hidden * h2 * w2, latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, 2 * hidden * h2 * w2), nn.ReLU(), nn.Unflatten(1, (2 * hidden, h2, w2)),
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class AeDenoiser(nn.Module):
    """Dec(E(D(z))): what the black box sees in ZO-AE-DS (for certification)."""

    def __init__(self, denoiser: DnCNN, autoencoder: AutoEncoder):
        super().__init__()
        self.denoiser, self.autoencoder = denoiser, autoencoder

    def forward(self, x: Tensor) -> Tensor:
        return self.autoencoder.decoder(self.autoencoder.encoder(self.denoiser(x)))


@dataclass
class ZoAeDsSettings:
    latent: int = 16  # d_z (8x8 digits: 64 pixels)
    mu: float = 5e-3
    lr: float = 1e-4
    epochs: int = 20
    step_every_epochs: int = 4  # the schedule shape of Appx. G (lr / 10 every 4 epochs), as our fine-tune
    gamma: float = 0.1
    batch_size: int = 64
    ae_epochs: int = 30
    ae_lr: float = 1e-3
    max_steps: int | None = None  # stop after this many steps in total (as run.max_steps)


def latent_cge(decode_and_score: Callable[[Tensor], Tensor], z: Tensor, labels: Tensor, mu: float
               ) -> tuple[Tensor, Tensor, int]:
    """Forward CGE over the latent coordinates, every image at once.

    `decode_and_score` maps latents [M, d_z] to log-probabilities [M, classes] (through the
    black box). Returns (g_z [B, d_z]: d l_b / d z_b for each image b, l [B] at z, loss values
    spent = d_z + 1). The d_z + 1 latent batches go out in one call.
    """
    b, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    points = torch.cat([z.unsqueeze(0), z.unsqueeze(0) + mu * eye.unsqueeze(1)])  # [d + 1, B, d]
    logp = decode_and_score(points.reshape(-1, d)).view(d + 1, b, -1)
    losses = -logp.gather(-1, labels.view(1, b, 1).expand(d + 1, b, 1)).squeeze(-1)  # [d + 1, B]
    grad = ((losses[1:] - losses[0]) / mu).transpose(0, 1)  # [B, d]
    return grad, losses[0], d + 1


def pretrain_autoencoder(x: Tensor, settings: ZoAeDsSettings, seed: int, progress: bool = False) -> AutoEncoder:
    """Stage 1 of ZO-AE-DS: reconstruction (MSE) on clean images, Adam, first-order (our model)."""
    torch.manual_seed(seed)
    ae = AutoEncoder(x.shape[1], x.shape[2], x.shape[3], settings.latent)
    opt = torch.optim.Adam(ae.parameters(), lr=settings.ae_lr)
    batches = TensorBatches(x, batch_size=64, seed=seed)
    for epoch in tqdm(range(settings.ae_epochs), desc="ZO-AE-DS: autoencoder", disable=not progress, leave=False):
        for i in range(batches.num_batches(epoch)):
            xb = batches.batch(epoch, i)
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(ae(xb), xb).backward()
            opt.step()
    return ae.eval()


def train_zo_ae_ds(denoiser: DnCNN, autoencoder: AutoEncoder, black_box: BlackBoxClassifier, x: Tensor,
                   labels: Tensor, sigma: float, settings: ZoAeDsSettings, seed: int, progress: bool = False
                   ) -> dict[str, Any]:
    """Stage 2 of ZO-AE-DS: D and E end to end through the black box, Dec frozen (in place).

    `labels` are the black box's own predictions on clean x (eq. (A2)); delta comes from the
    same `NoisyBatches` as our fine-tune, so both see the same noise. Returns costs.
    """
    torch.manual_seed(seed)
    decoder = autoencoder.decoder.eval().requires_grad_(False)
    encoder = autoencoder.encoder
    params = [*denoiser.parameters(), *encoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=settings.lr)
    batches = NoisyBatches(TensorBatches(x, labels, batch_size=settings.batch_size, seed=seed), sigma=sigma, seed=seed)
    steps_per_epoch = batches.num_batches(0)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: settings.gamma ** ((step // steps_per_epoch) // settings.step_every_epochs))

    def decode_and_score(z: Tensor) -> Tensor:
        with torch.no_grad():
            return log_probabilities(black_box, decoder(z))

    loss_values = 0
    images0 = black_box.queries
    losses: list[float] = []
    t0 = time.perf_counter()
    denoiser.train()
    encoder.train()
    for epoch in tqdm(range(settings.epochs), desc="ZO-AE-DS: D + E through the black box", disable=not progress,
                      leave=False):
        for i in range(steps_per_epoch):
            if epoch * steps_per_epoch + i >= total:
                break
            xb, yb, delta = batches.batch(epoch, i)
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                z = encoder(denoiser(xb + delta))
                grad, base, spent = latent_cge(decode_and_score, z.detach(), yb, settings.mu)
                if not torch.isfinite(grad).all():
                    raise FloatingPointError(f"ZO-AE-DS step {epoch * steps_per_epoch + i + 1}: non-finite estimate")
                z.backward(grad / xb.shape[0])  # chain rule through E and D for the batch mean
            opt.step()
            sched.step()
            loss_values += spent
            losses.append(float(base.mean()))
    denoiser.eval()
    encoder.eval()
    return {"steps": total, "loss_queries": loss_values,
            "queries_per_step": settings.latent + 1, "black_box_images": black_box.queries - images0,
            "final_loss": float(sum(losses[-steps_per_epoch:]) / max(1, len(losses[-steps_per_epoch:]))),
            "seconds": round(time.perf_counter() - t0, 2)}


def save_ae_ds(path: Path, denoiser: DnCNN, autoencoder: AutoEncoder, info: dict[str, Any]) -> None:
    state = {"denoiser": denoiser.state_dict(), "autoencoder": autoencoder.state_dict(),
             "info": json.dumps(info), "latent": autoencoder.latent}
    atomic_write_bytes(Path(path), lambda fh: torch.save(state, fh))


def load_ae_ds(path: Path, make_denoiser: Callable[[dict[str, Tensor]], DnCNN], image_shape: tuple[int, int, int]
               ) -> tuple[AeDenoiser, dict[str, Any]]:
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    den = make_denoiser(state["denoiser"])
    ae = AutoEncoder(*image_shape, latent=int(state["latent"]))
    ae.load_state_dict(state["autoencoder"])
    return AeDenoiser(den.eval(), ae.eval()).eval(), json.loads(state["info"])

