"""The 2-D wake flow behind a rod (Um et al. 2020, "Solver-in-the-Loop"; DeepZero Appx. H,
eq. (A4)-(A6)) as a batched, value-only `Simulator`, written for PhiFlow 3.

Setup, in the units of the reference code (`tum-pbs/Solver-in-the-Loop`, karman-2d):
domain 100 (x) by 200 (y), open (zero-gradient) boundaries, flow along +y, a rod of
radius 10 centred at (50, 50), dt = 1. One step (eq. (A4)-(A6), operator splitting):

1. explicit diffusion of the velocity, viscosity ``nu = U * L / Re`` with U = 1 the inflow
   speed and L = 10 (the rod radius). This is the viscosity of the reference's
   high-fidelity runs: they set ``diffusivity = res^2 / re`` at res = 128 and the papers'
   Reynolds numbers are ``Re = re / 1638.4`` (e.g. re = 160000 -> Re = 97.7), so
   ``nu = 16384 / (1638.4 Re) = 10 / Re``. Both fidelities use the same physical viscosity
   here; only the discretisation differs, which is exactly the error the corrector learns.
   Sub-stepped so that ``nu dt_sub / dx^2 <= 1/4`` (2-D stability of the explicit stencil);
2. boundary forcing: the y velocity is set to 1 on the two inflow rows (y faces 0 and 1)
   and on the two side columns (x = 0 and x = nx - 1), as the reference's `vel_yBc` mask;
3. semi-Lagrangian self-advection;
4. pressure projection (`fluid.make_incompressible` with the rod as obstacle, CG to 1e-5).

State layout (x before y everywhere, the PhiFlow 3 order; the reference is (y, x)):
one tensor ``[B, 2, nx + 1, ny + 1]``. Channel 0 holds the x-face velocities
(``[nx + 1, ny]``, the last y row is padding), channel 1 the y-face velocities
(``[nx, ny + 1]``, the last x column is padding). Padding entries are always zero.
With ZERO_GRADIENT boundaries PhiFlow 3 keeps both outer faces: x-faces ``(nx + 1, ny)``,
y-faces ``(nx, ny + 1)`` (tested).

The step is traced once per batch size and dtype with `phi.math.jit_compile` on plain
tensors (eager PhiFlow field operations cost several ms each). The traced step stays
differentiable through PhiFlow's torch backend (the linear solve has an implicit
gradient), which FO-SOL uses; the ZO path calls it under `torch.no_grad()` only. The
batched CG freezes converged batch members (phiml's ``torch_sparse_cg``), so a state's
next state does not depend on what else is in its batch (tested).

PhiFlow is an optional extra (`pip install blackbox-zo[sim]`) and is imported lazily.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .simulator import ReferenceRuns, SolBatch, SolverInTheLoopOracle

__all__ = ["WakeFlowGeometry", "WakeFlowSimulator", "shared_simulator", "restrict_staggered", "pack", "unpack", "face_mask", "vorticity",
           "wake_flow_sol_oracle", "high_fidelity_frames", "WakeFlowTwin",
           "PAPER_TRAIN_RE", "PAPER_TEST_RE"]

PAPER_TRAIN_RE = (97.7, 195.3, 390.6, 781.3, 1562.5, 3125.0)
PAPER_TEST_RE = (146.5, 293.0, 585.9, 1171.9, 2343.8)


@dataclass(frozen=True)
class WakeFlowGeometry:
    """Domain, rod and grid of one fidelity level (reference units)."""

    nx: int = 32
    ny: int = 64
    width: float = 100.0
    height: float = 200.0
    rod_x: float = 50.0
    rod_y: float = 50.0
    rod_radius: float = 10.0
    inflow_speed: float = 1.0
    viscosity_length: float = 10.0  # L in nu = U L / Re (see the module docstring)
    dt: float = 1.0

    def __post_init__(self):
        if self.nx < 4 or self.ny < 4:
            raise ValueError(f"grid must be at least 4x4 cells, got nx={self.nx}, ny={self.ny}")
        if abs(self.width / self.nx - self.height / self.ny) > 1e-9 * self.width:
            raise ValueError(f"cells must be square: width/nx={self.width / self.nx} != height/ny={self.height / self.ny}")
        if not self.dt > 0:
            raise ValueError(f"dt must be > 0, got {self.dt}")

    @property
    def dx(self) -> float:
        return self.width / self.nx

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (2, self.nx + 1, self.ny + 1)

    def viscosity(self, reynolds: Tensor) -> Tensor:
        """nu = U L / Re (the reference's convention, L = 10)."""
        return self.inflow_speed * self.viscosity_length / reynolds


def pack(ux: Tensor, uy: Tensor) -> Tensor:
    """x-faces [B, nx+1, ny] and y-faces [B, nx, ny+1] -> padded state [B, 2, nx+1, ny+1]."""
    return torch.stack([torch.nn.functional.pad(ux, (0, 1)), torch.nn.functional.pad(uy, (0, 0, 0, 1))], dim=1)


def unpack(state: Tensor) -> tuple[Tensor, Tensor]:
    """Padded state [B, 2, nx+1, ny+1] -> (x-faces [B, nx+1, ny], y-faces [B, nx, ny+1])."""
    return state[:, 0, :, :-1], state[:, 1, :-1, :]


def face_mask(nx: int, ny: int) -> Tensor:
    """1 where the padded state holds a real face value, 0 on the padding: [2, nx+1, ny+1]."""
    m = torch.zeros(2, nx + 1, ny + 1)
    m[0, :, :ny] = 1
    m[1, :nx, :] = 1
    return m


def restrict_staggered(state: Tensor, factor: int) -> Tensor:
    """Downsample a padded staggered state by an integer factor (flux-conserving restriction).

    A coarse x-face i coincides with fine x-face factor*i; its value is the mean of the
    `factor` fine faces it covers along y. Likewise for y-faces along x. The flux through
    every coarse face is the sum of the fine fluxes, so the divergence of a coarse cell is
    the mean of its fine cells' divergences: a divergence-free field stays divergence-free.
    [B, 2, F*n+1, F*m+1] -> [B, 2, n+1, m+1].
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return state.clone()
    ux, uy = unpack(state)
    b, nxf1, nyf = ux.shape
    nx, ny = (nxf1 - 1) // factor, nyf // factor
    if nx * factor + 1 != nxf1 or ny * factor != nyf:
        raise ValueError(f"fine grid {nxf1 - 1}x{nyf} is not {factor}x a coarse grid")
    ux_c = ux[:, ::factor, :].reshape(b, nx + 1, ny, factor).mean(-1)
    uy_c = uy[:, :, ::factor].reshape(b, nx, factor, ny + 1).mean(2)
    return pack(ux_c, uy_c)


def vorticity(state: Tensor, dx: float) -> Tensor:
    """Vorticity d(uy)/dx - d(ux)/dy at the interior cell corners: [B, nx-1, ny-1]."""
    ux, uy = unpack(state)
    duy_dx = (uy[:, 1:, 1:-1] - uy[:, :-1, 1:-1]) / dx
    dux_dy = (ux[:, 1:-1, 1:] - ux[:, 1:-1, :-1]) / dx
    return duy_dx - dux_dy


class WakeFlowSimulator:
    """Batched wake-flow step on padded states; implements `oracles.simulator.Simulator`.

    `step(state [B, 2, nx+1, ny+1], reynolds [B]) -> state`. One batch element is one
    simulation; a batch may mix Reynolds numbers, simulations and perturbed correctors.
    float32 and float64 states are both supported (float64 runs PhiFlow in 64-bit).
    """

    def __init__(
        self,
        geometry: WakeFlowGeometry | None = None,
        *,
        min_reynolds: float = 90.0,
        cg_tolerance: float = 1e-5,
        cg_max_iterations: int = 2000,
        jit: bool = True,
    ):
        self.geometry = geometry or WakeFlowGeometry()
        g = self.geometry
        if not min_reynolds > 0:
            raise ValueError(f"min_reynolds must be > 0, got {min_reynolds}")
        if not cg_tolerance > 0:
            raise ValueError(f"cg_tolerance must be > 0, got {cg_tolerance}")
        # Explicit diffusion is stable for nu dt_sub / dx^2 <= 1/4 in 2-D; the sub-step count
        # is a trace-time constant, fixed by the smallest Reynolds number this simulator accepts.
        self.min_reynolds = float(min_reynolds)
        nu_max = float(g.viscosity(torch.tensor(self.min_reynolds, dtype=torch.float64)))
        self.diffusion_substeps = max(1, math.ceil(nu_max * g.dt / g.dx**2 / 0.25))
        self.cg_tolerance, self.cg_max_iterations = float(cg_tolerance), int(cg_max_iterations)
        self.use_jit = jit
        self._pm: Any = None
        self._steps: dict[torch.dtype, Callable] = {}
        self.mask = face_mask(g.nx, g.ny)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.geometry.state_shape

    # -- PhiFlow objects (lazy: phiflow is an optional extra) -------------------------

    def _build(self) -> None:
        if self._pm is not None:
            return
        try:
            from phi import math as pm
            from phi.torch.flow import (Box, Obstacle, Solve, Sphere, StaggeredGrid, advect, diffuse, dual,
                                        extrapolation, fluid)
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the wake-flow simulator needs PhiFlow 3: pip install 'blackbox-zo[sim]'") from exc
        # phiml builds the pressure matrix as a torch sparse CSR tensor; torch warns once that
        # CSR support is beta and invariant checks are off. Nothing for a user to act on.
        warnings.filterwarnings("ignore", message=r"Sparse (CSR tensor support|invariant checks)", category=UserWarning)
        g = self.geometry
        # Keyword geometry: PhiFlow 3 orders dimensions by name (x before y), never by position.
        template = StaggeredGrid(0, extrapolation.ZERO_GRADIENT, Box(x=(0, g.width), y=(0, g.height)), x=g.nx, y=g.ny)
        obstacle = Obstacle(Sphere(x=g.rod_x, y=g.rod_y, radius=g.rod_radius))
        force = torch.zeros(g.nx, g.ny + 1)  # on the y-faces [x, y]
        force[:, 0:2] = 1.0  # inflow rows
        force[0, :] = 1.0  # side columns
        force[-1, :] = 1.0
        force_mask = pm.tensor(force, pm.spatial("x,y"))  # float32; phiml upcasts it in 64-bit runs
        solve = Solve("CG", self.cg_tolerance, self.cg_tolerance, max_iterations=self.cg_max_iterations)
        substeps, dt, speed = self.diffusion_substeps, g.dt, g.inflow_speed

        def step(ux, uy, nu):
            v = template.with_values(pm.stack([ux, uy], dual(vector="x,y")))
            v = diffuse.explicit(v, nu, dt, substeps=substeps)
            uy_forced = v.vector["y"].values * (1 - force_mask) + speed * force_mask
            v = template.with_values(pm.stack([v.vector["x"].values, uy_forced], dual(vector="x,y")))
            v = advect.semi_lagrangian(v, v, dt)
            v, _ = fluid.make_incompressible(v, [obstacle], solve)
            return v.vector["x"].values, v.vector["y"].values

        self._pm = pm
        self._raw_step = step

    def _step_fn(self, dtype: torch.dtype) -> Callable:
        if dtype not in self._steps:
            self._steps[dtype] = self._pm.jit_compile(self._raw_step) if self.use_jit else self._raw_step
        return self._steps[dtype]

    # -- the Simulator protocol ---------------------------------------------------------

    def initial_state(self, batch_size: int = 1, poke: float = 1.0) -> Tensor:
        """The reference's start: uy = 1 everywhere, plus a sideways poke behind the rod.

        The poke (ux = `poke`) covers x in [0.4375, 0.5625) and y in [0.656, 0.8125) of the
        domain: the reference's index box at 32x64, in domain fractions so every resolution
        gets the same physical poke.
        """
        g = self.geometry
        ux = torch.zeros(batch_size, g.nx + 1, g.ny)
        uy = torch.full((batch_size, g.nx, g.ny + 1), g.inflow_speed)
        x0, x1 = round(g.nx * 14 / 32), round(g.nx * 18 / 32)
        y0, y1 = round(g.ny * 42 / 64), round(g.ny * 52 / 64)
        ux[:, x0:x1, y0:y1] = poke
        return pack(ux, uy)

    def reset(self, state: Tensor) -> Tensor:
        """Validate and return a batch of states to start from (padding zeroed)."""
        if state.dim() != 4 or tuple(state.shape[1:]) != self.state_shape:
            raise ValueError(f"wake-flow state must be [B, {', '.join(map(str, self.state_shape))}], got {tuple(state.shape)}")
        return state * self.mask.to(state)

    def step(self, state: Tensor, reynolds: Tensor) -> Tensor:
        """One time step of every simulation in the batch. Differentiable when autograd is on."""
        if state.dim() != 4 or tuple(state.shape[1:]) != self.state_shape:
            raise ValueError(f"wake-flow state must be [B, {', '.join(map(str, self.state_shape))}], got {tuple(state.shape)}")
        if state.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"wake-flow state must be float32 or float64, got {state.dtype}")
        self._build()
        pm = self._pm
        reynolds = torch.as_tensor(reynolds, dtype=state.dtype).reshape(-1)
        if reynolds.numel() == 1 and state.shape[0] > 1:
            reynolds = reynolds.expand(state.shape[0])
        if reynolds.shape[0] != state.shape[0]:
            raise ValueError(f"need one Reynolds number per state: {reynolds.shape[0]} vs {state.shape[0]}")
        if float(reynolds.min()) < self.min_reynolds * (1 - 1e-6):
            raise ValueError(f"Reynolds number {float(reynolds.min())} below this simulator's "
                             f"min_reynolds {self.min_reynolds} (the diffusion sub-steps are sized for it)")
        ux, uy = unpack(state)
        nu = self.geometry.viscosity(reynolds)
        bits = 64 if state.dtype == torch.float64 else 32
        with pm.precision(bits):
            ux_p = pm.tensor(ux, pm.batch("b"), pm.spatial("x,y"))
            uy_p = pm.tensor(uy, pm.batch("b"), pm.spatial("x,y"))
            nu_p = pm.tensor(nu, pm.batch("b"))
            ux_n, uy_n = self._step_fn(state.dtype)(ux_p, uy_p, nu_p)
            out = pack(ux_n.native(["b", "x", "y"]), uy_n.native(["b", "x", "y"]))
        return out.to(state.dtype)

    def divergence(self, state: Tensor) -> Tensor:
        """Cell divergence (du_x/dx + du_y/dy) [B, nx, ny], for checks."""
        ux, uy = unpack(state)
        dx = self.geometry.dx
        return (ux[:, 1:, :] - ux[:, :-1, :]) / dx + (uy[:, :, 1:] - uy[:, :, :-1]) / dx

    def fluid_cells(self) -> Tensor:
        """1 for cells whose centre lies outside the rod: [nx, ny]."""
        g = self.geometry
        xs = (torch.arange(g.nx) + 0.5) * g.dx
        ys = (torch.arange(g.ny) + 0.5) * g.dx
        r2 = (xs[:, None] - g.rod_x) ** 2 + (ys[None, :] - g.rod_y) ** 2
        return (r2 > g.rod_radius**2).float()


_SHARED: dict[tuple, WakeFlowSimulator] = {}


def shared_simulator(geometry: WakeFlowGeometry, *, min_reynolds: float = 90.0,
                     cg_tolerance: float = 1e-5) -> WakeFlowSimulator:
    """One simulator per (geometry, diffusion sub-steps, CG tolerance) in this process.

    Tracing the step costs seconds per batch size; sharing the simulator shares its traces
    between the data generator, the oracle, the baselines and the evaluation.
    """
    sim = WakeFlowSimulator(geometry, min_reynolds=min_reynolds, cg_tolerance=cg_tolerance)
    key = (geometry, sim.diffusion_substeps, float(cg_tolerance))
    held = _SHARED.setdefault(key, sim)
    # Same sub-step count, so the held simulator is as stable for the lower of both bounds.
    held.min_reynolds = min(held.min_reynolds, sim.min_reynolds)
    return held


def high_fidelity_frames(hi: WakeFlowGeometry, factor: int, reynolds: Tensor, *, skip_steps: int, record_steps: int,
                         poke: float = 1.0, cg_tolerance: float = 1e-5, min_reynolds: float | None = None,
                         progress: bool = True) -> Tensor:
    """All Reynolds numbers as ONE batched high-fidelity simulation on `hi`, from rest plus a
    sideways poke; the first `skip_steps` steps (the transient) are dropped, then
    `record_steps + 1` frames are restricted onto the `factor` times coarser grid
    (flux-conserving). Returns [R, T+1, 2, nx+1, ny+1] (the low-fidelity layout)."""
    min_re = float(reynolds.min()) if min_reynolds is None else min_reynolds
    sim = shared_simulator(hi, min_reynolds=min_re, cg_tolerance=cg_tolerance)
    state = sim.initial_state(reynolds.numel(), poke=poke)
    frames = []
    total = skip_steps + record_steps
    with torch.no_grad(), tqdm(total=total, desc=f"wake-flow data: {reynolds.numel()} high-fidelity runs {hi.nx}x{hi.ny}",
                               disable=not progress, dynamic_ncols=True, unit="step") as bar:
        for i in range(total + 1):
            if i > 0:
                state = sim.step(state, reynolds)
                bar.update(1)
            if i >= skip_steps:
                frames.append(restrict_staggered(state, factor))
    traj = torch.stack(frames, 1)
    if not torch.isfinite(traj).all():
        raise FloatingPointError("the high-fidelity simulation produced non-finite values")
    return traj


class WakeFlowTwin:
    """The wake flow as a registered simulator (`wake-flow-v1`) with its high-fidelity twin.

    The low-fidelity step is `WakeFlowSimulator` on `lo_nx` x 2 `lo_nx` cells (conditions:
    the Reynolds number); `reference_data()` runs the `hifi_factor` times finer grid
    (`high_fidelity_frames`) for `train_re` and `test_re`. Differentiable (PhiFlow's torch
    backend): FO-SOL runs through it.
    """

    differentiable = True
    padding = "zeros"
    description = "2-D wake flow behind a rod, PhiFlow 3 torch backend (differentiable), Um et al. 2020"
    quick_options = {"lo_nx": 8, "skip_steps": 20, "record_steps": 8, "train_re": [100.0, 400.0], "test_re": [200.0]}

    def __init__(self, lo_nx: int = 32, hifi_factor: int = 2, skip_steps: int = 2000, record_steps: int = 200,
                 train_re: tuple[float, ...] = PAPER_TRAIN_RE, test_re: tuple[float, ...] = PAPER_TEST_RE,
                 poke: float = 1.0, cg_tolerance: float = 1e-5):
        if not train_re or not test_re or min(tuple(train_re) + tuple(test_re)) <= 0:
            raise ValueError("train_re and test_re must be non-empty and > 0")
        if hifi_factor < 1 or skip_steps < 0 or record_steps < 1:
            raise ValueError(f"need hifi_factor >= 1, skip_steps >= 0, record_steps >= 1; got {hifi_factor}, "
                             f"{skip_steps}, {record_steps}")
        self.lo = WakeFlowGeometry(nx=int(lo_nx), ny=2 * int(lo_nx))
        self.hi = WakeFlowGeometry(nx=self.lo.nx * hifi_factor, ny=self.lo.ny * hifi_factor)
        self.hifi_factor, self.skip_steps, self.record_steps = int(hifi_factor), int(skip_steps), int(record_steps)
        self.train_re, self.test_re = tuple(map(float, train_re)), tuple(map(float, test_re))
        self.poke, self.cg_tolerance = float(poke), float(cg_tolerance)
        self.min_reynolds = min(self.train_re + self.test_re)
        self.sim = shared_simulator(self.lo, min_reynolds=self.min_reynolds, cg_tolerance=self.cg_tolerance)
        self.mask = self.sim.mask

    @property
    def state_shape(self) -> tuple[int, ...]:
        return self.sim.state_shape

    def reset(self, state: Tensor) -> Tensor:
        return self.sim.reset(state)

    def step(self, state: Tensor, conditions: Tensor) -> Tensor:
        return self.sim.step(state, conditions)

    def cache_key(self) -> str:
        try:
            import phi

            version = str(phi.__version__)
        except Exception:  # pragma: no cover
            version = "unknown"
        return f"wake-flow-data-v2-phiflow-{version}"

    def example_states(self, batch: int) -> tuple[Tensor, Tensor]:
        re = torch.linspace(self.min_reynolds, max(self.train_re + self.test_re), batch)
        with torch.no_grad():
            state = self.sim.step(self.sim.initial_state(batch, poke=self.poke), re)
        return state, re

    def reference_data(self, progress: bool = True):
        re = torch.tensor(self.train_re + self.test_re, dtype=torch.float32)
        frames = high_fidelity_frames(self.hi, self.hifi_factor, re, skip_steps=self.skip_steps,
                                      record_steps=self.record_steps, poke=self.poke, cg_tolerance=self.cg_tolerance,
                                      min_reynolds=self.min_reynolds, progress=progress)
        test = torch.zeros(re.numel(), dtype=torch.bool)
        test[len(self.train_re):] = True
        return ReferenceRuns(frames, re, test, description=f"wake flow {self.hi.nx}x{self.hi.ny} restricted onto "
                                                            f"{self.lo.nx}x{self.lo.ny}")


# ------------------------------------------------------------------ check-oracle example


class _ExampleCorrector(torch.nn.Module):
    """A 3x3 conv on the velocity plus a Reynolds-number bias: just enough for `check-oracle`."""

    def __init__(self, nx: int, ny: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.re_gain = torch.nn.Parameter(torch.zeros(2))
        with torch.no_grad():
            self.conv.weight.mul_(0.1)
        self.register_buffer("mask", face_mask(nx, ny))

    def forward(self, state: Tensor, reynolds: Tensor) -> Tensor:
        bias = (reynolds / 1000.0).view(-1, 1, 1, 1) * self.re_gain.view(1, 2, 1, 1)
        return (self.conv(state) + bias) * self.mask


def wake_flow_sol_oracle(nx: int = 8, ny: int = 16, unroll: int = 2, windows: int = 2, seed: int = 0):
    """A tiny wake-flow solver-in-the-loop oracle with an example batch (`blackbox-zo check-oracle`)."""
    sim = shared_simulator(WakeFlowGeometry(nx=nx, ny=ny))
    torch.manual_seed(seed)
    oracle = SolverInTheLoopOracle(sim, _ExampleCorrector(nx, ny), weight=sim.mask)
    start = sim.initial_state(windows)
    re = torch.linspace(100.0, 1000.0, windows)
    with torch.no_grad():
        states, s = [], start
        for _ in range(unroll):
            s = sim.step(s, re)
            states.append(s)
    # Targets slightly off the uncorrected trajectory, so the loss is not trivially zero.
    oracle.example = SolBatch(start, torch.stack(states, 1) * 1.01, re)
    return oracle


def _example():
    oracle = wake_flow_sol_oracle()
    return oracle, oracle.example


wake_flow_sol_oracle.example = _example  # type: ignore[attr-defined]

