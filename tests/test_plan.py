"""Query plans and the one executor (blackbox_zo/plan.py): the points a plan names, the fast paths,
the ledger, the chunked direction stream, ask/tell, the estimators' maths on top, and the rule that
no other code in the tree queries an oracle or takes a finite difference."""

from __future__ import annotations

import ast
import io
import math
import re
import tokenize
from pathlib import Path

import pytest
import torch

from blackbox_zo.estimators import CGE, RGE, LinearInterpolation
from blackbox_zo.oracle import QueryBudgetExceeded
from blackbox_zo.plan import ExplicitDirections, QueryPlan, SeededDirections, block_rows, block_seed, execute
from helpers import SmoothBlocks

ROOT = Path(__file__).resolve().parents[1]
MU = 1e-3
SUBSET = torch.tensor([3, 0, 17, 39, 22])  # unsorted on purpose


def _plans(theta: torch.Tensor) -> dict[str, QueryPlan]:
    d = theta.numel()
    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(d, 6, generator=gen, dtype=torch.float64))[0].T.contiguous()  # [6, d]
    points = theta + 0.1 * torch.randn(7, d, generator=gen, dtype=torch.float64)
    return {
        "coordinates-forward": QueryPlan.coordinates(theta, MU),
        "coordinates-central-subset": QueryPlan.coordinates(theta, MU, SUBSET, "central"),
        "directions-forward": QueryPlan.along(theta, SeededDirections(11, d, seed=5, chunk=4), MU),
        "directions-central-subset-sphere": QueryPlan.along(
            theta, SeededDirections(11, SUBSET.numel(), seed=5, chunk=4, distribution="sphere"), MU, "central", SUBSET),
        "explicit-central": QueryPlan.along(theta, ExplicitDirections(q, chunk=4), MU, "central"),
        "points": QueryPlan.at(points, chunk=3),
    }


EXPECTED_QUERIES = {"coordinates-forward": 41, "coordinates-central-subset": 10, "directions-forward": 12,
                    "directions-central-subset-sphere": 22, "explicit-central": 12, "points": 7}


@pytest.mark.parametrize("name", list(EXPECTED_QUERIES))
def test_execute_returns_the_losses_of_the_plans_points_and_charges_each_once(name):
    oracle = SmoothBlocks()
    theta = oracle.initial_theta()
    plan = _plans(theta)[name]
    losses = execute(plan, oracle, None)
    assert plan.num_queries == losses.queries == oracle.ledger.total == EXPECTED_QUERIES[name]
    # The reference: every point of the plan built independently (materialize) and evaluated in one
    # call, straight through `losses` (no ledger). Rows are evaluated independently, but BLAS may round
    # a row of a bigger call differently by a few ulp of a loss of size ~20 (~1e-14); 1e-12 leaves room.
    points = plan.materialize()
    assert points.shape == (plan.num_queries, theta.numel())
    ref = plan.split(oracle.losses(points, None))
    for part in ("base", "plus", "minus"):
        got, want = getattr(losses, part), getattr(ref, part)
        assert (got is None) == (want is None), part
        if got is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the points are the ones the plan names: theta + mu v_i (then - mu v_i), v_i = e_i or u_i
    if plan.kind == "coordinates":
        coords = plan.coord_indices()
        steps = torch.zeros(coords.numel(), theta.numel(), dtype=theta.dtype)
        steps[torch.arange(coords.numel()), coords] = MU
        first = int(plan.has_base)
        torch.testing.assert_close(points[first:first + coords.numel()] - theta, steps, rtol=0, atol=1e-15)
        if plan.central:
            torch.testing.assert_close(points[first + coords.numel():] - theta, -steps, rtol=0, atol=1e-15)
    if plan.kind == "directions":
        u = torch.cat(list(plan.directions.chunks(theta)))
        full = torch.zeros(u.shape[0], theta.numel(), dtype=theta.dtype)
        full[:, plan.coord_indices() if plan.coords is not None else slice(None)] = u
        first = int(plan.has_base)
        torch.testing.assert_close(points[first:first + u.shape[0]] - theta, MU * full, rtol=0, atol=1e-15)


