"""Meta Pseudo Labels on ImageNet with 10% of the labels and ResNet-50 (the paper's Table 3).

    torchrun --nproc_per_node 8 examples/imagenet_mpl.py --data-dir /data/imagenet \
        --output-dir runs/in10 --compile --wandb-project metapl
    python examples/imagenet_mpl.py --data-dir /data/imagenet --evaluate runs/in10/final.pt

``--data-dir`` holds ILSVRC2012 as ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (class
indices come from train/'s folders; val/ may lack a class but not add one); any image folders
in that layout work, with ``--model`` and ``--image-size`` to suit. Images are decoded on
demand by a thread pool (resize 8/7 of the size, center crop) and augmented batched on the
device (random-resized crop, flip, RandAugment). ``val/`` is the test set, reported once at the
end; ``--val-per-class`` training images per class are held out for validation. Every recipe
field is a flag (below, with its default) and a --set FIELD=VALUE key. The recipe below is a
starting point, not the paper's tuned schedule: see docs/reproducing.md (also for what the
output folder holds, what --resume checks, and --evaluate / --finetune-only).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from metapl import distributed
from metapl.data import (
    ImageFolderDataset,
    labeled_fraction_split,
    load_manifest,
    normalize,
    random_resized_crop,
    save_manifest,
)
from metapl.data.lazy import DecodedImages
from metapl.training.loop import SSLData
from metapl.training.modes import evaluate_saved, finetune_saved
from metapl.training.recipe import (
    MAY_CHANGE_ON_RESUME,
    MODELS,
    USAGE,
    Recipe,
    add_common_args,
    build_mpl,
    build_network,
    build_networks,
    build_randaugment,
    check_args,
    cli,
    print_results,
    recipe_from_args,
    run,
)
from metapl.training.rundir import open_run

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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, usage=USAGE, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--model", default="resnet50", choices=MODELS, help="(default: resnet50; mlp: smoke tests)"
    )
    p.add_argument("--label-fraction", type=float, default=0.1, help="(default: 0.1)")
    p.add_argument("--val-per-class", type=int, default=10, help="(default: 10)")
    p.add_argument("--image-size", type=int, default=224, help="(default: 224)")
    p.add_argument("--decode-threads", type=int, default=16, help="(default: 16)")
    add_common_args(p, {"imagenet": RECIPE})
    args = p.parse_args(argv)
    check_args(p, args)
    for split in ("train", "val"):
        if not (args.data_dir / split).is_dir():
            p.error(f"--data-dir must hold {split}/<class>/<images> (ImageNet layout)")
    if not 0 < args.label_fraction <= 1:
        p.error(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    return args


def _folders(args) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """train/ and val/ (val/ labelled with train/'s class indices)."""
    train_set = ImageFolderDataset(args.data_dir / "train", size=args.image_size)
    test_set = ImageFolderDataset(
        args.data_dir / "val", size=args.image_size, classes=train_set.classes
    )
    return train_set, test_set


def load_data(
    args, device: torch.device, recipe: Recipe = RECIPE, split_from=None
) -> tuple[SSLData, int]:
    """The data and the number of classes (train/'s class folders). ``split_from``: a
    split.json to reuse when the output folder has none (--finetune-only)."""
    train_set, test_set = _folders(args)
    labeled, unlabeled, val = _split(train_set.targets, args, split_from)
    randaugment = build_randaugment(recipe, args.image_size, imagenet=True)

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


def _split(targets: np.ndarray, args, split_from=None) -> tuple[np.ndarray, ...]:
    """Labeled (label_fraction of each class), unlabeled and validation indices, reused from
    output-dir/split.json (or ``split_from``) when it exists."""
    path = args.output_dir / "split.json"
    source = path if path.exists() else split_from
    if source is not None and source.exists():
        split, meta = load_manifest(source)
        val = np.asarray(meta["val"], dtype=np.int64)
        if source != path and distributed.rank() == 0:
            save_manifest(split, path, meta)
    else:
        split = labeled_fraction_split(
            targets, args.label_fraction, args.seed, unlabeled_includes_labeled=False
        )
        rng = np.random.default_rng(args.seed + 1)
        rest = targets[split.unlabeled]
        val = np.sort(
            np.concatenate(
                [
                    rng.choice(
                        split.unlabeled[rest == c],
                        min(args.val_per_class, (rest == c).sum()),
                        replace=False,
                    )
                    for c in np.unique(rest)
                ]
            )
        )
        if distributed.rank() == 0:
            meta = {
                "dataset": "imagenet",
                "label_fraction": args.label_fraction,
                "seed": args.seed,
                "val": val.tolist(),
            }
            save_manifest(split, path, meta)
    unlabeled = np.setdiff1d(np.arange(len(targets)), val)
    return split.labeled, unlabeled, val


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    recipe = recipe_from_args(RECIPE, args)
    size = args.image_size
    if args.evaluate is not None:
        with distributed.process_group() as device:
            train_set, test_set = _folders(args)
            n = len(train_set.classes)
            x = DecodedImages(test_set, np.arange(len(test_set)), args.decode_threads)
            y = torch.as_tensor(test_set.targets).to(device)
            results = evaluate_saved(
                args.evaluate,
                lambda: build_network(args.model, n, 0.0, size),
                x,
                y,
                lambda im: normalize(im, "imagenet"),
                bf16=not args.no_bf16,
            )
            print_results(results, args.json)
            return results
    config = {"args": args, "recipe": recipe}
    with (
        distributed.process_group() as device,
        open_run(args.output_dir, config, args.resume, MAY_CHANGE_ON_RESUME),
    ):
        split_from = args.finetune_only.parent / "split.json" if args.finetune_only else None
        data, num_classes = load_data(args, device, recipe, split_from)
        teacher, student = build_networks(args, recipe, num_classes, size, device)
        if args.finetune_only is not None:
            return finetune_saved(args.finetune_only, student, data, recipe, args, "imagenet")
        return run(build_mpl(teacher, student, recipe, args), data, recipe, args, "imagenet")


if __name__ == "__main__":
    sys.exit(cli(main))
