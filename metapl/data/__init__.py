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
    load_svhn,
    normalize,
)
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
    "ImageFolderDataset",
    "RandAugment",
    "Split",
    "cutout",
    "random_resized_crop",
    "labeled_fraction_split",
    "labeled_unlabeled_split",
    "load_cifar",
    "load_manifest",
    "load_svhn",
    "normalize",
    "save_manifest",
    "strong_augment",
    "weak_augment",
]
