"""A truly non-differentiable simulator: 1-D viscous Burgers, shock-capturing finite volumes in NumPy.

    u_t + (u^2 / 2)_x = nu u_xx   on a periodic domain [0, 2 pi)

One step advances every state of a batch by `dt` with a second-order MUSCL scheme:

* reconstruction: cell slopes from a flux limiter (minmod, superbee, MC; or `first-order`,
  zero slopes: the first-order Godunov scheme, the default of the low-fidelity solver),
  ``sigma_j = limiter(u_j - u_{j-1}, u_{j+1} - u_j)``, interface states
  ``u_L = u_j + sigma_j / 2`` and ``u_R = u_{j+1} - sigma_{j+1} / 2``;
* the Godunov flux of Burgers' equation, ``F = max(max(u_L, 0)^2, min(u_R, 0)^2) / 2``
  (exact Riemann solution for the convex flux u^2/2);
* central differences for the viscous term;
* SSP-RK2 (Heun) in time, with ``ceil(dt / dt_stable)`` sub-steps per state, where
  ``dt_stable = cfl / (max|u| / dx + 2 nu / dx^2)`` is computed for each state of the batch
  on its own (so element b of a batched step is exactly a step of b alone).

The limiter (min/max/sign), the Godunov flux (max/min) and the sub-step count (ceil) are
non-smooth, and the arithmetic runs in NumPy float64: there is no torch graph, and a
state that requires grad is refused. `differentiable = False`: FO-SOL cannot run; ZO-SOL
trains a corrector through it by loss values only.

A state whose stable time step would need more than `max_substeps` sub-steps (a corrector
that blew it up), or that is not finite, comes back as NaN: the solver refuses it, as a
legacy code stops on a CFL violation. The SOL oracle turns that into a capped loss.

**High-fidelity twin** (`reference_data`): the scheme with `hifi_limiter` (MC by default;
`same`: the low-fidelity limiter) on a `hifi_factor` times finer grid, with its own (smaller)
stable sub-steps, from exact cell averages of a random smooth
start ``u0(x) = c + sum_k a_k sin(k x + phi_k)``, each fine frame averaged onto the coarse
cells (conservative restriction). The default pair is the physically meaningful one: a cheap
solver (first-order, 32 cells) whose numerical diffusion (~ |u| dx / 2, far above the
viscosity) is a systematic error a corrector can learn, against a converged second-order
reference. Each run has its own viscosity (the condition) and start;
`train_runs` runs are for training, `test_runs` held out. Generated in about a second.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .simulator import ReferenceRuns

__all__ = ["BurgersSimulator", "muscl_rhs", "LIMITERS", "cell_averages"]

LIMITERS = ("minmod", "superbee", "mc", "first-order")
VERSION = 1  # bump when the scheme changes: part of the twin data's cache key


def _minmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # (sign a + sign b) / 2 is +-1 when the signs agree and 0 otherwise
    return 0.5 * (np.sign(a) + np.sign(b)) * np.minimum(np.abs(a), np.abs(b))


def _slopes(dm: np.ndarray, dp: np.ndarray, limiter: str) -> np.ndarray:
    if limiter == "minmod":
        return _minmod(dm, dp)
    if limiter == "superbee":  # maxmod(minmod(2a, b), minmod(a, 2b))
        s1, s2 = _minmod(2 * dm, dp), _minmod(dm, 2 * dp)
        return np.where(np.abs(s1) >= np.abs(s2), s1, s2)
    if limiter == "first-order":  # zero slopes: piecewise-constant cells, the first-order Godunov scheme
        return np.zeros_like(dm)
    if limiter == "mc":  # monotonized central: minmod(2a, 2b, (a + b) / 2)
        c = 0.5 * (dm + dp)
        m = _minmod(2 * dm, 2 * dp)
        return np.where(m * c > 0, np.sign(c) * np.minimum(np.abs(m), np.abs(c)), 0.0)
    raise ValueError(f"limiter must be one of {', '.join(LIMITERS)}, got {limiter!r}")


def muscl_rhs(u: np.ndarray, nu: np.ndarray, dx: float, limiter: str = "minmod") -> np.ndarray:
    """du/dt of the semi-discrete scheme for states u [B, N] (periodic), viscosities nu [B]."""
    left, right = np.roll(u, 1, axis=1), np.roll(u, -1, axis=1)
    slope = _slopes(u - left, right - u, limiter)
    u_l = u + 0.5 * slope  # at interface j + 1/2, from cell j
    u_r = np.roll(u - 0.5 * slope, -1, axis=1)  # at interface j + 1/2, from cell j + 1
    flux = 0.5 * np.maximum(np.maximum(u_l, 0.0) ** 2, np.minimum(u_r, 0.0) ** 2)  # Godunov
    advection = -(flux - np.roll(flux, 1, axis=1)) / dx
    diffusion = nu[:, None] * (right - 2.0 * u + left) / dx**2
    return advection + diffusion


def cell_averages(cells: int, length: float, offset: np.ndarray, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Exact cell averages of c + sum_k a_k sin(k x + phi_k) on `cells` cells: [R, cells]."""
    edges = np.linspace(0.0, length, cells + 1)
    k = np.arange(1, amp.shape[1] + 1)[None, :, None]  # [1, K, 1]
    ph = phase[:, :, None]
    # (1/dx) * integral of sin(k x + phi) over a cell = (cos(k x_j + phi) - cos(k x_{j+1} + phi)) / (k dx)
    c = np.cos(k * edges[None, None, :] + ph)
    avg = (c[:, :, :-1] - c[:, :, 1:]) / (k * (length / cells))
    return offset[:, None] + (amp[:, :, None] * avg).sum(1)


