"""Run directories: atomic writes, checkpoints with rotation and damage detection, the resume contract.

A run directory holds ``config.json`` (the resolved settings), ``metrics.jsonl`` (one line
per step and per evaluation), ``checkpoint.pt`` and ``checkpoint.prev.pt`` (the newest and
the one before it), ``summary.json`` (why and where the run stopped) and plots. What this
module guarantees (docs/reliability.md):

* Nothing is ever half written: every file but ``metrics.jsonl`` is written to a temporary
  file in the same directory, flushed to disk and renamed over the old one. ``metrics.jsonl``
  is appended line by line; a resume cuts it back to the lines its checkpoint has seen.
* A checkpoint carries a digest of its own tensors, so a truncated file (unreadable) and a
  corrupted one (readable, wrong bytes) are both found at load time and named in one line.
* The checkpoint before the newest is kept beside it. When the newest is damaged or missing
  (a crash between the two renames of a rotation), the run resumes from the one before it.
* Every failure to create or write a file is a :class:`WriteError` that names the file and
  the operating system's reason (no space left, permission denied, ...).
* Resume is a contract: only the settings in :data:`RESUMABLE_SETTINGS` may differ from the
  run's ``config.json``; anything else is refused before a byte is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "PREVIOUS_CHECKPOINT_NAME",
    "DAMAGED_CHECKPOINT_NAME",
    "CONFIG_NAME",
    "METRICS_NAME",
    "SUMMARY_NAME",
    "RESUMABLE_SETTINGS",
    "RunDirError",
    "WriteError",
    "CheckpointError",
    "ResumeError",
    "LoadedCheckpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "append_line",
    "make_run_dir",
    "discard_if_unused",
    "remove_stale_temporaries",
    "write_config",
    "read_run_config",
    "check_same_problem",
    "write_summary",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "find_checkpoint",
    "state_digest",
    "truncate_lines",
    "config_differences",
    "check_resume",
    "UNSET",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
DAMAGED_CHECKPOINT_NAME = "checkpoint.damaged.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"

# Settings that may change when a run is resumed: none of them changes what a step computes.
# run.epochs also stretches the LR schedule (it is built for epochs x steps per epoch); a logger
# added with run.loggers is filled from metrics.jsonl first (docs/tracking.md); every other difference (model, estimator, optimizer, seeds, data, device, ...) is refused.
RESUMABLE_SETTINGS: tuple[str, ...] = (
    "run.epochs",
    "run.max_steps",
    "run.query_budget",
    "run.progress",
    "run.threads",
    "run.checkpoint_every_steps",
    "run.eval_every_epochs",
    "run.nan_policy",
    "run.oracle_retries",
    "run.oracle_retry_backoff_s",
    "run.out_dir",
    "run.loggers",
    "parallel.timeout_s",
    "parallel.check_every_steps",
)


class RunDirError(RuntimeError):
    """A one-line, user-facing problem with a run directory (the CLI exits 2 with it)."""


class WriteError(RunDirError):
    """A file of a run could not be created or written (no space left, permission denied, ...)."""


class CheckpointError(RunDirError):
    """A checkpoint is truncated, corrupt or missing; the message names the file."""


class ResumeError(RunDirError):
    """`--resume` refused: another problem, changed settings, or not a run directory."""


# ------------------------------------------------------------------------------ writes


def _reason(exc: OSError) -> str:
    return f"{exc.strerror or exc} (errno {exc.errno})" if exc.errno else str(exc)


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temp file in the same directory and rename: never half a file.

    An OSError (e.g. no space left) becomes a :class:`WriteError` naming `path`; the old
    file, if any, is untouched and the temp file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {_reason(exc)}") from exc
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:  # e.g. the directory itself went away; nothing more to clean
            pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def append_line(path: Path, line: str) -> None:
    """Append one line (metrics.jsonl). A torn last line is cut off by the next resume."""
    try:
        with open(path, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {_reason(exc)}") from exc


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines of a text file (atomically); no file, nothing to do."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) == keep and (not lines or lines[-1].endswith("\n")):
        return
    atomic_write_text(path, "".join(lines[:keep]))


# run directories made by this process -> the parent directories made for them (only those are ever removed)
_CREATED: dict[Path, list[Path]] = {}


def make_run_dir(out_dir: str | Path, problem: str) -> Path:
    """A fresh ``out_dir/problem/<timestamp>[-k]`` directory; one line if it cannot be made."""
    base = Path(out_dir) / problem
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    missing = [d for d in (base, *base.parents) if not d.exists()]  # innermost first
    try:
        for k in range(1000):
            run_dir = base / (stamp if k == 0 else f"{stamp}-{k}")
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                continue
            _CREATED[run_dir.resolve()] = [d.resolve() for d in missing]
            return run_dir
    except OSError as exc:
        raise WriteError(f"cannot create a run directory under {base} (run.out_dir={str(out_dir)!r}): "
                         f"{_reason(exc)}") from exc
    raise WriteError(f"cannot create a fresh run directory under {base}: 1000 names taken")


def discard_if_unused(run_dir: Path) -> None:
    """After a setup that failed or was interrupted: remove the config.json written for it
    and, if this process created the directory and it is now empty, the directory too."""
    run_dir = Path(run_dir)
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if names - {CONFIG_NAME}:
        return  # something else lives here: not ours to remove
    (run_dir / CONFIG_NAME).unlink(missing_ok=True)
    parents = _CREATED.pop(run_dir.resolve(), None)
    if parents is not None:
        for d in (run_dir, *parents):  # innermost first; rmdir refuses a directory that is not empty
            try:
                d.rmdir()
            except OSError:
                break


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Temp files of atomic writes left by a process that was killed mid-write."""
    removed = []
    for p in Path(run_dir).glob(".*.tmp*"):
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


