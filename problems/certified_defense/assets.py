"""The user's assets for the certified defense: the black-box classifier and the images.

* `ClassifierSettings.source`: ``digits`` (the built-in digits CNN, trained by stage 1), a
  ``.onnx`` file (an in-process ONNX Runtime session), or an Open Inference Protocol (v2)
  endpoint ``http(s)://HOST[:PORT]/v2/models/NAME[/versions/V]`` (`RemoteClassifier`).
* `ImageSettings.source`: ``digits`` (scikit-learn's 8x8 digits), a folder with one
  subfolder per class holding PNG/JPEG files (read with Pillow), or an ``.npz`` with arrays
  ``x`` ([N, H, W], [N, C, H, W] or [N, H, W, C]; uint8 0-255 or floats in [0, 1]) and ``y``
  ([N] integer labels).

Input size and channels come from the images; the classifier's declared input must fit
them (a `ConfigError`, one line, exit 2, if not). Each asset has an `identity` (a dict
naming it: the ONNX file's SHA-256, the endpoint's URL + model + version + metadata, the
image files' digest) that goes into the stage-cache key, so a cached denoiser is never
reused for another classifier or other images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from blackbox_zo.config import ConfigError, Strict
from blackbox_zo.oracle import OracleError
from blackbox_zo.problem import ProblemSetupError
from oracles.classifier import OnnxClassifier
from oracles.remote import ModelMismatchError, RemoteClassifier, read_token
from problems.digits import load_digits_split

__all__ = [
    "ClassifierSettings",
    "ImageSettings",
    "ImageData",
    "load_images",
    "classifier_kind",
    "open_classifier",
    "file_sha256",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BUILTIN = "digits"


class ClassifierSettings(Strict):
    """The black box. The bearer token is never a setting: `token_env` / `token_file` say where it is."""

    source: str = Field(BUILTIN, description="'digits' (built-in CNN, stage 1), a .onnx file, or a v2 endpoint "
                        "http(s)://HOST[:PORT]/v2/models/NAME[/versions/V]")
    outputs: Literal["logits", "probabilities"] = Field("logits", description="what the classifier returns")
    max_batch: int = Field(512, ge=1, le=1_000_000, description="v2 endpoint: images per request at most")
    in_flight: int = Field(4, ge=1, le=64, description="v2 endpoint: requests in flight at once")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="v2 endpoint: timeout of one request")
    token_env: Optional[str] = Field("BLACKBOX_ZO_TOKEN", description="v2 endpoint: environment variable that "
                                     "holds the bearer token (if set)")
    token_file: Optional[str] = Field(None, description="v2 endpoint: file whose first line is the bearer token")
    verify_tls: bool = Field(True, description="v2 endpoint: verify the server's TLS certificate")
    ca_file: Optional[str] = Field(None, description="v2 endpoint: CA bundle for a private certificate authority")
    input_name: Optional[str] = Field(None, description="v2 endpoint: the input tensor (default: the only one)")
    output_name: Optional[str] = Field(None, description="v2 endpoint: the output tensor (default: the first)")


class ImageSettings(Strict):
    source: str = Field(BUILTIN, description="'digits' (built-in 8x8), a folder with one subfolder per class "
                        "(PNG/JPEG), or an .npz with x and y")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share of each class (folder / .npz)")
    size: Optional[tuple[int, int]] = Field(None, description="folder: resize every image to (height, width)")
    channels: Optional[Literal[1, 3]] = Field(None, description="folder: 1 (grayscale) or 3 (RGB); default: 3 if "
                                              "any image has colour, else 1")


def classifier_kind(source: str) -> str:
    """'builtin', 'remote' or 'onnx' (ConfigError for anything else)."""
    s = source.strip()
    if s == BUILTIN:
        return "builtin"
    if s.startswith(("http://", "https://")):
        return "remote"
    if s.endswith(".onnx"):
        return "onnx"
    raise ConfigError(f"classifier.source={source!r}: expected 'digits', a .onnx file or a v2 endpoint URL "
                      "http(s)://HOST[:PORT]/v2/models/NAME[/versions/VERSION]")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------- images


@dataclass
class ImageData:
    x_train: Tensor  # [N, C, H, W] float32 in [0, 1]
    y_train: Tensor  # [N] long
    x_test: Tensor
    y_test: Tensor
    identity: dict[str, Any]
    classes: list[str]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])  # type: ignore[return-value]


def load_images(settings: ImageSettings, seed: int) -> ImageData:
    """The images of `settings.source`, split into train and test (stratified by class, seeded)."""
    source = settings.source.strip()
    if source == BUILTIN:
        x_tr, y_tr, x_te, y_te = load_digits_split(seed)
        return ImageData(x_tr, y_tr, x_te, y_te, {"images": BUILTIN, "data_seed": seed},
                         [str(c) for c in range(10)])
    path = Path(source).expanduser()
    if path.is_dir():
        x, y, classes, digest = _read_folder(path, settings)
    elif path.suffix == ".npz" and path.is_file():
        x, y, classes, digest = _read_npz(path)
    elif not path.exists():
        raise ProblemSetupError(f"images.source={source!r}: no such folder or file (expected 'digits', a folder "
                                "with one subfolder per class, or an .npz with x and y)")
    else:
        raise ProblemSetupError(f"images.source={source!r}: expected 'digits', a folder with one subfolder per "
                                "class, or an .npz file with arrays x and y")
    train, test = _stratified_split(y, settings.test_fraction, seed)
    identity = {"images": str(path.resolve()), "sha256": digest, "test_fraction": settings.test_fraction,
                "size": settings.size, "channels": settings.channels, "data_seed": seed}
    return ImageData(x[train], y[train], x[test], y[test], identity, classes)


def _stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = int(round(test_fraction * idx.numel()))
        k = min(max(k, 1 if idx.numel() > 1 else 0), idx.numel() - 1)  # both sides keep every class with 2+
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def _class_indices(names: list[str]) -> list[int]:
    """Subfolders named 0..K-1 (any order) are those class indices; otherwise sorted names -> 0, 1, ..."""
    if all(n.isdigit() for n in names):
        return [int(n) for n in names]
    return list(range(len(names)))


def _read_folder(path: Path, settings: ImageSettings) -> tuple[Tensor, Tensor, list[str], str]:
    try:
        from PIL import Image
    except ImportError as exc:  # Pillow comes with matplotlib; said plainly if it is missing
        raise ImportError("an image folder needs Pillow: pip install pillow") from exc
    subdirs = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: (int(d.name) if d.name.isdigit() else 0, d.name))
    if len(subdirs) < 2:
        raise ProblemSetupError(f"images.source={str(path)!r}: needs one subfolder per class (at least 2), "
                                f"found {len(subdirs)}")
    names = [d.name for d in subdirs]
    indices = _class_indices(names)
    files: list[tuple[Path, int]] = []
    for d, c in zip(subdirs, indices):
        found = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ProblemSetupError(f"images.source={str(path)!r}: class folder {d.name!r} has no PNG/JPEG image")
        files += [(f, c) for f in found]
    h = hashlib.sha256()
    images = []
    for f, _ in files:
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except Exception as exc:  # a corrupt file: name it
            raise ProblemSetupError(f"images.source={str(path)!r}: cannot read {f.relative_to(path)} "
                                    f"({type(exc).__name__}: {exc})") from None
    channels = settings.channels or (3 if any(im.mode not in ("1", "L", "LA", "I", "I;16", "F") for im in images)
                                     else 1)
    mode = "L" if channels == 1 else "RGB"
    sizes = {im.size for im in images}
    if settings.size is None and len(sizes) > 1:
        raise ProblemSetupError(f"images.source={str(path)!r}: images have {len(sizes)} different sizes "
                                f"(e.g. {sorted(sizes)[:2]} as width x height); set images.size=[H, W] to resize them")
    arrays = []
    for im in images:
        im = im.convert(mode)
        if settings.size is not None:
            height, width = settings.size
            im = im.resize((width, height), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays))
    y = torch.tensor([c for _, c in files], dtype=torch.long)
    return x, y, names, h.hexdigest()


def _read_npz(path: Path) -> tuple[Tensor, Tensor, list[str], str]:
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickle a user's file
            if "x" not in data or "y" not in data:
                raise ProblemSetupError(f"images.source={str(path)!r}: needs arrays 'x' and 'y', has "
                                        f"{sorted(data.files)}")
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
    except ProblemSetupError:
        raise
    except Exception as exc:
        raise ProblemSetupError(f"images.source={str(path)!r}: cannot read it ({type(exc).__name__}: {exc})") from None
    where = f"images.source={str(path)!r}"
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ProblemSetupError(f"{where}: x has shape {list(x.shape)}; expected [N, H, W], [N, C, H, W] or "
                                "[N, H, W, C] with C = 1 or 3")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise ProblemSetupError(f"{where}: y must be [N] integer labels for the {x.shape[0]} images, got "
                                f"{y.dtype} {list(y.shape)}")
    if x.dtype == np.uint8:
        xf = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        xf = x.astype(np.float32)
        if not np.isfinite(xf).all() or xf.min() < 0 or xf.max() > 1:
            raise ProblemSetupError(f"{where}: float images must be finite and in [0, 1] (got "
                                    f"[{np.nanmin(xf):.3g}, {np.nanmax(xf):.3g}])")
    else:
        raise ProblemSetupError(f"{where}: x must be uint8 (0-255) or float in [0, 1], got {x.dtype}")
    if y.min() < 0:
        raise ProblemSetupError(f"{where}: labels must be >= 0, got {int(y.min())}")
    classes = [str(c) for c in sorted(set(y.tolist()))]
    return torch.from_numpy(np.ascontiguousarray(xf)), torch.from_numpy(y.astype(np.int64)), classes, \
        file_sha256(path)


# -------------------------------------------------------------------------- classifier


def open_classifier(settings: ClassifierSettings, input_shape: tuple[int, int, int], *, retries: int,
                    backoff_s: float, onnx_threads: int = 1):
    """(classifier, identity) for an ONNX file or a v2 endpoint (the built-in one is stage 1's).

    The classifier's declared input must take [batch, *input_shape]; ConfigError otherwise.
    """
    kind = classifier_kind(settings.source)
    shape = [int(s) for s in input_shape]
    if kind == "onnx":
        path = Path(settings.source).expanduser()
        if not path.is_file():
            raise ConfigError(f"classifier.source={settings.source!r}: no such ONNX file")
        clf = OnnxClassifier(path, outputs=settings.outputs, threads=onnx_threads)
        declared = clf.function.session.get_inputs()[0].shape
        if len(declared) != 4 or any(isinstance(d, int) and d > 0 and d != w for d, w in zip(declared[1:], shape)):
            raise ConfigError(f"classifier.source={settings.source!r} takes input of shape {list(declared)}, "
                              f"the images are [batch, {', '.join(map(str, shape))}]")
        return clf, {"classifier": "onnx", "sha256": file_sha256(path), "outputs": settings.outputs}
    if kind == "remote":
        try:
            token = read_token(settings.token_env, settings.token_file)
        except ValueError as exc:
            raise ConfigError(f"classifier.token_file: {exc}") from None
        try:
            clf = RemoteClassifier(
                settings.source, outputs=settings.outputs, max_batch=settings.max_batch,
                in_flight=settings.in_flight, timeout_s=settings.timeout_s, retries=retries, backoff_s=backoff_s,
                token=token, verify_tls=settings.verify_tls, ca_file=settings.ca_file,
                input_name=settings.input_name, output_name=settings.output_name, input_shape=shape)
        except (ValueError, ModelMismatchError) as exc:
            raise ConfigError(f"classifier.source: {exc}") from None
        except OracleError as exc:  # the server is down or refused: the environment, one line
            raise ProblemSetupError(f"classifier.source: {exc}") from None
        return clf, {"classifier": "remote", **clf.identity, "outputs": settings.outputs}
    raise ValueError("the built-in classifier comes from stage 1")