class BurgersSimulator:
    """Batched NumPy Burgers step on states [B, 1, cells]; conditions: the viscosity nu [B].

    Implements `oracles.simulator.Simulator` and declares itself non-differentiable.
    The options after `max_substeps` only shape the high-fidelity twin's data.
    """

    differentiable = False
    padding = "circular"  # periodic domain: a convolutional corrector wraps around
    conservative = True  # finite volumes on a periodic domain: the total of u is exact; a corrector keeps it
    description = "1-D viscous Burgers, MUSCL + flux limiter + Godunov flux in NumPy (not differentiable)"
    quick_options = {"cells": 16, "hifi_factor": 4, "record_steps": 12, "train_runs": 3, "test_runs": 2}

    def __init__(
        self,
        cells: int = 32,
        dt: float = 0.05,
        limiter: Literal["minmod", "superbee", "mc", "first-order"] = "first-order",
        cfl: float = 0.5,
        max_substeps: int = 64,
        hifi_factor: int = 8,
        record_steps: int = 100,
        train_runs: int = 8,
        test_runs: int = 4,
        nu_min: float = 0.003,
        nu_max: float = 0.03,
        amplitude: float = 1.0,
        modes: int = 3,
        data_seed: int = 0,
        hifi_limiter: Literal["same", "minmod", "superbee", "mc", "first-order"] = "mc",
    ):
        if cells < 4:
            raise ValueError(f"cells must be >= 4, got {cells}")
        if not dt > 0 or not 0 < cfl <= 1:
            raise ValueError(f"need dt > 0 and 0 < cfl <= 1, got dt={dt}, cfl={cfl}")
        if limiter not in LIMITERS:
            raise ValueError(f"limiter must be one of {', '.join(LIMITERS)}, got {limiter!r}")
        if hifi_limiter != "same" and hifi_limiter not in LIMITERS:
            raise ValueError(f"hifi_limiter must be 'same' or one of {', '.join(LIMITERS)}, got {hifi_limiter!r}")
        if max_substeps < 1 or hifi_factor < 1 or record_steps < 1 or train_runs < 1 or test_runs < 1 or modes < 1:
            raise ValueError("max_substeps, hifi_factor, record_steps, train_runs, test_runs and modes must be >= 1")
        if not 0 < nu_min <= nu_max:
            raise ValueError(f"need 0 < nu_min <= nu_max, got {nu_min}, {nu_max}")
        self.cells, self.dt, self.limiter, self.cfl = int(cells), float(dt), limiter, float(cfl)
        self.max_substeps = int(max_substeps)
        self.hifi_factor, self.record_steps = int(hifi_factor), int(record_steps)
        self.train_runs, self.test_runs = int(train_runs), int(test_runs)
        self.nu_min, self.nu_max, self.amplitude, self.modes = float(nu_min), float(nu_max), float(amplitude), int(modes)
        self.data_seed = int(data_seed)
        self.hifi_limiter = limiter if hifi_limiter == "same" else hifi_limiter
        self.length = 2 * math.pi
        self.dx = self.length / self.cells
        self.last_substeps: np.ndarray | None = None  # sub-steps of each state in the last call (for tests)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (1, self.cells)

    def cache_key(self) -> str:
        return f"burgers-scheme-v{VERSION}-twin-{self.hifi_limiter}-numpy-{np.__version__}"

    # -- the Simulator protocol ---------------------------------------------------------

    def reset(self, state: Tensor) -> Tensor:
        if state.dim() != 3 or tuple(state.shape[1:]) != self.state_shape:
            raise ValueError(f"burgers state must be [B, 1, {self.cells}], got {tuple(state.shape)}")
        return state

    def step(self, state: Tensor, conditions: Tensor) -> Tensor:
        """Advance every state by dt. NumPy inside: no gradient flows, and a state that
        requires grad is refused rather than silently detached."""
        self.reset(state)
        if torch.is_grad_enabled() and state.requires_grad:
            raise RuntimeError("burgers-v1 is a NumPy solver and is not differentiable: it cannot backpropagate "
                               "(FO-SOL needs a differentiable simulator; use ZO-SOL)")
        nu = torch.as_tensor(conditions).detach().reshape(-1).cpu().numpy().astype(np.float64)
        if nu.shape[0] == 1 and state.shape[0] > 1:
            nu = np.repeat(nu, state.shape[0])
        if nu.shape[0] != state.shape[0]:
            raise ValueError(f"need one viscosity per state: {nu.shape[0]} vs {state.shape[0]}")
        if not np.all(nu >= 0):
            raise ValueError(f"viscosities must be >= 0, got min {nu.min()}")
        u = state.detach().reshape(state.shape[0], self.cells).cpu().numpy().astype(np.float64)
        out = self._advance(u, nu, self.dx)
        return torch.from_numpy(out).to(dtype=state.dtype, device=state.device).reshape(state.shape)

    def _advance(self, u: np.ndarray, nu: np.ndarray, dx: float) -> np.ndarray:
        """dt of SSP-RK2 with per-state sub-steps; refused states (too many sub-steps) -> NaN."""
        with np.errstate(over="ignore", invalid="ignore"):
            speed = np.abs(u).max(axis=1) / dx + 2.0 * nu / dx**2
            n_sub = np.ceil(self.dt * speed / self.cfl)
            refused = ~np.isfinite(n_sub) | (n_sub > self.max_substeps)
            n_sub = np.where(refused, 0, np.maximum(n_sub, 1)).astype(np.int64)
            self.last_substeps = n_sub
            h = self.dt / np.maximum(n_sub, 1)
            u = u.copy()
            for k in range(int(n_sub.max(initial=0))):
                active = n_sub > k  # each state runs exactly its own number of sub-steps
                if active.all():
                    u = self._rk2(u, h[:, None], nu, dx)
                else:
                    u[active] = self._rk2(u[active], h[active][:, None], nu[active], dx)
            u[refused] = np.nan
        return u

    def _rk2(self, u: np.ndarray, h: np.ndarray, nu: np.ndarray, dx: float) -> np.ndarray:
        u1 = u + h * muscl_rhs(u, nu, dx, self.limiter)
        return 0.5 * u + 0.5 * (u1 + h * muscl_rhs(u1, nu, dx, self.limiter))

    # -- inputs for check_simulator and the twin ----------------------------------------------

    def _starts(self, cells: int, runs: int, rng: np.random.Generator) -> np.ndarray:
        k = np.arange(1, self.modes + 1)
        amp = rng.uniform(-self.amplitude, self.amplitude, size=(runs, self.modes)) / k
        phase = rng.uniform(0.0, 2 * math.pi, size=(runs, self.modes))
        offset = rng.uniform(-0.25 * self.amplitude, 0.25 * self.amplitude, size=runs)
        return cell_averages(cells, self.length, offset, amp, phase)

    def _viscosities(self, runs: int, rng: np.random.Generator) -> np.ndarray:
        return np.exp(rng.uniform(math.log(self.nu_min), math.log(self.nu_max), size=runs))

    def example_states(self, batch: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng(12345)
        u = self._starts(self.cells, batch, rng)
        return (torch.from_numpy(u).float().reshape(batch, 1, self.cells),
                torch.from_numpy(self._viscosities(batch, rng)).float())

    def high_fidelity(self) -> "BurgersSimulator":
        """The twin: the same scheme on a hifi_factor times finer grid (same dt between frames)."""
        return BurgersSimulator(cells=self.cells * self.hifi_factor, dt=self.dt, limiter=self.hifi_limiter, cfl=self.cfl,
                                max_substeps=1_000_000, hifi_factor=1)

    def restrict(self, fine: np.ndarray) -> np.ndarray:
        """Average each run of hifi_factor fine cells onto its coarse cell: [..., F*N] -> [..., N]."""
        return fine.reshape(*fine.shape[:-1], self.cells, self.hifi_factor).mean(-1)

    def reference_data(self, progress: bool = True):
        """Reference trajectories from the high-fidelity twin, on this grid (`ReferenceRuns`)."""
        runs = self.train_runs + self.test_runs
        rng = np.random.default_rng(self.data_seed)
        nu = self._viscosities(runs, rng)
        hifi = self.high_fidelity()
        u = self._starts(hifi.cells, runs, rng)
        frames = [self.restrict(u)]
        for _ in range(self.record_steps):
            u = hifi._advance(u, nu, hifi.dx)
            frames.append(self.restrict(u))
        traj = np.stack(frames, 1)[:, :, None, :]  # [R, T+1, 1, N]
        if not np.isfinite(traj).all():
            raise FloatingPointError("the high-fidelity Burgers runs produced non-finite values")
        test = np.zeros(runs, dtype=bool)
        test[self.train_runs :] = True
        return ReferenceRuns(torch.from_numpy(traj).float(), torch.from_numpy(nu).float(), torch.from_numpy(test),
                             description=f"Burgers {hifi.cells} cells averaged onto {self.cells}, "
                                         f"{self.record_steps} steps of dt={self.dt}, limiter {self.hifi_limiter}")
