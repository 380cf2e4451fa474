"""What the paper-scale example scripts share (``examples/cifar_mpl.py``,
``examples/imagenet_mpl.py``): the MPL recipe, every field of which is a command-line flag, and
the path from flags to a trained model. The modes (``--evaluate``, ``--finetune-only``) are in
``metapl.training.modes``."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from metapl import distributed, optim
from metapl.data import RandAugment
from metapl.models import build_model, resnet50
from metapl.mpl import MPL, UDA
from metapl.training.loop import SSLData, TrainConfig, train
from metapl.training.rundir import CHECKPOINT, CONFIG, RunError
from metapl.training.tracking import Tracker

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "MODELS",
    "USAGE",
    "Recipe",
    "add_common_args",
    "build_mpl",
    "build_network",
    "build_networks",
    "build_randaugment",
    "check_args",
    "cli",
    "print_results",
    "recipe_from_args",
    "run",
    "set_fields",
    "tracker_for",
    "train_config",
]

META_GRADS = ("exact", "finite_difference", "first_order", "none")
# The examples' one-line usage (argparse's generated one runs to dozens of lines).
USAGE = "%(prog)s --data-dir DIR (--output-dir DIR | --resume RUN_DIR | --evaluate FILE) ..."
MODELS = ("wrn28-2", "wrn28-8", "resnet50", "mlp")


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of an MPL experiment; each is a flag (``--teacher-lr``) and a
    ``--set`` key. The defaults are the PyTorch port's CIFAR-10-4K command (kekmodel/MPL-pytorch
    README) with the official code's RandAugment and UDA mask (docs/reproducing.md)."""

    steps: int = 300_000
    labeled_batch: int = 128
    unlabeled_ratio: int = 7
    teacher_lr: float = 0.05
    student_lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_steps: int = 5000
    student_wait_steps: int = 3000
    teacher_dropout: float = 0.2
    student_dropout: float = 0.2
    ema_decay: float = 0.995
    label_smoothing: float = 0.15
    pseudo_label_temperature: float = 1.0
    uda_weight: float = 8.0
    uda_temperature: float = 0.7
    uda_threshold: float = 0.6
    uda_steps: int = 5000
    uda_mask_on: str = "sharpened"
    h_baseline_decay: float = 0.99
    log_prob_reduction: str = "mean"
    student_bn: str = "joint"
    randaugment: str = "mpl"
    randaugment_ops: int = 2
    randaugment_magnitude: float = 16.0
    finetune_epochs: float = 625.0
    finetune_steps: int | None = None
    finetune_batch: int = 512
    finetune_lr: float = 3e-5
    finetune_weight_decay: float = 0.0
    finetune_momentum: float = 0.9
    finetune_label_smoothing: float = 0.15
    finetune_augment: str = "strong"

    def __post_init__(self):
        for name, options in CHOICES.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"{_flag(name)} must be one of {options}, got {getattr(self, name)!r}"
                )
        for name in ("steps", "labeled_batch", "unlabeled_ratio", "finetune_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.finetune_steps is not None and (
            not isinstance(self.finetune_steps, int) or self.finetune_steps < 0
        ):
            raise ValueError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if self.finetune_epochs < 0 or self.randaugment_ops < 0:
            raise ValueError("--finetune-epochs and --randaugment-ops must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")

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


CHOICES = {
    "uda_mask_on": ("sharpened", "unsharpened"),
    "log_prob_reduction": ("mean", "sum"),
    "student_bn": ("joint", "unlabeled"),
    "randaugment": ("mpl", "uniform"),
    "finetune_augment": ("strong", "weak"),
}

