"""What the paper-scale example scripts share: MPL hyperparameters, command-line flags, and the
path from flags to a trained model (``examples/cifar_mpl.py``, ``examples/imagenet_mpl.py``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn

from metapl import distributed, optim
from metapl.mpl import MPL, UDA
from metapl.rundir import CHECKPOINT, CONFIG, RunError
from metapl.tracking import Tracker
from metapl.train import SSLData, TrainConfig, train

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "Recipe",
    "add_common_args",
    "build_mpl",
    "check_args",
    "cli",
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

    def scaled_to(self, steps: int) -> Recipe:
        """This recipe over ``steps`` steps: warm-up, student wait and UDA ramp keep their
        share of the schedule, rounded, and at least one step where the recipe has any, as
        far as the run has room (warm-up + wait must stay below ``steps``)."""
        if steps == self.steps:
            return self
        scale = steps / self.steps
        phases = {k: getattr(self, k) for k in ("warmup_steps", "student_wait_steps", "uda_steps")}
        new = {k: min(steps, max(1, round(v * scale))) if v > 0 else 0 for k, v in phases.items()}
        while new["warmup_steps"] + new["student_wait_steps"] >= steps > 0:
            longer = max(("student_wait_steps", "warmup_steps"), key=new.__getitem__)
            new[longer] -= 1
        return replace(self, steps=steps, **new)


# Command-line fields a resumed run may change (the rest must equal the saved config.json):
# where things are read and written, how often the run logs, evaluates and saves, and what
# it prints. None of them changes the trained weights.
MAY_CHANGE_ON_RESUME = frozenset(f"args.{name}" for name in (
    "resume", "data_dir", "output_dir", "eval_every", "log_every", "checkpoint_every", "json",
    "download", "decode_threads",
))  # fmt: skip


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, help="training steps (the schedule scales with them)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
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
    if args.resume and not any((args.output_dir / f).exists() for f in (CONFIG, CHECKPOINT)):
        p.error(f"--resume: no run to resume in {args.output_dir} (no {CONFIG} or {CHECKPOINT}); "
                "start without --resume")  # fmt: skip
    for name in ("steps", "labeled_batch", "unlabeled_ratio", "eval_every", "log_every",
                 "checkpoint_every"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        p.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")


def override(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """The recipe with the command line's overrides. Another --steps scales the warm-up,
    student wait and UDA ramp with it (``Recipe.scaled_to``), so short runs keep the
    schedule's shape."""
    names = ("lr", "labeled_batch", "unlabeled_ratio", "finetune_steps")
    recipe = replace(recipe, **{k: getattr(args, k) for k in names if getattr(args, k) is not None})
    return recipe.scaled_to(args.steps) if args.steps else recipe


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
        resume=args.resume,
    )  # fmt: skip
    results = train(mpl, data, config, args.output_dir, tracker, resume=args.resume)
    tracker.finish()
    if is_main:
        rows = "\n".join(f"| {k} | {100 * v:.2f} |" for k, v in results.items())
        table = f"| metric | accuracy (%) |\n|---|---|\n{rows}"
        print(json.dumps(results) if args.json else table, file=sys.stdout, flush=True)
    return results


def cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run an example's ``main`` as a command: a run that cannot start or go on (RunError, a
    bad value, a missing file) prints one ``error:`` line instead of a traceback and exits 1."""
    try:
        main(argv)
    except (RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


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
