"""Meta Pseudo Labels on CIFAR-10-4K, CIFAR-100-10K and SVHN-1K with Wide ResNets.

    python examples/cifar_mpl.py --preset cifar10-4k --data-dir data/ --output-dir runs/c10
    torchrun --nproc_per_node 4 examples/cifar_mpl.py --preset cifar10-4k ...   # data parallel
    python examples/cifar_mpl.py --resume runs/c10         # continue the run, as it was started
    python examples/cifar_mpl.py --evaluate runs/c10       # test what it saved
    python examples/cifar_mpl.py --data-dir data/ --finetune-only runs/c10/checkpoint.pt \\
        --output-dir runs/c10-ft

Every recipe field is a flag (below, with its default; the PyTorch port's names are aliases).
The number of classes comes from the data (any CIFAR-format set).
Data stays on the device as uint8; augmentation (pad-crop, flip, RandAugment, Cutout) runs
batched there. The output folder holds the run's configuration (config.json), its split
(split.json, reused on --resume), checkpoints and the final models (final.pt, results.json);
an existing run there is continued only with --resume and the same flags.
See docs/reproducing.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from _paper import cli, run, split_with_validation

from metapl.data import (
    labeled_unlabeled_split,
    load_cifar,
    load_svhn,
    normalize,
    strong_augment,
    weak_augment,
)
from metapl.training import RunError, SSLData
from metapl.training.recipe import Recipe, Settings, build_randaugment


@dataclass(frozen=True)
class Data:
    dataset: str = "cifar10"  # cifar10, cifar100 or svhn: the files read and the normalization
    labels_per_class: int = 400
    num_labeled: int | None = None  # labels in all (the port's): labels_per_class x classes
    val_per_class: int = 500  # held-out validation images per class
    flip: bool = True  # horizontal flips
    svhn_extra: bool = False  # SVHN's extra split among the unlabeled images
    download: bool = False  # download with torchvision

    def __post_init__(self):
        if self.dataset not in ("cifar10", "cifar100", "svhn"):
            raise ValueError(f"dataset must be cifar10, cifar100 or svhn, got {self.dataset!r}")
        for name in ("labels_per_class", "val_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_labeled is not None and self.num_labeled < 1:
            raise ValueError(f"num_labeled must be >= 1, got {self.num_labeled}")
        if self.svhn_extra and self.dataset != "svhn":
            raise ValueError(f"svhn_extra is for SVHN, not {self.dataset}")


@dataclass(frozen=True)
class Experiment:
    name: str = "cifar10-4k"  # the run's name (wandb group and run names)
    data: Data = field(default_factory=Data)
    recipe: Recipe = field(default_factory=Recipe)
    settings: Settings = field(default_factory=Settings)


# The recipe is the PyTorch port's published CIFAR-10-4K command (kekmodel/MPL-pytorch README)
# with the official code's RandAugment and UDA mask. CIFAR-100-10K: the port's CIFAR-100
# command (the same recipe, 10,000 labels, WRN-28-8; the paper's Table 2 has no CIFAR-100).
# SVHN-1K: 1000 labels, no flips (digits are not mirror-symmetric), and the extra split among
# the unlabeled images (the paper's 603k unlabeled SVHN images are train + extra).
PRESETS = {
    "cifar10-4k": Experiment(),
    "cifar100-10k": Experiment(
        name="cifar100-10k",
        data=Data("cifar100", 100, val_per_class=50),
        settings=Settings(model="wrn28-8"),
    ),
    "svhn-1k": Experiment(name="svhn-1k", data=Data("svhn", 100, flip=False, svhn_extra=True)),
}


def _arrays(exp: Experiment, extra: bool):
    """(x, y) of the training split, (x, y) of the test split, and the extra split's images
    (SVHN with ``extra``, else None); the class count (from the labels)."""
    d, root = exp.data, exp.settings.data_dir
    if d.dataset == "svhn":
        (x, y), test = (load_svhn(root, s, d.download) for s in ("train", "test"))
        x_extra = load_svhn(root, "extra", d.download)[0] if extra else None
    else:
        (x, y), test = (load_cifar(root, d.dataset, t, d.download) for t in (True, False))
        x_extra = None
    return (x, y), test, x_extra, int(max(y.max(), test[1].max())) + 1


# CIFAR-10's label names, in label order (its batches.meta)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class Cifar:
    """The data side of the script (examples/_paper.py)."""

    @staticmethod
    def image_size(exp: Experiment) -> int:
        return 32

    @staticmethod
    def about(exp: Experiment, num_classes: int) -> dict:
        names = CIFAR10_CLASSES if exp.data.dataset == "cifar10" else ()
        if len(names) != num_classes:  # SVHN's digits, CIFAR-100's indices, other data
            names = tuple(str(c) for c in range(num_classes))
        return {
            "classes": list(names),
            "image_size": 32,
            "resize": 32,
            "normalization": exp.data.dataset,
        }

    @staticmethod
    def test_set(exp: Experiment, device: torch.device):
        _, (x, y), _, num_classes = _arrays(exp, extra=False)
        return x.to(device), y.to(device), lambda im: normalize(im, exp.data.dataset), num_classes

    @staticmethod
    def load_data(exp: Experiment, device: torch.device, split_from=None) -> tuple[SSLData, int]:
        """The data and its number of classes. ``split_from``: a split.json to reuse when the
        output folder has none (--finetune-only: the trained run's)."""
        d = exp.data
        (x, y), (x_test, y_test), x_extra, num_classes = _arrays(exp, d.svhn_extra)
        labeled, unlabeled, val = _split(y, num_classes, exp, split_from)
        if x_extra is not None:  # the extra images follow the training images
            unlabeled = torch.cat([unlabeled, len(x) + torch.arange(len(x_extra))])
            x = torch.cat([x, x_extra])
        randaugment = build_randaugment(exp.recipe, image_size=x.shape[-1])

        def prepare(images):
            return normalize(images, d.dataset)

        def weak(images, generator):
            return prepare(weak_augment(images, flip=d.flip, generator=generator))

        def strong(images, generator):
            return prepare(strong_augment(images, randaugment, flip=d.flip, generator=generator))

        x_u = x[unlabeled].to(device)
        (x_l, y_l), (x_v, y_v) = ((x[i].to(device), y[i].to(device)) for i in (labeled, val))
        data = SSLData(
            x_l, y_l, x_u, x_v, y_v, x_test.to(device), y_test.to(device), weak, strong, prepare
        )
        return data, num_classes


def _split(y: torch.Tensor, num_classes: int, exp: Experiment, split_from=None):
    """Labeled (labels_per_class of each class, or num_labeled in all), unlabeled and
    validation indices into the training split (see ``split_with_validation``)."""
    d, targets = exp.data, y.numpy()

    def new_split():
        per_class = d.labels_per_class
        if d.num_labeled is not None:
            per_class, rest = divmod(d.num_labeled, num_classes)
            if rest or not per_class:
                raise RunError(
                    f"--num-labeled {d.num_labeled} is not a positive multiple of "
                    f"the {num_classes} classes"
                )
        counts = np.bincount(targets, minlength=num_classes)
        need = per_class + d.val_per_class
        if counts.min() < need:
            c = int(counts.argmin())
            raise RunError(
                f"--labels-per-class {per_class} and --val-per-class {d.val_per_class} need "
                f"{need} training images of every class, but class {c} has {counts[c]}: lower "
                "--labels-per-class or --val-per-class"
            )
        seed = exp.settings.seed
        return labeled_unlabeled_split(
            y, per_class, seed, num_classes, unlabeled_includes_labeled=False
        )

    meta = {"preset": exp.name, "seed": exp.settings.seed}
    split = split_with_validation(exp, targets, new_split, meta, split_from)
    return tuple(torch.from_numpy(a) for a in split)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run(Experiment, PRESETS, Cifar, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(cli(main))