# What each field means, and the PyTorch port's name for it where it has another.
HELP = {
    "steps": "training steps; another value scales warm-up, wait and UDA ramp with it",
    "labeled_batch": "global labeled batch",
    "unlabeled_ratio": "unlabeled batch = ratio x labeled batch",
    "teacher_lr": "teacher's peak learning rate",
    "student_lr": "student's peak learning rate",
    "momentum": "SGD momentum (teacher and student)",
    "nesterov": "Nesterov momentum",
    "weight_decay": "on weight matrices and kernels",
    "warmup_steps": "linear warm-up, then cosine decay",
    "student_wait_steps": "the student's lr is 0 for this many steps first",
    "teacher_dropout": "dropout before the teacher's classifier",
    "student_dropout": "dropout before the student's classifier",
    "ema_decay": "EMA of the student, evaluated and finetuned (0: no EMA)",
    "label_smoothing": "of the teacher's supervised loss",
    "pseudo_label_temperature": "softmax(z / T) of the teacher's pseudo labels",
    "uda_weight": "UDA loss weight",
    "uda_temperature": "UDA target sharpening",
    "uda_threshold": "UDA confidence mask",
    "uda_steps": "UDA weight ramp",
    "uda_mask_on": "the prediction the UDA threshold applies to (sharpened: the MPL code)",
    "h_baseline_decay": "first_order: moving average of h subtracted",
    "log_prob_reduction": "first_order: mean (the paper's code) or sum (B_u x mean, the scale "
    "of exact)",
    "student_bn": "the student's step forwards cat(x_l, x_u) (joint: the paper's code) or x_u",
    "randaugment": "mpl: fixed magnitude, each op with p ~ U(0.2, 0.8) (the MPL code); "
    "uniform: magnitude ~ U(0, M), always applied",
    "randaugment_ops": "RandAugment N",
    "randaugment_magnitude": "RandAugment M",
    "finetune_epochs": "finetuning epochs over the labeled set (steps = epochs x "
    "ceil(labeled / batch)), unless --finetune-steps",
    "finetune_steps": "finetuning steps (overrides --finetune-epochs; 0: no finetuning)",
    "finetune_batch": "finetuning batch",
    "finetune_lr": "finetuning learning rate (constant, SGD Nesterov, dropout off)",
    "finetune_weight_decay": "finetuning weight decay",
    "finetune_momentum": "finetuning momentum",
    "finetune_label_smoothing": "finetuning label smoothing",
    "finetune_augment": "augmentation of the finetuning batches",
}
PORT_NAMES = {
    "steps": "--total-steps",
    "labeled_batch": "--batch-size",
    "unlabeled_ratio": "--mu",
    "teacher_lr": "--teacher_lr",
    "student_lr": "--student_lr",
    "ema_decay": "--ema",
    "uda_weight": "--lambda-u",
    "uda_threshold": "--threshold",
    "uda_temperature": "--temperature",
    "finetune_batch": "--finetune-batch-size",
}

