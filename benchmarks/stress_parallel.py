"""Stress the distributed teardown: many torchrun jobs in a row, optionally under CPU load.

Issue 13: a rank of a finished torchrun job sometimes died with SIGABRT ("terminate called
without an active exception"). The cause, and the fix, are in `blackbox_zo.parallel.shutdown`:
gloo's worker threads outlived the old atexit teardown and raced interpreter finalization.
This script shows the fix holds:

* ``--cycles N`` (default 30): the real thing. Each cycle is the CLI's torchrun train +
  resume on digits (2 ranks, gloo, a tiny configuration): train 2 steps, resume to 4. A cycle
  fails on a non-zero exit of either job, a missing or wrong result, or a crash message.
* ``--exit-race N``: a small torchrun job that makes the race likely, so that it is seen in a
  few dozen runs: the same process-group lifecycle as the CLI (torch._dynamo imported after
  the group exists, as torch.optim does; broadcast_object_list last), then rank 1 leaves at
  once while rank 0 lingers. ``--old-teardown`` runs it with the teardown before the fix (an
  atexit destroy_process_group) as the reference: measured on 2 cores, 11 of 40 jobs aborted.
* ``--load``: busy processes (one per core, ``--load-procs``) run the whole time and are
  stopped at the end, always (also on Ctrl-C or SIGTERM).

Prints one line per job, then the count of failures and each failure's stderr tail; exits 1
if any job failed. Examples::

    python benchmarks/stress_parallel.py --cycles 30
    python benchmarks/stress_parallel.py --cycles 30 --load
    python benchmarks/stress_parallel.py --cycles 0 --exit-race 40 [--old-teardown] [--load]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
TINY = ["model.width=2", "data.batch_size=32", "run.epochs=1", "run.progress=false", "run.checkpoint_every_steps=1",
        "parallel.balance_steps=2", "parallel.check_every_steps=1"]
CRASH_MARKS = ("terminate called", "Fatal Python error", "Segmentation fault", "SIGABRT", "core dumped")


@dataclass
class Failure:
    job: str
    reason: str
    stderr: str


@dataclass
class Tally:
    jobs: int = 0
    failures: list[Failure] = field(default_factory=list)


def torchrun(args: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone` (it binds a free port itself) to the end, or stop it and its ranks.

    On a timeout (exit code 124 here) or Ctrl-C/SIGTERM, the launcher and every rank are stopped
    (see :func:`stop_torchrun`): nothing is left running.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # not in our foreground group: Ctrl-C reaches us only
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_torchrun(proc)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process we could not stop still holds the pipes
            out, err = "", "[stress] output lost: a process of the job is still running"
        return subprocess.CompletedProcess(cmd, 124, out, err + f"\n[stress] stopped after {timeout_s:g}s\n")
    except BaseException:
        stop_torchrun(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the live children of `pid`, from /proc (Linux; [] elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[1]) == pid:  # fields[0] is the state, [1] the parent, [19] the start time
            found.append((int(stat.parent.name), fields[19]))
    return found


def stop_torchrun(proc: subprocess.Popen, grace_s: float = 45.0) -> None:
    """Stop a torchrun launcher and its ranks.

    torchrun starts every rank in a session of its own, so killing the launcher's group misses
    them. SIGTERM first: the agent passes it on to the ranks and waits for them (30 s). If it
    has not finished after `grace_s`, the ranks found at the start are killed by session,
    each only if it is still the same process (same start time), then the launcher.
    """
    ranks = _children(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid, started in ranks:
        try:
            same = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == started
        except (OSError, IndexError):
            continue  # already gone
        if same:
            try:
                os.killpg(pid, signal.SIGKILL)  # a rank leads its own session and process group
            except ProcessLookupError:
                pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _crash(stderr: str) -> str | None:
    return next((m for m in CRASH_MARKS if m in stderr), None)


def _check(job: subprocess.CompletedProcess, what: str) -> str | None:
    if _crash(job.stderr):
        return f"{what}: exit {job.returncode}, {_crash(job.stderr)!r} on stderr"
    if job.returncode != 0:
        return f"{what}: exit {job.returncode}"
    if "Traceback" in job.stderr:
        return f"{what}: a traceback on stderr"
    return None


def cli_cycle(work: Path, timeout_s: float) -> tuple[str | None, str, str]:
    """Train 2 steps, resume to 4, under torchrun; (reason it failed or None, stderr, timings)."""
    sets = [a for s in TINY + [f"run.out_dir={work / 'runs'}"] for a in ("--set", s)]
    t0 = time.perf_counter()
    first = torchrun(["-m", "blackbox_zo", "train", "digits", *sets, "--set", "run.max_steps=2"], work, timeout_s)
    t1 = time.perf_counter()
    reason = _check(first, "train")
    if reason:
        return reason, first.stderr, ""
    runs = sorted((work / "runs" / "digits").iterdir()) if (work / "runs" / "digits").is_dir() else []
    if len(runs) != 1:
        return f"train: {len(runs)} run directories, expected 1", first.stderr, ""
    second = torchrun(["-m", "blackbox_zo", "train", "digits", "--resume", str(runs[0]), "--set", "run.max_steps=4"],
                      work, timeout_s)
    t2 = time.perf_counter()
    timing = f"train {t1 - t0:.1f}s, resume {t2 - t1:.1f}s"
    reason = _check(second, "resume")
    if reason:
        return reason, second.stderr, timing
    if second.stdout.count("digits: test_acc=") != 1:
        return "resume: not exactly one final line (from the main rank)", second.stderr, timing
    summary = json.loads((runs[0] / "summary.json").read_text())
    steps = [json.loads(x)["step"] for x in (runs[0] / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    if summary.get("steps") != 4 or steps != [1, 2, 3, 4]:
        return f"resume: summary steps {summary.get('steps')}, metrics steps {steps}", second.stderr, timing
    return None, second.stderr, timing


def exit_race_job(work: Path, timeout_s: float, old: bool) -> tuple[str | None, str]:
    args = [str(Path(__file__).resolve()), "--worker-exit-race"] + (["--old-teardown"] if old else [])
    job = torchrun(args, work, timeout_s)
    return _check(job, "exit-race job"), job.stderr


def worker_exit_race(old: bool) -> int:
    """One rank of the --exit-race job (run by torchrun)."""
    import random

    import torch
    import torch.distributed as dist

    from blackbox_zo import parallel

    if old:  # the lifecycle before the fix: a plain init and an atexit destroy_process_group
        import atexit
        import datetime

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))

        def _destroy() -> None:
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass

        atexit.register(_destroy)
    else:
        parallel.init_from_env(None)
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily, i.e. after the group exists)

    t = torch.ones(1000)
    for _ in range(5):
        dist.all_reduce(t)
    box = [{"metrics": 1.0}] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(box, src=0)  # the trainer's last collective (share_from_main)
    if dist.get_rank() == 0:
        time.sleep(random.random() * 0.5)  # the main rank writes summary and plots; the other leaves
    if not old:
        parallel.shutdown()  # what the CLI does before it returns
    return 0


class Load:
    """Busy processes, one per core by default, stopped on exit from the `with` block, always."""

    def __init__(self, procs: int):
        self.n, self.procs = procs, []

    def __enter__(self) -> "Load":
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True))
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Stopped(Exception):
    """SIGTERM: unwinds like Ctrl-C through the `finally`s, so the job and the load are stopped."""


def _sigterm(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=30, help="CLI train + resume cycles (default 30)")
    ap.add_argument("--exit-race", type=int, default=0, metavar="N", help="small jobs that provoke the exit race")
    ap.add_argument("--old-teardown", action="store_true", help="--exit-race with the teardown before the fix")
    ap.add_argument("--load", action="store_true", help="keep every core busy with other processes meanwhile")
    ap.add_argument("--load-procs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per torchrun job (default 300)")
    ap.add_argument("--tail", type=int, default=80, help="stderr lines shown per failure")
    ap.add_argument("--worker-exit-race", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_exit_race:
        return worker_exit_race(args.old_teardown)
    if args.cycles < 0 or args.exit_race < 0:
        ap.error("--cycles and --exit-race must be >= 0")
    signal.signal(signal.SIGTERM, _sigterm)
    tally = Tally()
    started = time.perf_counter()
    load = f"{args.load_procs} busy processes" if args.load else "no"
    print(f"stress_parallel: {args.cycles} CLI cycles, {args.exit_race} exit-race jobs"
          f"{' (OLD teardown)' if args.old_teardown else ''}, {RANKS} ranks, gloo; extra load: {load}", flush=True)
    stopped_by = 0
    try:
        with Load(args.load_procs if args.load else 0), tempfile.TemporaryDirectory(prefix="stress_parallel_") as tmp:
            for i in range(args.cycles):
                work = Path(tmp) / f"cycle{i}"
                work.mkdir()
                reason, err, timing = cli_cycle(work, args.timeout_s)
                tally.jobs += 1
                if reason:
                    tally.failures.append(Failure(f"cycle {i + 1}", reason, err))
                print(f"cycle {i + 1}/{args.cycles}: {reason or 'ok'} ({timing})", flush=True)
            for i in range(args.exit_race):
                work = Path(tmp) / f"race{i}"
                work.mkdir()
                reason, err = exit_race_job(work, args.timeout_s, args.old_teardown)
                tally.jobs += 1
                if reason:
                    tally.failures.append(Failure(f"exit-race {i + 1}", reason, err))
                print(f"exit-race {i + 1}/{args.exit_race}: {reason or 'ok'}", flush=True)
    except (KeyboardInterrupt, Stopped) as exc:
        stopped_by = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        print(f"stopped by {stopped_by.name}: the running job and the load were stopped", flush=True)
    for f in tally.failures:
        tail = "\n".join(f.stderr.strip().splitlines()[-args.tail:])
        print(f"\n--- {f.job}: {f.reason}; stderr tail:\n{tail}")
    print(f"\nstress_parallel: {len(tally.failures)} failures in {tally.jobs} jobs "
          f"(extra load: {load}; {time.perf_counter() - started:.0f}s)", flush=True)
    if stopped_by:
        return 128 + stopped_by
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
