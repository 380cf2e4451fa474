"""Meta Pseudo Labels on CIFAR-10-4K and SVHN-1K with WideResNet-28-2 (the paper's Table 2).

    python examples/cifar_mpl.py --preset cifar10-4k --data-dir data/ --output-dir runs/c10
    torchrun --nproc_per_node 4 examples/cifar_mpl.py --preset cifar10-4k ...   # data parallel
    python examples/cifar_mpl.py ... --resume                                    # after a crash

Data stays on the device as uint8; augmentation (pad-crop, flip, RandAugment, Cutout) runs
batched there. The split (labeled / unlabeled / validation indices) is written to
``<output-dir>/split.json`` and reused on --resume. Hyperparameters: docs/reproducing.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import metapl
from metapl import distributed, optim
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
from metapl.tracking import Tracker
from metapl.train import SSLData, TrainConfig, train


@dataclass(frozen=True)
class Preset:
    dataset: str
    labels_per_class: int
    flip: bool
    steps: int = 300_000
    labeled_batch: int = 128
    unlabeled_ratio: int = 7
    lr: float = 0.05  # teacher and student
    weight_decay: float = 5e-4
    warmup_steps: int = 5000
    student_wait_steps: int = 3000
    dropout: float = 0.2
    ema_decay: float = 0.995
    label_smoothing: float = 0.15
    uda_weight: float = 8.0
    uda_temperature: float = 0.7
    uda_threshold: float = 0.6
    uda_steps: int = 5000
    randaugment_ops: int = 2
    randaugment_magnitude: float = 16.0
    finetune_steps: int = 5000
    val_per_class: int = 500


# The PyTorch port's published CIFAR-10-4K command (kekmodel/MPL-pytorch README); SVHN-1K uses
# the same recipe with 1000 labels and no horizontal flips (digits are not mirror-symmetric).
PRESETS = {
    "cifar10-4k": Preset("cifar10", labels_per_class=400, flip=True),
    "svhn-1k": Preset("svhn", labels_per_class=100, flip=False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cifar10-4k")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, help="override the preset's training steps")
    p.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt")
    p.add_argument("--meta-grad", default="exact",
                   choices=["exact", "finite_difference", "first_order", "none"])  # fmt: skip
    p.add_argument("--no-uda", action="store_true", help="drop the teacher's UDA loss")
    p.add_argument("--compile", action="store_true", help="torch.compile the MPL step")
    p.add_argument("--wandb-project", help="log to this wandb project (offline without a key)")
    p.add_argument("--wandb-group", help="wandb group (default: preset and meta-grad)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="wrn28-2", help="wrn28-2 | wrn28-8 | mlp (for smoke tests)")
    p.add_argument("--lr", type=float, help="override the teacher's and student's base lr")
    p.add_argument("--labeled-batch", type=int)
    p.add_argument("--unlabeled-ratio", type=int)
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--labels-per-class", type=int)
    p.add_argument("--val-per-class", type=int)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--download", action="store_true", help="download with torchvision")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--json", action="store_true", help="print the final accuracies as JSON")
    args = p.parse_args(argv)
    if not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder (see docs/data.md for the layout)")
    for name in ("steps", "labeled_batch", "unlabeled_ratio", "eval_every", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def preset_from_args(args) -> Preset:
    """The preset with the command line's overrides. A shorter --steps shrinks the warm-up,
    student wait and UDA ramp in proportion, so short runs keep the schedule's shape."""
    preset = PRESETS[args.preset]
    names = ("lr", "labeled_batch", "unlabeled_ratio", "finetune_steps", "labels_per_class",
             "val_per_class")  # fmt: skip
    preset = replace(preset, **{k: getattr(args, k) for k in names if getattr(args, k)})
    if args.steps and args.steps != preset.steps:
        scale = args.steps / preset.steps
        preset = replace(
            preset, steps=args.steps,
            **{k: int(getattr(preset, k) * scale)
               for k in ("warmup_steps", "student_wait_steps", "uda_steps")},
        )  # fmt: skip
    return preset


def load_data(preset: Preset, args, device: torch.device) -> SSLData:
    if preset.dataset == "svhn":
        (x, y), (x_test, y_test) = (load_svhn(args.data_dir, s, args.download)
                                    for s in ("train", "test"))  # fmt: skip
    else:
        (x, y), (x_test, y_test) = (load_cifar(args.data_dir, preset.dataset, t, args.download)
                                    for t in (True, False))  # fmt: skip
    labeled, unlabeled, val = _split(y, preset, args)
    randaugment = RandAugment(preset.randaugment_ops, preset.randaugment_magnitude)

    def prepare(images):
        return normalize(images, preset.dataset)

    def weak(images, generator):
        return prepare(weak_augment(images, flip=preset.flip, generator=generator))

    def strong(images, generator):
        return prepare(strong_augment(images, randaugment, flip=preset.flip, generator=generator))

    def on_device(idx):
        return x[idx].to(device), y[idx].to(device)

    (x_l, y_l), (x_u, _), (x_v, y_v) = on_device(labeled), on_device(unlabeled), on_device(val)
    return SSLData(x_l, y_l, x_u, x_v, y_v, x_test.to(device), y_test.to(device), weak, strong,
                   prepare)  # fmt: skip