def test_coordinates_take_the_oracles_fast_path_and_directions_go_in_chunks():
    oracle = SmoothBlocks()
    theta = oracle.initial_theta()
    plans = _plans(theta)
    execute(plans["coordinates-forward"], oracle, None)
    assert oracle.calls[0] == ("losses", 1) and oracle.calls[1] == ("coordinate_losses", 40)  # base, then the fast path
    oracle.calls.clear()
    execute(plans["directions-central-subset-sphere"], oracle, None)
    # chunks of 4, 4 and 3 directions, each with both signs in one call (2m points fit the oracle's chunk)
    assert [n for kind, n in oracle.calls] == [8, 8, 6] and {k for k, _ in oracle.calls} == {"losses"}
    # fast_path=False: the same coordinate losses through batched `losses` on perturbed vectors built here
    slow_oracle = SmoothBlocks()
    slow = execute(plans["coordinates-central-subset"], slow_oracle, None, fast_path=False)
    fast = execute(plans["coordinates-central-subset"], SmoothBlocks(), None)
    assert all(kind == "losses" for kind, _ in slow_oracle.calls)
    torch.testing.assert_close(slow.plus, fast.plus, rtol=0, atol=1e-12)
    torch.testing.assert_close(slow.minus, fast.minus, rtol=0, atol=1e-12)


def test_a_plan_the_budget_cannot_pay_for_is_refused_before_its_first_query():
    oracle = SmoothBlocks()
    plan = _plans(oracle.initial_theta())["directions-forward"]
    oracle.ledger.budget = plan.num_queries - 1
    with pytest.raises(QueryBudgetExceeded, match="budget 11"):
        execute(plan, oracle, None)
    assert oracle.calls == [] and oracle.ledger.total == 0


def test_seeded_directions_are_a_chunked_reproducible_stream():
    like = torch.zeros(3, dtype=torch.float64)
    spec = SeededDirections(count=11, dim=40, seed=5, chunk=4, distribution="sphere")
    chunks = list(spec.chunks(like))
    assert [c.shape for c in chunks] == [(4, 40), (4, 40), (3, 40)]  # never all 11 x 40 at once
    assert all(torch.equal(a, b) for a, b in zip(chunks, spec.chunks(like)))  # same seed: same directions
    torch.testing.assert_close(torch.cat(chunks).norm(dim=1), torch.ones(11, dtype=torch.float64), rtol=0, atol=1e-15)
    other = SeededDirections(count=11, dim=40, seed=6, chunk=4, distribution="sphere")
    assert not torch.equal(torch.cat(list(other.chunks(like))), torch.cat(chunks))
    # the chunk only groups evaluations: it is not part of what ranks must agree on
    assert SeededDirections(11, 40, 5, 5).identity() == SeededDirections(11, 40, 5, 4).identity()
    assert SeededDirections(11, 40, 5, 4).identity() != SeededDirections(11, 40, 6, 4).identity()


