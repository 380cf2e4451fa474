"""Loaders for the on-disk formats of CIFAR-10/100, SVHN and ImageNet-style image folders.

Images come back as uint8 [N, 3, H, W] (or [3, H, W] per ImageFolder item) and targets as
int64: augmentation and normalization (`normalize`) run batched on the device afterwards.
"""

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import einops
import numpy as np
import torch
from torch.utils.data import Dataset

from metapl.data.check import unreadable_images, why_unreadable

# Per-channel (mean, std) of the training images on the [0, 1] scale.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

CIFAR_FILES = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        b"fine_labels",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def normalize(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 [N, C, H, W] (or float in [0, 1]) -> float32 standardized with `dataset`'s stats."""
    mean, std = NORMALIZATION[dataset]
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _torchvision_datasets() -> ModuleType | None:
    try:
        import torchvision.datasets
    except (ImportError, RuntimeError, OSError):  # absent, or a build that does not match torch
        return None
    return torchvision.datasets


def _missing(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not p.is_file()]


def _ensure(paths: list[Path], download: bool, fetch: Callable[[Any], Any], how: str) -> None:
    """Raise FileNotFoundError (one line) saying where to put the missing files, after trying
    `fetch`."""
    if not _missing(paths):
        return
    tv = _torchvision_datasets() if download else None
    if tv is not None:
        fetch(tv)
        if not _missing(paths):
            return
    reason = "download=True needs torchvision, which does not import here; " if download else ""
    missing = _missing(paths)
    listing = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
    raise FileNotFoundError(f"missing dataset file(s) {listing}: {reason}{how}")


def load_cifar(
    root: str | os.PathLike, name: str = "cifar10", train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 python-pickle batches under `root` -> (uint8 [N, 3, 32, 32], int64 [N]).

    Expects root/cifar-10-batches-py/{data_batch_1..5, test_batch} or
    root/cifar-100-python/{train, test} (pickles of b"data" [N, 3072] uint8 holding the R, G, B
    planes row-major, and b"labels" / b"fine_labels"). The files are pickles: load only trusted
    copies.
    """
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR name {name!r}; pass 'cifar10' or 'cifar100'")
    folder, train_files, test_files, label_key, url = CIFAR_FILES[name]
    paths = [Path(root) / folder / f for f in (train_files if train else test_files)]

    def fetch(tv: Any) -> None:
        cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
        cls(str(root), train=train, download=True)

    how = f"Download and extract {url} into {root} (it unpacks to {folder}/)."
    _ensure(paths, download, fetch, how)
    images, targets = [], []
    for p in paths:
        try:
            with open(p, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets.append(np.asarray(batch[label_key], dtype=np.int64))
        except Exception as e:  # unpickling raises many types for a damaged file
            raise ValueError(
                f"cannot read {p}: {type(e).__name__}: {e}; it is not a CIFAR python batch "
                f"(a pickle of b'data' and {label_key!r}): download it again ({url})"
            ) from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(targets))


def load_svhn(
    root: str | os.PathLike, split: str = "train", download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN root/{split}_32x32.mat -> (uint8 [N, 3, 32, 32], int64 [N]), digit 0 as label 0.

    The .mat files hold X [32, 32, 3, N] uint8 and y [N, 1] with 10 meaning digit 0.
    split: "train", "test" or "extra". Reading .mat files needs scipy.
    """
    if split not in ("train", "test", "extra"):
        raise ValueError(f"unknown SVHN split {split!r}; pass 'train', 'test' or 'extra'")
    path = Path(root) / f"{split}_32x32.mat"

    def fetch(tv: Any) -> None:
        tv.SVHN(str(root), split=split, download=True)

    how = f"Download {_SVHN_URL.format(split=split)} into {root}."
    _ensure([path], download, fetch, how)
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("load_svhn reads .mat files with scipy: pip install scipy") from e
    try:
        mat = loadmat(path)
        images = einops.rearrange(mat["X"], "h w c n -> n c h w")
        targets = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10
    except Exception as e:  # scipy raises many types for a damaged file
        raise ValueError(
            f"cannot read {path}: {type(e).__name__}: {e}; it is not an SVHN .mat file (X "
            f"[32, 32, 3, N] and y [N, 1]): download it again ({_SVHN_URL.format(split=split)})"
        ) from None
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(targets)


def _pil_image() -> ModuleType:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "reading image folders needs Pillow, which is not installed: pip install pillow "
            '(or pip install -e ".[vision]")'
        ) from None
    return Image


def load_image(
    path: str | os.PathLike, size: int, resize: int | None = None, interpolation: str = "bicubic"
) -> torch.Tensor:
    """One image file as uint8 [3, size, size]: its shorter side resized to ``resize``
    (default size * 8 / 7) with ``interpolation``, then center-cropped (ImageNet's evaluation
    view; what ``ImageFolderDataset`` items and ``metapl.training.predict`` see)."""
    Image = _pil_image()
    resize = round(size * 8 / 7) if resize is None else resize
    r = Image.Resampling
    mode = {"nearest": r.NEAREST, "bilinear": r.BILINEAR, "bicubic": r.BICUBIC}[interpolation]
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    new_w, new_h = max(resize, round(w * scale)), max(resize, round(h * scale))
    img = img.resize((new_w, new_h), mode)
    left = int(round((new_w - size) / 2))
    top = int(round((new_h - size) / 2))
    img = img.crop((left, top, left + size, top + size))
    return einops.rearrange(torch.from_numpy(np.array(img)), "h w c -> c h w").contiguous()


class ImageFolderDataset(Dataset):
    """root/<class>/<image> (ImageNet's train/ or val/ layout), decoded lazily with PIL.

    Item i -> (uint8 [3, size, size], class index). Each image's shorter side is resized to
    `resize` (default size * 8 / 7, i.e. 256 for 224) with `interpolation`, then center-cropped
    to size x size, so batches stack; random-resized crops are done on the device afterwards.
    Classes are the sorted sub-folder names; `targets` ([N] int64) feeds the split functions.

    `classes`: the class names to number by, in order (pass the training set's `classes` to
    a validation or test folder, so both share one mapping). A class without a folder here is
    fine (its index is kept); a folder not in `classes` raises a ValueError naming it.

    `unlabeled=True`: a folder of unlabeled images instead, at any depth and without classes
    (`classes` is empty and every target is -1).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 224,
        resize: int | None = None,
        interpolation: str = "bicubic",
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        classes: Sequence[str] | None = None,
        unlabeled: bool = False,
    ):
        _pil_image()  # a clear error now when Pillow is missing
        self.root = Path(root)
        self.size = size
        self.resize = round(size * 8 / 7) if resize is None else resize
        if self.resize < size:
            raise ValueError(f"resize ({self.resize}) must be >= size ({size})")
        modes = ("nearest", "bilinear", "bicubic")
        if interpolation not in modes:
            raise ValueError(f"unknown interpolation {interpolation!r}; pass one of {list(modes)}")
        self.interpolation = interpolation
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist: put images at {self.root}/<class>/<file>"
                " (ImageNet: ILSVRC2012 train/val from https://image-net.org/download.php, with"
                " val/ sorted into one folder per class)"
            )
        exts = tuple(e.lower() for e in extensions)
        if unlabeled:
            self.classes, self.class_to_idx = [], {}
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts)
            self.samples = [(p, -1) for p in files if p.is_file()]
        else:
            self._list_classes(exts, classes)
        if not self.samples:
            where = f"{self.root} (at any depth)" if unlabeled else f"{self.root}/<class>/"
            raise FileNotFoundError(f"no images with extensions {exts} in {where}")
        self.targets = np.array([t for _, t in self.samples], dtype=np.int64)
        self._owns_classes = classes is None and not unlabeled  # its folders are the classes
        if self._owns_classes:
            self._check_no_empty_class()

    def _list_classes(self, exts: tuple[str, ...], classes: Sequence[str] | None) -> None:
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = folders if classes is None else list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in folders if c not in self.class_to_idx]
        if unknown:
            shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise ValueError(
                f"{self.root} has {len(unknown)} class folder(s) not among the given classes (the"
                f" training set's): {shown}; remove them, or add those classes to the training"
                " folder"
            )
        self.samples = [
            (p, self.class_to_idx[c])
            for c in folders
            for p in sorted((self.root / c).iterdir())
            if p.suffix.lower() in exts
        ]

    def check_images(self, skip_bad: bool = False, threads: int = 8) -> list[Path]:
        """Open and verify every image before any is used (``metapl.data.check``; cached while
        the folder does not change). A damaged file raises a ValueError naming it; with
        ``skip_bad`` the damaged files are dropped from the samples instead, and returned."""
        bad = unreadable_images([p for p, _ in self.samples], self.root, threads)
        if bad and not skip_bad:
            others = f" (and {len(bad) - 1} other file(s))" if len(bad) > 1 else ""
            raise ValueError(
                f"cannot read image {bad[0]}: {why_unreadable(bad[0])}{others}; replace or "
                "remove it, or skip damaged images (--skip-bad-images)"
            )
        if bad:
            dropped = set(bad)
            self.samples = [s for s in self.samples if s[0] not in dropped]
            self.targets = np.array([t for _, t in self.samples], dtype=np.int64)
            if self._owns_classes:
                self._check_no_empty_class()
            if not self.samples:
                raise ValueError(f"{self.root} holds no readable images")
        return bad

    def _check_no_empty_class(self) -> None:
        """A class folder without images would still add an output class: refused."""
        counts = np.bincount(self.targets, minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts, strict=True) if n == 0]
        if empty:
            raise ValueError(
                f"class folder {self.root / empty[0]} holds no readable images"
                + (f" (nor {len(empty) - 1} other class folder(s))" if len(empty) > 1 else "")
                + ": a class without images would still be a class of the model; remove the "
                "folder or add its images"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return load_image(path, self.size, self.resize, self.interpolation), target
