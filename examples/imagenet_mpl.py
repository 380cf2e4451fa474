"""Meta Pseudo Labels on ImageNet with 10% of the labels and ResNet-50 (the paper's Table 3).

    torchrun --nproc_per_node 8 examples/imagenet_mpl.py --data-dir /data/imagenet \
        --output-dir runs/in10 --compile --wandb-project metapl

``--data-dir`` holds ILSVRC2012 as ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (class
indices come from train/'s folders; val/ may lack a class but not add one). Images
are decoded on demand by a thread pool (resize 256, center 224) and augmented batched on the
device (random-resized crop, flip, RandAugment). ``val/`` is the test set, reported once at the
end; ``--val-per-class`` training images per class are held out for validation. The recipe
below is a starting point, not the paper's tuned schedule: see docs/reproducing.md (also for
what the output folder holds and what --resume checks).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import nn

from metapl import distributed
from metapl.data import (
    ImageFolderDataset,
    RandAugment,
    labeled_fraction_split,
    load_manifest,
    normalize,
    random_resized_crop,
    save_manifest,
)
from metapl.data.lazy import DecodedImages
from metapl.models import resnet50
from metapl.recipe import (
    MAY_CHANGE_ON_RESUME,
    Recipe,
    add_common_args,
    build_mpl,
    check_args,
    cli,
    override,
    run,
)
from metapl.rundir import open_run
from metapl.train import SSLData

RECIPE = Recipe(
    steps=300_000, labeled_batch=128, unlabeled_ratio=7, lr=0.1, weight_decay=1e-4,
    warmup_steps=5000, student_wait_steps=3000, dropout=0.1, ema_decay=0.999,
    label_smoothing=0.1, uda_weight=8.0, uda_temperature=0.7, uda_threshold=0.6,
    uda_steps=5000, finetune_steps=5000, finetune_batch=256, finetune_lr=3e-5,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--decode-threads", type=int, default=16)
    p.add_argument("--model", default="resnet50", choices=["resnet50"])
    args = p.parse_args(argv)
    check_args(p, args)
    for split in ("train", "val"):
        if not (args.data_dir / split).is_dir():
            p.error(f"--data-dir must hold {split}/<class>/<images> (ImageNet layout)")
    if not 0 < args.label_fraction <= 1:
        p.error(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    return args


def load_data(args, device: torch.device) -> tuple[SSLData, int]:
    """The data and the number of classes (train/'s class folders; val/ is labelled with
    train/'s class indices)."""
    train_set = ImageFolderDataset(args.data_dir / "train", size=args.image_size)
    test_set = ImageFolderDataset(args.data_dir / "val", size=args.image_size,
                                  classes=train_set.classes)  # fmt: skip
    labeled, unlabeled, val = _split(train_set.targets, args)
    randaugment = RandAugment(2, 17.0, cutout=0)

    def prepare(images):
        return normalize(images, "imagenet")

    def weak(images, generator):
        return prepare(random_resized_crop(images, generator=generator))

    def strong(images, generator):
        return prepare(randaugment(random_resized_crop(images, generator=generator), generator))

    def store(dataset, idx):
        images = DecodedImages(dataset, idx, args.decode_threads)
        return images, torch.as_tensor(dataset.targets[idx]).to(device)

    (x_l, y_l), (x_u, _), (x_v, y_v) = (store(train_set, i) for i in (labeled, unlabeled, val))
    x_t, y_t = store(test_set, np.arange(len(test_set)))
    return SSLData(x_l, y_l, x_u, x_v, y_v, x_t, y_t, weak, strong, prepare), len(train_set.classes)


def _split(targets: np.ndarray, args) -> tuple[np.ndarray, ...]:
    """Labeled (label_fraction of each class), unlabeled and validation indices, reused from
    output-dir/split.json when it exists."""
    path = args.output_dir / "split.json"
    if path.exists():
        split, meta = load_manifest(path)
        val = np.asarray(meta["val"], dtype=np.int64)
    else:
        split = labeled_fraction_split(targets, args.label_fraction, args.seed,
                                       unlabeled_includes_labeled=False)  # fmt: skip
        rng = np.random.default_rng(args.seed + 1)
        rest = targets[split.unlabeled]
        val = np.sort(np.concatenate([
            rng.choice(split.unlabeled[rest == c], min(args.val_per_class, (rest == c).sum()),
                       replace=False)
            for c in np.unique(rest)
        ]))  # fmt: skip
        if distributed.rank() == 0:
            meta = {"dataset": "imagenet", "label_fraction": args.label_fraction,
                    "seed": args.seed, "val": val.tolist()}  # fmt: skip
            save_manifest(split, path, meta)
    unlabeled = np.setdiff1d(np.arange(len(targets)), val)
    return split.labeled, unlabeled, val


def build_resnet50(num_classes: int, dropout: float) -> nn.Module:
    model = resnet50(num_classes)
    model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)  # dropout before the classifier
    return model


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    recipe = override(RECIPE, args)
    config = {"args": args, "recipe": recipe}
    with (
        distributed.process_group() as device,
        open_run(args.output_dir, config, args.resume, MAY_CHANGE_ON_RESUME),
    ):
        data, num_classes = load_data(args, device)
        torch.manual_seed(args.seed)
        teacher, student = (build_resnet50(num_classes, recipe.dropout).to(device)
                            for _ in range(2))  # fmt: skip
        if args.channels_last:
            teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        return run(build_mpl(teacher, student, recipe, args), data, recipe, args, "imagenet")


if __name__ == "__main__":
    sys.exit(cli(main))
