"""Meta Pseudo Labels on sklearn's 8x8 digits: an ablation that runs offline in minutes on a CPU.

Data: ``load_digits`` (1797 images), a stratified, seeded 30% test split; from the rest 10
labeled images per class (100 labels), the other ~1150 images unlabeled. Model: a small CNN
(two 3x3 conv layers with BatchNorm, max-pooling, dropout) for teacher, student and baseline.
Augmentation, batched tensor ops: weak = random +-1 px shift; strong = shift, rotation,
Gaussian noise and a 2x2 cutout. The student is evaluated as its EMA. Both networks use SGD
(nesterov) with warm-up, cosine decay and gradient clipping: without warm-up and clipping the
exact MPL term blows the teacher up in its first steps at this learning rate.

Rows (every one trains from scratch for the same number of steps):

====================  =========================================================================
supervised            the CNN on the 100 labels only (weak augmentation)
pseudo_label          teacher on labels; student on its soft labels of strong views (no MPL)
uda                   teacher on labels + UDA consistency; student on its labels (no MPL)
mpl                   MPL, exact meta-gradient through the student's SGD step, soft labels
mpl_first_order       MPL, the paper's first-order (REINFORCE) estimator, sampled hard labels
mpl_uda               exact MPL + UDA teacher: the paper's full recipe
mpl_uda_first_order   first-order MPL + UDA teacher
====================  =========================================================================

Every run logs to Weights & Biases (offline when WANDB_API_KEY is unset; WANDB_MODE or
``--wandb-mode`` override), one group per row and one run per seed, files under --output-dir,
and to <output-dir>/seed<N>/<row>/metrics.jsonl (replaced when the run is repeated), which
``python -m metapl.training.plot`` draws.

Measured (400 steps, seeds 0-2, mean test accuracy %): with 10 labels per class every row
lands at 95-96 (supervised 95.4, uda 95.7, mpl 95.6, mpl_uda 95.6): the same CNN trained on
all ~1250 training labels reaches 98.6, so there is little left to gain. With
``--labeled-per-class 2``: supervised 75.1, pseudo_label 79.8, mpl 80.7, uda 92.1,
mpl_uda 92.7: UDA gives most of the gain, the MPL term about a point.

    python examples/digits_mpl.py                       # 7 rows x 3 seeds (~2.5 min)
    python examples/digits_mpl.py --rows supervised mpl_uda --seeds 0 --json
    python examples/digits_mpl.py --labeled-per-class 2 # where semi-supervision pays
    python examples/digits_mpl.py --budget small        # 300 steps, for `make demo`
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.data.augment import cutout, weak_augment
from metapl.training.bounds import check_bounds
from metapl.training.recipe import check_mpl_options, mpl_options, set_fields, split_labels
from metapl.training.tracking import Tracker

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    test_size: float = 0.3
    labeled_per_class: int = 10
    channels: int = 16  # conv widths: channels, 2 * channels
    dropout: float = 0.2
    steps: int = 400
    batch_u: int = 128  # unlabeled images per step (the labeled batch is all 100 labels)
    lr_teacher: float = 0.05  # SGD, momentum 0.9, nesterov, cosine decay (both networks)
    lr_student: float = 0.05
    weight_decay: float = 5e-4
    warmup_steps: int = 30  # linear warm-up of both learning rates
    max_grad_norm: float = 1.0  # clip both networks' gradients (0: off); exact MPL needs it
    temperature: float = 1.0  # of the pseudo labels
    uda_weight: float = 1.0
    uda_temperature: float = 0.4
    uda_threshold: float = 0.8
    ema_decay: float = 0.9  # of the student (and of the supervised model)
    lookahead_steps: int = 1  # student steps per MPL step on the same pseudo labels (MPL's K)
    mpl_weight: float = 1.0  # the MPL term's weight in the teacher's gradient
    log_prob_reduction: str = "mean"  # first_order: "mean" (the paper's 1/B scale) or "sum"
    student_bn: str = "unlabeled"  # the student's BatchNorm batch: "unlabeled" or "joint"
    # the MPL signal's labeled batch: "same" as the teacher's, "resampled" (the labels again,
    # with their own weak views) or "held_out" (half of each class's labels, which the
    # teacher's own loss then never sees); rows without an MPL term: "same"
    mpl_labels: str = "same"
    rotate_degrees: float = 15.0  # strong augmentation
    noise_std: float = 0.1
    cutout: int = 2  # side of the square
    log_every: int = 25

    def __post_init__(self):
        check_bounds(
            self,
            {
                "test_size": "in (0, 1)",
                "labeled_per_class": ">= 1",
                "channels": ">= 1",
                "dropout": "in [0, 1)",
                "steps": ">= 1",
                "batch_u": ">= 1",
                "lr_teacher": "> 0",
                "lr_student": "> 0",
                "weight_decay": ">= 0",
                "warmup_steps": ">= 0",
                "max_grad_norm": ">= 0",
                "temperature": "> 0",
                "uda_weight": ">= 0",
                "uda_temperature": "> 0",
                "uda_threshold": "in [0, 1]",
                "ema_decay": "in [0, 1)",
                "rotate_degrees": ">= 0",
                "noise_std": ">= 0",
                "cutout": ">= 0",
                "log_every": ">= 1",
            },
        )


BUDGETS = {"default": {}, "small": {"steps": 300}}
ROWS = (
    "supervised",
    "pseudo_label",
    "uda",
    "mpl",
    "mpl_first_order",
    "mpl_uda",
    "mpl_uda_first_order",
)

# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    x_l: Tensor  # [100, 1, 8, 8] in [0, 1]
    y_l: Tensor
    x_u: Tensor  # [~1150, 1, 8, 8]; labels never used
    x_test: Tensor
    y_test: Tensor


def load_data(cfg: Config, seed: int) -> Data:
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    train, test = train_test_split(
        np.arange(len(y)), test_size=cfg.test_size, stratify=digits.target, random_state=seed
    )
    fewest = np.bincount(y[train]).min()
    if cfg.labeled_per_class >= fewest:
        raise ValueError(
            f"labeled_per_class must be below {fewest} (the training images of the rarest class "
            f"with test_size={cfg.test_size}), got {cfg.labeled_per_class}"
        )
    rng = np.random.default_rng(seed)
    labeled = np.concatenate(
        [rng.choice(train[y[train] == c], cfg.labeled_per_class, replace=False) for c in range(10)]
    )
    unlabeled = np.setdiff1d(train, labeled)
    return Data(x[labeled], y[labeled], x[unlabeled], x[test], y[test])


# ----------------------------------------------------------------------------- augmentation


def weak(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shift by -1, 0 or +1 px in each direction, zero fill. [N, 1, 8, 8] -> same."""
    return weak_augment(x, pad=1, flip=False, pad_mode="constant", fill=0.0, generator=gen)