# Command-line fields a resumed run may change (the rest must equal the saved config.json):
# where things are read and written, how often the run logs, evaluates and saves, and what
# it prints. None of them changes the trained weights.
MAY_CHANGE_ON_RESUME = frozenset(
    f"args.{name}"
    for name in (
        "resume",
        "data_dir",
        "output_dir",
        "eval_every",
        "log_every",
        "checkpoint_every",
        "json",
        "download",
        "decode_threads",
    )
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(name: str, presets: Mapping[str, Recipe]) -> str:
    values = {preset: _shown(getattr(r, name)) for preset, r in presets.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default: {next(iter(values.values()))}"
    return "default: " + ", ".join(f"{k} {v}" for k, v in values.items())


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def add_common_args(p: argparse.ArgumentParser, presets: Mapping[str, Recipe]) -> None:
    """The flags both examples share: paths, modes, logging, and one per ``Recipe`` field
    (with the PyTorch port's spelling as an alias) with its default in ``--help``."""
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--output-dir", type=Path, help="the run's folder (not with --evaluate)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN_DIR",
        help="continue the run in --output-dir, or in RUN_DIR (a run folder or its checkpoint.pt)",
    )
    p.add_argument(
        "--evaluate",
        type=Path,
        metavar="CHECKPOINT",
        help="test a saved model (final.pt or checkpoint.pt) and exit",
    )
    p.add_argument(
        "--finetune-only",
        type=Path,
        metavar="CHECKPOINT",
        help="finetune the (EMA) student saved in CHECKPOINT on the labeled data, "
        "evaluate it and save it in --output-dir",
    )
    p.add_argument(
        "--meta-grad",
        default="exact",
        choices=META_GRADS,
        help="how the teacher's MPL gradient is computed (default: exact)",
    )
    p.add_argument("--no-uda", action="store_true", help="drop the teacher's UDA loss")
    p.add_argument("--compile", action="store_true", help="torch.compile the MPL step")
    p.add_argument("--wandb-project", help="log to this wandb project (offline without a key)")
    p.add_argument("--wandb-group", help="wandb group (default: preset and meta-grad)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--eval-every", "--eval-step", type=int, default=1000, help="(default: 1000)")
    p.add_argument("--log-every", type=int, default=50, help="(default: 50)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="(default: 1000)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast (default on CUDA)")
    p.add_argument("--json", action="store_true", help="print the final accuracies as JSON")

    g = p.add_argument_group(
        "recipe",
        "every field of metapl.training.recipe.Recipe; the PyTorch "
        "port's spelling is an alias (docs/reproducing.md)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set any recipe field (repeatable; named flags win)",
    )
    g.add_argument("--lr", type=float, help="teacher and student learning rate")
    g.add_argument(
        "--randaug",
        nargs=2,
        type=int,
        metavar=("N", "M"),
        help="RandAugment N and M (the port's flag)",
    )
    for f in dataclasses.fields(Recipe):
        names = [_flag(f.name)] + ([PORT_NAMES[f.name]] if f.name in PORT_NAMES else [])
        default = Recipe.__dataclass_fields__[f.name].default
        kw: dict = {
            "dest": f.name,
            "default": None,
            "help": f"{HELP[f.name]} ({_default_text(f.name, presets)})",
        }
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        else:
            kw["type"] = int if default is None else type(default)
        g.add_argument(*names, **kw)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail fast, before any data is read, on paths, values and modes that cannot work.
    ``--resume RUN_DIR`` becomes ``--output-dir RUN_DIR --resume``."""
    if not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder (see docs/data.md for the layout)")
    modes = [m for m in ("resume", "evaluate", "finetune_only") if getattr(args, m) is not None]
    if len(modes) > 1:
        p.error(f"{' and '.join(_flag(m) for m in modes)} cannot be combined: pick one mode")
    if args.resume:  # a path
        run_dir = Path(args.resume)
        run_dir = run_dir.parent if run_dir.is_file() else run_dir
        if args.output_dir is not None and args.output_dir.resolve() != run_dir.resolve():
            p.error(
                f"--resume {args.resume} and --output-dir {args.output_dir} name two runs: "
                "give one of them"
            )
        args.output_dir = run_dir
    args.resume = args.resume is not None
    for mode in ("evaluate", "finetune_only"):
        path = getattr(args, mode)
        if path is not None and not path.is_file():
            p.error(f"{_flag(mode)} {path}: no such file (pass a run's final.pt or checkpoint.pt)")
    if args.evaluate is None and args.output_dir is None:
        p.error("--output-dir is required (the run's folder)")
    if args.resume and not any((args.output_dir / f).exists() for f in (CONFIG, CHECKPOINT)):
        p.error(
            f"--resume: no run to resume in {args.output_dir} (no {CONFIG} or {CHECKPOINT}); "
            "start without --resume"
        )
    for name in ("eval_every", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")


def recipe_from_args(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """``recipe`` (a preset) with the command line applied: ``--steps`` first (scaling the
    warm-up, student wait and UDA ramp with it, ``Recipe.scaled_to``), then ``--set``, then
    the named flags (``--lr`` sets both learning rates, ``--randaug N M`` both RandAugment
    fields). A bad value raises ValueError naming its flag."""
    recipe = recipe.scaled_to(args.steps) if args.steps else recipe
    recipe = set_fields(recipe, args.set)
    named = {}
    if args.lr is not None:
        named.update(teacher_lr=args.lr, student_lr=args.lr)
    if args.randaug is not None:
        named.update(randaugment_ops=args.randaug[0], randaugment_magnitude=float(args.randaug[1]))
    for f in dataclasses.fields(Recipe):
        if f.name != "steps" and getattr(args, f.name) is not None:
            named[f.name] = getattr(args, f.name)
    return replace(recipe, **named)


def train_config(recipe: Recipe, args, num_labeled: int) -> TrainConfig:
    """The training loop's settings; finetuning steps from ``finetune_epochs`` over
    ``num_labeled`` images (the port's epochs of ceil(labeled / batch) batches) unless
    ``finetune_steps`` is set."""
    steps = recipe.finetune_steps
    if steps is None:
        steps = math.ceil(recipe.finetune_epochs * math.ceil(num_labeled / recipe.finetune_batch))
    return TrainConfig(
        steps=recipe.steps,
        labeled_batch=recipe.labeled_batch,
        unlabeled_ratio=recipe.unlabeled_ratio,
        eval_every=args.eval_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        bf16=not args.no_bf16,
        channels_last=args.channels_last,
        finetune_steps=steps,
        finetune_batch=recipe.finetune_batch,
        finetune_lr=recipe.finetune_lr,
        finetune_momentum=recipe.finetune_momentum,
        finetune_weight_decay=recipe.finetune_weight_decay,
        finetune_label_smoothing=recipe.finetune_label_smoothing,
        finetune_augment=recipe.finetune_augment,
    )


def build_randaugment(recipe: Recipe, image_size: int, imagenet: bool = False) -> RandAugment:
    """The strong view's RandAugment: ``"mpl"`` is ``RandAugment.mpl`` (CIFAR: a gray
    image_size / 2 cutout after it; ImageNet: no cutout, the official code's translate and
    cutout-op sizes), ``"uniform"`` the RandAugment paper's op list with magnitudes drawn
    uniformly up to M."""
    n, m = recipe.randaugment_ops, recipe.randaugment_magnitude
    cutout = 0 if imagenet else image_size // 2
    if recipe.randaugment == "uniform":
        return RandAugment(n, m, cutout=cutout)
    ra = replace(RandAugment.mpl(image_size, m), num_ops=n, cutout=cutout)
    return replace(ra, translate=100 / 224, cutout_op=40 / 224) if imagenet else ra


def build_network(model: str, num_classes: int, dropout: float, image_size: int) -> nn.Module:
    """One of ``MODELS`` with ``dropout`` before its classifier (``mlp``: one hidden layer of
    32, for smoke tests on 3 x image_size x image_size images)."""
    if model == "resnet50":
        net = resnet50(num_classes)
        net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
        return net
    if model == "mlp":
        return build_model(
            "mlp", num_classes, in_features=3 * image_size**2, hidden=(32,), dropout=dropout
        )
    return build_model(model, num_classes, dropout=dropout)


def build_networks(
    args, recipe: Recipe, num_classes: int, image_size: int, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """Teacher and student (``args.model``, each with its dropout), seeded by ``args.seed``."""
    torch.manual_seed(args.seed)
    nets = [
        build_network(args.model, num_classes, p, image_size).to(device)
        for p in (recipe.teacher_dropout, recipe.student_dropout)
    ]
    if args.channels_last:
        nets = [m.to(memory_format=torch.channels_last) for m in nets]
    return nets[0], nets[1]


def build_mpl(teacher: nn.Module, student: nn.Module, recipe: Recipe, args) -> MPL:
    """MPL with SGD and the warm-up + cosine schedule for both networks (the student waits
    ``student_wait_steps`` first; weight decay on weight matrices and kernels only); soft
    labels for exact / finite_difference, sampled hard labels with the moving-average baseline
    for first_order."""

    def sgd(lr: float, wait_steps: int) -> optim.Optimizer:
        schedule = optim.warmup_cosine(lr, recipe.steps, recipe.warmup_steps, wait_steps)
        return optim.sgd(
            schedule,
            recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
            decay_mask=optim.matrices_only,
        )

    method = None if args.meta_grad == "none" else args.meta_grad
    uda = None
    if not args.no_uda:
        uda = UDA(
            recipe.uda_weight,
            recipe.uda_temperature,
            recipe.uda_threshold,
            recipe.uda_steps,
            recipe.uda_mask_on,
        )
    first_order = method == "first_order"
    return MPL(
        teacher,
        student,
        sgd(recipe.teacher_lr, 0),
        sgd(recipe.student_lr, recipe.student_wait_steps),
        meta_grad=method,
        pseudo_labels="hard" if first_order else "soft",
        uda=uda,
        label_smoothing=recipe.label_smoothing,
        compile=args.compile,
        temperature=recipe.pseudo_label_temperature,
        ema_decay=recipe.ema_decay or None,
        h_baseline_decay=recipe.h_baseline_decay if first_order else None,
        log_prob_reduction=recipe.log_prob_reduction,
        student_bn=recipe.student_bn,
    )


def tracker_for(args, recipe: Recipe, name: str) -> Tracker:
    """The run's tracker (metrics.jsonl, and wandb with --wandb-project) on the main process."""
    return Tracker(
        args.output_dir,
        args.wandb_project,
        group=args.wandb_group or f"{name}-{args.meta_grad}",
        name=f"{name}-{args.meta_grad}-uda{int(not args.no_uda)}-seed{args.seed}",
        config={**asdict(recipe), **{k: str(v) for k, v in vars(args).items()}},
        enabled=distributed.rank() == 0,
        resume=args.resume,
    )


def run(mpl: MPL, data: SSLData, recipe: Recipe, args, name: str) -> dict[str, float]:
    """Train with tracking and print the final accuracies (a table, or JSON with --json)."""
    tracker = tracker_for(args, recipe, name)
    config = train_config(recipe, args, len(data.labeled_y))
    results = train(mpl, data, config, args.output_dir, tracker, resume=args.resume)
    tracker.finish()
    print_results(results, args.json)
    return results


def print_results(results: Mapping[str, float], as_json: bool) -> None:
    """On the main process: a table of accuracies in percent, or the raw values as JSON."""
    if distributed.rank() != 0:
        return
    rows = "\n".join(f"| {k} | {100 * v:.2f} |" for k, v in results.items())
    table = f"| metric | accuracy (%) |\n|---|---|\n{rows}"
    print(json.dumps(results) if as_json else table, file=sys.stdout, flush=True)


def cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run an example's ``main`` as a command: a run that cannot start or go on (RunError, a
    bad value, a missing file or package) prints one ``error:`` line instead of a traceback
    and exits 1."""
    try:
        main(argv)
    except (RunError, ValueError, FileNotFoundError, ImportError) as e:
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
