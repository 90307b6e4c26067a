"""The collector tuning of the CLI process (blackbox_zo/collector.py): imports without automatic
collection, frozen afterwards, a raised first-generation threshold, cycles still collected."""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest

from blackbox_zo import collector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_gc():
    threshold, was_enabled = gc.get_threshold(), gc.isenabled()
    yield
    gc.set_threshold(*threshold)
    (gc.enable if was_enabled else gc.disable)()
    gc.unfreeze()  # the default state of a process: every object collectable


def _module(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


SEES_GC = "import gc\nENABLED_DURING_IMPORT = gc.isenabled()\nOBJECTS = [[i] for i in range(1000)]\n"


def test_import_pauses_collection_and_freezes(tmp_path, monkeypatch, restore_gc):
    monkeypatch.delenv("BLACKBOX_ZO_GC_TUNING", raising=False)
    name = _module(tmp_path, monkeypatch, "gc_probe_a", SEES_GC)
    gc.enable()
    frozen = gc.get_freeze_count()
    module = collector.import_engine(name)
    assert module.ENABLED_DURING_IMPORT is False
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + 1000  # at least the module's own 1,000 lists
    # once imported, nothing more is paused or frozen
    frozen = gc.get_freeze_count()
    assert collector.import_engine(name) is module
    assert gc.get_freeze_count() == frozen


def test_import_error_reenables_and_freezes_nothing(tmp_path, monkeypatch, restore_gc):
    monkeypatch.delenv("BLACKBOX_ZO_GC_TUNING", raising=False)
    name = _module(tmp_path, monkeypatch, "gc_probe_b", "X = [[1]] * 10\nraise RuntimeError('broken import')\n")
    gc.enable()
    frozen = gc.get_freeze_count()
    with pytest.raises(RuntimeError, match="broken import"):
        collector.import_engine(name)
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


def test_disabled_collector_stays_disabled(tmp_path, monkeypatch, restore_gc):
    monkeypatch.delenv("BLACKBOX_ZO_GC_TUNING", raising=False)
    name = _module(tmp_path, monkeypatch, "gc_probe_c", SEES_GC)
    gc.disable()
    collector.import_engine(name)
    assert not gc.isenabled()


def test_opt_out(tmp_path, monkeypatch, restore_gc):
    monkeypatch.setenv("BLACKBOX_ZO_GC_TUNING", "0")
    name = _module(tmp_path, monkeypatch, "gc_probe_d", SEES_GC)
    gc.enable()
    gc.set_threshold(700, 10, 10)
    frozen = gc.get_freeze_count()
    assert collector.import_engine(name).ENABLED_DURING_IMPORT is True
    assert gc.get_freeze_count() == frozen
    assert collector.tune_collector() is False
    assert gc.get_threshold() == (700, 10, 10)


def test_threshold_raised_and_cycles_still_collected(monkeypatch, restore_gc):
    monkeypatch.delenv("BLACKBOX_ZO_GC_TUNING", raising=False)
    gc.enable()
    gc.set_threshold(700, 10, 10)
    assert collector.tune_collector() is True
    assert gc.get_threshold() == (collector.FIRST_GENERATION_THRESHOLD, 10, 10)
    gc.collect()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    dead = weakref.ref(a)
    del a, b
    # no gc.collect(): allocations alone must trigger a collection that frees the cycle
    keep = [[i] for i in range(3 * collector.FIRST_GENERATION_THRESHOLD)]
    assert dead() is None, "the cycle survived 3x the first generation's threshold of allocations"
    assert len(keep) == 3 * collector.FIRST_GENERATION_THRESHOLD


def test_threshold_zero_is_left_alone(monkeypatch, restore_gc):
    monkeypatch.delenv("BLACKBOX_ZO_GC_TUNING", raising=False)
    gc.set_threshold(0, 10, 10)
    assert collector.tune_collector() is False
    assert gc.get_threshold()[0] == 0


def _cli_state(argv: list[str]) -> tuple[int, bool, int, int, bool]:
    script = textwrap.dedent(f"""
        import gc, json, sys
        from blackbox_zo import cli
        code = cli.main({argv!r})
        print(json.dumps([code, gc.isenabled(), gc.get_threshold()[0], gc.get_freeze_count(),
                          "torch._dynamo" in sys.modules]))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("BLACKBOX_ZO_GC_TUNING", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cli_process_is_tuned():
    """The `blackbox-zo` entry point itself: after a command, the collector is on, tuned, and the
    engine's import frozen; `train` also loads torch._dynamo (which torch.optim imports) frozen,
    other commands do not pay for it."""
    code, on, threshold, frozen_list, dynamo = _cli_state(["list"])
    assert code == 0 and on is True
    assert threshold == collector.FIRST_GENERATION_THRESHOLD
    assert frozen_list > 100_000  # torch and the engine leave hundreds of thousands of objects
    assert dynamo is False
    # a train command refused at its settings (exit 2) has already loaded the engine and torch._dynamo
    code, on, threshold, frozen_train, dynamo = _cli_state(["train", "digits", "--set", "run.epochs=0"])
    assert code == 2 and on is True and dynamo is True
    assert frozen_train > frozen_list + 50_000  # torch._dynamo's objects are frozen too
    code, _, _, _, dynamo = _cli_state(["train", "digits", "--help"])  # prints the settings, trains nothing
    assert code == 0 and dynamo is False
