"""Forward parallelism over torch.distributed (DeepZero Sec. 5, eq. (5); Algorithm 2, lines 6-10).

Parallelism shards query plans, not estimators. Every method of the engine builds a
`blackbox_zo.plan.QueryPlan` and hands it to `blackbox_zo.plan.execute`; given a
:class:`PlanSharder`, the executor evaluates only this rank's share of the plan and one
all-reduce gives every rank the losses of the whole plan, from which each rank computes the
method's estimate itself. CGE decomposes over coordinates (DeepZero eq. (5))::

    grad = sum_{i=1..M} g_i,   g_i = sum_{j in S_i} [(l(theta + mu e_j) - l(theta)) / mu] e_j

and so does every plan: M processes each evaluate the losses of their piece S_i, and the sum
of the zero-padded loss vectors is exact (x + 0 = x), so a sharded plan returns bitwise the
losses its pieces evaluated. This module holds the process group, the cost model that cuts
plans and the agreement checks; it knows no estimator. How it runs:

* Launch with ``torchrun --nproc-per-node M -m blackbox_zo train PROBLEM ...``. The CLI
  calls :func:`init_from_env` when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA);
  without a launcher nothing here is active and training is single-process.
* Every rank builds the same problem with the same seeds, so it draws the same batch and
  the same coordinate set (the trainer's batches and sparse sampler are pure functions of
  seed/epoch/index) and builds the same plan. Every rank evaluates the base loss l(theta) of
  a forward-difference plan itself (it needs it for its own differences, and a feature-reuse
  oracle needs the unperturbed features anyway), then its share of the perturbations. The
  losses are summed by **one all-reduce** per plan; every rank then computes the identical
  estimate and takes the identical optimizer step, so parameters are never broadcast. The
  same all-reduce carries a checksum of the plan (a rank with other coordinates, seed or step
  raises :class:`DivergenceError` on every rank), and :meth:`PlanSharder.check_agreement`
  compares a checksum of the parameters, buffers, batch and coordinate set across ranks
  every ``parallel.check_every_steps`` steps.
* Coordinate plans are balanced by measured cost: during the first ``parallel.balance_steps``
  coordinate plans each rank evaluates a strided share (every M-th coordinate, so about 1/M of
  every block, and all ranks are busy as in the steps after) and times it block by block (CPU
  time on CPU, so that other processes on a shared machine do not distort it; wall time on
  CUDA) (a block = one
  named tensor of the ParamSpace, e.g. one layer's weight, so it belongs to one stage of a
  staged model). The per-coordinate cost of every block is then agreed across ranks (one
  all-reduce) and the sorted coordinate set is cut into M contiguous pieces of equal
  predicted cost. With a feature-reuse oracle late stages are cheaper than early ones and the
  cut follows that; with the plain oracle all coordinates cost alike and the cut is even. No
  cost table is hard-coded. After that, every plan refines the cut: the all-reduce also
  carries each rank's measured seconds for its piece, and the predicted costs of each piece
  are scaled toward what it took (:func:`refine_costs`), so a per-call overhead or a block
  whose cost is not linear in its count stops skewing the split. The refined costs carry
  over, per block, when the coordinate set changes. The step size of that scaling decays
  (:func:`refinement_gain`: 1 on the first plan of a coordinate set, down to 0.15), so the
  cut converges fast from the calibration and then stops chasing one step's timing noise.
  The cut changes no result: every coordinate is evaluated by exactly one rank.
* Direction plans (RGE, linear interpolation) and point plans are split evenly into
  contiguous ranges: every direction perturbs every block, so they cost alike. Every rank
  draws the same seeded direction stream (the one a single process draws, chunk for chunk).
* A rank whose shard fails (the oracle raises or returns NaN/inf) marks it in the same
  all-reduce: that rank re-raises its error and every other rank raises one of the same kind
  ("k of M ranks failed"), so ``run.nan_policy`` skips or stops the step on every rank alike.
* A rank that dies or hangs: every collective runs under the process group's timeout
  (``parallel.timeout_s``); a dead peer is seen at once (connection reset), a hung one
  after the timeout, and either becomes a :class:`ParallelError` naming the rank, the
  operation and the timeout. Under torchrun the agent then stops the remaining ranks.
* Teardown: the CLI ends the group it joined with :func:`shutdown` before it returns, on
  every exit path (a barrier first when the command succeeded, so no rank leaves while a
  peer still needs it). See :func:`shutdown` for why this cannot be left to interpreter exit.

Query accounting (the job's ledger). Every loss value some rank evaluated is counted
once, in the phase it was made in. Each rank's ledger holds the **job** total: after the
all-reduce the executor charges the queries of the other ranks to this rank's ledger (the one
place a sharded plan is charged), so all ledgers agree, the budget check stops every rank
before the same step, and the main rank's checkpoint and summary report the job's count.
Work that really runs on every rank is counted on every rank: the base loss of a
forward-difference plan (a CGE-forward step with |S| coordinates costs |S| + M queries on M
ranks, RGE-forward q + M) and anything a problem does in `setup` (e.g. ZO-GraSP pruning,
which runs unsharded on every rank before training and is summed over ranks once when
training starts). Evaluation runs on the main rank only and is counted once.
``ledger.rate()`` becomes job queries per second of this rank's time inside the oracle.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import hashlib
import importlib
import os
import time
import traceback
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.distributed
from torch import Tensor

from .oracle import NonFiniteLossError, OracleError, ParamSpace, QueryLedger

__all__ = [
    "ParallelError",
    "DivergenceError",
    "init_from_env",
    "shutdown",
    "is_active",
    "rank",
    "world_size",
    "is_main_process",
    "agree_max",
    "balanced_bounds",
    "refine_costs",
    "refinement_gain",
    "BlockCosts",
    "fingerprint",
    "cost_clock",
    "PlanSharder",
    "ReducedShards",
    "sum_ledger_over_ranks",
    "share_from_main",
]


class ParallelError(RuntimeError):
    """A distributed run cannot go on: a rank died, hung past the timeout, or disagrees."""


class DivergenceError(ParallelError):
    """Ranks that must hold identical state (parameters, batch, coordinates) do not."""


# ------------------------------------------------------------------------ process group


def _dist():
    return torch.distributed


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a process group: the rank that writes files and prints."""
    return rank() == 0