def write_config(run_dir: Path, config: Any) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_NAME, config.model_dump_json(indent=2) + "\n")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The raw settings of a run; one line if `run_dir` is not a run directory."""
    run_dir = Path(run_dir)
    cfg = run_dir / CONFIG_NAME
    if not run_dir.is_dir():
        raise ResumeError(f"not a run directory (no such directory): {run_dir}")
    if not cfg.is_file():
        raise ResumeError(f"not a run directory (no {CONFIG_NAME}): {run_dir}")
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{cfg} is damaged: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ResumeError(f"{cfg} is damaged: expected a JSON object, got {type(raw).__name__}")
    return raw


def check_same_problem(run_dir: Path, raw: dict[str, Any], problem: str) -> None:
    """Refuse to resume a run of another problem, and say which command would resume it."""
    saved = raw.get("problem") or ""
    if saved and saved != problem:
        raise ResumeError(f"{run_dir} is a run of problem {saved!r}, not {problem!r}; resume it with: "
                          f"blackbox-zo train {saved} --resume {run_dir}")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


# -------------------------------------------------------------------------- checkpoints


def _leaves(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def state_digest(state: dict[str, Any]) -> str:
    """blake2b of every tensor's bytes (and every other leaf's repr) in `state`, but "digest".

    torch.load reads a checkpoint whose tensor bytes were flipped without complaint; this
    digest, stored inside the checkpoint, is what finds such damage.
    """
    h = hashlib.blake2b(digest_size=16)
    for key, leaf in _leaves({k: v for k, v in state.items() if k != "digest"}):
        h.update(key.encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def save_checkpoint(run_dir: Path, state: dict[str, Any], rotate: bool = True) -> Path:
    """Write ``checkpoint.pt`` atomically; the one it replaces becomes ``checkpoint.prev.pt``.

    Order: the new file is complete on disk before either rename, so a crash at any point
    leaves a loadable newest checkpoint, or none and the previous one (see load_checkpoint).
    """
    run_dir = Path(run_dir)
    path, prev = run_dir / CHECKPOINT_NAME, run_dir / PREVIOUS_CHECKPOINT_NAME
    state = dict(state)
    state["digest"] = state_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = run_dir / f".{CHECKPOINT_NAME}.tmp{os.getpid()}"
    try:
        try:
            with open(tmp, "wb") as fh:
                fh.write(buf.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            if rotate and path.exists():
                os.replace(path, prev)
            os.replace(tmp, path)
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {_reason(exc)}") from exc
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file's state, checked against its digest; CheckpointError (one line) if it is damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, I/O error: all mean "cannot use this file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {path} is damaged (cannot be read: {type(exc).__name__}"
                              f"{': ' + first[:200] if first else ''})") from None
    if not isinstance(state, dict) or "module" not in state or "position" not in state:
        raise CheckpointError(f"checkpoint {path} is damaged (not a blackbox-zo checkpoint)")
    if "digest" in state and state_digest(state) != state["digest"]:
        raise CheckpointError(f"checkpoint {path} is damaged (its contents do not match their digest)")
    return state


class LoadedCheckpoint:
    """A checkpoint read by `load_checkpoint`: the state, which file, and what was wrong with the newer one."""

    def __init__(self, state: dict[str, Any], path: Path, note: str | None = None, damaged: Path | None = None):
        self.state, self.path, self.note, self.damaged = state, path, note, damaged

    @property
    def step(self) -> int:
        return int(self.state["position"][2])


def find_checkpoint(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / CHECKPOINT_NAME).exists() or (run_dir / PREVIOUS_CHECKPOINT_NAME).exists()


def load_checkpoint(run_dir: Path) -> LoadedCheckpoint:
    """The newest usable checkpoint of a run: ``checkpoint.pt``, else ``checkpoint.prev.pt``.

    Falling back is said in `note` (one line). If no file is usable, CheckpointError names
    the newest one and why; if there is none at all, it says so.
    """
    run_dir = Path(run_dir)
    path, prev = run_dir / CHECKPOINT_NAME, run_dir / PREVIOUS_CHECKPOINT_NAME
    if path.exists():
        try:
            return LoadedCheckpoint(read_checkpoint(path), path)
        except CheckpointError as exc:
            if not prev.exists():
                raise
            try:
                state = read_checkpoint(prev)
            except CheckpointError:
                raise exc from None
            return LoadedCheckpoint(state, prev, f"{exc}; using the previous one, {prev.name} "
                                    f"(step {int(state['position'][2])})", damaged=path)
    if prev.exists():
        state = read_checkpoint(prev)
        return LoadedCheckpoint(state, prev, f"{path} is missing (the run stopped while replacing it); "
                                f"using the previous one, {prev.name} (step {int(state['position'][2])})")
    raise CheckpointError(f"no checkpoint in {run_dir} ({CHECKPOINT_NAME} not found)")


# --------------------------------------------------------------------------- resume contract


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):  # an empty dict (e.g. no oracle.options) has no settings to compare
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


class _Unset:
    def __repr__(self) -> str:
        return "(unset)"


UNSET = _Unset()


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for every setting that differs, sorted by key;
    a setting present on one side only (a free-form dict such as oracle.options) shows as UNSET."""
    a, b = _flatten(saved), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, UNSET), b.get(key, UNSET)
        if va is UNSET or vb is UNSET or va != vb:
            out.append((key, va, vb))
    return out


def _allowed(key: str, allowed: Iterable[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in allowed)


def check_resume(run_dir: Path, saved: dict[str, Any], new: dict[str, Any],
                 allowed: Iterable[str] = RESUMABLE_SETTINGS) -> list[tuple[str, Any, Any]]:
    """Refuse (ResumeError, one line) a resume that changes a setting outside `allowed`.

    `saved` and `new` are validated configs as dicts (``model_dump()``). Returns the
    allowed differences, which the resumed run takes over.
    """
    allowed = tuple(allowed)
    diffs = config_differences(saved, new)
    refused = [d for d in diffs if not _allowed(d[0], allowed)]
    if refused:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise ResumeError(f"cannot resume {run_dir} with changed settings ({shown}); only "
                          f"{', '.join(allowed)} may change on resume: start a new run to change the others")
    return [d for d in diffs if _allowed(d[0], allowed)]
