"""`blackbox-zo certify`: Cohen et al.'s CERTIFY for a denoiser in front of a black box, resumable.

    blackbox-zo certify RUN_DIR                         # the run's denoiser, classifier and images
    blackbox-zo certify RUN_DIR --set classifier.source=http://127.0.0.1:8080/v2/models/digits
    blackbox-zo certify --denoiser den.pt --set classifier.source=model.onnx --set images.source=imgs/
    blackbox-zo certify RUN_DIR --compare --seeds 0,1    # the rows of DeepZero's Table 2, 2 seeds each

Randomized smoothing (Cohen, Rosenfeld and Kolter, "Certified Adversarial Robustness via
Randomized Smoothing", ICML 2019, arXiv:1902.02918) over base(z) = argmax f(D(z)), on a
class-balanced subset of the test split. Test image i draws its noise from a generator
seeded by (seed, i), so a result does not depend on the order, on a subset being run, or on
an interruption. Each certified image is one line of ``points.jsonl``, written as soon as it
is known: an interrupted certification (Ctrl-C, the server gone) continues where it
stopped when the same command is run again, and a finished one is read back, not
recomputed. Writes ``certify.csv`` (label, prediction, radius, correct per image),
``table.md`` / ``table.csv`` (certified accuracy at the chosen radii), ``certified_accuracy.png``
and ``summary.json`` into ``RUN_DIR/certify/<settings key>/`` (or ``--out``).

``--compare`` certifies, for each seed, the rows of DeepZero's Table 2 (Chen et al., ICLR 2024,
arXiv:2310.02025): no denoiser, the MSE-only denoiser, FO-DS (Salman et al. 2020: the whole
denoiser fine-tuned with white-box gradients; needs the built-in classifier, the only one with
a white-box copy), ZO-AE-DS (Zhang et al., ICLR 2022, arXiv:2203.14195; `zo_ae_ds.py`) and
ours (the ZO fine-tune of the run), and reports each row's mean over seeds and a paired sign
test against ours. Every training run and every certified image is cached under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blackbox_zo import rundir
from blackbox_zo.config import ConfigError, resolve_config
from blackbox_zo.interrupts import Interrupted
from blackbox_zo.oracle import OracleError
from blackbox_zo.problem import ProblemSetupError
from blackbox_zo.progress import human
from blackbox_zo.rundir import append_line, atomic_write_bytes, atomic_write_text
from blackbox_zo.trainer import train
from oracles import certification
from oracles.certification import max_certifiable_radius
from oracles.classifier import predict_labels
from oracles.smoothing import DnCNN

from . import (CertifiedDefenseConfig, CertifiedDefenseProblem, classifier_kind, open_assets,
               stratified_subset)
from .experiment import FastDenoisers
from .plots import plot_certified_accuracy
from .zo_ae_ds import ZoAeDsSettings, load_ae_ds, pretrain_autoencoder, save_ae_ds, train_zo_ae_ds

__all__ = ["CertifySettings", "RowResult", "certify_points", "sign_test", "denoiser_from_state", "run_certify", "run_compare"]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75)
ROW_LABELS = {
    "none": "no denoiser",
    "mse": "MSE-only denoiser",
    "fo-ds": "FO-DS (whole denoiser, white-box gradients)",
    "zo-ae-ds": "ZO-AE-DS (Zhang et al. 2022)",
    "zo": "ZO fine-tune (ours)",
    "denoiser": "denoiser",
}


@dataclass(frozen=True)
class CertifySettings:
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    sigma: float = 0.25
    test_size: int = 200
    seed: int = 0
    batch: int = 10_000  # noise samples per call of the base classifier

    def key(self, *parts: Any) -> str:
        blob = json.dumps({**asdict(self), "parts": parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class RowResult:
    indices: np.ndarray  # test-split index per point
    labels: np.ndarray
    predictions: np.ndarray  # class or -1 (abstain)
    radii: np.ndarray
    seconds: float  # spent in this process
    black_box_images: int  # sent in this process
    reused: int  # points read back from points.jsonl

    def certified(self, r: float) -> np.ndarray:
        return (self.predictions == self.labels) & (self.predictions >= 0) & (self.radii >= r)

    def accuracy_at(self, radii: Sequence[float]) -> list[float]:
        return [float(self.certified(r).mean()) for r in radii]


# ---------------------------------------------------------------------------- the loop


def _read_points(path: Path) -> dict[int, dict[str, Any]]:
    """Records of points.jsonl; a line torn by a crash is dropped (and cut from the file)."""
    if not path.exists():
        return {}
    good: list[str] = []
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line)
            if not line.endswith("\n"):
                raise ValueError("torn")
        except ValueError:
            break
        out[int(rec["index"])] = rec
        good.append(line)
    if sum(map(len, good)) != path.stat().st_size:
        atomic_write_text(path, "".join(good))
    return out


def certify_points(base: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, indices: Tensor, settings: CertifySettings,
                   num_classes: int, points_path: Path, *, images_sent: Callable[[], int], progress: bool = True,
                   desc: str = "certify") -> RowResult:
    """CERTIFY each image (resuming from `points_path`); image i's noise is seeded by (seed, indices[i])."""
    points_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_points(points_path)
    reused = sum(1 for i in indices.tolist() if int(i) in done)
    sent0, t0 = images_sent(), time.perf_counter()
    bar = tqdm(total=len(indices), initial=reused, desc=desc, disable=not progress, dynamic_ncols=True, leave=False,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    try:
        with torch.no_grad():
            for pos, index in enumerate(indices.tolist()):
                if int(index) in done:
                    continue
                gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + int(index))
                pred, radius = certification.certify(base, x[pos], settings.sigma, settings.n0, settings.n,
                                                     settings.alpha, num_classes, settings.batch, gen)
                rec = {"index": int(index), "label": int(y[pos]), "predict": int(pred), "radius": round(radius, 6),
                       "correct": int(pred == int(y[pos]))}
                append_line(points_path, json.dumps(rec))
                done[int(index)] = rec
                elapsed = max(1e-9, time.perf_counter() - t0)
                bar.set_postfix({"img/s": f"{(len(done) - reused) / elapsed:.2f}",
                                 "queries": human(images_sent() - sent0),
                                 "queries/s": human((images_sent() - sent0) / elapsed)}, refresh=False)
                bar.update(1)
    finally:
        bar.close()
    recs = [done[int(i)] for i in indices.tolist()]
    return RowResult(
        indices=np.asarray([r["index"] for r in recs]), labels=np.asarray([r["label"] for r in recs]),
        predictions=np.asarray([r["predict"] for r in recs]), radii=np.asarray([float(r["radius"]) for r in recs]),
        seconds=time.perf_counter() - t0, black_box_images=images_sent() - sent0, reused=reused)