def agree_max(value: int, what: str) -> int:
    """The largest `value` over all ranks (one all-reduce; `value` itself without a process group).

    Used to agree on a decision every rank must take together (e.g. stop before the next step).
    """
    if not is_active():
        return int(value)
    flag = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist = _dist()
    _collective(what, lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
    return int(flag.item())


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ParallelError(f"WORLD_SIZE > 1 but {name} is not set: launch with torchrun (it sets RANK, "
                            "LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or unset WORLD_SIZE for one process")
    try:
        return int(raw)
    except ValueError:
        raise ParallelError(f"environment variable {name} must be an integer, got {raw!r}") from None


# Modules that capture the default process group in a default argument when they are first
# imported (``def all_reduce(tensor, ..., group=group.WORLD)``). Imported after the group
# exists (torch.optim imports torch._dynamo lazily, which imports this one), they hold the
# group forever and destroy_process_group() can no longer free it; imported before, they
# hold None (= "the default group", resolved at call time). See shutdown().
_CAPTURE_THE_GROUP_AT_IMPORT = ("torch.distributed.nn.functional",)


def init_from_env(config: Any = None) -> bool:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    gloo for CPU runs, NCCL when ``run.device`` is CUDA (``parallel.backend`` overrides);
    every collective then fails after ``parallel.timeout_s`` instead of waiting forever.
    Returns True if this call created the group (the caller then ends it with
    :func:`shutdown`), False if one was already initialised.
    """
    dist = _dist()
    if dist.is_initialized():
        return False
    if not dist.is_available():
        raise ParallelError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    world, rank_, local = _env_int("WORLD_SIZE"), _env_int("RANK"), int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ:
        raise ParallelError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
    _env_int("MASTER_PORT")
    pcfg = getattr(config, "parallel", None)
    device = str(getattr(getattr(config, "run", None), "device", "cpu"))
    backend = getattr(pcfg, "backend", "auto")
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ParallelError("parallel.backend: nccl needs CUDA, and none is available (use gloo on CPU)")
        torch.cuda.set_device(local % torch.cuda.device_count())
    timeout = float(getattr(pcfg, "timeout_s", 300.0))
    for name in _CAPTURE_THE_GROUP_AT_IMPORT:
        importlib.import_module(name)
    try:
        dist.init_process_group(backend, rank=rank_, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:  # rendezvous failed: another rank never arrived, or the port is taken
        raise ParallelError(f"rank {rank_} of {world}: cannot join the {backend} process group within "
                            f"{timeout:g}s: {type(exc).__name__}: {exc}") from exc
    # A fallback for scripts that call init_from_env() and never shutdown(): atexit handlers run
    # while the interpreter is still whole. The CLI does not rely on it (it calls shutdown()).
    atexit.register(_shutdown_at_exit)
    return True


def shutdown(*, barrier: bool = True, unwinding: BaseException | None = None) -> None:
    """Leave and free the process group (its backend threads included) now, not at interpreter exit.

    Why this exists (issue 13: a rank of a finished torchrun job died with SIGABRT,
    "terminate called without an active exception", about 1 run in 8 of the parallel tests).
    gloo runs every collective on a worker thread of the C++ process group; the worker marks
    the work done (the caller's wait() returns) and only afterwards drops its reference to it.
    When that is the last reference to a tensor created in Python (broadcast_object_list
    makes such tensors; it is the trainer's last collective), dropping it must take the GIL.
    If the main thread has meanwhile reached Py_FinalizeEx, CPython ends any thread that asks
    for the GIL with pthread_exit(); the forced unwind passes through the noexcept destructor
    of the work and libstdc++ calls std::terminate(): SIGABRT. Seen in a core dump: main thread
    in Py_FinalizeEx -> gc; worker thread in ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork
    -> TensorImpl::decref_pyobject -> take_gil -> pthread_exit -> std::terminate.

    The old teardown registered destroy_process_group() with atexit, which looks sufficient but
    was not: destroy_process_group() only forgets the group; the C++ object and its threads
    live until the last Python reference goes, and torch.distributed.nn.functional (imported
    by torch._dynamo, which torch.optim imports lazily, i.e. after the group existed) captured
    the group in the default arguments of its functions. So the worker threads were still alive during
    finalization, and a rank that exited right after the last collective raced them.

    The fix, at the cause: init_from_env() imports the capturing module before the group
    exists, and this function is called explicitly (the CLI does so on every exit path) to
    (1) with ``barrier=True``, wait for every rank, so no rank tears down while a peer still
    needs a collective; (2) destroy the group; (3) check, through a weak reference, that the
    C++ group was really freed: its destructor joins the worker threads (releasing the GIL
    while it waits), so nothing of the group can run during finalization. A group that is
    still referenced afterwards (a plug-in holding it, or a future torch module capturing it)
    raises ParallelError instead of leaving the race in place silently.

    Use ``barrier=False`` on error paths: a failed or interrupted rank must not wait
    ``parallel.timeout_s`` for peers that may be gone. A failed barrier still destroys the
    group and then raises ParallelError. Does nothing when no group is initialised.
    ``unwinding``: the exception the process is ending with, if any; the local variables of
    its finished frames (and of the exceptions chained to it) are cleared, because the frames
    of a failed collective hold the group. The traceback still prints.
    """
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return
    seen: set[int] = set()
    while unwinding is not None and id(unwinding) not in seen:
        seen.add(id(unwinding))
        traceback.clear_frames(unwinding.__traceback__)  # skips frames still executing (the caller's)
        unwinding = unwinding.__cause__ or unwinding.__context__
    # Failures are kept as messages only: an exception's traceback holds the frames of the
    # collective, whose locals hold the group, and would keep it alive.
    failure: str | None = None
    if barrier and dist.get_world_size() > 1:
        try:
            _collective("the final barrier", dist.barrier)
        except ParallelError as exc:
            failure = str(exc)
    group = weakref.ref(dist.group.WORLD)
    try:
        dist.destroy_process_group()
    except Exception as exc:  # nothing left to free in a group that is already broken
        failure = failure or f"destroying the process group failed: {type(exc).__name__}: {exc}"
    if group() is not None:
        gc.collect()  # frames of a failed collective (reference cycles through their exception) go here
    if group() is not None:
        failure = failure or (
            "the process group is still referenced after destroy_process_group(), so its backend threads "
            "would outlive this process's teardown (they can abort the interpreter at exit); something "
            "imported after init_from_env() or a plug-in holds torch.distributed.group.WORLD")
    if failure is not None:
        raise ParallelError(failure)


def _shutdown_at_exit() -> None:
    try:
        shutdown(barrier=False)
    except ParallelError:  # nothing more can be done at exit; the CLI path reports this case
        pass


def _comm_device() -> torch.device:
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    """Run one collective; a dead or hung peer becomes a ParallelError naming the operation."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as exc:
        waited = time.perf_counter() - start
        raise ParallelError(
            f"rank {rank()} of {world_size()}: {what} failed after {waited:.1f}s: another rank died or "
            f"hung past the process-group timeout (parallel.timeout_s). Cause: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc


# ---------------------------------------------------------------------------- sharding


def balanced_bounds(costs: Tensor, parts: int) -> list[int]:
    """Cut items with these costs, in order, into `parts` contiguous pieces of equal total cost.

    Item i goes to the piece whose cost interval [p T/parts, (p+1) T/parts) holds the
    centre of its own cumulative-cost interval, so every piece costs at most
    T/parts + max(cost). Returns bounds b with piece p = items[b[p]:b[p+1]].
    """
    n = int(costs.numel())
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n == 0:
        return [0] * (parts + 1)
    c = costs.detach().to(torch.float64).cpu().clamp_min(0)
    if float(c.sum()) <= 0:
        c = torch.ones_like(c)
    cum = torch.cumsum(c, 0)
    centres = cum - 0.5 * c
    targets = cum[-1] * torch.arange(1, parts, dtype=torch.float64) / parts
    inner = torch.searchsorted(centres, targets).tolist()
    return [0, *inner, n]


def refine_costs(costs: Tensor, bounds: Sequence[int], seconds: Sequence[float], damping: float = 0.5) -> Tensor:
    """Scale each piece's predicted item costs toward the seconds it measured.

    Piece p = items[bounds[p]:bounds[p+1]] predicted sum(costs) and took seconds[p]; its
    costs are multiplied by (seconds[p] / predicted) ** damping, the factor clamped to
    [1/2, 2] per call so one noisy step cannot swing the cut. Empty pieces and pieces
    without a positive measurement keep their costs. Re-cutting with `balanced_bounds`
    after each call converges to pieces of equal measured time (tests/test_parallel.py
    checks this on a cost profile the block model cannot represent).
    """
    out = costs.detach().to(torch.float64).clone()
    for p in range(len(bounds) - 1):
        a, b = int(bounds[p]), int(bounds[p + 1])
        predicted, measured = float(out[a:b].sum()), float(seconds[p])
        if b > a and predicted > 0 and measured > 0:
            out[a:b] *= min(2.0, max(0.5, (measured / predicted) ** damping))
    return out


def refinement_gain(refinements: int, start: float = 1.0, floor: float = 0.15, decay: float = 0.7) -> float:
    """The `damping` of the `refinements`-th call of :func:`refine_costs` on one coordinate set:
    start * decay**refinements, never below `floor` (1.0, 0.7, 0.49, 0.34, 0.24, 0.17, 0.15, ...).

    Large at first, because the calibrated block costs can be far off (digits, 2 ranks, before the
    strided calibration: first cuts at coordinate 493 to 745, settled at 369 to 550); small later,
    because one step's shard seconds carry noise of a few percent (tens under load: one step of a
    rank took 30 ms where its neighbours took 20), and with the former constant 0.5 the cut followed
    that noise (in a 12-step trace it wandered between 357 and 585). A stochastic-approximation
    schedule; the floor keeps the cut following a real drift of the costs (other load, a layer
    that got slower). On a simulated digits-like profile with seeded noise of 2% / 5% per step
    (tests/test_parallel.py), the mean imbalance of the cut over steps 3-8 is 1.008 / 1.012
    (constant 0.5: 1.014 / 1.016) and over steps 10-40 1.003 / 1.007 (1.005 / 1.011).
    """
    return max(floor, start * decay ** max(0, int(refinements)))


class BlockCosts:
    """Measured seconds per coordinate of each ParamSpace block, agreed across ranks."""

    def __init__(self, space: ParamSpace):
        self.space = space
        self.seconds = torch.zeros(len(space), dtype=torch.float64)
        self.counts = torch.zeros(len(space), dtype=torch.float64)
        self.per_coord: Tensor | None = None  # set by finalize()

    def add(self, block: int, seconds: float, count: int) -> None:
        self.seconds[block] += seconds
        self.counts[block] += count

    def finalize(self) -> Tensor:
        """Sum the timings of all ranks (one all-reduce) -> identical costs on every rank.

        A block no rank timed (e.g. outside this epoch's sparse coordinate set) gets the
        count-weighted mean cost of the blocks that were timed.
        """
        both = torch.cat([self.seconds, self.counts]).to(_comm_device())
        _collective("all-reduce of the measured block costs", lambda: _dist().all_reduce(both))
        both = both.cpu()
        seconds, counts = both[: len(self.space)], both[len(self.space):]
        mean = float(seconds.sum() / counts.sum()) if counts.sum() > 0 else 1.0
        self.per_coord = torch.where(counts > 0, seconds / counts.clamp_min(1), torch.full_like(seconds, mean))
        return self.per_coord

    def describe(self) -> str:
        if self.per_coord is None:
            return "block costs not measured yet"
        rows = [f"{b.name}={1e6 * float(c):.1f}us" for b, c in zip(self.space, self.per_coord)]
        return "measured cost per coordinate: " + ", ".join(rows)


# --------------------------------------------------------------------------- checksums


def _tensors_of(obj: Any) -> list[Any]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [x for k in sorted(obj, key=str) for x in (str(k), *_tensors_of(obj[k]))]
    if isinstance(obj, (list, tuple)):
        return [x for item in obj for x in _tensors_of(item)]
    return [repr(obj)]  # ints, seeds, strings: their text is their identity


def fingerprint(obj: Any) -> int:
    """A 63-bit hash of the exact bytes of every tensor in obj (nested tuples/lists/dicts).

    Bitwise: one flipped bit anywhere changes it, which is what "identical on every
    rank" means. Costs one pass over the bytes (plus a host copy for CUDA tensors).
    """
    h = hashlib.blake2b(digest_size=8)
    for item in _tensors_of(obj):
        if isinstance(item, Tensor):
            t = item.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(str(item).encode())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


# ----------------------------------------------------------------------- plan sharding


def cost_clock(like: Tensor) -> float:
    """The clock shard costs are measured with. CPU: this process's CPU time, so that other
    processes on a shared machine do not distort the measured costs (with one intra-op thread
    it equals the wall time on an idle machine). CUDA: wall time after a synchronize."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
        return time.perf_counter()
    return time.process_time()


# slots after the losses in the one all-reduced tensor of a plan; then each rank's shard seconds
_QUERIES, _FAILED_NONFINITE, _FAILED_ORACLE, _KEY_A, _KEY_A2, _KEY_B, _KEY_B2 = range(7)
_SLOTS = 7
_KEY_BITS = 16  # two 16-bit keys: sums of squares stay exact in float64 up to 1024 ranks


class ReducedShards:
    """The all-reduced result of one plan: every rank's losses, the job's queries, each rank's seconds."""

    def __init__(self, values: Tensor, queries: int, seconds: Tensor, failed_nonfinite: int, failed_oracle: int,
                 world: int):
        self.values, self.queries, self.seconds = values, queries, seconds
        self.failed_nonfinite, self.failed_oracle, self.world = failed_nonfinite, failed_oracle, world

    def raise_if_failed(self, own: BaseException | None) -> None:
        """A failure on any rank fails the plan on every rank: the failing rank re-raises its own
        error, the others an error of the same kind naming how many ranks failed."""
        failed = self.failed_nonfinite + self.failed_oracle
        if not failed:
            return
        if own is not None:
            raise own
        cls = OracleError if self.failed_oracle else NonFiniteLossError
        raise cls(f"{failed} of {self.world} ranks failed to evaluate their shard (see that rank's log)")


class PlanSharder:
    """Splits query plans over the ranks of the process group: the cost model and the agreement checks.

    `blackbox_zo.plan.execute(plan, ..., sharder=this)` asks it which part of a plan this rank
    evaluates and hands it the losses to all-reduce; it never sees an estimator. Coordinate plans
    are cut by measured cost (:class:`BlockCosts` during the first `balance_steps` coordinate
    plans, then :func:`refine_costs` every plan); direction and point plans evenly.
    `balance_by_cost=False` cuts coordinates evenly by count and `refine=False` keeps the
    calibrated block costs (the benchmark's comparisons).
    """

    def __init__(self, *, balance_steps: int = 3, check_every_steps: int = 50, balance_by_cost: bool = True,
                 refine: bool = True, log: Callable[[str], None] | None = None):
        if not is_active():
            raise ParallelError("PlanSharder needs an initialised process group of more than one rank")
        if balance_steps < 1:
            raise ValueError(f"parallel.balance_steps must be >= 1, got {balance_steps}")
        self.balance_steps = int(balance_steps)
        self.balance_by_cost = bool(balance_by_cost)
        self.refine = bool(refine)
        self.check_every_steps = int(check_every_steps)
        self.rank, self.world = rank(), world_size()
        self.calls = 0  # coordinate plans executed
        self.costs: BlockCosts | None = None
        self.log = log
        self.last_shard_seconds = 0.0  # cost-clock seconds this rank spent on its last plan
        self.last_local_queries = 0
        # per-coordinate predicted costs of the current sorted coordinate set, refined every plan
        self._item_costs: Tensor | None = None
        self._item_key: int | None = None
        self._item_coords: Tensor | None = None  # the sorted coordinate set _item_key was computed for
        self._item_blocks: Tensor | None = None
        self._bounds: list[int] | None = None
        self._refinements = 0  # refine_costs calls on the current coordinate set (see refinement_gain)
        # the stop request rides on every plan's all-reduce (see take_agreed_stop)
        self.stop_source: Callable[[], int] | None = None
        self._agreed_stop: int | None = None

    def __repr__(self) -> str:
        return f"PlanSharder(rank={self.rank}, world={self.world})"

    # -- agreement ----------------------------------------------------------------------

    def check_agreement(self, step: int, **parts: Any) -> None:
        """All-gather a checksum of each named part; raise DivergenceError if ranks differ."""
        names = list(parts)
        mine = torch.tensor([fingerprint(parts[n]) for n in names], dtype=torch.int64, device=_comm_device())
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        _collective(f"all-gather of the step-{step} checksums", lambda: _dist().all_gather(gathered, mine))
        table = torch.stack(gathered).cpu()
        differ = [n for i, n in enumerate(names) if bool((table[:, i] != table[0, i]).any())]
        if differ:
            odd = sorted({r for r in range(self.world) if not torch.equal(table[r], table[0])})
            raise DivergenceError(
                f"ranks diverged at step {step}: {', '.join(differ)} differ between rank 0 and rank(s) {odd} "
                "(every rank must draw the same batch and coordinates and take the same step; a rank with "
                "other seeds, data or code breaks that)")

    def due_for_check(self, step: int) -> bool:
        return self.check_every_steps > 0 and step % self.check_every_steps == 0

    # -- the cost model of coordinate plans ------------------------------------------------

    def _calibrating(self) -> bool:
        return self.balance_by_cost and (self.costs is None or self.costs.per_coord is None)

    def _timed_now(self) -> bool:
        # the first plan warms up (allocations, first-touch); time the ones after it
        return self.calls >= 1 or self.balance_steps == 1

    def coordinate_piece(self, space: ParamSpace, sorted_coords: Tensor) -> slice:
        """This rank's positions in a sorted coordinate set.

        While the block costs are calibrated: every `world`-th coordinate from position `rank`
        (a strided share). Every rank then holds about 1/world of every block, so the
        calibration steps are balanced by construction and each block's cost is timed while
        every rank is busy, as in the steps that follow. (A contiguous even split, used before,
        gave one digits rank the expensive early layers, 35 ms against 8 ms: the other rank
        waited, and the early layers were timed on a machine half idle, cheaper than under the
        contention of two busy ranks: the first cuts landed at coordinate 493 to 745, where the
        refinement later settled at 369 to 550.) After it: the contiguous piece of
        :meth:`coordinate_bounds`, which keeps a rank to few stages."""
        if self._calibrating():
            self._bounds = None
            return slice(self.rank, None, self.world)
        bounds = self.coordinate_bounds(space, sorted_coords)
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def coordinate_bounds(self, space: ParamSpace, sorted_coords: Tensor) -> list[int]:
        """The contiguous pieces of a sorted coordinate set: rank r evaluates [b[r], b[r + 1]).
        By the (refined) measured costs once calibrated; even by count before, or with
        `balance_by_cost=False`."""
        if not self.balance_by_cost or self._calibrating():
            self._bounds = None
            return balanced_bounds(torch.ones(sorted_coords.numel(), dtype=torch.float64), self.world)
        last = self._item_coords
        if (last is not None and last.shape == sorted_coords.shape and last.device == sorted_coords.device
                and torch.equal(last, sorted_coords)):
            key = self._item_key  # the same set as the last plan (every step of dense or Sparse-CGE): no hash
        else:
            key = fingerprint(sorted_coords)
            self._item_coords = sorted_coords.clone()
        if key != self._item_key:  # a new coordinate set: start from the (refined) block costs
            self._carry_refinement_to_blocks()
            self._item_blocks = space.block_index(sorted_coords.cpu())
            self._item_costs = self.costs.per_coord[self._item_blocks].clone()
            self._item_key = key
            self._refinements = 0
        self._bounds = balanced_bounds(self._item_costs, self.world)
        return self._bounds

    def measure_coordinates(self, evaluate: Callable[[Tensor], Tensor], space: ParamSpace, coords: Tensor,
                          like: Tensor) -> Tensor:
        """evaluate(coords); while calibrating, block by block, each block's cost-clock time recorded."""
        if not (self._calibrating() and self._timed_now()):
            return evaluate(coords)
        if self.costs is None:
            self.costs = BlockCosts(space)
        blocks, counts = torch.unique_consecutive(space.block_index(coords.cpu()), return_counts=True)
        out, start = [], 0
        for b, n in zip(blocks.tolist(), counts.tolist()):
            t0 = cost_clock(like)
            out.append(evaluate(coords[start : start + n]))
            self.costs.add(b, cost_clock(like) - t0, n)
            start += n
        return torch.cat(out) if out else like.new_empty(0)

    def _carry_refinement_to_blocks(self) -> None:
        """Fold the refined per-coordinate costs back into per-block means."""
        if self._item_costs is None or self.costs is None or self.costs.per_coord is None:
            return
        n = len(self.costs.per_coord)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, self._item_blocks, self._item_costs)
        counts = torch.bincount(self._item_blocks, minlength=n).to(torch.float64)
        self.costs.per_coord = torch.where(counts > 0, sums / counts.clamp_min(1), self.costs.per_coord)

    def learn_costs(self, space: ParamSpace, seconds: Tensor) -> None:
        """After a coordinate plan: scale the predicted costs toward every rank's measured shard
        seconds (identical on every rank, so every rank cuts alike), and end the calibration
        (one all-reduce of the block costs) after `balance_steps` plans."""
        if self.refine and self._bounds is not None and self._item_costs is not None:
            self._item_costs = refine_costs(self._item_costs, self._bounds, seconds.tolist(),
                                            damping=refinement_gain(self._refinements))
            self._refinements += 1
        if self._calibrating() and self.calls + 1 >= self.balance_steps:
            if self.costs is None:
                self.costs = BlockCosts(space)
            self.costs.finalize()
            if self.log is not None and self.rank == 0:
                self.log(f"forward parallelism over {self.world} ranks: shards balanced by {self.costs.describe()}")

    def coordinate_plan_done(self) -> None:
        self.calls += 1

    # -- the stop request, carried by the plans' all-reduce ------------------------------------

    def take_agreed_stop(self) -> int | None:
        """The largest stop request (a signal number, 0 for none) of any rank, as packed into the
        last plan's all-reduce since the previous call; None if no plan was reduced since then
        (or no `stop_source` is set). Every rank runs the same plans, so every rank gets the same
        answer, and the trainer needs no all-reduce of its own before a step that follows a
        plan (one collective per step instead of two; a request seen after this rank packed its
        part stops the run one step later)."""
        agreed, self._agreed_stop = self._agreed_stop, None
        return agreed

    # -- the all-reduce of a plan -----------------------------------------------------------

    def reduce(self, values: Tensor, *, local_queries: int, seconds: float, failure: BaseException | None,
               plan_key: Any, what: str, elapsed: float) -> ReducedShards:
        """One all-reduce (sum) of this rank's losses (zeros where another rank evaluated), its
        queries, its failure, its seconds and a checksum of the plan it ran: a rank that built
        another plan (other coordinates, seed or step) raises DivergenceError on every rank."""
        self.last_shard_seconds, self.last_local_queries = elapsed, local_queries
        width, world = values.numel(), self.world
        packed = torch.zeros(width + _SLOTS + 2 * world, dtype=torch.float64, device=_comm_device())
        packed[:width] = values.to(device=packed.device, dtype=torch.float64)
        key = fingerprint(plan_key)
        a, b = key & (2**_KEY_BITS - 1), (key >> _KEY_BITS) & (2**_KEY_BITS - 1)
        tail = [local_queries, 0, 0, a, a * a, b, b * b]
        if failure is not None:
            tail[_FAILED_ORACLE if isinstance(failure, OracleError) else _FAILED_NONFINITE] = 1
        packed[width : width + _SLOTS] = torch.tensor(tail, dtype=torch.float64)
        packed[width + _SLOTS + self.rank] = seconds
        source = self.stop_source
        if source is not None:  # each rank's stop request in its own slot: their maximum, not their sum
            packed[width + _SLOTS + world + self.rank] = float(source())
        _collective(what, lambda: _dist().all_reduce(packed))
        packed = packed.cpu()
        slots = packed[width : width + _SLOTS].tolist()
        if source is not None:
            self._agreed_stop = int(packed[width + _SLOTS + world :].max())
        # all keys equal  <=>  world * sum(k^2) == (sum k)^2  (Cauchy-Schwarz; exact in float64)
        if any(self.world * slots[sq] != slots[k] ** 2 for k, sq in ((_KEY_A, _KEY_A2), (_KEY_B, _KEY_B2))):
            raise DivergenceError(
                f"rank {self.rank} of {self.world}: ranks ran different query plans in the {what} (other "
                "coordinates, directions, seed or step): every rank must build the same plan; pass the same "
                "seed on every rank")
        return ReducedShards(packed[:width].to(values.device), int(round(slots[_QUERIES])),
                             packed[width + _SLOTS : width + _SLOTS + world], int(round(slots[_FAILED_NONFINITE])),
                             int(round(slots[_FAILED_ORACLE])), self.world)


# ------------------------------------------------------------------------------ ledger


def sum_ledger_over_ranks(ledger: QueryLedger) -> None:
    """Replace each rank's per-phase counts by the sum over ranks (work every rank did)."""
    phases = sorted(ledger.counts)
    counts = torch.tensor([ledger.counts[p] for p in phases], dtype=torch.int64, device=_comm_device())
    _collective("all-reduce of the setup-time query counts", lambda: _dist().all_reduce(counts))
    ledger.counts.update({p: int(c) for p, c in zip(phases, counts.cpu().tolist())})


def share_from_main(metrics: dict[str, float], ledger: QueryLedger) -> dict[str, float]:
    """After an evaluation that ran on the main rank only: every rank gets its metrics and
    its ledger counts (the evaluation's queries, counted once), so all ledgers agree."""
    box: list[Any] = [metrics, dict(ledger.counts)] if rank() == 0 else [None, None]
    _collective("broadcast of the evaluation results", lambda: _dist().broadcast_object_list(box, src=0))
    metrics, counts = box
    ledger.counts = dict(counts)
    return dict(metrics)