def _split(y: torch.Tensor, preset: Preset, args) -> tuple[torch.Tensor, ...]:
    """Labeled, unlabeled and validation indices, from output-dir/split.json when it exists.

    Validation images are held out of both training sets: val_per_class of each class, drawn
    from the images that are not labeled."""
    path = args.output_dir / "split.json"
    if path.exists():
        split, meta = load_manifest(path)
        val = np.asarray(meta["val"], dtype=np.int64)
    else:
        split = labeled_unlabeled_split(y, preset.labels_per_class, args.seed,
                                        unlabeled_includes_labeled=False)  # fmt: skip
        rng = np.random.default_rng(args.seed + 1)
        targets = y.numpy()[split.unlabeled]
        val = np.sort(np.concatenate([
            rng.choice(split.unlabeled[targets == c], preset.val_per_class, replace=False)
            for c in np.unique(targets)
        ]))  # fmt: skip
        if distributed.rank() == 0:
            meta = {"preset": args.preset, "seed": args.seed, "val": val.tolist()}
            save_manifest(split, path, meta)
    # MPL's convention: the unlabeled set is every training image but the validation ones.
    unlabeled = np.setdiff1d(np.arange(len(y)), val)
    return tuple(torch.from_numpy(a) for a in (split.labeled, unlabeled, val))


def build_mpl(preset: Preset, args, device: torch.device) -> metapl.MPL:
    torch.manual_seed(args.seed)
    num_classes = 10
    kw = {"dropout": preset.dropout}
    if args.model == "mlp":
        kw.update(in_features=3 * 32 * 32, hidden=(32,))
    teacher, student = (build_model(args.model, num_classes, **kw).to(device) for _ in range(2))
    if args.channels_last:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))

    def sgd(wait_steps):
        lr = optim.warmup_cosine(preset.lr, preset.steps, preset.warmup_steps, wait_steps)
        return optim.sgd(lr, momentum=0.9, nesterov=True, weight_decay=preset.weight_decay)

    method = None if args.meta_grad == "none" else args.meta_grad
    uda = None if args.no_uda else metapl.UDA(preset.uda_weight, preset.uda_temperature,
                                              preset.uda_threshold, preset.uda_steps)  # fmt: skip
    return metapl.MPL(
        teacher, student, sgd(0), sgd(preset.student_wait_steps), meta_grad=method,
        pseudo_labels="hard" if method == "first_order" else "soft", uda=uda,
        label_smoothing=preset.label_smoothing, compile=args.compile,
        ema_decay=preset.ema_decay, h_baseline_decay=0.99 if method == "first_order" else None,
    )  # fmt: skip


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    device = distributed.init_from_env()
    preset = preset_from_args(args)
    if args.resume and not (args.output_dir / "checkpoint.pt").exists():
        sys.exit(f"--resume: no checkpoint in {args.output_dir}; start without --resume")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(preset, args, device)
    mpl = build_mpl(preset, args, device)
    config = TrainConfig(
        steps=preset.steps, labeled_batch=preset.labeled_batch,
        unlabeled_ratio=preset.unlabeled_ratio, eval_every=args.eval_every,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
        bf16=not args.no_bf16, channels_last=args.channels_last,
        finetune_steps=preset.finetune_steps,
    )  # fmt: skip
    tracker = Tracker(
        args.output_dir, args.wandb_project,
        group=args.wandb_group or f"{args.preset}-{args.meta_grad}",
        name=f"{args.preset}-{args.meta_grad}-seed{args.seed}",
        config={**asdict(preset), **{k: str(v) for k, v in vars(args).items()}},
        enabled=distributed.rank() == 0,
    )  # fmt: skip
    results = train(mpl, data, config, args.output_dir, tracker, resume=args.resume)
    tracker.finish()
    if distributed.rank() == 0:
        print(json.dumps(results) if args.json else _table(results))
    return results


def _table(results: dict[str, float]) -> str:
    rows = "\n".join(f"| {k} | {100 * v:.2f} |" for k, v in results.items())
    return f"| metric | accuracy (%) |\n|---|---|\n{rows}"


if __name__ == "__main__":
    main()
