"""Meta Pseudo Labels on ImageNet with 10% of the labels and ResNet-50 (the paper's Table 3).

    torchrun --nproc_per_node 8 examples/imagenet_mpl.py --data-dir /data/imagenet \
        --output-dir runs/in10 --compile --wandb-project metapl
    python examples/imagenet_mpl.py --evaluate runs/in10            # test what it saved
    python examples/imagenet_mpl.py --resume runs/in10              # continue it

``--data-dir`` holds ILSVRC2012 as ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (class
indices come from train/'s folders; val/ may lack a class but not add one); any image folders
in that layout work, with ``--model`` and ``--image-size`` to suit. Images are decoded on
demand by a thread pool (resize 8/7 of the size, center crop) and augmented batched on the
device (random-resized crop, flip, RandAugment). ``val/`` is the test set, reported once at the
end; ``--val-per-class`` training images per class are held out for validation. Every recipe
field is a flag (below, with its default). The recipe below is a
starting point, not the paper's tuned schedule: see docs/reproducing.md (also for what the
output folder holds, what --resume checks, and --evaluate / --finetune-only).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from _paper import cli, fail, run, split_with_validation
from torch.utils.data import ConcatDataset

from metapl import distributed
from metapl.data import (
    ImageFolderDataset,
    labeled_fraction_split,
    normalize,
    random_resized_crop,
)
from metapl.data.lazy import DecodedImages
from metapl.training import SSLData
from metapl.training.recipe import Recipe, Settings, build_randaugment


@dataclass(frozen=True)
class Data:
    # of each class's training images, labeled (default: 0.1; 1 with --unlabeled-dir)
    label_fraction: float | None = None
    unlabeled_dir: Path | None = None  # more unlabeled images: any nesting, no class folders
    val_per_class: int = 10  # training images per class held out for validation
    image_size: int = 224
    decode_threads: int = 16
    skip_bad_images: bool = False  # drop (and list) damaged image files instead of stopping

    def __post_init__(self):
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.fraction == 1 and self.unlabeled_dir is None:
            raise ValueError(
                "label_fraction 1 leaves no unlabeled images: lower it, or add a folder of "
                "unlabeled images with --unlabeled-dir"
            )

    @property
    def fraction(self) -> float:
        """The labeled fraction of train/: as given, else 0.1 (1 beside an unlabeled folder)."""
        if self.label_fraction is not None:
            return self.label_fraction
        return 1.0 if self.unlabeled_dir is not None else 0.1
        for name in ("val_per_class", "image_size", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


RECIPE = Recipe(
    steps=300_000,
    labeled_batch=128,
    unlabeled_ratio=7,
    teacher_lr=0.1,
    student_lr=0.1,
    weight_decay=1e-4,
    warmup_steps=5000,
    student_wait_steps=3000,
    teacher_dropout=0.1,
    student_dropout=0.1,
    ema_decay=0.999,
    label_smoothing=0.1,
    uda_weight=8.0,
    uda_temperature=0.7,
    uda_threshold=0.6,
    uda_steps=5000,
    randaugment_magnitude=17.0,
    finetune_steps=5000,
    finetune_batch=256,
    finetune_lr=3e-5,
    finetune_label_smoothing=0.1,
)


@dataclass(frozen=True)
class Experiment:
    name: str = "imagenet"  # the run's name (wandb group and run names)
    data: Data = field(default_factory=Data)
    recipe: Recipe = RECIPE
    settings: Settings = Settings(model="resnet50")


PRESETS = {"imagenet": Experiment()}


def _folders(exp: Experiment) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """train/ and val/ (val/ labelled with train/'s class indices)."""
    root, size = exp.settings.data_dir, exp.data.image_size
    for split in ("train", "val"):
        if not (root / split).is_dir():
            fail(f"--data-dir must hold {split}/<class>/<images> (ImageNet layout)")
    train_set = ImageFolderDataset(root / "train", size=size)
    test_set = ImageFolderDataset(root / "val", size=size, classes=train_set.classes)
    for dataset in (train_set, test_set):  # every file read before step 1
        _check(dataset, exp)
    return train_set, test_set


def _check(dataset: ImageFolderDataset, exp: Experiment) -> None:
    """Every image of ``dataset`` opened before training; --skip-bad-images: dropped, listed."""
    skipped = dataset.check_images(exp.data.skip_bad_images, exp.data.decode_threads)
    if skipped and distributed.rank() == 0:
        shown = ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} damaged image(s): {shown}", file=sys.stderr)