def sign_test(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Paired two-sided sign test on booleans: (a only, b only, p) - scipy's exact binomial test."""
    from scipy.stats import binomtest

    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5).pvalue)
    return wins, losses, p


# ------------------------------------------------------------------------------ models


def denoiser_from_state(state: dict[str, Tensor]):
    """A DnCNN shaped after its own state dict (depth, width, channels, batch norm) with it loaded."""
    convs = sorted(int(k.split(".")[1]) for k, v in state.items()
                   if k.startswith("prefix.") and k.endswith(".weight") and v.dim() == 4)
    if not convs or "last.weight" not in state:
        raise ConfigError("the denoiser file is not a DnCNN state dict (no prefix.*.weight / last.weight)")
    first = state[f"prefix.{convs[0]}.weight"]
    den = DnCNN(channels=int(first.shape[1]), depth=len(convs) + 1, width=int(first.shape[0]),
                batch_norm=any(k.endswith("running_mean") for k in state))
    den.load_state_dict(state)
    return den.eval()


def _state_digest(module: nn.Module | None) -> str:
    if module is None:
        return "none"
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class SmoothedBase:
    """base(z) = argmax f(D(z)) (D may be None: the undefended classifier)."""
    def __init__(self, black_box, denoise: Callable[[Tensor], Tensor] | None):
        self.black_box, self.denoise = black_box, denoise

    def __call__(self, images: Tensor) -> Tensor:
        z = images if self.denoise is None else self.denoise(images)
        return self.black_box(z).argmax(1)


