"""Process-level settings: the device a run uses, and the allocator that makes CPU finite differences fast.

`resolve_device(requested, supported)` turns `run.device` into the device a run really
uses, before anything is written: `auto` picks CUDA when the problem supports it and a
device is there, else the CPU; an explicit device that is not there (or that the problem
cannot use) is a one-line DeviceError, never a silent fallback. The resolved name is what
config.json records.

A ZO step allocates and frees the same large tensors (perturbed activations, chunks of
P·N samples) thousands of times. glibc's malloc hands blocks above its mmap threshold
(128 KiB at start, raised only when such a block is freed) straight to the kernel and
returns freed heap above 128 KiB (trim threshold), so every chunk comes back as fresh
zero pages: one page fault per 4 KiB touched. Measured on the digits CNN (one forward-CGE
step over all 3,818 coordinates, one thread, `benchmarks/bench_parallel.py`'s reference):
~220K minor page faults and 0.8 s of system time per 9 steps, 0.14 to 0.20 CPU s per step;
with the two thresholds below, ~40K faults and 0.07 to 0.12 CPU s per step.

`tune_allocator()` sets, through `mallopt(3)`:

* `M_MMAP_THRESHOLD` = 32 MiB: blocks below it come from the heap and are reused (this
  also switches off the dynamic threshold). Feature reuse caps its CPU chunks at 32 MiB.
* `M_TRIM_THRESHOLD` = 256 MiB: freed heap is kept up to that much before it is returned.

The cost is memory held back from the kernel (at most the process's peak heap plus
256 MiB). It is a no-op on platforms without glibc, and when the environment variable
`BLACKBOX_ZO_MALLOC_TUNING=0` is set. The trainer and the CLI call it once per process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch

__all__ = ["tune_allocator", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "DeviceError", "resolve_device"]

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_state: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Set glibc's malloc thresholds for this process (once). True if they are in effect."""
    if "done" in _state:
        return _state["done"]
    ok = False
    if os.environ.get("BLACKBOX_ZO_MALLOC_TUNING", "1").strip() not in ("0", "false", "no", "off") \
            and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        except (OSError, AttributeError):
            ok = False
    _state["done"] = ok
    return ok


class DeviceError(RuntimeError):
    """`run.device` names a device this machine or this problem cannot use (one line)."""


def resolve_device(requested: str, supported: tuple[str, ...] = ("cpu",), problem: str = "this problem") -> str:
    """The device a run with `run.device = requested` uses, or DeviceError.

    `supported` lists the device types the problem moves its tensors to (Problem.devices).
    """
    req = str(requested).strip().lower()
    if req == "auto":
        if "cuda" in supported and torch.cuda.is_available():
            return "cuda"
        return "cpu"
    try:
        dev = torch.device(req)
    except (RuntimeError, ValueError):
        raise DeviceError(f"run.device={requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in supported:
        raise DeviceError(f"run.device={requested!r}: {problem} runs on {' or '.join(supported)} only "
                          "(use run.device=cpu or auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"run.device={requested!r} but this torch ({torch.__version__}) sees no CUDA device; "
                              "use run.device=cpu (or auto, which picks CUDA only where there is one), "
                              "or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"run.device={requested!r} but only {torch.cuda.device_count()} CUDA device(s) "
                              f"are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"run.device={requested!r} but MPS is not available on this machine; use run.device=cpu")
    return str(dev)
