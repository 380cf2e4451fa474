"""Tiny fake datasets written in exactly the real on-disk formats, for tests and smoke runs.

Images are learnable: each class has a random 4x4 pattern (color; gray for MNIST), upsampled
and noised, so a model trained on the fakes beats chance. Labels cycle through the classes
(balanced).
"""

import os
import pickle
from pathlib import Path

import numpy as np

from metapl.data.datasets import CIFAR_FILES


def _class_images(
    rng: np.random.Generator, protos: np.ndarray, targets: np.ndarray, h: int, w: int
) -> np.ndarray:
    """uint8 [N, 3, h, w]: the class patterns protos [K, 3, 4, 4] resized to (h, w) plus noise."""
    rows = np.arange(h) * 4 // h
    cols = np.arange(w) * 4 // w
    base = protos[targets][:, :, rows][:, :, :, cols]
    noise = rng.normal(0.0, 24.0, base.shape)
    return np.clip(np.rint(base + noise), 0, 255).astype(np.uint8)


def _prototypes(rng: np.random.Generator, num_classes: int) -> np.ndarray:
    return rng.integers(0, 256, (num_classes, 3, 4, 4)).astype(np.float32)


def _balanced_targets(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_fake_cifar(
    root: str | os.PathLike,
    n_train: int,
    n_test: int,
    num_classes: int = 10,
    seed: int = 0,
    name: str = "cifar10",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write root/cifar-10-batches-py (5 train batches + test_batch + batches.meta) or
    root/cifar-100-python (train, test, meta) for `name`; labels in [0, num_classes).

    Returns {"train": (images uint8 [N, 3, 32, 32], targets int64 [N]), "test": (...)}.
    """
    folder, train_files, test_files, label_key, _ = CIFAR_FILES[name]
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = _prototypes(rng, num_classes)
    written = {}
    for split, n, files in (("train", n_train, train_files), ("test", n_test, test_files)):
        targets = _balanced_targets(rng, n, num_classes)
        images = _class_images(rng, protos, targets, 32, 32)
        written[split] = (images, targets)
        chunks = np.array_split(np.arange(n), len(files))
        for k, (idx, file) in enumerate(zip(chunks, files, strict=True)):
            batch = {
                b"batch_label": f"{split} batch {k + 1}".encode(),
                label_key: targets[idx].tolist(),
                b"data": images[idx].reshape(len(idx), 3072),
                b"filenames": [f"fake_{i:06d}.png".encode() for i in idx],
            }
            if name == "cifar100":
                batch[b"coarse_labels"] = (targets[idx] % 20).tolist()
            _dump(batch, out / file)
    names = [f"class_{c}".encode() for c in range(num_classes)]
    if name == "cifar10":
        meta = {b"label_names": names, b"num_cases_per_batch": -(-n_train // 5)}
        _dump(meta, out / "batches.meta")
    else:
        coarse = [f"superclass_{c}".encode() for c in range(20)]
        _dump({b"fine_label_names": names, b"coarse_label_names": coarse}, out / "meta")
    return written


def write_fake_svhn(
    root: str | os.PathLike, n_train: int, n_test: int, seed: int = 0, n_extra: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write root/{train,test}_32x32.mat, and extra_32x32.mat when ``n_extra > 0`` (X
    [32, 32, 3, N] uint8, y [N, 1] uint8 with 10 for digit 0). Needs scipy. Returns
    {"train": (images [N, 3, 32, 32], digits [N]), "test": ..., "extra": ...}."""
    from scipy.io import savemat

    Path(root).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = _prototypes(rng, 10)
    written = {}
    splits = (("train", n_train), ("test", n_test)) + ((("extra", n_extra),) if n_extra else ())
    for split, n in splits:
        digits = _balanced_targets(rng, n, 10)
        images = _class_images(rng, protos, digits, 32, 32)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        savemat(Path(root) / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
        written[split] = (images, digits)
    return written


def write_fake_imagefolder(
    root: str | os.PathLike,
    num_classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    image_size: tuple[int, int] = (48, 64),
    seed: int = 0,
    ext: str = "png",
) -> dict[str, list[tuple[Path, np.ndarray, int]]]:
    """Write ImageNet's layout root/{train,val}/class_XXX/img_YYYY.<ext> (png: lossless; jpg or
    JPEG like ImageNet). Every other image is transposed, so portrait and landscape both occur.

    Returns {"train": [(path, image uint8 [3, H, W] as encoded, class)], "val": [...]}, sorted.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    protos = _prototypes(rng, num_classes)
    h, w = image_size
    written: dict[str, list[tuple[Path, np.ndarray, int]]] = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        written[split] = []
        for c in range(num_classes):
            folder = Path(root) / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            targets = np.full(per_class, c)
            for i, image in enumerate(_class_images(rng, protos, targets, h, w)):
                if i % 2:
                    image = np.ascontiguousarray(image.transpose(0, 2, 1))
                path = folder / f"img_{i:04d}.{ext}"
                Image.fromarray(image.transpose(1, 2, 0)).save(path)
                written[split].append((path, image, c))
    return written


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array in LeCun's IDX format (gzipped when `path` ends in .gz)."""
    import gzip
    import struct

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fake_mnist(
    root: str | os.PathLike, n_train: int, n_test: int, seed: int = 0, gz: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write MNIST's four IDX files (train-images-idx3-ubyte[.gz] etc.) into root: images
    uint8 [N, 28, 28], balanced labels 0..9. Returns {"train": (images [N, 1, 28, 28],
    labels int64 [N]), "test": ...}."""
    Path(root).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (10, 1, 4, 4)).astype(np.float32)
    suffix = ".gz" if gz else ""
    written = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        labels = _balanced_targets(rng, n, 10)
        images = _class_images(rng, protos, labels, 28, 28)
        write_idx(Path(root) / f"{prefix}-images-idx3-ubyte{suffix}", images[:, 0])
        write_idx(Path(root) / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
        written[split] = (images, labels)
    return written


def write_fake_ising(
    root: str | os.PathLike, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the Ising files (images_16.zip of 0000.png... with 0 / 255 pixels, labels_16.csv
    sorted by temperature) into root. Temperatures are uniform in (0, 4.5); below T_c = 2.269
    (label 0) a lattice is one sign with each spin flipped with probability 0.05 + 0.15 T / T_c,
    above it (label 1) every spin is random. The zip lists the images in reverse, as the real
    one does. Returns (images uint8 [N, 1, 16, 16], labels int64 [N], temperatures [N])."""
    import io
    import zipfile

    from PIL import Image

    Path(root).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    temperatures = np.sort(rng.uniform(0.0, 4.5, n))
    labels = (temperatures > 2.269).astype(np.int64)
    flip = np.where(labels == 1, 0.5, 0.05 + 0.15 * temperatures / 2.269)
    sign = rng.choice([-1, 1], (n, 1, 1))
    spins = sign * np.where(rng.random((n, 16, 16)) < flip[:, None, None], -1, 1)
    images = np.where(spins > 0, 255, 0).astype(np.uint8)
    with zipfile.ZipFile(Path(root) / "images_16.zip", "w") as z:
        for i in reversed(range(n)):
            png = io.BytesIO()
            Image.fromarray(images[i]).save(png, format="PNG")
            z.writestr(f"{i:04d}.png", png.getvalue())
    rows = [f"{i:04d}.png,{float(t)!r},{labels[i]}\n" for i, t in enumerate(temperatures)]
    (Path(root) / "labels_16.csv").write_text("filenames,temperatures,labels\n" + "".join(rows))
    return images[:, None], labels, temperatures
