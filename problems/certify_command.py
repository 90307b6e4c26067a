"""The `blackbox-zo certify` command (registered through the entry-point group blackbox_zo.commands).

Only the argument parser lives here, outside the `certified_defense` package (whose import
brings torch), so building the CLI's parser imports nothing heavy; the work is in
`problems/certified_defense/certify.py`, imported when the command runs.
"""

from __future__ import annotations

import argparse

__all__ = ["CertifyCommand"]


class CertifyCommand:
    help = "certify a denoiser in front of a black-box classifier (Cohen et al.'s CERTIFY); --compare: Table 2's rows"
    description = (
        "Randomized-smoothing certification of base(z) = argmax f(D(z)) on a class-balanced subset of the test "
        "split: certified accuracy at --radii, a curve (PNG), a per-image CSV. Checkpointed per image: run the same "
        "command again to resume. RUN_DIR is a `blackbox-zo train certified-defense` run (its classifier, images "
        "and fine-tuned denoiser); --set classifier.source=... points it at another copy of the classifier (an ONNX "
        "file, a v2 endpoint). Costs (N0 + N) black-box images per test image.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir", nargs="?", help="a certified-defense run directory")
        p.add_argument("--denoiser", help="a DnCNN state dict (.pt) to certify instead of a run's, or 'none'")
        p.add_argument("--n0", type=int, default=100, help="CERTIFY selection samples N0 (default 100)")
        p.add_argument("--n", type=int, default=10_000, help="CERTIFY estimation samples N (default 10,000)")
        p.add_argument("--alpha", type=float, default=0.001, help="failure probability per certificate (0.001)")
        p.add_argument("--sigma", type=float, help="smoothing noise (default: the run's defense.sigma)")
        p.add_argument("--test-size", type=int, default=200, help="class-balanced test images (default 200)")
        p.add_argument("--radii", default="0,0.25,0.5,0.75", help="radii of the table (default 0,0.25,0.5,0.75)")
        p.add_argument("--seed", type=int, default=0, help="noise seed of the certification (default 0)")
        p.add_argument("--batch", type=int, default=10_000, help="noise samples per classifier call (10,000)")
        p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
        p.add_argument("--out", help="output directory (default RUN_DIR/certify/<settings key>)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="classifier.* / images.* / defense.onnx_threads / run.oracle_retries overrides")
        p.add_argument("--compare", action="store_true",
                       help="certify the rows of DeepZero's Table 2 (no denoiser, MSE-only, FO-DS, ZO-AE-DS, ours) "
                            "for each of --seeds, training what is missing (cached under --out)")
        p.add_argument("--seeds", default=None, help="--compare: comma-separated seeds (default: the run's, +1)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
        from .certified_defense.certify import run_certify, run_compare

        return run_compare(args) if args.compare else run_certify(args)