def rotate(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Per-sample rotation by U(-degrees, degrees) about the image center (bilinear)."""
    angle = (torch.rand(len(x), generator=gen) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def strong(x: Tensor, cfg: Config, gen: torch.Generator) -> Tensor:
    """Shift, rotation, Gaussian noise and a cutout square, each drawn per image."""
    x = rotate(weak(x, gen), cfg.rotate_degrees, gen)
    x = (x + cfg.noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return cutout(x, cfg.cutout, fill=0.0, generator=gen)


# ----------------------------------------------------------------------------- model


def cnn(cfg: Config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c = cfg.channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Conv2d(c, 2 * c, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 2x2
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(8 * c, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return round((model(x).argmax(-1) == y).float().mean().item(), 4)


def schedule(cfg: Config, lr: float):
    """Linear warm-up, then cosine decay to 0 at the last step (short runs warm up less)."""
    return optim.warmup_cosine(lr, cfg.steps, min(cfg.warmup_steps, cfg.steps // 2))


def sgd(cfg: Config, lr: float) -> optim.Optimizer:
    opt = optim.sgd(schedule(cfg, lr), momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return optim.clip_grad_norm(opt, cfg.max_grad_norm) if cfg.max_grad_norm else opt


# ----------------------------------------------------------------------------- training


def train_supervised(cfg: Config, data: Data, seed: int, log) -> nn.Module:
    """The baseline in plain PyTorch: the teacher's CNN, optimizer and schedule on the labels
    only (torch.optim.SGD equals metapl.optim.sgd step for step), evaluated as its EMA."""
    model = cnn(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(
        model.parameters(),
        cfg.lr_teacher,
        momentum=0.9,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: float(schedule(cfg, 1.0)(torch.tensor(s)))
    )
    ema = torch.optim.swa_utils.AveragedModel(
        model,
        multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
        use_buffers=True,
    )
    model.train()
    for step in range(cfg.steps):
        loss = F.cross_entropy(model(weak(data.x_l, gen)), data.y_l)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        log(step, {"train/loss": loss.item()}, ema.module)
    return ema.module


def train_mpl(cfg: Config, data: Data, seed: int, row: str, log) -> nn.Module:
    """Teacher + student. The row picks the MPL term and UDA; returns the EMA student."""
    use_uda = "uda" in row
    method = None if row in ("pseudo_label", "uda") else "exact"
    if row.endswith("first_order"):
        method = "first_order"
    uda = metapl.UDA(cfg.uda_weight, cfg.uda_temperature, cfg.uda_threshold) if use_uda else None
    mpl = metapl.MPL(
        cnn(cfg, seed),
        cnn(cfg, seed + 1),
        sgd(cfg, cfg.lr_teacher),
        sgd(cfg, cfg.lr_student),
        meta_grad=method,
        pseudo_labels="hard" if method == "first_order" else "soft",
        uda=uda,
        temperature=cfg.temperature,
        ema_decay=cfg.ema_decay,
        h_baseline_decay=0.9 if method == "first_order" else None,
        **mpl_options(cfg, method),
    )
    own = held = torch.arange(len(data.y_l))
    if method and cfg.mpl_labels == "held_out":
        own, held = split_labels(data.y_l)
    gen = torch.Generator().manual_seed(seed)
    for step in range(cfg.steps):
        idx = torch.randint(len(data.x_u), (cfg.batch_u,), generator=gen)
        x_u = data.x_u[idx]
        x_l = weak(data.x_l[own], gen)
        mpl_batch = None
        if method and cfg.mpl_labels != "same":
            mpl_batch = (weak(data.x_l[held], gen), data.y_l[held])
        metrics = mpl.step(
            x_l, data.y_l[own], weak(x_u, gen), strong(x_u, cfg, gen), mpl_batch=mpl_batch
        )
        log(step, metrics, mpl.ema_student)
    return mpl.ema_student


# ----------------------------------------------------------------------------- logging


def wandb_mode(flag: str | None) -> str:
    """--wandb-mode, else WANDB_MODE, else online with an API key and offline without."""
    if flag:
        return flag
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def run(cfg: Config, data: Data, seed: int, row: str, args, bar: tqdm) -> float:
    """Train one row for one seed inside its own wandb run; returns the test accuracy."""
    import wandb

    config = {**asdict(cfg), "row": row, "seed": seed}
    wb = wandb.init(
        project=args.wandb_project,
        group=row,
        name=f"{row}-seed{seed}",
        mode=args.wandb_mode,
        dir=args.output_dir,
        config=config,
        settings=wandb.Settings(silent=True, console="off"),
        reinit="create_new",
    )
    folder = args.output_dir / f"seed{seed}" / row
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    jsonl = Tracker(folder, config=config)

    def log(step: int, metrics: dict, model: nn.Module) -> None:
        bar.update()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            was_training = model.training
            metrics = {**metrics, "test/accuracy": accuracy(model, data.x_test, data.y_test)}
            model.train(was_training)
            wb.log(metrics, step=step + 1)
            jsonl.log(metrics, step=step + 1)

    bar.set_description(f"seed {seed} {row}")
    if row == "supervised":
        model = train_supervised(cfg, data, seed, log)
    else:
        model = train_mpl(cfg, data, seed, row, log)
    acc = accuracy(model, data.x_test, data.y_test)
    wb.summary["test/final_accuracy"] = acc
    wb.finish()
    jsonl.finish()
    return acc


# ----------------------------------------------------------------------------- main


def check_flags(args: argparse.Namespace) -> None:
    for flag in ("steps", "labeled_per_class"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    bad = [seed for seed in args.seeds if not 0 <= seed < 2**32]
    if bad or len(set(args.seeds)) < len(args.seeds):
        raise ValueError(f"--seeds must be distinct and in [0, 2**32), got {args.seeds}")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--labeled-per-class", type=int, default=None, help="default 10")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/digits_mpl"))
    parser.add_argument("--wandb-project", default="metapl-digits")
    parser.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        default=None,
        help="default: $WANDB_MODE, else online with WANDB_API_KEY, else offline",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override any Config field, e.g. --set lr_student=0.1",
    )
    args = parser.parse_args(argv)
    try:
        check_flags(args)
        cfg = set_fields(replace(Config(), **BUDGETS[args.budget]), args.set)
        if args.steps is not None:
            cfg = replace(cfg, steps=args.steps)
        if args.labeled_per_class is not None:
            cfg = replace(cfg, labeled_per_class=args.labeled_per_class)
        check_mpl_options(cfg, cfg.labeled_per_class)
        datasets = {seed: load_data(cfg, seed) for seed in args.seeds}
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    args.wandb_mode = wandb_mode(args.wandb_mode)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small convolutions: threads cost more than they give

    accs: dict[str, list[float]] = {row: [] for row in args.rows}
    start = time.perf_counter()
    total = len(args.seeds) * len(args.rows) * cfg.steps
    with tqdm(total=total, file=sys.stderr, disable=None) as bar:
        for seed, data in datasets.items():
            for row in args.rows:
                accs[row].append(run(cfg, data, seed, row, args, bar))
    seconds = time.perf_counter() - start

    summary = {
        row: {
            "mean": round(statistics.mean(a), 4),
            "std": round(statistics.stdev(a), 4) if len(a) > 1 else 0.0,
            "seeds": a,
        }
        for row, a in accs.items()
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"\ndigits, {10 * cfg.labeled_per_class} labels, {cfg.steps} steps, "
            f"seeds {args.seeds}, {seconds:.0f} s; test accuracy (%) of the (EMA) student\n"
        )
        if len(args.seeds) == 1:  # one seed has no spread to show
            print("| row                 | test accuracy |")
            print("|---------------------|---------------|")
            for row, s in summary.items():
                print(f"| {row:<19} | {100 * s['mean']:13.1f} |")
        else:
            print("| row                 | mean ± std   | per seed |")
            print("|---------------------|--------------|----------|")
            for row, s in summary.items():
                per_seed = " ".join(f"{100 * a:.1f}" for a in s["seeds"])
                spread = f"{100 * s['mean']:5.1f} ± {100 * s['std']:4.1f}"
                print(f"| {row:<19} | {spread} | {per_seed} |")
    return summary


if __name__ == "__main__":
    main()