def _reference_directions(count: int, dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    # The documented layout, built independently of the stream: block b is torch.randn(rows, dim) from a
    # fresh generator seeded block_seed(seed, b); the directions are the blocks stacked, cut at count.
    rows = block_rows(dim)
    blocks = [torch.randn(rows, dim, generator=torch.Generator().manual_seed(block_seed(seed, b)), dtype=dtype)
              for b in range(-(-count // rows))]
    return torch.cat(blocks)[:count]


@pytest.mark.parametrize("dim,rows,count", [(40, 64, 150), (3818, 32, 150), (4001, 32, 150), (20_001, 4, 150),
                                            (70_000, 1, 20)])  # 16 divides the block or not; one-row blocks
def test_seeded_directions_do_not_depend_on_the_chunking(dim, rows, count):
    # Direction i depends only on (seed, i, dim, dtype): every chunk size gives the same stream bitwise,
    # a stream of another count starts with the same directions, and a piece drawn alone (a rank's share
    # of a sharded plan) is the same piece of the whole. The old sampler drew each chunk with one call of
    # torch.randn from one generator, whose output depends on the size of each draw: this fails there.
    assert block_rows(dim) == rows
    seed = 2**40 + 3
    for dtype in (torch.float32, torch.float64):
        like = torch.zeros(1, dtype=dtype)
        want = _reference_directions(count, dim, seed, dtype)
        for chunk in (1, 7, 64, 256):
            got = torch.cat(list(SeededDirections(count, dim, seed, chunk).chunks(like)))
            assert got.dtype == dtype and torch.equal(got, want), (dtype, chunk)
        # the stream's last block is drawn only as far as the stream goes (a prefix of the block): every
        # length of last block, against the whole blocks of a longer stream
        longer = _reference_directions(count + 64, dim, seed, dtype)
        for n in range(count, count + rows + 1):
            assert torch.equal(SeededDirections(n, dim, seed, 64).stream(like).rows(0, n), longer[:n]), (dtype, n)
        for lo, hi in ((0, count // 2), (count // 2, count), (3, 4), (9, count - 10), (count - 10, count),
                       (count - 3, count)):  # the last two: from inside the stream's last block to its end
            assert torch.equal(SeededDirections(count, dim, seed, 7).stream(like).rows(lo, hi), want[lo:hi])
    # sphere: the same Gaussian rows over their norms
    like = torch.zeros(1, dtype=torch.float64)
    sphere = torch.cat(list(SeededDirections(count, dim, seed, 7, "sphere").chunks(like)))
    gauss = _reference_directions(count, dim, seed, torch.float64)
    torch.testing.assert_close(sphere, gauss / gauss.norm(dim=1, keepdim=True), rtol=0, atol=1e-15)


def test_seeded_directions_are_standard_normal_and_distinct_across_blocks_and_seeds():
    # A fixed draw (not flaky): 4096 x 64 = 262,144 numbers, so the sample mean has std 0.002 and the
    # sample variance 0.0028; 0.01 and 0.015 are ~5 std. Distinct blocks and seeds must not repeat rows
    # (a seed hash that collided, or a block seed that ignored the block, would).
    like = torch.zeros(1, dtype=torch.float64)
    u = SeededDirections(4096, 64, 11, 256).stream(like).rows(0, 4096)
    assert abs(float(u.mean())) < 0.01 and abs(float(u.var()) - 1) < 0.015
    assert block_rows(64) == 64
    rows = torch.cat([u, SeededDirections(64, 64, 12, 64).stream(like).rows(0, 64),
                      SeededDirections(64, 64, 11 + 2**32, 64).stream(like).rows(0, 64)])
    assert torch.unique(rows[:, 0]).numel() == rows.shape[0]
    # one-row blocks: consecutive directions from consecutive block seeds are uncorrelated
    assert block_rows(70_000) == 1
    v = SeededDirections(200, 70_000, 3, 200).stream(like).rows(0, 200)
    corr = torch.corrcoef(v)
    assert float((corr - torch.eye(200, dtype=torch.float64)).abs().max()) < 0.03  # ~8 std of 1/sqrt(70000)


class _RecordingBlocks(SmoothBlocks):
    def __init__(self):
        super().__init__()
        self.points: list[torch.Tensor] = []

    def losses(self, thetas, batch):
        self.points.append(thetas.clone())
        return super().losses(thetas, batch)


def test_a_rank_evaluates_its_share_with_the_directions_of_one_process(monkeypatch):
    # A sharded plan cuts the directions at [lo, hi); each rank's oracle may pick another chunk (the
    # chunk is a memory bound: another device, other activations seen). The points a rank evaluates must
    # be theta + mu u_k of the one-process stream for exactly k in [lo, hi), and without keeping the
    # stream for combine it draws no block that ends before its first chunk.
    from blackbox_zo import plan as plan_module

    drawn: list[int] = []
    original = plan_module._DirectionStream._draw
    monkeypatch.setattr(plan_module._DirectionStream, "_draw", lambda self, b, out: (drawn.append(b), original(self, b, out))[1])
    theta = SmoothBlocks().initial_theta()
    d, count, seed = theta.numel(), 300, 9
    rows = block_rows(d)
    one = _reference_directions(count, d, seed, theta.dtype)
    for chunk, (lo, hi) in ((7, (0, 150)), (64, (150, 300)), (1, (133, 271))):
        oracle, drawn[:] = _RecordingBlocks(), []
        plan = QueryPlan.along(theta, SeededDirections(count, d, seed, chunk), MU)
        plus, minus, kept = plan_module._Runner(plan, oracle, None, None, True).directions(lo, hi, keep=False)
        torch.testing.assert_close(torch.cat(oracle.points), theta + MU * one[lo:hi], rtol=0, atol=1e-15)
        assert kept is None and minus is None and plus.shape == (hi - lo,)
        first, last = (lo // chunk) * chunk, min(count, -(-hi // chunk) * chunk) - 1  # the chunks it evaluates
        assert min(drawn) == first // rows and max(drawn) == last // rows


def test_directions_redrawn_by_combine_are_the_ones_evaluated():
    # With room, the executor keeps the chunks it drew for `combine`; without, combine draws the
    # stream again. Both must give the same estimate, bitwise.
    kept_oracle, redrawn_oracle = SmoothBlocks(), SmoothBlocks()
    redrawn_oracle.memory_cap_bytes = 2000  # < 4 x (11 directions x 40 x 8 bytes): not kept
    theta = kept_oracle.initial_theta()
    rge = RGE(q=11, mu=MU, chunk=4)
    plan = rge.plan(theta, seed=3, chunk=4)
    assert execute(plan, kept_oracle, None).drawn is not None
    assert execute(plan, redrawn_oracle, None).drawn is None
    a = rge.estimate(kept_oracle, theta, None, seed=3)
    b = rge.estimate(redrawn_oracle, theta, None, seed=3)
    assert torch.equal(a.grad, b.grad) and a.grad.abs().max() > 0


@pytest.mark.parametrize("estimator", [CGE(mu=MU, scheme="central"), RGE(q=9, mu=MU, chunk=4),
                                       LinearInterpolation(m=12, mu=MU, directions="dct", warm_start=False)],
                         ids=["cge", "rge", "linear-interpolation"])
def test_ask_tell_equals_estimate(estimator):
    # ask: the plan's points; tell: their losses in the same order. The same estimate as `estimate`,
    # up to the few-ulp difference of evaluating the points in other calls (see above) / mu ~ 1e-11.
    oracle = SmoothBlocks()
    theta = oracle.initial_theta()
    plan = estimator.plan(theta, seed=3, chunk=4)
    told = estimator.combine(plan, plan.split(oracle.losses(plan.materialize(), None)))
    estimator.chunk = 4
    direct = estimator.estimate(oracle, theta, None, seed=3)
    torch.testing.assert_close(told.grad, direct.grad, rtol=0, atol=1e-9)
    assert told.queries == direct.queries == plan.num_queries


def test_estimators_match_closed_forms_on_a_quadratic(quadratic):
    # Central differences are exact on a quadratic: (f(t + mu v) - f(t - mu v)) / (2 mu) = v . g, so
    # CGE gives g, RGE gives (scale / q) U^T U g with the plan's own directions U (scale 1 Gaussian,
    # k sphere), and linear interpolation with an orthonormal square Q gives Q^T Q g = g. Only float64
    # rounding remains: ~1e-16 |f| / mu ~ 1e-12 per difference, summed over <= 12 terms.
    theta = quadratic.initial_theta()
    g = quadratic.grad(theta)
    cge = CGE(mu=MU, scheme="central").estimate(quadratic, theta, None)
    torch.testing.assert_close(cge.grad, g, rtol=0, atol=1e-9)
    sub = torch.tensor([1, 4, 7, 10])
    for distribution, coords in (("gaussian", None), ("sphere", sub)):
        rge = RGE(q=7, mu=MU, distribution=distribution, scheme="central", chunk=3)
        est = rge.estimate(quadratic, theta, None, coords=coords, seed=2)
        plan = rge.plan(theta, coords=coords, seed=2, chunk=3)
        u = torch.cat(list(plan.directions.chunks(theta)))
        k = u.shape[1]
        gk = g if coords is None else g[coords]
        want = torch.zeros_like(g)
        want[coords if coords is not None else slice(None)] = (k if distribution == "sphere" else 1) / 7 * (u.T @ (u @ gk))
        torch.testing.assert_close(est.grad, want, rtol=0, atol=1e-9)
    li = LinearInterpolation(m=None, mu=MU, directions="orthonormal", scheme="central").estimate(quadratic, theta, None, seed=1)
    torch.testing.assert_close(li.grad, g, rtol=0, atol=1e-9)


def test_estimators_match_autograd_on_a_smooth_function():
    # f = sum log cosh(theta - c) + 1/2 theta^T A theta is smooth, not quadratic. Central differences
    # err by <= mu^2 / 6 max |D^3 f[v, v, v]|; the quadratic part has none and |d^3/dt^3 log cosh| =
    # |2 tanh sech^2| <= 0.77, so a unit direction v (sum |v_j|^3 <= 1) errs by <= 0.77 mu^2 / 6 = 1.3e-7
    # (+ rounding 1e-16 * 20 / mu = 2e-12). CGE: per coordinate; linear interpolation, g = Q^T b with
    # orthonormal Q: the same per measurement, so <= sqrt(d) * 1.3e-7 = 8.1e-7 in norm.
    oracle = SmoothBlocks()
    theta = oracle.initial_theta().requires_grad_(True)
    (reference,) = torch.autograd.grad(oracle.losses(theta.unsqueeze(0), None)[0], theta)
    theta = theta.detach()
    bound = 0.77 * MU**2 / 6 + 1e-11
    cge = CGE(mu=MU, scheme="central").estimate(oracle, theta, None)
    assert float((cge.grad - reference).abs().max()) <= bound
    li = LinearInterpolation(m=None, mu=MU, directions="orthonormal", scheme="central").estimate(oracle, theta, None, seed=4)
    assert float((li.grad - reference).norm()) <= math.sqrt(theta.numel()) * bound
    assert float(reference.abs().max()) > 0.1  # a real gradient


def test_bad_plans_are_refused_with_the_field_named():
    theta = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="mu must be > 0"):
        QueryPlan.coordinates(theta, 0.0)
    with pytest.raises(ValueError, match="scheme"):
        QueryPlan.coordinates(theta, MU, scheme="backward")
    with pytest.raises(ValueError, match="dimension 5, the plan's space has 2"):
        QueryPlan.along(theta, SeededDirections(3, 5, 0, 2), MU, coords=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expected 6 loss values, got 5"):
        QueryPlan.coordinates(theta, MU).split(torch.zeros(5))
    with pytest.raises(ValueError, match="count, dim, chunk >= 1"):
        SeededDirections(0, 5, 0, 2)


# ------------------------------------------------------------ one finite-difference loop in the tree


def _sources() -> list[Path]:
    return [p for d in ("blackbox_zo", "oracles", "problems", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]


def _code_lines(src: str) -> dict[int, str]:
    """Source lines without comments and strings (docstrings quote the formulas)."""
    lines: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            lines.setdefault(tok.start[0], []).append(tok.string)
    return {n: " ".join(parts) for n, parts in lines.items()}


def test_only_the_executor_queries_an_oracle():
    """Perturb-query-difference is written once: `oracle.query` / `query_coordinates` are called by the
    executor only, and an oracle's raw `losses` / `coordinate_losses` only by oracle implementations
    (and by benchmarks timing those paths themselves, outside any estimate)."""
    raw_ok = {"blackbox_zo/oracle.py": "the base class's default coordinate path, the accounted wrappers, "
                                       "and check_oracle (uncharged by design)",
              "oracles/": "oracle implementations delegating to their own paths",
              "benchmarks/": "speed of the oracle paths themselves"}
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if name in ("query", "query_coordinates") and rel != "blackbox_zo/plan.py":
                    found.append(f"{rel}:{node.lineno} calls .{name}()")
                if name in ("losses", "coordinate_losses") and not any(rel.startswith(k) for k in raw_ok):
                    found.append(f"{rel}:{node.lineno} calls .{name}()")
    assert found == [], "query an oracle through blackbox_zo.plan.execute:\n" + "\n".join(found)
    # and the executor does query (the scan would pass vacuously if the names changed)
    plan_src = (ROOT / "blackbox_zo" / "plan.py").read_text()
    assert ".query(" in plan_src and ".query_coordinates(" in plan_src


def test_finite_difference_quotients_are_written_once():
    """(l+ - l0) / mu and (l+ - l-) / (2 mu) live in PlanLosses.differences; the other quotients by a
    step in the tree are ZO-GraSP's difference of two estimates (DeepZero eq. (3)) and HZO's stage
    differences (contrib: activations of a white-box model, not oracle queries), ZO-AE-DS's per-image
    latent CGE (problems/certified_defense/zo_ae_ds.py: a [d_z + 1, batch] matrix of per-image losses, one
    derivative per image and latent coordinate, which the scalar losses of a PlanLosses do not hold), and
    check_simulator's test of a declared gradient (a simulator's backward pass against a central difference
    of its step, not a loss query: oracles/simulator.py)."""
    quotient = re.compile(r"\)\s*/\s*\(?\s*(?:2\.?0?\s*\*\s*)?(?:\w+\s*\.\s*)?(?:mu|eps|tau|step|activation_mu)\b")
    allowed = {"blackbox_zo/plan.py": 2, "blackbox_zo/sparsity.py": 1, "blackbox_zo/contrib/hzo.py": 4,
               "problems/certified_defense/zo_ae_ds.py": 1, "oracles/simulator.py": 1}
    counts: dict[str, list[int]] = {}
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for n, line in _code_lines(path.read_text()).items():
            if quotient.search(line):
                counts.setdefault(rel, []).append(n)
    assert {k: len(v) for k, v in counts.items()} == allowed, counts


def test_the_engine_page_example_runs_as_printed(capsys):
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "engine.md").read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(code, "docs/engine.md", "exec"), scope)
    assert capsys.readouterr().out.split() == ["65", "130", "True"]
    # RGE on the bowl ||x - 1||^2 at 0: an unbiased estimate of the gradient (-2, -2, -2) from 64 directions
    assert float(scope["estimate"].grad.mean()) == pytest.approx(-2.0, abs=1.0)
