"""Data for the MPL experiments: on-disk loaders, labeled / unlabeled splits, and augmentation
batched on the device. Fake datasets in the real formats live in `metapl.data.fake`."""

from metapl.data.augment import (
    MPL_OPS,
    OPS,
    STANDARD_OPS,
    RandAugment,
    cutout,
    random_resized_crop,
    strong_augment,
    weak_augment,
)
from metapl.data.datasets import (
    NORMALIZATION,
    ImageFolderDataset,
    load_cifar,
    load_image,
    load_svhn,
    normalize,
)
from metapl.data.digits_augment import DigitAugment
from metapl.data.ising import fetch_ising, load_ising
from metapl.data.mnist import fetch_mnist, load_mnist, mnist_split, read_idx
from metapl.data.splits import (
    Split,
    labeled_fraction_split,
    labeled_unlabeled_split,
    load_manifest,
    save_manifest,
)

__all__ = [
    "MPL_OPS",
    "NORMALIZATION",
    "OPS",
    "STANDARD_OPS",
    "DigitAugment",
    "ImageFolderDataset",
    "RandAugment",
    "Split",
    "cutout",
    "fetch_ising",
    "fetch_mnist",
    "random_resized_crop",
    "labeled_fraction_split",
    "labeled_unlabeled_split",
    "load_cifar",
    "load_image",
    "load_ising",
    "load_manifest",
    "load_mnist",
    "mnist_split",
    "load_svhn",
    "normalize",
    "read_idx",
    "save_manifest",
    "strong_augment",
    "weak_augment",
]
