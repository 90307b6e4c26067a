"""The NumPy Burgers solver (oracles/burgers.py) against independent references.

* smooth inviscid flow before the shock forms: the exact solution by characteristics
  (u = u0(x - u t), solved by Newton), second-order convergence of the scheme;
* linear viscous decay: a tiny sine mode decays as exp(-nu lambda t), lambda the discrete
  Laplacian's eigenvalue (closed form);
* a shock: the Rankine-Hugoniot speed (u_L + u_R) / 2;
* conservation (periodic finite volumes) and the TVD property of the minmod scheme;
* batch independence with per-state sub-steps, and the refusals (a state that needs too many
  sub-steps comes back NaN; a state that requires grad is refused: no gradient exists).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oracles.burgers import BurgersSimulator, cell_averages


def sine_start(cells: int, offset: float, amp: float) -> np.ndarray:
    return cell_averages(cells, 2 * math.pi, np.array([offset]), np.array([[amp]]), np.array([[0.0]]))


def characteristic_solution(x: np.ndarray, t: float, offset: float, amp: float) -> np.ndarray:
    """u = offset + amp sin(x - u t) by Newton (unique while t < 1 / amp, before the shock)."""
    u = offset + amp * np.sin(x)
    for _ in range(60):
        xi = x - u * t
        u = u - (u - offset - amp * np.sin(xi)) / (1 + t * amp * np.cos(xi))
    return u


def test_smooth_flow_converges_at_second_order_to_the_characteristic_solution():
    errors = {}
    for cells in (32, 64, 128):
        sim = BurgersSimulator(cells=cells, dt=0.05, cfl=0.4, limiter="minmod")
        u = sine_start(cells, 0.5, 0.3)
        for _ in range(20):  # t = 1 < 1 / 0.3: no shock yet
            u = sim._advance(u, np.zeros(1), sim.dx)
        x = (np.arange(cells) + 0.5) * sim.dx
        errors[cells] = np.abs(u[0] - characteristic_solution(x, 1.0, 0.5, 0.3)).mean()
    # MUSCL-minmod + SSP-RK2 is second order away from extrema, first order at them: the measured
    # L1 orders are 1.87 and 1.92; first order (1.0) would fail this
    orders = [math.log2(errors[a] / errors[b]) for a, b in ((32, 64), (64, 128))]
    assert min(orders) > 1.6, (errors, orders)
    assert errors[128] < 2e-4


def test_the_first_order_scheme_converges_at_first_order_and_is_monotone():
    """The default low-fidelity scheme (zero slopes: first-order Godunov) against the same
    characteristic solution: first order, not second, which is the systematic numerical
    diffusion a corrector learns to undo (docs/sol.md)."""
    errors = {}
    for cells in (64, 128, 256):
        sim = BurgersSimulator(cells=cells, dt=0.05, cfl=0.4, limiter="first-order")
        u = sine_start(cells, 0.5, 0.3)
        for _ in range(20):
            u = sim._advance(u, np.zeros(1), sim.dx)
        x = (np.arange(cells) + 0.5) * sim.dx
        errors[cells] = np.abs(u[0] - characteristic_solution(x, 1.0, 0.5, 0.3)).mean()
    orders = [math.log2(errors[a] / errors[b]) for a, b in ((64, 128), (128, 256))]
    assert all(0.8 < o < 1.2 for o in orders), (errors, orders)
    # and more diffusive than minmod on the same grid: the smooth peak is lower
    lo, mm = (BurgersSimulator(cells=32, dt=0.05, limiter=lim) for lim in ("first-order", "minmod"))
    u_lo = u_mm = sine_start(32, 0.0, 1.0)
    for _ in range(10):
        u_lo, u_mm = lo._advance(u_lo, np.zeros(1), lo.dx), mm._advance(u_mm, np.zeros(1), mm.dx)
    assert u_lo.max() < u_mm.max()


def test_a_small_mode_decays_as_the_discrete_heat_equation():
    sim = BurgersSimulator(cells=32, dt=0.05)
    nu, eps = 0.05, 1e-6  # u^2 / 2 ~ 1e-12: the advection is negligible, the step is linear diffusion
    u0 = sine_start(32, 0.0, eps)
    u = u0
    for _ in range(40):
        u = sim._advance(u, np.array([nu]), sim.dx)
    lam = (2 - 2 * math.cos(sim.dx)) / sim.dx**2  # eigenvalue of the central second difference for sin(x)
    ratio = u[0] / u0[0]
    # SSP-RK2's amplification 1 - z + z^2 / 2 vs exp(-z), z = nu lam h = 0.0025: error z^3 / 6 per step,
    # 40 steps -> 1e-7 relative; measured 1.1e-6 (the float64 sine averages near zero crossings)
    np.testing.assert_allclose(ratio[np.abs(u0[0]) > 0.3 * eps], math.exp(-nu * lam * 2.0), rtol=1e-5)


def test_a_shock_moves_at_the_rankine_hugoniot_speed_and_mass_is_conserved():
    cells = 400
    sim = BurgersSimulator(cells=cells, dt=0.02, cfl=0.4, limiter="minmod")
    x = (np.arange(cells) + 0.5) * sim.dx
    u = np.where((x > 1.0) & (x < 3.0), 1.0, 0.0)[None]  # a shock at x = 3 (1 -> 0), a rarefaction at x = 1
    mass = u.sum()
    for _ in range(50):  # t = 1
        u = sim._advance(u, np.zeros(1), sim.dx)
    right = x > 2.5
    position = x[right][np.argmin(np.abs(u[0][right] - 0.5))]
    assert abs(position - (3.0 + 0.5 * 1.0)) < 2 * sim.dx  # speed (u_L + u_R) / 2 = 0.5
    assert abs(u.sum() - mass) < 1e-9 * mass  # periodic finite volumes conserve the total exactly (to rounding)


def test_the_minmod_scheme_is_total_variation_diminishing():
    sim = BurgersSimulator(cells=64, dt=0.05, cfl=0.5, limiter="minmod")
    rng = np.random.default_rng(3)
    u = sim._starts(64, 4, rng)
    tv = lambda v: np.abs(np.diff(np.concatenate([v, v[:, :1]], 1), axis=1)).sum(1)  # noqa: E731 periodic TV
    top, bottom = u.max(1), u.min(1)
    for _ in range(60):  # shocks form and interact
        before = tv(u)
        u = sim._advance(u, np.zeros(4), sim.dx)
        assert np.all(tv(u) <= before + 1e-12)
        assert np.all(u.max(1) <= top + 1e-12) and np.all(u.min(1) >= bottom - 1e-12)  # no new extrema


def test_each_state_takes_its_own_substeps_and_the_batch_does_not_matter():
    sim = BurgersSimulator()
    states, nu = sim.example_states(3)
    states[1] *= 4  # a faster state needs more sub-steps
    with torch.no_grad():
        together = sim.step(states, nu)
        substeps = sim.last_substeps.copy()
        alone = torch.cat([sim.step(states[i : i + 1], nu[i : i + 1]) for i in range(3)])
    assert substeps[1] > substeps[0] and substeps[1] > substeps[2]
    assert torch.equal(together, alone)  # bitwise: each state's arithmetic is its own


def test_a_state_it_cannot_advance_comes_back_nan_and_gradients_are_refused():
    sim = BurgersSimulator(max_substeps=8)
    states, nu = sim.example_states(2)
    states[0] *= 1e4  # would need thousands of sub-steps: refused, as a solver stops on a CFL violation
    with torch.no_grad():
        out = sim.step(states, nu)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    with pytest.raises(RuntimeError, match="not differentiable"):
        sim.step(states[1:].clone().requires_grad_(True), nu[1:])
    assert BurgersSimulator.differentiable is False


def test_the_twin_data_is_the_fine_solution_averaged_onto_the_coarse_cells():
    sim = BurgersSimulator(cells=16, hifi_factor=4, record_steps=10, train_runs=2, test_runs=1)
    runs = sim.reference_data(progress=False)
    assert tuple(runs.frames.shape) == (3, 11, 1, 16) and runs.test.tolist() == [False, False, True]
    # cell averaging conserves mass, and so does the fine scheme: every frame has the first one's total
    totals = runs.frames.double().sum((2, 3))
    torch.testing.assert_close(totals, totals[:, :1].expand_as(totals), rtol=0, atol=1e-5)
    # the coarse solver from the same start drifts from it, but stays close over one step (the
    # states are O(1)); the default first-order scheme drifts more than minmod: its numerical
    # diffusion is the error a corrector learns
    minmod = BurgersSimulator(cells=16, hifi_factor=4, record_steps=10, train_runs=2, test_runs=1, limiter="minmod")
    with torch.no_grad():
        gap = (sim.step(runs.frames[:, 0], runs.conditions) - runs.frames[:, 1]).abs().max()
        gap_minmod = (minmod.step(runs.frames[:, 0], runs.conditions) - runs.frames[:, 1]).abs().max()
    assert 0 < gap_minmod < gap < 0.1, (gap_minmod, gap)
    again = sim.reference_data(progress=False)
    assert torch.equal(again.frames, runs.frames)  # seeded: the same data every time
