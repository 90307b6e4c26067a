"""The allocator tuning: a CGE step on the digits CNN takes far fewer page faults with it."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"),
                                reason="mallopt thresholds are glibc's")

SCRIPT = textwrap.dedent("""
    import resource, torch
    from blackbox_zo.runtime import tune_allocator
    print(tune_allocator())
    torch.set_num_threads(1)
    from problems.digits import load_digits_split, make_digits_cnn
    from oracles.model_loss import ModelLossOracle
    from blackbox_zo.estimators import CGE
    x, y, _, _ = load_digits_split(0)
    torch.manual_seed(0)
    oracle = ModelLossOracle(make_digits_cnn(8))
    theta = oracle.initial_theta()
    coords = torch.arange(0, theta.numel(), 4)
    def step(i):
        batch, t = (x[64 * i:64 * i + 64], y[64 * i:64 * i + 64]), theta + 1e-3 * i
        oracle.on_step(t, batch)
        CGE(mu=5e-3).estimate(oracle, t, batch, coords=coords)
    step(0)  # first touch of everything, in both settings; the chunks are sized from a bound here,
    step(1)  # and from the memory step 0 measured from here on: the heap reaches its size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(2, 12):
        step(i)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(tuning: str) -> tuple[bool, int]:
    env = dict(os.environ, BLACKBOX_ZO_MALLOC_TUNING=tuning)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuning_cuts_page_faults_of_cge_steps():
    tuned_on, tuned = _faults("1")
    plain_on, plain = _faults("0")
    assert tuned_on and not plain_on
    # Without the thresholds every freed chunk above glibc's (dynamic) mmap threshold goes back
    # to the kernel and returns as fresh zero pages, every step: the untuned count grows with the
    # steps (2.5K to 5K a step of 955 coordinates here). The tuned count is a one-off residue
    # (2 to 2.3K, whatever the number of steps), so the steps are 10, not 3: with 3 steps the
    # residue's worst case (2,337 vs 7,401) failed a 4x margin on a loaded machine.
    assert plain > 4 * tuned, (tuned, plain)
