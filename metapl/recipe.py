"""What the paper-scale example scripts share: MPL hyperparameters, command-line flags, and the
path from flags to a trained model (``examples/cifar_mpl.py``, ``examples/imagenet_mpl.py``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn

from metapl import distributed, optim
from metapl.mpl import MPL, UDA
from metapl.tracking import Tracker
from metapl.train import SSLData, TrainConfig, train

__all__ = [
    "Recipe",
    "add_common_args",
    "build_mpl",
    "check_args",
    "override",
    "run",
    "set_fields",
]

META_GRADS = ("exact", "finite_difference", "first_order", "none")


@dataclass(frozen=True)
class Recipe:
    """MPL hyperparameters of one experiment (teacher and student share the optimizer)."""

    steps: int = 300_000
    labeled_batch: int = 128
    unlabeled_ratio: int = 7
    lr: float = 0.05
    momentum: float = 0.9
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
    h_baseline_decay: float = 0.99
    finetune_steps: int = 5000
    finetune_batch: int = 512
    finetune_lr: float = 3e-5


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, help="training steps (shrinks the schedule to fit)")
    p.add_argument("--resume", action="store_true", help="continue from output-dir/checkpoint.pt")
    p.add_argument("--meta-grad", default="exact", choices=META_GRADS)
    p.add_argument("--no-uda", action="store_true", help="drop the teacher's UDA loss")
    p.add_argument("--compile", action="store_true", help="torch.compile the MPL step")
    p.add_argument("--wandb-project", help="log to this wandb project (offline without a key)")
    p.add_argument("--wandb-group", help="wandb group (default: preset and meta-grad)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="teacher and student base learning rate")
    p.add_argument("--labeled-batch", type=int, help="global labeled batch size")
    p.add_argument("--unlabeled-ratio", type=int, help="unlabeled batch = ratio x labeled")
    p.add_argument("--finetune-steps", type=int, help="student finetuning steps after MPL")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    p.add_argument("--json", action="store_true", help="print the final accuracies as JSON")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail fast, before any data is read, on paths and values that cannot work."""
    if not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder (see docs/data.md for the layout)")
    if args.resume and not (args.output_dir / "checkpoint.pt").exists():
        p.error(f"--resume: no checkpoint in {args.output_dir}; start without --resume")
    for name in ("steps", "labeled_batch", "unlabeled_ratio", "eval_every", "log_every",
                 "checkpoint_every"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        p.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")


def override(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """The recipe with the command line's overrides. A shorter --steps shrinks the warm-up,
    student wait and UDA ramp in proportion, so short runs keep the schedule's shape."""
    names = ("lr", "labeled_batch", "unlabeled_ratio", "finetune_steps")
    recipe = replace(recipe, **{k: getattr(args, k) for k in names if getattr(args, k) is not None})
    if args.steps and args.steps != recipe.steps:
        scale = args.steps / recipe.steps
        shrunk = {k: int(getattr(recipe, k) * scale)
                  for k in ("warmup_steps", "student_wait_steps", "uda_steps")}  # fmt: skip
        recipe = replace(recipe, steps=args.steps, **shrunk)
    return recipe


def build_mpl(teacher: nn.Module, student: nn.Module, recipe: Recipe, args) -> MPL:
    """MPL with Nesterov SGD and the warm-up + cosine schedule for both networks (the student
    waits ``student_wait_steps`` first; weight decay on weight matrices and kernels only); soft
    labels for exact / finite_difference, sampled hard labels with the moving-average baseline
    for first_order."""

    def sgd(wait_steps: int) -> optim.Optimizer:
        lr = optim.warmup_cosine(recipe.lr, recipe.steps, recipe.warmup_steps, wait_steps)
        return optim.sgd(lr, recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay,
                         decay_mask=optim.matrices_only)  # fmt: skip

    method = None if args.meta_grad == "none" else args.meta_grad
    uda = None
    if not args.no_uda:
        uda = UDA(recipe.uda_weight, recipe.uda_temperature, recipe.uda_threshold,
                  recipe.uda_steps)  # fmt: skip
    first_order = method == "first_order"
    return MPL(
        teacher, student, sgd(0), sgd(recipe.student_wait_steps), meta_grad=method,
        pseudo_labels="hard" if first_order else "soft", uda=uda,
        label_smoothing=recipe.label_smoothing, compile=args.compile, ema_decay=recipe.ema_decay,
        h_baseline_decay=recipe.h_baseline_decay if first_order else None,
    )  # fmt: skip


def run(mpl: MPL, data: SSLData, recipe: Recipe, args, name: str) -> dict[str, float]:
    """Train with tracking and print the final accuracies (a table, or JSON with --json)."""
    config = TrainConfig(
        steps=recipe.steps, labeled_batch=recipe.labeled_batch,
        unlabeled_ratio=recipe.unlabeled_ratio, eval_every=args.eval_every,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
        bf16=not args.no_bf16, channels_last=args.channels_last,
        finetune_steps=recipe.finetune_steps, finetune_batch=recipe.finetune_batch,
        finetune_lr=recipe.finetune_lr,
    )  # fmt: skip
    is_main = distributed.rank() == 0
    tracker = Tracker(
        args.output_dir, args.wandb_project, group=args.wandb_group or f"{name}-{args.meta_grad}",
        name=f"{name}-{args.meta_grad}-uda{int(not args.no_uda)}-seed{args.seed}",
        config={**asdict(recipe), **{k: str(v) for k, v in vars(args).items()}}, enabled=is_main,
    )  # fmt: skip
    results = train(mpl, data, config, args.output_dir, tracker, resume=args.resume)
    tracker.finish()
    if is_main:
        rows = "\n".join(f"| {k} | {100 * v:.2f} |" for k, v in results.items())
        table = f"| metric | accuracy (%) |\n|---|---|\n{rows}"
        print(json.dumps(results) if args.json else table, file=sys.stdout, flush=True)
    return results


def set_fields(config, assignments: list[str]):
    """The dataclass ``config`` with ``KEY=VALUE`` assignments applied (the examples' ``--set``).

    Each value is parsed as a Python literal of the field's current type (``True``, ``0.1``,
    ``(64, 64)``; strings as written). An unknown key or a value of another type raises a
    ValueError naming the valid keys or the expected type."""
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set takes KEY=VALUE with KEY one of {names}, got {item!r}")
        current = getattr(config, key)
        if isinstance(current, str):
            changes[key] = text
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(current, float) and type(value) is int:
            value = float(value)
        if current is not None and type(value) is not type(current):
            raise ValueError(
                f"--set {key}: expected a {type(current).__name__} like {current!r}, got {text!r}"
            )
        changes[key] = value
    return replace(config, **changes)
