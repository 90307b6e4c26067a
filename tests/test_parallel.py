"""Forward parallelism (blackbox_zo.parallel): 2 gloo ranks on CPU against one process.

Each multi-rank test starts real processes (torch.multiprocessing spawn, or torchrun for
the CLI) that join a gloo group on a free local port; their results come back as files.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from blackbox_zo import parallel
from blackbox_zo.config import TrainConfig, resolve_config
from blackbox_zo.estimators import CGE, RGE
from blackbox_zo.problem import TensorBatches, TrainingSetup
from blackbox_zo.rundir import CHECKPOINT_NAME
from blackbox_zo.trainer import Trainer, train

pytestmark = pytest.mark.distributed

WORLD = 2
MU = 5e-3


# ------------------------------------------------------------------------------ harness


class _Ranks(list):
    """The spawned rank processes, and the TCPStore they meet at (hosted here, as torchrun's agent does)."""

    store: Any = None


def _start(tmp_path: Path, scenario: str, **options) -> _Ranks:
    """Spawn WORLD ranks running `scenario`; each writes its result dict (or its error) to a file.

    The rendezvous store is hosted by this process on a port the kernel picks (port 0), and the
    ranks join it as clients (TORCHELASTIC_USE_AGENT_STORE, torchrun's own arrangement), so no
    port is chosen by probing and released before use: nothing else can take it in between.
    """
    import torch.multiprocessing as mp
    from torch.distributed import TCPStore

    ctx = mp.get_context("spawn")
    procs = _Ranks()
    procs.store = TCPStore("127.0.0.1", 0, WORLD, True, wait_for_workers=False)
    procs.extend(ctx.Process(target=_worker, args=(r, procs.store.port, scenario, str(tmp_path), options))
                 for r in range(WORLD))
    try:
        for p in procs:
            p.start()
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs: list) -> None:
    """Kill every rank still running and reap it (the test that started them stops them)."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        if p.pid is not None:
            p.join(10)


def _collect(tmp_path: Path, procs: list, deadline_s: float) -> list[dict]:
    """Results of every rank; once one rank reported an error, the others get 1 s more, then are killed."""
    end = time.monotonic() + deadline_s
    files = [tmp_path / f"rank{r}.pt" for r in range(len(procs))]
    results: dict[int, dict] = {}
    try:
        while time.monotonic() < end and len(results) < len(procs):
            for r, (p, f) in enumerate(zip(procs, files)):
                if r not in results and f.exists():
                    results[r] = torch.load(f, weights_only=True)
                    if "error" in results[r]:
                        end = min(end, time.monotonic() + 1)
                elif r not in results and not p.is_alive():
                    p.join()
                    if f.exists():
                        continue
                    results[r] = {"exitcode": p.exitcode}
            time.sleep(0.05)
    finally:  # a hung rank is ours to stop, and so is every rank when this loop fails
        _stop(procs)
    return [results.get(r, {"exitcode": None, "hung": True}) for r in range(len(procs))]


def _worker(rank: int, port: int, scenario: str, out_dir: str, options: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate({"parallel": {"timeout_s": options.get("timeout_s", 120),
                                                   "check_every_steps": options.get("check_every", 1),
                                                   "balance_steps": 2}})
    start = time.perf_counter()
    try:
        parallel.init_from_env(cfg)
        result = SCENARIOS[scenario](rank, Path(out_dir), options)
    except Exception as exc:
        result = {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start,
                  "trace": traceback.format_exc()}
    tmp = Path(out_dir) / f".rank{rank}.tmp"
    torch.save(result, tmp)
    os.replace(tmp, Path(out_dir) / f"rank{rank}.pt")
    os._exit(0)  # do not wait for a peer that is gone or hung


# ---------------------------------------------------------------------- shared problem


def _mlp_setup(n_coords: int | None = None, dtype=torch.float64, oracle_cls=None) -> TrainingSetup:
    """A 16-12-10 tanh MLP (334 parameters in 4 blocks) on a synthetic 10-class problem:
    cheap to evaluate, so the spawned ranks spend their time on what is tested."""
    from oracles.model_loss import ModelLossOracle

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen, dtype=dtype)
    y = (x @ torch.randn(16, 10, generator=gen, dtype=dtype)).argmax(1)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10)).to(dtype)
    oracle = (oracle_cls or ModelLossOracle)(module)
    sampler = FixedCoords(_spread_coords(oracle.space.dim, n_coords)) if n_coords else None
    return TrainingSetup(oracle=oracle, train_batches=TensorBatches(x, y, batch_size=32, seed=0), module=module,
                         coord_sampler=sampler)


def _spread_coords(d: int, n: int) -> torch.Tensor:
    return torch.randperm(d, generator=torch.Generator().manual_seed(1))[:n]


class FixedCoords:
    """A coordinate sampler (the trainer's hook for sparsity) with a fixed set."""

    def __init__(self, coords):
        self._coords = coords

    def coords(self, epoch):
        return self._coords

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _train_config(steps: int, **parallel_cfg) -> TrainConfig:
    return TrainConfig.model_validate({
        "estimator": {"kind": "cge", "mu": MU}, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "run": {"epochs": 1, "max_steps": steps, "progress": False},
        "parallel": {"balance_steps": 2, **parallel_cfg}})


ESTIMATORS = {
    "cge-forward": (lambda: CGE(mu=MU), 100),
    "cge-central": (lambda: CGE(mu=MU, scheme="central"), None),
    "rge-forward": (lambda: RGE(q=24, mu=MU, chunk=10), None),
    "rge-central-sphere": (lambda: RGE(q=24, mu=MU, distribution="sphere", scheme="central", chunk=10), 200),
}
TRAIN_STEPS, TRAIN_COORDS = 6, 150


def _estimates(make_sharder=lambda: None) -> dict:
    """Every estimator on the float64 MLP; with a `parallel.PlanSharder` from `make_sharder`, in parallel."""
    out = {}
    for name, (make, n_coords) in ESTIMATORS.items():
        setup = _mlp_setup()
        oracle = setup.oracle
        theta = oracle.initial_theta()
        coords = _spread_coords(theta.numel(), n_coords) if n_coords else None
        est, sharder = make(), make_sharder()
        batch = setup.train_batches.batch(0, 0)
        # three calls: the estimate must not change when the shards are re-balanced (balance_steps=2)
        runs = [est.estimate(oracle, theta, batch, coords=coords, seed=7, sharder=sharder) for _ in range(3)]
        out[name] = {"grads": torch.stack([r.grad for r in runs]), "queries": [r.queries for r in runs],
                     "base_loss": runs[-1].base_loss, "ledger": oracle.ledger.total}
    return out


def _single_process_training() -> torch.Tensor:
    setup = _mlp_setup(TRAIN_COORDS)
    Trainer(setup, _train_config(steps=TRAIN_STEPS)).fit()
    return setup.oracle.space.flatten_module(setup.module)


# --------------------------------------------------------------------------- scenarios


def _scenario_healthy(rank: int, out: Path, options: dict) -> dict:
    result = {"estimates": _estimates(lambda: parallel.PlanSharder(balance_steps=2))}
    # training: CGE on a fixed coordinate subset, SGD with momentum, as the CLI would run it
    setup = _mlp_setup(TRAIN_COORDS)
    run_dir = None
    if rank == 0:  # as the CLI does: only the main rank has a run directory
        run_dir = out / "run"
        run_dir.mkdir()
    trainer = Trainer(setup, _train_config(steps=TRAIN_STEPS, check_every_steps=1), run_dir=run_dir)
    summary = trainer.fit()
    result.update(params=setup.oracle.space.flatten_module(setup.module), summary_queries=summary["queries"],
                  costs=trainer.parallel.costs.per_coord)
    result["collectives_per_step"] = _collectives_per_step()
    result["diverge"] = _divergence_cases(rank)
    result["nan"] = _nan_cases(rank)
    # the CLI on the digits job, as torchrun's workers run it: the first 2 steps (resumed by a real torchrun below)
    from blackbox_zo.cli import main

    result["cli_code"] = main(["train", "digits", *_cli_sets(out / "runs"), "--set", "run.max_steps=2"])
    return result


def _collectives_per_step() -> list[int]:
    """Collectives (of any kind) each training step makes, counted between the steps' callbacks."""
    dist = torch.distributed
    names = ("all_reduce", "all_gather", "broadcast", "broadcast_object_list", "barrier", "all_gather_object")
    inner = {n: getattr(dist, n) for n in names}
    count = [0]

    def counting(name):
        def call(*args, **kwargs):
            count[0] += 1
            return inner[name](*args, **kwargs)
        return call

    seen = []
    for n in names:
        setattr(dist, n, counting(n))
    try:
        Trainer(_mlp_setup(40), _train_config(steps=8, check_every_steps=0),
                callbacks=[lambda trainer, record: seen.append(count[0])]).fit()
    finally:
        for n in names:
            setattr(dist, n, inner[n])
    return [b - a for a, b in zip(seen, seen[1:])]


def _divergence_cases(rank: int) -> dict:
    messages = {}
    # (a) parameters: rank 1 nudges one weight after step 3; the check every 2 steps sees it at step 4
    setup = _mlp_setup(40)

    def nudge(trainer, record):
        if rank == 1 and record.get("step") == 3:
            with torch.no_grad():
                trainer.params[0].view(-1)[0] += 1e-9

    trainer = Trainer(setup, _train_config(steps=8, check_every_steps=2), callbacks=[nudge])
    try:
        trainer.fit()
    except parallel.DivergenceError as exc:
        messages["params"] = (str(exc), trainer.pos.step)
    # (b) batches: rank 1 shuffles with another seed; seen at the first check (step 0)
    setup = _mlp_setup(40)
    if rank == 1:
        setup.train_batches.seed = 99
    try:
        Trainer(setup, _train_config(steps=3, check_every_steps=2)).fit()
    except parallel.DivergenceError as exc:
        messages["batch"] = (str(exc), 0)
    return messages


class _NaNOnRank1:
    """Mixin: rank 1's losses are NaN during training step `bad_step` (the trainer's callback sets `step`)."""

    bad_step, step = 2, 0

    def _poisoned(self, out):
        return out * float("nan") if int(os.environ["RANK"]) == 1 and self.step == self.bad_step else out

    def losses(self, thetas, batch):
        return self._poisoned(super().losses(thetas, batch))

    def base_loss(self, theta, batch):  # a step's base query (the rest of a CGE step goes to feature reuse)
        return self._poisoned(super().base_loss(theta, batch))


def _nan_cases(rank: int) -> dict:
    from oracles.model_loss import ModelLossOracle

    from blackbox_zo.trainer import TrainingError

    out = {}
    cls = type("NaNOnRank1", (_NaNOnRank1, ModelLossOracle), {})
    for policy in ("skip", "stop"):
        setup = _mlp_setup(40, oracle_cls=cls)

        def track(trainer, record):
            trainer.oracle.step = record["step"]

        cfg = _train_config(steps=4)
        cfg.run.nan_policy = policy
        trainer = Trainer(setup, cfg, callbacks=[track])
        try:
            trainer.fit()
            out[policy] = (trainer.skipped_steps, trainer.pos.step, setup.oracle.space.flatten_module(setup.module))
        except TrainingError as exc:
            out[policy] = (str(exc), trainer.pos.step, setup.oracle.space.flatten_module(setup.module))
    return out


class _SleepyOracle:
    """Mixin: rank 1 dies or hangs inside its third loss evaluation (step 1)."""

    mode = "dead"
    calls = 0

    def _maybe_fail(self):
        type(self).calls += 1
        if int(os.environ["RANK"]) == 1 and type(self).calls == 3:
            if self.mode == "dead":
                os._exit(17)
            time.sleep(120)

    def losses(self, thetas, batch):
        self._maybe_fail()
        return super().losses(thetas, batch)

    def base_loss(self, theta, batch):  # a step's base query (the rest of a CGE step goes to feature reuse)
        self._maybe_fail()
        return super().base_loss(theta, batch)


def _scenario_fail(rank: int, out: Path, options: dict) -> dict:
    from oracles.model_loss import ModelLossOracle

    cls = type("Sleepy", (_SleepyOracle, ModelLossOracle), {"mode": options["mode"]})
    setup = _mlp_setup(60, oracle_cls=cls)
    Trainer(setup, _train_config(steps=20), run_dir=None).fit()
    return {"finished": True}


def _backend_threads() -> list[str] | None:
    """Names of this process's gloo threads (Linux; None where /proc is not there)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for t in tasks.iterdir():
        try:
            names.append((t / "comm").read_text().strip())
        except OSError:  # a thread that ended while we looked
            pass
    return [n for n in names if "gloo" in n]


def _scenario_teardown(rank: int, out: Path, options: dict) -> dict:
    """The end of a CLI run, then parallel.shutdown(): the group and its threads must be gone.

    Training with a torch optimizer imports torch._dynamo after the group exists; that import
    used to capture the group in default arguments (torch.distributed.nn.functional), so the
    old teardown left gloo's threads running into interpreter finalization (issue 13: SIGABRT).
    """
    import weakref

    import torch.distributed as dist
    import torch.distributed.nn.functional  # noqa: F401  (what torch._dynamo imports, explicitly)

    setup = _mlp_setup(40)
    trainer = Trainer(setup, _train_config(steps=2))
    trainer.fit()  # ends with the main rank's evaluation shared by broadcast_object_list
    group = weakref.ref(dist.group.WORLD)
    threads_before = _backend_threads()
    case = options["case"]
    held = [dist.group.WORLD] if case == "still-referenced" else []
    result = {"threads_before": threads_before}
    start = time.perf_counter()
    if case == "failed-collective" and rank == 0:  # rank 1 has left; the CLI's exception path tears down
        try:
            parallel._collective("an all-reduce after the peer left", lambda: dist.all_reduce(torch.ones(3)))
        except parallel.ParallelError as exc:  # its traceback's frames hold the group
            result["collective_error"] = str(exc)
            try:
                parallel.shutdown(barrier=False, unwinding=exc)
            except parallel.ParallelError as exc2:
                result["error_message"] = str(exc2)
    else:  # "peer-left": rank 1 fails and leaves at once (as the CLI does on an error), rank 0 succeeded
        try:
            parallel.shutdown(barrier=not (case in ("peer-left", "failed-collective") and rank == 1))
        except parallel.ParallelError as exc:
            result["error_message"] = str(exc)
    result["seconds"] = time.perf_counter() - start
    result.update(freed=group() is None, initialized=dist.is_initialized(), threads_after=_backend_threads(),
                  held=len(held))
    # gloo's TCP transport closes its event-loop thread (pure C++: it never takes the GIL) once its
    # last connection is closed, which after a peer's reset can come a moment later than the
    # group's destructor: seen once in a clean-clone run. It must still go, shortly.
    settled = result["threads_after"] if case != "still-referenced" else None  # that group is kept on purpose
    deadline = time.perf_counter() + 10.0
    while settled and time.perf_counter() < deadline:
        time.sleep(0.05)
        settled = _backend_threads()
    result["threads_settled"] = settled
    return result


SCENARIOS = {"healthy": _scenario_healthy, "fail": _scenario_fail, "teardown": _scenario_teardown}


# ------------------------------------------------------------------------------- tests


def test_balanced_bounds_cut_by_cost():
    # uniform costs: pieces differ by at most one item
    b = parallel.balanced_bounds(torch.ones(10), 3)
    assert b[0] == 0 and b[-1] == 10 and max(b[i + 1] - b[i] for i in range(3)) - min(b[i + 1] - b[i] for i in range(3)) <= 1
    # skewed costs (a cheap late stage, as with feature reuse): equal cost, unequal counts
    costs = torch.cat([torch.full((100,), 3.0), torch.full((400,), 1.0)])  # total 700
    b = parallel.balanced_bounds(costs, 2)
    assert b == [0, 150, 500]  # 100*3 + 50*1 = 350 on each side
    for parts in (2, 3, 5):
        b = parallel.balanced_bounds(costs, parts)
        worst = max(float(costs[b[i]:b[i + 1]].sum()) for i in range(parts))
        assert worst <= float(costs.sum()) / parts + float(costs.max())  # the documented guarantee


def test_refine_costs_converges_to_equal_measured_time():
    # What the block model cannot represent: a fixed overhead per piece (one call per shard)
    # and a cost that grows inside a block. The cut starts from flat predicted costs.
    n, parts, overhead = 600, 3, 40.0
    true = torch.cat([torch.linspace(5.0, 1.0, 100), torch.full((500,), 0.5)]).double()
    predicted = torch.ones(n, dtype=torch.float64)

    def measure(bounds):
        return [overhead + float(true[bounds[p]:bounds[p + 1]].sum()) for p in range(parts)]

    first = measure(parallel.balanced_bounds(predicted, parts))
    for _ in range(25):
        bounds = parallel.balanced_bounds(predicted, parts)
        predicted = parallel.refine_costs(predicted, bounds, measure(bounds))
    last = measure(parallel.balanced_bounds(predicted, parts))
    assert max(first) / (sum(first) / parts) > 1.3  # the flat cut is far off
    # balanced to within one item's cost (the most expensive is 5 of a mean piece of ~223)
    assert max(last) - min(last) <= float(true.max()) + 1e-9
    # pieces without a measurement keep their costs; one step moves a piece by at most 2x
    kept = parallel.refine_costs(predicted, [0, 0, 300, n], [0.0, 0.0, 1e9])
    assert torch.equal(kept[:300], predicted[:300])
    assert torch.allclose(kept[300:], 2 * predicted[300:])


def test_refinement_gain_converges_fast_then_filters_timing_noise():
    # The schedule itself: a full step on the first refinement of a coordinate set, decaying, floored.
    gains = [parallel.refinement_gain(k) for k in range(20)]
    assert gains[0] == 1.0 and all(a >= b for a, b in zip(gains, gains[1:])) and gains[-1] == 0.15
    # A digits-like profile (an expensive first layer, a cheap last one: feature reuse), calibrated
    # costs that put the middle layer at twice its cost, and every measured shard time carrying
    # seeded multiplicative noise (sigma 5%: one step on a shared machine). Imbalance = slowest
    # piece / mean of the TRUE costs of the cut the sharder chose: it measures the cut, not the noise.
    true = torch.cat([torch.full((80,), 175.0), torch.full((1168,), 13.0), torch.full((2570,), 2.7)]).double()
    start = torch.cat([torch.full((80,), 175.0), torch.full((1168,), 26.0), torch.full((2570,), 2.7)]).double()

    def imbalances(gain, seed, steps=40, sigma=0.05):
        gen, costs, out = torch.Generator().manual_seed(seed), start.clone(), []
        for k in range(steps):
            b = parallel.balanced_bounds(costs, 2)
            exact = [float(true[b[p]:b[p + 1]].sum()) for p in range(2)]
            out.append(max(exact) / (sum(exact) / 2))
            noisy = [e * float(torch.exp(sigma * torch.randn(1, generator=gen))) for e in exact]
            costs = parallel.refine_costs(costs, b, noisy, damping=gain(k))
        return out

    runs = {name: [imbalances(g, seed) for seed in range(20)]
            for name, g in (("constant 0.5", lambda k: 0.5), ("schedule", parallel.refinement_gain))}

    def excess(name, lo, hi):  # mean imbalance - 1 over steps [lo, hi), over the seeds
        return statistics.mean(statistics.mean(r[lo:hi]) for r in runs[name]) - 1

    assert excess("schedule", 0, 1) > 0.08  # the calibrated cut is far off
    # converges faster than the former constant gain, and then leaves less imbalance (values
    # with these seeds: 0.012 vs 0.016 over steps 3-8, 0.0065 vs 0.011 over steps 10-40)
    assert excess("schedule", 3, 9) < 0.85 * excess("constant 0.5", 3, 9)
    assert excess("schedule", 10, 40) < 0.75 * excess("constant 0.5", 10, 40)
    assert excess("schedule", 10, 40) < 0.01


def test_fingerprint_is_bitwise():
    t = torch.linspace(-1, 1, 1000)
    u = t.clone()
    u[500] = torch.nextafter(u[500], torch.tensor(2.0))  # one ulp
    assert parallel.fingerprint((t, {"a": 3})) == parallel.fingerprint((t.clone(), {"a": 3}))
    assert parallel.fingerprint(t) != parallel.fingerprint(u)
    assert parallel.fingerprint((t, 1)) != parallel.fingerprint((t, 2))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """One 2-rank session shared by the tests below; the single-process references are computed
    here while the ranks run."""
    tmp = tmp_path_factory.mktemp("healthy")
    procs = _start(tmp, "healthy")
    try:
        single = {"estimates": _estimates(), "params": _single_process_training()}
    finally:  # generous (2 shared cores, other suites running) but bounded; stops the ranks in any case
        ranks = _collect(tmp, procs, deadline_s=300)
    for r in ranks:
        assert "error" not in r, r.get("trace", r)
    return ranks, single, tmp


def test_two_ranks_give_the_same_estimate_as_one_process(healthy):
    ranks, single, _ = healthy
    for name in ESTIMATORS:
        ref = single["estimates"][name]
        for r in ranks:
            got = r["estimates"][name]
            # float64 throughout: the only differences are the order of the cross-rank sum (RGE) and the
            # chunk a coordinate is evaluated in; both change a loss by ~1e-16 relative and the estimate
            # by ~1e-16 * loss / mu ~ 1e-13. 1e-10 leaves room and still catches any coordinate or
            # direction evaluated twice, missed or misplaced (errors of the size of an entry, >= 1e-4).
            assert torch.allclose(got["grads"], ref["grads"], rtol=0, atol=1e-10), name
            # job accounting: forward schemes evaluate the base loss on every rank, so a forward step costs
            # one query more per extra rank than on one process; central schemes cost exactly the same
            extra = (WORLD - 1) if "forward" in name else 0
            assert got["queries"] == [q + extra for q in ref["queries"]], name
            assert got["ledger"] == ref["ledger"] + 3 * extra, name
            assert got["base_loss"] == pytest.approx(ref["base_loss"], rel=1e-12), name
        assert torch.equal(ranks[0]["estimates"][name]["grads"], ranks[1]["estimates"][name]["grads"]), name
        assert ref["grads"].abs().max() > 1e-3, name  # a real gradient, not zeros on both sides


def test_two_ranks_take_the_same_steps_as_one_process(healthy, tmp_path):
    ranks, single, tmp = healthy
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # identical steps on every rank, bitwise
    # float64; 6 steps of lr 0.1 with momentum amplify the ~1e-13 gradient rounding by < 10
    assert torch.allclose(ranks[0]["params"], single["params"], rtol=0, atol=1e-10)
    assert (single["params"] - _mlp_setup().oracle.initial_theta()).abs().max() > 1e-3  # it moved
    assert ranks[0]["summary_queries"]["train"] == TRAIN_STEPS * (TRAIN_COORDS + WORLD)
    assert ranks[0]["costs"].shape == (4,) and bool((ranks[0]["costs"] > 0).all())  # measured, one per block
    assert torch.equal(ranks[0]["costs"], ranks[1]["costs"])  # agreed, so both cut the same shards
    # only the main rank writes, and it writes what a single process would
    assert sorted(p.name for p in (tmp / "run").iterdir()) == [CHECKPOINT_NAME, "metrics.jsonl", "summary.json",
                                                               "training.png"]
    state = torch.load(tmp / "run" / CHECKPOINT_NAME, weights_only=True)
    assert state["ledger"]["counts"]["train"] == TRAIN_STEPS * (TRAIN_COORDS + WORLD)


def test_a_training_step_makes_one_collective(healthy):
    # the step's plan all-reduce also carries the stop request: no second collective per step
    # (steps 2-3 of 8: the calibration's block costs add one all-reduce at the end of step 2)
    for r in healthy[0]:
        per_step = r["collectives_per_step"]
        assert len(per_step) == 7 and per_step[2:] == [1] * 5, per_step


def test_divergence_is_detected(healthy):
    ranks, _, _ = healthy
    for r in ranks:
        msg, step = r["diverge"]["params"]
        assert "ranks diverged at step 4" in msg and "parameters_and_buffers" in msg and "rank(s) [1]" in msg
        assert step == 4  # caught at the first check after the nudge, before step 4 was taken
        msg, _ = r["diverge"]["batch"]
        assert "ranks diverged at step 0" in msg and "batch" in msg and "parameters" not in msg


def test_a_nan_on_one_rank_is_skipped_or_stops_on_every_rank(healthy):
    ranks, _, _ = healthy
    skipped = [r["nan"]["skip"] for r in ranks]
    assert [s[:2] for s in skipped] == [(1, 4), (1, 4)]  # step 2 skipped on both ranks, the run went on
    assert torch.equal(skipped[0][2], skipped[1][2])  # and they still agree bitwise
    stopped = [r["nan"]["stop"] for r in ranks]
    assert all(isinstance(s[0], str) and s[1] == 2 for s in stopped), stopped  # both stopped at step 2
    assert "non-finite" in stopped[1][0] and "1 of 2 ranks failed" in stopped[0][0]
    assert "parameters left unchanged" in stopped[0][0]
    assert torch.equal(stopped[0][2], stopped[1][2])


@pytest.mark.parametrize("mode", ["dead", "hung"])
def test_failed_rank_gives_clear_error_within_timeout(tmp_path, mode):
    # The group's timeout also bounds every collective before the fault, so it must exceed the
    # ranks' skew on a loaded machine (3 s failed at load 18-22 on 2 cores). A dead peer must be
    # seen at once, long before a generous timeout; a hung one only by the timeout.
    timeout = 10.0 if mode == "hung" else 60.0
    ranks = _collect(tmp_path, _start(tmp_path, "fail", mode="dead" if mode == "dead" else "hang", timeout_s=timeout),
                     deadline_s=60)
    survivor = ranks[0]
    assert survivor.get("error") == "ParallelError", survivor
    assert "rank 0 of 2" in survivor["message"] and "died or hung" in survivor["message"]
    assert "all-reduce of the CGE estimate" in survivor["message"]
    waited = float(survivor["message"].split("failed after ")[1].split("s:")[0])
    if mode == "hung":  # noticed by the timeout, not before it and not much after
        assert timeout - 0.5 <= waited <= timeout + 20
    else:  # a dead peer closes its sockets: seen at once, long before the timeout
        assert ranks[1] == {"exitcode": 17} and waited < timeout


@pytest.mark.parametrize("case", ["released", "still-referenced", "peer-left", "failed-collective"])
def test_shutdown_frees_the_group_and_its_threads_before_exit(tmp_path, case):
    ranks = _collect(tmp_path, _start(tmp_path, "teardown", case=case, timeout_s=120), deadline_s=300)
    for rank, r in enumerate(ranks):
        assert "error" not in r, r.get("trace", r)
        assert not r["initialized"]
        if r["threads_before"] is not None:
            assert r["threads_before"]  # the check below can see gloo's threads
        if case == "still-referenced":  # a group someone still holds cannot be freed: said, not left to abort at exit
            assert not r["freed"] and "still referenced" in r["error_message"], r
            if r["threads_after"] is not None:
                assert r["threads_after"], r
            continue
        # freed now, threads joined: nothing of the group is left for interpreter finalization
        assert r["freed"], r
        # the worker threads (they take the GIL: the abort's cause) are joined by the time shutdown returns;
        # the transport's event loop ends within seconds
        assert not [t for t in r["threads_after"] or [] if t != "gloo_tcp_loop"], r["threads_after"]
        assert r["threads_settled"] in ([], None), r["threads_settled"]
        if case == "peer-left" and rank == 0:  # its barrier sees the peer gone at once, not after timeout_s
            assert "the final barrier failed" in r["error_message"] and r["seconds"] < 60, r
        elif case == "failed-collective" and rank == 0:
            assert "died or hung" in r["collective_error"] and "error_message" not in r, r
        else:
            assert "error_message" not in r, r


TORCHRUN_TIMEOUT_S = 300  # a job takes ~20 s on 2 idle cores; bounded, so a hang fails instead of stalling CI


def _stress_module():
    """benchmarks/stress_parallel.py: its torchrun runner stops the launcher and every rank on a
    timeout or an interrupt (torchrun gives each rank a session of its own)."""
    import importlib.util

    if "stress_parallel" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "stress_parallel.py"
        spec = importlib.util.spec_from_file_location("stress_parallel", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["stress_parallel"] = module  # before running it: its dataclasses look themselves up there
        spec.loader.exec_module(module)
    return sys.modules["stress_parallel"]


def _torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (it binds a free port itself) running the CLI on digits."""
    return _stress_module().torchrun(["-m", "blackbox_zo", "train", "digits", *args], cwd, TORCHRUN_TIMEOUT_S)


# DeepZero's recipe (Sparse-CGE: coordinate plans whose base loss every rank evaluates), not the digits default
CLI_SET = ["estimator=cge", "estimator.mu=0.005", "phase2=none", "model.width=2", "data.batch_size=32", "run.epochs=1", "run.progress=false", "run.checkpoint_every_steps=1",
           "parallel.balance_steps=2", "parallel.check_every_steps=1"]


def _cli_sets(out_dir: Path) -> list[str]:
    return [a for s in CLI_SET + [f"run.out_dir={out_dir}"] for a in ("--set", s)]


def test_torchrun_resumes_a_parallel_run_and_only_main_writes(healthy, tmp_path):
    ranks, _, tmp = healthy
    assert [r["cli_code"] for r in ranks] == [0, 0]
    (run_dir,) = (tmp / "runs" / "digits").iterdir()  # one run directory, made by the main rank only
    resumed = _torchrun(tmp_path, "--resume", str(run_dir), "--set", "run.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "terminate called" not in resumed.stderr and "teardown failed" not in resumed.stderr, resumed.stderr[-3000:]
    assert resumed.stdout.count("digits: test_acc=") == 1  # one final line, from the main rank
    assert len(list((tmp / "runs" / "digits").iterdir())) == 1
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # the same 4 steps on one process
    from problems.digits import DigitsProblem

    p = DigitsProblem()
    cfg = resolve_config(p.config_model, p.default_config(), overrides=CLI_SET + ["run.max_steps=4"])
    single = train(p, cfg, run_dir=tmp_path / "single")
    a = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "single" / CHECKPOINT_NAME, weights_only=True)
    for k in b["module"]:
        # float32: a loss may differ by a few ulp (~2.3 * 2**-21 ~ 1e-6) with the chunk its coordinate is
        # evaluated in; / mu -> 2e-4 in a gradient entry, times lr * (momentum-grown) 4 steps (~1) -> 2e-4.
        assert torch.allclose(a["module"][k], b["module"][k], rtol=0, atol=2e-4), k
    # the job's ledger: every loss value once; the base loss is evaluated on both ranks
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["queries"]["train"] == single["queries"]["train"] + 4 * (WORLD - 1)
    assert summary["steps"] == 4


def _processes_with_arg(marker: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace").split("\0"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")
def test_a_torchrun_that_times_out_leaves_no_process(tmp_path):
    # torchrun gives every rank a session of its own, so killing the launcher alone leaves them running
    marker = f"{600 + os.getpid() % 1000}.{time.time_ns() % 997}"  # a `sleep` argument no one else uses
    try:
        job = _stress_module().torchrun(["--no-python", "sleep", marker], tmp_path, timeout_s=15)
        assert job.returncode == 124
        deadline = time.monotonic() + 10  # a killed process can take a moment to be reaped
        while _processes_with_arg(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_with_arg(marker) == []
    finally:  # if the runner failed, the test still stops what it started
        for pid in _processes_with_arg(marker):
            os.kill(pid, 9)


@pytest.mark.slow
def test_stress_parallel_train_resume_cycles_under_load():
    """The stress script in small: CLI train + resume cycles and exit-race jobs, under load, 0 failures.
    (`python benchmarks/stress_parallel.py --cycles 30 [--load]` is the full run.)"""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "stress_parallel.py"
    proc = subprocess.Popen([sys.executable, str(script), "--cycles", "3", "--exit-race", "10", "--load"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:  # SIGTERM: the script stops its job and its load processes itself
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out[-5000:]
    assert "stress_parallel: 0 failures in 13 jobs" in out, out[-5000:]