class ImageNet:
    """The data side of the script (examples/_paper.py)."""

    @staticmethod
    def image_size(exp: Experiment) -> int:
        return exp.data.image_size

    @staticmethod
    def about(exp: Experiment, num_classes: int) -> dict:
        root, size = exp.settings.data_dir / "train", exp.data.image_size
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())  # train/'s numbering
        return {
            "classes": classes,
            "image_size": size,
            "resize": round(size * 8 / 7),
            "normalization": "imagenet",
        }

    @staticmethod
    def test_set(exp: Experiment, device: torch.device):
        train_set, test_set = _folders(exp)
        x = DecodedImages(test_set, np.arange(len(test_set)), exp.data.decode_threads)
        y = torch.as_tensor(test_set.targets).to(device)
        return x, y, lambda im: normalize(im, "imagenet"), len(train_set.classes)

    @staticmethod
    def load_data(exp: Experiment, device: torch.device, split_from=None) -> tuple[SSLData, int]:
        """The data and the number of classes (train/'s class folders). ``split_from``: a
        split.json to reuse when the output folder has none (--finetune-only)."""
        train_set, test_set = _folders(exp)
        extra = None if exp.data.unlabeled_dir is None else _unlabeled_folder(exp)
        files = _files(train_set) + ([] if extra is None else _files(extra, "unlabeled-dir/"))
        labeled, unlabeled, val = _split(train_set.targets, exp, split_from, files)
        randaugment = build_randaugment(exp.recipe, exp.data.image_size, imagenet=True)

        def prepare(images):
            return normalize(images, "imagenet")

        def weak(images, generator):
            return prepare(random_resized_crop(images, generator=generator))

        def strong(images, generator):
            return prepare(randaugment(random_resized_crop(images, generator=generator), generator))

        def store(dataset, idx):
            images = DecodedImages(dataset, idx, exp.data.decode_threads)
            return images, torch.as_tensor(dataset.targets[idx]).to(device)

        (x_l, y_l), (x_v, y_v) = (store(train_set, i) for i in (labeled, val))
        if extra is None:
            x_u = DecodedImages(train_set, unlabeled, exp.data.decode_threads)
        else:  # train/'s unlabeled images, then the folder's
            pool = ConcatDataset([train_set, extra])
            idx = np.concatenate([unlabeled, len(train_set) + np.arange(len(extra))])
            x_u = DecodedImages(pool, idx, exp.data.decode_threads)
        x_t, y_t = store(test_set, np.arange(len(test_set)))
        data = SSLData(x_l, y_l, x_u, x_v, y_v, x_t, y_t, weak, strong, prepare)
        return data, len(train_set.classes)


def _files(dataset: ImageFolderDataset, prefix: str = "") -> list[tuple[str, int]]:
    """The images as (path relative to the folder, size), recorded in split.json."""
    return [
        (prefix + str(p.relative_to(dataset.root)), p.stat().st_size) for p, _ in dataset.samples
    ]


def _unlabeled_folder(exp: Experiment) -> ImageFolderDataset:
    folder = exp.data.unlabeled_dir
    if not folder.is_dir():
        fail(f"--unlabeled-dir {folder} is not a folder")
    extra = ImageFolderDataset(folder, size=exp.data.image_size, unlabeled=True)
    _check(extra, exp)
    return extra


def _split(
    targets: np.ndarray, exp: Experiment, split_from=None, files=None
) -> tuple[np.ndarray, ...]:
    """Labeled (label_fraction of each class), unlabeled and validation indices (see
    ``split_with_validation``)."""
    d = exp.data

    def new_split():  # beside an unlabeled folder, validation may come from all of train/
        pool = d.unlabeled_dir is not None
        return labeled_fraction_split(
            targets, d.fraction, exp.settings.seed, unlabeled_includes_labeled=pool
        )

    meta = {"dataset": "imagenet", "label_fraction": d.fraction, "seed": exp.settings.seed}
    return split_with_validation(exp, targets, new_split, meta, split_from, files)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run(Experiment, PRESETS, ImageNet, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(cli(main))
