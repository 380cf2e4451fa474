"""Meta Pseudo Labels on CIFAR-10-4K, CIFAR-100-10K and SVHN-1K with Wide ResNets.

    python examples/cifar_mpl.py --preset cifar10-4k --data-dir data/ --output-dir runs/c10
    torchrun --nproc_per_node 4 examples/cifar_mpl.py --preset cifar10-4k ...   # data parallel
    python examples/cifar_mpl.py ... --resume              # continue the run in --output-dir
    python examples/cifar_mpl.py --resume runs/c10 ...     # the same, naming the run
    python examples/cifar_mpl.py --data-dir data/ --evaluate runs/c10/final.pt
    python examples/cifar_mpl.py --data-dir data/ --finetune-only runs/c10/checkpoint.pt \\
        --output-dir runs/c10-ft

Every recipe field is a flag (below, with its default; the PyTorch port's names are aliases)
and a --set FIELD=VALUE key. The number of classes comes from the data (any CIFAR-format set).
Data stays on the device as uint8; augmentation (pad-crop, flip, RandAugment, Cutout) runs
batched there. The output folder holds the run's configuration (config.json), its split
(split.json, reused on --resume), checkpoints and the final models (final.pt, results.json);
an existing run there is continued only with --resume and the same flags.
See docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

from metapl import distributed
from metapl.data import (
    labeled_unlabeled_split,
    load_cifar,
    load_manifest,
    load_svhn,
    normalize,
    save_manifest,
    strong_augment,
    weak_augment,
)
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
from metapl.training.rundir import RunError, open_run


@dataclass(frozen=True)
class DataSpec:
    dataset: str  # "cifar10" | "cifar100" | "svhn": the files read and the normalization
    labels_per_class: int
    flip: bool
    val_per_class: int = 500
    extra: bool = False  # SVHN: the extra split joins the unlabeled images


# The recipe is the PyTorch port's published CIFAR-10-4K command (kekmodel/MPL-pytorch README)
# with the official code's RandAugment and UDA mask. CIFAR-100-10K: the port's CIFAR-100
# command (the same recipe, 10,000 labels, WRN-28-8; the paper's Table 2 has no CIFAR-100).
# SVHN-1K: 1000 labels, no flips (digits are not mirror-symmetric), and the extra split among
# the unlabeled images (the paper's 603k unlabeled SVHN images are train + extra).
PRESETS = {
    "cifar10-4k": (DataSpec("cifar10", 400, flip=True), Recipe(), "wrn28-2"),
    "cifar100-10k": (DataSpec("cifar100", 100, flip=True, val_per_class=50), Recipe(), "wrn28-8"),
    "svhn-1k": (DataSpec("svhn", 100, flip=False, extra=True), Recipe(), "wrn28-2"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, usage=USAGE, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="cifar10-4k", help="(default: cifar10-4k)"
    )
    models = ", ".join(f"{k} {v[2]}" for k, v in PRESETS.items())
    p.add_argument(
        "--model", choices=MODELS, help=f"(default: the preset's: {models}; mlp: smoke tests)"
    )
    p.add_argument("--labels-per-class", type=int, help="(default: the preset's)")
    p.add_argument(
        "--num-labeled", type=int, help="labels in all (the port's): --labels-per-class x classes"
    )
    p.add_argument("--val-per-class", type=int, help="held-out validation images per class")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="horizontal flips (default: the preset's)",
    )
    p.add_argument(
        "--svhn-extra",
        action=argparse.BooleanOptionalAction,
        help="SVHN's extra split among the unlabeled images (default: svhn-1k yes)",
    )
    p.add_argument("--download", action="store_true", help="download with torchvision")
    add_common_args(p, {k: v[1] for k, v in PRESETS.items()})
    args = p.parse_args(argv)
    check_args(p, args)
    for name in ("labels_per_class", "num_labeled", "val_per_class"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.labels_per_class is not None and args.num_labeled is not None:
        p.error("--labels-per-class and --num-labeled say the same thing: give one")
    if args.svhn_extra and PRESETS[args.preset][0].dataset != "svhn":
        p.error(f"--svhn-extra is for SVHN presets, not {args.preset}")
    return args


def data_spec(args) -> DataSpec:
    spec = PRESETS[args.preset][0]
    changes = {
        "labels_per_class": args.labels_per_class,
        "val_per_class": args.val_per_class,
        "flip": args.flip,
        "extra": args.svhn_extra,
    }
    return replace(spec, **{k: v for k, v in changes.items() if v is not None})


def _arrays(spec: DataSpec, args, extra: bool):
    """(x, y) of the training split, (x, y) of the test split, and the extra split's images
    (SVHN with ``extra``, else None); the class count (from the labels)."""
    if spec.dataset == "svhn":
        (x, y), test = (load_svhn(args.data_dir, s, args.download) for s in ("train", "test"))
        x_extra = load_svhn(args.data_dir, "extra", args.download)[0] if extra else None
    else:
        (x, y), test = (
            load_cifar(args.data_dir, spec.dataset, t, args.download) for t in (True, False)
        )
        x_extra = None
    return (x, y), test, x_extra, int(max(y.max(), test[1].max())) + 1


def load_data(
    spec: DataSpec, recipe: Recipe, args, device: torch.device, split_from=None
) -> tuple[SSLData, int]:
    """The data and its number of classes. ``split_from``: a split.json to reuse when the
    output folder has none (--finetune-only: the trained run's)."""
    (x, y), (x_test, y_test), x_extra, num_classes = _arrays(spec, args, spec.extra)
    labeled, unlabeled, val = _split(y, num_classes, spec, args, split_from)
    if x_extra is not None:  # the extra images follow the training images
        unlabeled = torch.cat([unlabeled, len(x) + torch.arange(len(x_extra))])
        x = torch.cat([x, x_extra])
    randaugment = build_randaugment(recipe, image_size=x.shape[-1])

    def prepare(images):
        return normalize(images, spec.dataset)

    def weak(images, generator):
        return prepare(weak_augment(images, flip=spec.flip, generator=generator))

    def strong(images, generator):
        return prepare(strong_augment(images, randaugment, flip=spec.flip, generator=generator))

    x_u = x[unlabeled].to(device)
    (x_l, y_l), (x_v, y_v) = ((x[i].to(device), y[i].to(device)) for i in (labeled, val))
    data = SSLData(
        x_l, y_l, x_u, x_v, y_v, x_test.to(device), y_test.to(device), weak, strong, prepare
    )
    return data, num_classes


def _split(
    y: torch.Tensor, num_classes: int, spec: DataSpec, args, split_from=None
) -> tuple[torch.Tensor, ...]:
    """Labeled, unlabeled and validation indices into the training split, from
    output-dir/split.json (or ``split_from``) when it exists.

    The validation images (val_per_class of each class, drawn from the unlabeled images) are
    held out of training; the unlabeled set is every other training image, labeled ones too."""
    path = args.output_dir / "split.json"
    source = path if path.exists() else split_from
    if source is not None and source.exists():
        split, meta = load_manifest(source)
        val = np.asarray(meta["val"], dtype=np.int64)
        if source != path and distributed.rank() == 0:
            save_manifest(split, path, meta)
    else:
        per_class = spec.labels_per_class
        if args.num_labeled is not None:
            per_class, rest = divmod(args.num_labeled, num_classes)
            if rest or not per_class:
                raise RunError(
                    f"--num-labeled {args.num_labeled} is not a positive multiple of "
                    f"the {num_classes} classes"
                )
        counts = np.bincount(y.numpy(), minlength=num_classes)
        need = per_class + spec.val_per_class
        if counts.min() < need:
            c = int(counts.argmin())
            raise RunError(
                f"--labels-per-class {per_class} and --val-per-class {spec.val_per_class} need "
                f"{need} training images of every class, but class {c} has {counts[c]}: lower "
                "--labels-per-class or --val-per-class"
            )
        split = labeled_unlabeled_split(
            y, per_class, args.seed, num_classes, unlabeled_includes_labeled=False
        )
        rng = np.random.default_rng(args.seed + 1)
        targets = y.numpy()[split.unlabeled]
        val = np.sort(
            np.concatenate(
                [
                    rng.choice(split.unlabeled[targets == c], spec.val_per_class, replace=False)
                    for c in range(num_classes)
                ]
            )
        )
        if distributed.rank() == 0:
            save_manifest(
                split, path, {"preset": args.preset, "seed": args.seed, "val": val.tolist()}
            )
    unlabeled = np.setdiff1d(np.arange(len(y)), val)
    return tuple(torch.from_numpy(a) for a in (split.labeled, unlabeled, val))


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    spec = data_spec(args)
    args.model = args.model or PRESETS[args.preset][2]
    recipe = recipe_from_args(PRESETS[args.preset][1], args)
    if args.evaluate is not None:
        with distributed.process_group() as device:
            _, (x, y), _, num_classes = _arrays(spec, args, extra=False)
            results = evaluate_saved(
                args.evaluate,
                lambda: build_network(args.model, num_classes, 0.0, x.shape[-1]),
                x.to(device),
                y.to(device),
                lambda im: normalize(im, spec.dataset),
                bf16=not args.no_bf16,
            )
            print_results(results, args.json)
            return results
    config = {"args": args, "data": spec, "recipe": recipe}
    with (
        distributed.process_group() as device,
        open_run(args.output_dir, config, args.resume, MAY_CHANGE_ON_RESUME),
    ):
        split_from = args.finetune_only.parent / "split.json" if args.finetune_only else None
        data, num_classes = load_data(spec, recipe, args, device, split_from)
        teacher, student = build_networks(args, recipe, num_classes, 32, device)
        if args.finetune_only is not None:
            return finetune_saved(args.finetune_only, student, data, recipe, args, args.preset)
        return run(build_mpl(teacher, student, recipe, args), data, recipe, args, args.preset)


if __name__ == "__main__":
    sys.exit(cli(main))
