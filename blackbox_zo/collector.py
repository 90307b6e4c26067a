"""Python's cyclic garbage collector, tuned for the `blackbox-zo` process (the counterpart of
`runtime.tune_allocator` for Python objects).

A `blackbox-zo train` process imports torch and the engine (about 1,700 modules), later
`torch._dynamo` (torch.optim imports it when an optimizer is built) and matplotlib (the plot).
The imports leave hundreds of thousands of long-lived objects, and CPython's collector
traverses all of them in every full collection, which it starts whenever the objects created
since the last one reach a quarter of those it holds: in a digits run with DeepZero's recipe
(10 epochs, CPython 3.11) that was 6 full collections during the imports, 0.6 CPU s,
plus 840 young-generation collections (the first generation's threshold is 700 allocations),
0.25 CPU s, measured with `gc.callbacks` (docs/performance.md).

`import_engine(name)` imports the engine's module `name` with automatic collection paused
(the first time only: once imported it is returned as it is), then freezes what the imports
left (`gc.freeze()`: those objects move to the permanent generation, which no collection
traverses; module-level objects live as long as the process anyway).
`tune_collector()` raises the first generation's threshold to `FIRST_GENERATION_THRESHOLD`
allocations: cycles are still collected automatically, in about 25x fewer collections, and
at most that many young objects wait for one (a few MiB). Neither changes any result: the
arithmetic does not see the collector.

The CLI (`cli.load_engine`) imports `blackbox_zo._commands` (torch and the engine) this way, and
for a `train` that trains also
`torch._dynamo`, which torch.optim would import anyway when the optimizer is built: frozen with the
rest, the run's collections skip its objects too (collector time of the digits run, measured as above:
0.83 CPU s with Python's defaults, 0.22 with the engine frozen and the threshold raised, 0.07 with
torch._dynamo frozen too; the full collection at interpreter exit 0.19, 0.13, 0.04).

Only the CLI's `main` calls them; a library caller's process (a notebook, a test)
is left as it is. `BLACKBOX_ZO_GC_TUNING=0` turns both off.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from types import ModuleType

__all__ = ["FIRST_GENERATION_THRESHOLD", "import_engine", "tune_collector", "enabled"]

FIRST_GENERATION_THRESHOLD = 10_000


def enabled() -> bool:
    """False when the environment variable BLACKBOX_ZO_GC_TUNING turns the tuning off."""
    return os.environ.get("BLACKBOX_ZO_GC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


def import_engine(name: str) -> ModuleType:
    """Import module `name` without automatic collection, then freeze what the import left.

    Only the import that loads it does so: a module already in sys.modules is returned as it
    is and nothing is frozen (a process that calls the CLI's `main` again, e.g. a test run, does
    not freeze its own garbage). The collector is enabled again on every way out, an import
    error included, if it was enabled before; nothing is frozen when the import fails.
    """
    if name in sys.modules or not enabled():
        return importlib.import_module(name)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        module = importlib.import_module(name)
        gc.freeze()
    finally:
        if was_enabled:
            gc.enable()
    return module


def tune_collector() -> bool:
    """Raise the first generation's threshold (once; the other two stay). True if in effect."""
    if not enabled():
        return False
    first, second, third = gc.get_threshold()
    if first != 0:  # 0: collection switched off by someone who meant it
        gc.set_threshold(max(first, FIRST_GENERATION_THRESHOLD), second, third)
    return gc.get_threshold()[0] >= FIRST_GENERATION_THRESHOLD