def _torch_denoise(module: nn.Module) -> Callable[[Tensor], Tensor]:
    module = module.eval()

    def run(z: Tensor) -> Tensor:
        with torch.no_grad():
            return module(z)

    return run


# ------------------------------------------------------------------------------ output


def format_table(rows: list[dict[str, Any]], radii: Sequence[float], with_spread: bool = False) -> str:
    head = ["method"] + [f"r = {r:g}" for r in radii] + [k for k in ("cost", "seeds") if any(k in r for r in rows)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"]]
        for r in radii:
            mean = 100 * row[f"ca@{r:g}"]
            spread = row.get(f"ca@{r:g}_per_seed")
            cells.append(f"{mean:.1f}" + (f" ({', '.join(f'{100 * v:.1f}' for v in spread)})"
                                          if with_spread and spread else ""))
        cells += [str(row[k]) for k in ("cost", "seeds") if k in head]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_points_csv(path: Path, result: RowResult) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["test_index", "label", "prediction", "radius", "correct"])
    for i, label, pred, rad in zip(result.indices, result.labels, result.predictions, result.radii):
        w.writerow([int(i), int(label), int(pred), f"{rad:.6f}", int(pred == label and pred >= 0)])
    atomic_write_text(path, buf.getvalue())


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------ command


def _parse_radii(text: str) -> tuple[float, ...]:
    try:
        radii = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"--radii must be comma-separated numbers, got {text!r}") from None
    if not radii or any(r < 0 for r in radii):
        raise ConfigError(f"--radii must be non-negative numbers, got {text!r}")
    return radii


