"""The MPL recipe of the paper-scale examples (``examples/cifar_mpl.py``,
``examples/imagenet_mpl.py``) and what turns it into networks, an ``MPL`` and the training
loop's settings. Every field of ``Recipe`` and ``Settings`` is a flag of both scripts
(``metapl.training.cli``); the PyTorch port's names are aliases (docs/reproducing.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from torch import nn

from metapl import distributed, optim
from metapl.data import RandAugment
from metapl.models import build_model, resnet50
from metapl.mpl import MPL, UDA
from metapl.training.loop import TrainConfig

__all__ = [
    "MODELS",
    "Model",
    "Recipe",
    "Settings",
    "build_mpl",
    "build_network",
    "build_networks",
    "build_randaugment",
    "train_config",
]

Model = Literal["wrn28-2", "wrn28-8", "resnet50", "mlp"]
MODELS = ("wrn28-2", "wrn28-8", "resnet50", "mlp")
MetaGrad = Literal["exact", "finite_difference", "first_order", "score_function", "none"]


def _port(name: str):
    """The PyTorch port's spelling of a flag, as an alias."""
    return tyro.conf.arg(aliases=(name,))


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of an MPL experiment. The defaults are the PyTorch port's
    CIFAR-10-4K command (kekmodel/MPL-pytorch README) with the official code's RandAugment and
    UDA mask (docs/reproducing.md)."""

    # training steps; a preset's warm-up, wait, UDA ramp, EMA and finetuning scale with it
    # (Recipe.scaled_to)
    steps: Annotated[int, _port("--total-steps")] = 300_000
    labeled_batch: Annotated[int, _port("--batch-size")] = 128  # global labeled batch
    unlabeled_ratio: Annotated[int, _port("--mu")] = 7  # unlabeled batch = ratio x labeled
    teacher_lr: Annotated[float, _port("--teacher_lr")] = 0.05  # peak learning rate
    student_lr: Annotated[float, _port("--student_lr")] = 0.05
    momentum: float = 0.9  # SGD momentum (teacher and student)
    nesterov: bool = True
    weight_decay: float = 5e-4  # on weight matrices and kernels
    warmup_steps: int = 5000  # linear warm-up, then cosine decay
    student_wait_steps: int = 3000  # the student's lr is 0 for this many steps first
    teacher_dropout: float = 0.2  # before the teacher's classifier
    student_dropout: float = 0.2
    ema_decay: Annotated[float, _port("--ema")] = 0.995  # EMA of the student (0: no EMA)
    label_smoothing: float = 0.15  # of the teacher's supervised loss
    pseudo_label_temperature: float = 1.0  # softmax(z / T) of the teacher's pseudo labels
    uda_weight: Annotated[float, _port("--lambda-u")] = 8.0
    uda_temperature: Annotated[float, _port("--temperature")] = 0.7  # target sharpening
    uda_threshold: Annotated[float, _port("--threshold")] = 0.6  # confidence mask
    uda_steps: int = 5000  # UDA weight ramp
    uda_mask_on: Literal["sharpened", "unsharpened"] = "sharpened"  # sharpened: the MPL code
    h_baseline_decay: float = 0.99  # score function: moving average of h subtracted
    log_prob_reduction: Literal["mean", "sum"] = "mean"  # score function: the paper's mean
    student_bn: Literal["joint", "unlabeled"] = "joint"  # joint: cat(x_l, x_u), the code's
    # mpl: fixed magnitude, each op with p ~ U(0.2, 0.8) (the MPL code); uniform: magnitude
    # ~ U(0, M), always applied
    randaugment: Literal["mpl", "uniform"] = "mpl"
    randaugment_ops: int = 2  # RandAugment N
    randaugment_magnitude: float = 16.0  # RandAugment M
    # finetuning epochs over the labeled set (steps = epochs x ceil(labeled / batch)), unless
    # finetune_steps is set
    finetune_epochs: float = 625.0
    finetune_steps: int | None = None  # overrides finetune_epochs; 0: no finetuning
    finetune_batch: Annotated[int, _port("--finetune-batch-size")] = 512
    finetune_lr: float = 3e-5  # constant, SGD Nesterov, dropout off
    finetune_weight_decay: float = 0.0
    finetune_momentum: float = 0.9
    finetune_label_smoothing: float = 0.15
    finetune_augment: Literal["strong", "weak"] = "strong"

    def __post_init__(self):
        for name in ("steps", "labeled_batch", "unlabeled_ratio", "finetune_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_steps is not None and self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if self.finetune_epochs < 0 or self.randaugment_ops < 0:
            raise ValueError("finetune_epochs and randaugment_ops must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")

    def scaled_to(self, steps: int) -> Recipe:
        """This recipe over ``steps`` steps: every phase keeps its share of the schedule.
        Warm-up, student wait and UDA ramp are rounded, at least one step where the recipe
        has any, as far as the run has room (warm-up + wait stay below ``steps``); the EMA's
        horizon ``1 / (1 - decay)`` scales alike (below one step: no EMA, decay 0); the
        finetuning length too (``finetune_steps`` rounded, at least 1 where the recipe has
        any, or ``finetune_epochs``)."""
        if steps == self.steps:
            return self
        scale = steps / self.steps
        phases = {k: getattr(self, k) for k in ("warmup_steps", "student_wait_steps", "uda_steps")}
        new = {k: min(steps, max(1, round(v * scale))) if v > 0 else 0 for k, v in phases.items()}
        while new["warmup_steps"] + new["student_wait_steps"] >= steps > 0:
            longer = max(("student_wait_steps", "warmup_steps"), key=new.__getitem__)
            new[longer] -= 1
        if self.ema_decay > 0:
            horizon = scale / (1 - self.ema_decay)
            new["ema_decay"] = 1 - 1 / horizon if horizon > 1 else 0.0
        if self.finetune_steps is not None:
            new["finetune_steps"] = (
                max(1, round(self.finetune_steps * scale)) if self.finetune_steps else 0
            )
        else:
            new["finetune_epochs"] = self.finetune_epochs * scale
        return replace(self, steps=steps, **new)

    def schedule(self) -> str:
        """The phases in one line, e.g. ``warm-up 50, student wait 30, UDA ramp 50, EMA decay
        0.5, finetuning 50 steps``."""
        ema = f"EMA decay {self.ema_decay:.4g}" if self.ema_decay > 0 else "no EMA"
        finetune = (
            f"finetuning {self.finetune_steps} steps"
            if self.finetune_steps is not None
            else f"finetuning {self.finetune_epochs:.4g} epochs"
        )
        return (
            f"warm-up {self.warmup_steps}, student wait {self.student_wait_steps}, UDA ramp "
            f"{self.uda_steps}, {ema}, {finetune}"
        )


@dataclass(frozen=True)
class Settings:
    """How a run is run: its folders, its method and its logging."""

    data_dir: Path | None = None  # the data set's folder (required)
    output_dir: Path | None = None  # the run's folder (not with --evaluate)
    model: Model = "wrn28-2"  # mlp: one hidden layer, for smoke tests
    meta_grad: MetaGrad = "exact"  # how the teacher's MPL gradient is computed (none: no term)
    uda: bool = True  # the teacher's UDA consistency loss (--no-uda drops it)
    compile: bool = False  # torch.compile the MPL step
    seed: int = 0
    eval_every: Annotated[int, _port("--eval-step")] = 1000
    log_every: int = 50
    checkpoint_every: int = 1000
    channels_last: bool = False
    bf16: bool = True  # bf16 autocast on CUDA (--no-bf16: off)
    # stop when a loss exceeds this many times its recent median size (inf: only NaN / inf)
    explosion_factor: float = 1e3
    json: bool = False  # print the final accuracies as JSON
    wandb_project: str | None = None  # log to this wandb project (offline without a key)
    wandb_group: str | None = None  # (default: the run's name and meta-grad)

    def __post_init__(self):
        for name in ("eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def train_config(recipe: Recipe, settings: Settings, num_labeled: int) -> TrainConfig:
    """The training loop's settings, taken from the recipe and the run settings by name;
    finetuning steps from ``finetune_epochs`` over ``num_labeled`` images (the port's epochs
    of ceil(labeled / batch) batches) unless ``finetune_steps`` is set."""
    steps = recipe.finetune_steps
    if steps is None:
        steps = math.ceil(recipe.finetune_epochs * math.ceil(num_labeled / recipe.finetune_batch))
    return TrainConfig.take(recipe, settings, finetune_steps=steps)


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
    settings: Settings, recipe: Recipe, num_classes: int, image_size: int, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """Teacher and student (``settings.model``, each with its dropout), seeded by
    ``settings.seed``."""
    torch.manual_seed(settings.seed)
    nets = [
        build_network(settings.model, num_classes, p, image_size).to(device)
        for p in (recipe.teacher_dropout, recipe.student_dropout)
    ]
    if settings.channels_last:
        nets = [m.to(memory_format=torch.channels_last) for m in nets]
    return nets[0], nets[1]


def build_mpl(teacher: nn.Module, student: nn.Module, recipe: Recipe, settings: Settings) -> MPL:
    """MPL with SGD and the warm-up + cosine schedule for both networks (the student waits
    ``student_wait_steps`` first; weight decay on weight matrices and kernels only); the
    pseudo-label kind and the moving-average baseline follow from the method."""

    def sgd(lr: float, wait_steps: int) -> optim.Optimizer:
        schedule = optim.warmup_cosine(lr, recipe.steps, recipe.warmup_steps, wait_steps)
        return optim.sgd(
            schedule,
            recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
            decay_mask=optim.matrices_only,
        )

    uda = None
    if settings.uda:
        uda = UDA(
            recipe.uda_weight,
            recipe.uda_temperature,
            recipe.uda_threshold,
            recipe.uda_steps,
            recipe.uda_mask_on,
        )
    return MPL(
        teacher,
        student,
        sgd(recipe.teacher_lr, 0),
        sgd(recipe.student_lr, recipe.student_wait_steps),
        meta_grad=None if settings.meta_grad == "none" else settings.meta_grad,
        uda=uda,
        label_smoothing=recipe.label_smoothing,
        compile=settings.compile,
        temperature=recipe.pseudo_label_temperature,
        ema_decay=recipe.ema_decay or None,
        h_baseline_decay=recipe.h_baseline_decay,
        log_prob_reduction=recipe.log_prob_reduction,
        student_bn=recipe.student_bn,
        reduce=distributed.reduce_mean(),
    )
