"""Meta Pseudo Labels on CIFAR-10-4K and SVHN-1K with WideResNet-28-2 (the paper's Table 2).

    python examples/cifar_mpl.py --preset cifar10-4k --data-dir data/ --output-dir runs/c10
    torchrun --nproc_per_node 4 examples/cifar_mpl.py --preset cifar10-4k ...   # data parallel
    python examples/cifar_mpl.py ... --resume                                    # after a crash

Data stays on the device as uint8; augmentation (pad-crop, flip, RandAugment, Cutout) runs
batched there. The output folder holds the run's configuration (config.json), its split
(split.json, reused on --resume), checkpoints and the final models (final.pt, results.json);
an existing run there is continued only with --resume and the same flags. Hyperparameters and
the output folder: docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

from metapl import distributed
from metapl.data import (
    RandAugment,
    labeled_unlabeled_split,
    load_cifar,
    load_manifest,
    load_svhn,
    normalize,
    save_manifest,
    strong_augment,
    weak_augment,
)
from metapl.models import build_model
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


@dataclass(frozen=True)
class DataSpec:
    dataset: str
    labels_per_class: int
    flip: bool
    val_per_class: int = 500
    randaugment_ops: int = 2
    randaugment_magnitude: float = 16.0


# The recipe is the PyTorch port's published CIFAR-10-4K command (kekmodel/MPL-pytorch README);
# SVHN-1K uses it with 1000 labels and no horizontal flips (digits are not mirror-symmetric).
PRESETS = {
    "cifar10-4k": (DataSpec("cifar10", labels_per_class=400, flip=True), Recipe()),
    "svhn-1k": (DataSpec("svhn", labels_per_class=100, flip=False), Recipe()),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cifar10-4k")
    add_common_args(p)
    p.add_argument("--model", default="wrn28-2", help="wrn28-2 | wrn28-8 | mlp (smoke tests)")
    p.add_argument("--labels-per-class", type=int)
    p.add_argument("--val-per-class", type=int)
    p.add_argument("--download", action="store_true", help="download with torchvision")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def load_data(spec: DataSpec, args, device: torch.device) -> SSLData:
    if spec.dataset == "svhn":
        (x, y), (x_test, y_test) = (load_svhn(args.data_dir, s, args.download)
                                    for s in ("train", "test"))  # fmt: skip
    else:
        (x, y), (x_test, y_test) = (load_cifar(args.data_dir, spec.dataset, t, args.download)
                                    for t in (True, False))  # fmt: skip
    labeled, unlabeled, val = _split(y, spec, args)
    randaugment = RandAugment(spec.randaugment_ops, spec.randaugment_magnitude)

    def prepare(images):
        return normalize(images, spec.dataset)

    def weak(images, generator):
        return prepare(weak_augment(images, flip=spec.flip, generator=generator))

    def strong(images, generator):
        return prepare(strong_augment(images, randaugment, flip=spec.flip, generator=generator))

    def on_device(idx):
        return x[idx].to(device), y[idx].to(device)

    (x_l, y_l), (x_u, _), (x_v, y_v) = on_device(labeled), on_device(unlabeled), on_device(val)
    return SSLData(x_l, y_l, x_u, x_v, y_v, x_test.to(device), y_test.to(device), weak, strong,
                   prepare)  # fmt: skip


def _split(y: torch.Tensor, spec: DataSpec, args) -> tuple[torch.Tensor, ...]:
    """Labeled, unlabeled and validation indices, from output-dir/split.json when it exists.

    The validation images (val_per_class of each class, drawn from the unlabeled images) are
    held out of training; the unlabeled set is every other training image, labeled ones too."""
    path = args.output_dir / "split.json"
    if path.exists():
        split, meta = load_manifest(path)
        val = np.asarray(meta["val"], dtype=np.int64)
    else:
        per_class = args.labels_per_class or spec.labels_per_class
        split = labeled_unlabeled_split(y, per_class, args.seed, unlabeled_includes_labeled=False)
        rng = np.random.default_rng(args.seed + 1)
        targets = y.numpy()[split.unlabeled]
        val_per_class = args.val_per_class or spec.val_per_class
        val = np.sort(np.concatenate([
            rng.choice(split.unlabeled[targets == c], val_per_class, replace=False)
            for c in np.unique(targets)
        ]))  # fmt: skip
        if distributed.rank() == 0:
            save_manifest(split, path, {"preset": args.preset, "seed": args.seed,
                                        "val": val.tolist()})  # fmt: skip
    unlabeled = np.setdiff1d(np.arange(len(y)), val)
    return tuple(torch.from_numpy(a) for a in (split.labeled, unlabeled, val))


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    spec, recipe = PRESETS[args.preset]
    recipe = override(recipe, args)
    config = {"args": args, "data": spec, "recipe": recipe}
    with (
        distributed.process_group() as device,
        open_run(args.output_dir, config, args.resume, MAY_CHANGE_ON_RESUME),
    ):
        data = load_data(spec, args, device)
        torch.manual_seed(args.seed)
        kw = {"dropout": recipe.dropout}
        if args.model == "mlp":
            kw.update(in_features=3 * 32 * 32, hidden=(32,))
        teacher, student = (build_model(args.model, 10, **kw).to(device) for _ in range(2))
        if args.channels_last:
            teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        return run(build_mpl(teacher, student, recipe, args), data, recipe, args, args.preset)


if __name__ == "__main__":
    sys.exit(cli(main))
