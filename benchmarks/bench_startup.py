"""Start-up time of the command line: `blackbox-zo --help`, `blackbox-zo list`, `import blackbox_zo`.

Each is timed in a fresh process (median of --repeats) next to two references measured in
the same run: a bare Python start (`python -c pass`) and `import torch`, the floor of any
command that touches the engine. `--help` should stay near the bare start (the CLI parses
without importing the engine); `list` loads every plug-in and so pays for torch once.

    .venv/bin/python benchmarks/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "python -c pass (reference)": [sys.executable, "-c", "pass"],
    "import torch (reference)": [sys.executable, "-c", "import torch"],
    "import blackbox_zo": [sys.executable, "-c", "import blackbox_zo"],
    "blackbox-zo --help": [sys.executable, "-m", "blackbox_zo", "--help"],
    "blackbox-zo train digits --help": [sys.executable, "-m", "blackbox_zo", "train", "digits", "--help"],
    "blackbox-zo list": [sys.executable, "-m", "blackbox_zo", "list"],
}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per case (median reported)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    medians = {}
    for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits every case alike
        for name, argv in CASES.items():
            medians.setdefault(name, []).append(timed(argv))
    medians = {k: statistics.median(v) for k, v in medians.items()}
    bare, torch_s = medians["python -c pass (reference)"], medians["import torch (reference)"]
    print(f"{'case':<34} {'median s':>9} {'x bare python':>14} {'x import torch':>15}")
    for name, s in medians.items():
        print(f"{name:<34} {s:>9.3f} {s / bare:>14.2f} {s / torch_s:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