def _settings_from_args(args: argparse.Namespace, sigma: float, seed: int) -> CertifySettings:
    for name, low in (("n", 1), ("n0", 1), ("test_size", 1), ("batch", 1), ("threads", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0 < args.alpha < 1:
        raise ConfigError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.sigma is not None and not args.sigma > 0:
        raise ConfigError(f"--sigma must be > 0, got {args.sigma}")
    return CertifySettings(n0=args.n0, n=args.n, alpha=args.alpha, sigma=args.sigma if args.sigma is not None else sigma,
                           test_size=args.test_size, seed=seed, batch=args.batch)


_SET_ALLOWED = ("classifier.", "images.", "defense.onnx_threads", "defense.artifacts_dir", "run.oracle_retries",
                "run.oracle_retry_backoff_s", "run.out_dir")


def _load_config(args: argparse.Namespace):
    """The run's config (or the defaults) with --set applied; only classifier/images/retry settings may be set."""
    bad = [s for s in args.set if not s.split("=", 1)[0].strip().startswith(_SET_ALLOWED)]
    if bad:
        raise ConfigError(f"certify --set takes classifier.*, images.*, defense.onnx_threads, defense.artifacts_dir, "
                          f"run.oracle_retries, run.oracle_retry_backoff_s and run.out_dir, got {bad[0]!r}")
    if args.run_dir is not None:
        raw = rundir.read_run_config(args.run_dir)
        rundir.check_same_problem(args.run_dir, raw, CertifiedDefenseProblem.name)
        base = raw
    else:
        base = CertifiedDefenseProblem().default_config()
    config = resolve_config(CertifiedDefenseConfig, base, None, args.set)
    config.run.progress = not args.no_progress
    return config


def _open(config, log, denoiser: bool = True):

    try:
        return open_assets(config, log=log, denoiser=denoiser)
    except ProblemSetupError:
        raise
    except OracleError as exc:
        raise ProblemSetupError(str(exc)) from None


def _num_classes(black_box, x: Tensor) -> int:
    known = getattr(black_box, "num_classes", None)
    return int(known) if known else int(black_box(x[:1]).shape[1])


def _denoise_fn(module: nn.Module | None, directory: Path, threads: int, check: Tensor):
    """Fast denoising for a DnCNN (ONNX Runtime prefix + torch last layer, checked), torch otherwise."""
    if module is None:
        return None
    if isinstance(module, DnCNN):
        return FastDenoisers(directory, threads, check)(module)
    return _torch_denoise(module)


def _write_outputs(out: Path, results: dict[str, RowResult], settings: CertifySettings, radii: Sequence[float],
                   info: dict[str, Any]) -> dict[str, Any]:
    r_max = max_certifiable_radius(settings.sigma, settings.n, settings.alpha)
    rows = [{"key": k, "method": ROW_LABELS.get(k, k), **{f"ca@{r:g}": a for r, a in zip(radii, res.accuracy_at(radii))},
             "abstain": float((res.predictions < 0).mean()), "black_box_images": int(res.black_box_images),
             "certify_s": round(res.seconds, 1)} for k, res in results.items()]
    caption = (f"Certified accuracy (%) on {len(next(iter(results.values())).labels)} class-balanced test images; "
               f"sigma = {settings.sigma}, N0 = {settings.n0}, N = {settings.n:,}, alpha = {settings.alpha} "
               f"(largest certifiable radius {r_max:.3f}); classifier {info.get('classifier')}.")
    table = caption + "\n\n" + format_table(rows, radii) + "\n"
    for key, res in results.items():
        write_points_csv(out / ("certify.csv" if len(results) == 1 else f"certify_{key}.csv"), res)
    atomic_write_text(out / "table.md", table)
    write_csv(out / "table.csv", rows)
    curves = {k: (ROW_LABELS.get(k, k), [v]) for k, v in results.items()}
    plot_certified_accuracy(out / "certified_accuracy.png", curves, r_max,
                            f"sigma={settings.sigma}, N={settings.n:,}, {len(rows and next(iter(results.values())).labels)} images")
    return {"table": rows, "table_markdown": table, "largest_certifiable_radius": r_max}


def _start(args: argparse.Namespace) -> tuple[CertifiedDefenseConfig, tuple[float, ...], Callable[[str], None]]:
    """What `certify` and `certify --compare` both begin with: the settings, the radii (checked), the
    threads, and where progress lines go."""
    config = _load_config(args)
    radii = _parse_radii(args.radii)
    torch.set_num_threads(args.threads)
    log = (lambda m: None) if args.no_progress else (lambda m: print(m, file=sys.stderr))
    return config, radii, log


def run_certify(args: argparse.Namespace) -> int:
    """`blackbox-zo certify RUN_DIR` / `--denoiser FILE`: one denoiser, certified, resumable."""
    if args.run_dir is None and args.denoiser is None:
        raise ConfigError("certify needs a RUN_DIR of a certified-defense run, or --denoiser FILE (a DnCNN state "
                          "dict, or 'none') with --set classifier.source=... and --set images.source=...")
    config, radii, log = _start(args)
    # the denoiser first: a missing or damaged file is named before the classifier is opened
    if args.denoiser is not None:
        if args.denoiser == "none":
            module = None
        else:
            path = Path(args.denoiser)
            if not path.is_file():
                raise ConfigError(f"--denoiser {path}: no such file")
            module = denoiser_from_state(torch.load(path, map_location="cpu", weights_only=True))
    else:
        loaded = rundir.load_checkpoint(Path(args.run_dir))
        module = denoiser_from_state(loaded.state["module"])
    assets = _open(config, log, denoiser=False)
    settings = _settings_from_args(args, config.defense.sigma, args.seed)
    data = assets.data
    idx = stratified_subset(data.y_test, settings.test_size, seed=0)
    x, y = data.x_test[idx], data.y_test[idx]
    black_box = assets.black_box
    num_classes = _num_classes(black_box, x)
    key = settings.key(assets.classifier_identity, data.identity, _state_digest(module))
    if args.out:
        out = Path(args.out)
    elif args.run_dir:
        out = Path(args.run_dir) / "certify" / key
    else:
        out = Path(config.run.out_dir) / "certify" / key
    out.mkdir(parents=True, exist_ok=True)
    check = x[:16] + settings.sigma * torch.randn(x[:16].shape, generator=torch.Generator().manual_seed(1))
    denoise = _denoise_fn(module, out / "denoiser_onnx", args.threads, check)
    print(f"certifying {len(idx)} test images x (N0 {settings.n0} + N {settings.n:,}) samples = "
          f"{len(idx) * (settings.n0 + settings.n):,} black-box images, into {out}", file=sys.stderr)
    base = SmoothedBase(black_box, denoise)
    counts = lambda: int(black_box.queries)  # noqa: E731
    info = {"classifier": config.classifier.source, "images": config.images.source,
            "denoiser": args.denoiser or str(Path(args.run_dir) / rundir.CHECKPOINT_NAME)}
    start = {"settings": asdict(settings), "radii": list(radii), **info, "test_images": len(idx)}
    try:
        result = certify_points(base, x, y, idx, settings, num_classes, out / "points.jsonl", images_sent=counts,
                                progress=not args.no_progress, desc="certify")
    except Interrupted as exc:
        done = len(_read_points(out / "points.jsonl"))
        atomic_write_text(out / "summary.json", json.dumps({**start, "stopped": "interrupted", "done": done}, indent=2))
        raise Interrupted(exc.signum, during=f"certification ({done} of {len(idx)} images certified and kept in "
                          f"{out}/points.jsonl); run the same command again to resume") from None
    except OracleError as exc:
        done = len(_read_points(out / "points.jsonl"))
        atomic_write_text(out / "summary.json", json.dumps({**start, "stopped": "oracle error", "done": done,
                                                            "stop_detail": str(exc)}, indent=2))
        print(f"blackbox-zo: certification stopped: {exc}; {done} of {len(idx)} images certified and kept in "
              f"{out}/points.jsonl; run the same command again to resume", file=sys.stderr)
        return 1
    report = _write_outputs(out, {"denoiser" if module is not None else "none": result}, settings, radii, info)
    summary = {**start, "stopped": "completed", "done": len(idx), **report,
               "black_box": {"images": int(black_box.queries), "requests": int(black_box.calls),
                             "requests_retried": int(getattr(black_box, "retried", 0))},
               "reused_points": result.reused, "seconds": round(result.seconds, 1)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print(report["table_markdown"])
    print(f"wrote {out}/certify.csv, table.md, table.csv, certified_accuracy.png, summary.json")
    return 0


# ------------------------------------------------------------------------------ compare


def _completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("stopped") == "completed"
    except (OSError, ValueError):
        return False


def _trained_denoiser(problem, config, run_dir: Path, log) -> tuple[nn.Module, dict[str, Any]]:
    """Train `config` into `run_dir` unless a completed run is there (then read back); (denoiser, summary)."""
    if not _completed(run_dir):
        if run_dir.exists() and rundir.find_checkpoint(run_dir):
            log(f"[compare] resuming {run_dir}")
            train(problem, config, resume=run_dir)
        else:
            log(f"[compare] training {run_dir}")
            train(problem, config, run_dir=run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return denoiser_from_state(rundir.load_checkpoint(run_dir).state["module"]), summary


def _zo_ae_ds(assets, config, seed: int, directory: Path, log) -> tuple[nn.Module, dict[str, Any]]:
    path = directory / "zo_ae_ds.pt"
    shape = assets.data.shape
    if not path.exists():
        log(f"[compare] training ZO-AE-DS into {path}")
        settings = ZoAeDsSettings(epochs=config.run.epochs, batch_size=config.data.batch_size,
                                  step_every_epochs=config.schedule.step_every_epochs, gamma=config.schedule.gamma,
                                  max_steps=config.run.max_steps)
        x = assets.data.x_train
        ae = pretrain_autoencoder(x, settings, seed=seed, progress=config.run.progress)
        labels = predict_labels(assets.black_box, x)
        den = denoiser_from_state(torch.load(assets.stages.denoiser_mse, map_location="cpu", weights_only=True))
        info = train_zo_ae_ds(den, ae, assets.black_box, x, labels, config.defense.sigma, settings, seed=seed,
                              progress=config.run.progress)
        info["settings"] = asdict(settings)
        directory.mkdir(parents=True, exist_ok=True)
        save_ae_ds(path, den, ae, info)
    model, info = load_ae_ds(path, denoiser_from_state, shape)
    return model, info


def run_compare(args: argparse.Namespace) -> int:
    """`blackbox-zo certify RUN_DIR --compare`: Table 2's rows over seeds, with the paired sign test."""
    if args.run_dir is None:
        raise ConfigError("certify --compare needs the RUN_DIR of a certified-defense run (its settings are the recipe "
                          "for every row)")
    base_config, radii, log = _start(args)
    run_seed = base_config.run.seed
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [run_seed, run_seed + 1]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be distinct non-negative integers, got {args.seeds!r}")
    # the black box is the same for every seed: the built-in one is trained with the run's classifier seed
    base_config.defense.classifier_seed = (run_seed if base_config.defense.classifier_seed is None
                                           else base_config.defense.classifier_seed)
    builtin = classifier_kind(base_config.classifier.source) == "builtin"
    out = Path(args.out) if args.out else Path(args.run_dir) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    problem = CertifiedDefenseProblem()
    per_row: dict[str, list[RowResult]] = {}
    costs: dict[str, str] = {}
    settings_used: CertifySettings | None = None
    t_start = time.perf_counter()
    for seed in seeds:
        config = base_config.model_copy(deep=True)
        config.run.seed = seed
        assets = _open(config, log)
        black_box, data = assets.black_box, assets.data
        settings = _settings_from_args(args, config.defense.sigma, seed)
        settings_used = settings
        idx = stratified_subset(data.y_test, settings.test_size, seed=0)
        x, y = data.x_test[idx], data.y_test[idx]
        num_classes = _num_classes(black_box, x)
        seed_dir = out / f"seed{seed}"
        rows: dict[str, nn.Module | None] = {"none": None, "mse": assets.denoiser}
        if builtin:
            # the first-order reference over the WHOLE denoiser (it takes no mu, scheme or sparsity)
            fo = resolve_config(CertifiedDefenseConfig, config.model_dump(), None,
                                ["estimator=autograd", "defense.trainable=all"], name=problem.name)
            rows["fo-ds"], fo_summary = _trained_denoiser(problem, fo, seed_dir / "fo-ds", log)
            costs["fo-ds"] = f"{fo_summary['steps']} steps, white-box gradients (whole denoiser)"
        else:
            log("[compare] FO-DS skipped: it needs a white-box copy of the classifier (the built-in one only)")
        rows["zo-ae-ds"], ae_info = _zo_ae_ds(assets, config, seed, seed_dir / "zo-ae-ds", log)
        costs["zo-ae-ds"] = (f"{ae_info['steps']} steps, {ae_info['loss_queries']:,} loss queries "
                             f"({ae_info['queries_per_step']}/step) x {config.data.batch_size} images")
        if seed == run_seed:
            rows["zo"] = denoiser_from_state(rundir.load_checkpoint(Path(args.run_dir)).state["module"])
            zo_summary = json.loads((Path(args.run_dir) / "summary.json").read_text())
        else:
            rows["zo"], zo_summary = _trained_denoiser(problem, config, seed_dir / "zo", log)
        costs["zo"] = (f"{zo_summary['steps']} steps, {zo_summary['queries']['train']:,} loss queries x "
                       f"{config.data.batch_size} images")
        check = x[:16] + settings.sigma * torch.randn(x[:16].shape, generator=torch.Generator().manual_seed(1))
        for key, module in rows.items():
            key_dir = seed_dir / key / ("certify-" + settings.key(assets.classifier_identity, data.identity,
                                                                  _state_digest(module)))
            denoise = _denoise_fn(module, out / "denoiser_onnx", args.threads, check)
            result = certify_points(SmoothedBase(black_box, denoise), x, y, idx, settings, num_classes,
                                    key_dir / "points.jsonl", images_sent=lambda: int(black_box.queries),
                                    progress=not args.no_progress, desc=f"certify {key} (seed {seed})")
            write_points_csv(key_dir / "certify.csv", result)
            per_row.setdefault(key, []).append(result)
            log(f"[compare] seed {seed} {key}: " + ", ".join(f"r={r:g}: {a:.3f}" for r, a in
                                                              zip(radii, result.accuracy_at(radii))))
    assert settings_used is not None
    order = [k for k in ("none", "mse", "fo-ds", "zo-ae-ds", "zo") if k in per_row]
    table_rows = []
    for key in order:
        results = per_row[key]
        row: dict[str, Any] = {"key": key, "method": ROW_LABELS[key]}
        for r in radii:
            per_seed = [float(res.certified(r).mean()) for res in results]
            row[f"ca@{r:g}"] = float(np.mean(per_seed))
            row[f"ca@{r:g}_per_seed"] = per_seed
        row["cost"] = costs.get(key, "-")
        row["seeds"] = ",".join(map(str, seeds))
        table_rows.append(row)
    tests = []
    cat = np.concatenate
    for key in order:
        if key == "zo":
            continue
        for r in radii:
            a = cat([res.certified(r) for res in per_row["zo"]])
            b = cat([res.certified(r) for res in per_row[key]])
            wins, losses, p = sign_test(a, b)
            tests.append({"versus": key, "radius": r, "ours_only": wins, "other_only": losses, "p": round(p, 4)})
    r_max = max_certifiable_radius(settings_used.sigma, settings_used.n, settings_used.alpha)
    n_img = len(per_row["none"][0].labels)
    caption = (f"Certified accuracy (%) on {n_img} class-balanced test images, mean over seeds {seeds} (per seed "
               f"in brackets); sigma = {settings_used.sigma}, N0 = {settings_used.n0}, N = {settings_used.n:,}, "
               f"alpha = {settings_used.alpha} (largest certifiable radius {r_max:.3f}); classifier "
               f"{base_config.classifier.source}, images {base_config.images.source}.")
    sign_md = ["| ours vs | " + " | ".join(f"r = {r:g}" for r in radii) + " |", "|" + "---|" * (len(radii) + 1)]
    for key in order:
        if key == "zo":
            continue
        cells = [f"{t['ours_only']}:{t['other_only']} (p = {t['p']:.3g})" for t in tests if t["versus"] == key]
        sign_md.append(f"| {ROW_LABELS[key]} | " + " | ".join(cells) + " |")
    table = (caption + "\n\n" + format_table(table_rows, radii, with_spread=True) + "\n\nPaired sign test over "
             f"{n_img * len(seeds)} (seed, image) pairs: images certified at r by ours only : by the other row only "
             "(two-sided exact binomial p):\n\n" + "\n".join(sign_md) + "\n")
    atomic_write_text(out / "table.md", table)
    write_csv(out / "table.csv", table_rows)
    curves = {k: (ROW_LABELS.get(k, k), per_row[k]) for k in order}
    plot_certified_accuracy(out / "certified_accuracy.png", curves, r_max,
                            f"sigma={settings_used.sigma}, N={settings_used.n:,}, {n_img} images, seeds {seeds}")
    summary = {"table": table_rows, "sign_tests": tests, "table_markdown": table, "seeds": seeds,
               "settings": asdict(settings_used), "radii": list(radii), "largest_certifiable_radius": r_max,
               "certify_s": {k: [round(r.seconds, 1) for r in v] for k, v in per_row.items()},
               "reused_points": {k: [r.reused for r in v] for k, v in per_row.items()},
               "wall_s": round(time.perf_counter() - t_start, 1)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print(table)
    print(f"wrote {out}/table.md, table.csv, certified_accuracy.png, summary.json")
    return 0
