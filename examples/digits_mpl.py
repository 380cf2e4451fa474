"""Meta Pseudo Labels on sklearn's 8x8 digits: an ablation that runs offline in minutes on a CPU.

Data: ``load_digits`` (1797 images), a stratified, seeded 30% test split; from the rest 10
labeled images per class (100 labels), the other ~1150 images unlabeled. Model: a small CNN
(two 3x3 conv layers with BatchNorm, max-pooling, dropout) for teacher, student and baseline.
Augmentation, batched tensor ops: weak = random +-1 px shift; strong = shift, rotation,
Gaussian noise and a 2x2 cutout. Both networks use SGD (nesterov) with warm-up, cosine decay
and gradient clipping (without them the exact MPL term blows the teacher up in its first
steps at this learning rate); the student is reported as its EMA after the last step (no
validation split here: nothing is selected on the test images).

Rows (every one trains from scratch for the same number of steps; training loops, rows and
report are shared with examples/mnist_mpl.py in examples/_digits.py):

====================  =========================================================================
supervised            the CNN on the labels only (weak augmentation)
pseudo_label          teacher on labels; student on its soft labels of strong views (no MPL)
uda                   teacher on labels + UDA consistency; student on its labels (no MPL)
mpl                   MPL, exact meta-gradient through the student's SGD step, soft labels
mpl_first_order       MPL, the paper's first-order (REINFORCE) estimator, sampled hard labels
mpl_uda               exact MPL + UDA teacher: the paper's full recipe
mpl_uda_first_order   first-order MPL + UDA teacher
====================  =========================================================================

Every run logs to Weights & Biases (offline when WANDB_API_KEY is unset; WANDB_MODE=disabled
turns it off), one group per row and one run per seed, and to
<output-dir>/seed<N>/<row>/metrics.jsonl (replaced when the run is repeated), which
``python -m metapl.training.plot`` draws; curves.png and summary.json go to <output-dir>.
Results: docs/mpl.md.

    python examples/digits_mpl.py                         # 7 rows x 3 seeds
    python examples/digits_mpl.py --rows supervised mpl_uda --seeds 0 --json
    python examples/digits_mpl.py --labeled-per-class 2   # where semi-supervision pays
    python examples/digits_mpl.py --preset small --jobs 2 # 300 steps, for `make demo`
    python examples/digits_mpl.py --help                  # every field is a flag
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
from _digits import (
    Data,
    Recipe,
    Row,
    Task,
    check,
    check_runs,
    few_label_split,
    plot_curves,
    report,
    run,
    run_all,
    summarize,
)
from sklearn.datasets import load_digits
from torch import Tensor, nn

import metapl  # noqa: F401 (the scripts' tests patch metapl.MPL through this name)
from metapl.data.augment import cutout, weak_augment
from metapl.training.bounds import check_bounds
from metapl.training.cli import fail, parse

ROWS: tuple[Row, ...] = get_args(Row)


@dataclass(frozen=True)
class Digits:
    """The data, the augmentation and the CNN."""

    test_size: float = 0.3
    labeled_per_class: int = 10
    channels: int = 16  # conv widths: channels, 2 * channels
    dropout: float = 0.2
    rotate_degrees: float = 15.0  # strong augmentation
    noise_std: float = 0.1
    cutout: int = 2  # side of the square

    def __post_init__(self):
        check_bounds(
            self,
            {
                "test_size": "in (0, 1)",
                "labeled_per_class": ">= 1",
                "channels": ">= 1",
                "dropout": "in [0, 1)",
                "rotate_degrees": ">= 0",
                "noise_std": ">= 0",
                "cutout": ">= 0",
            },
        )


@dataclass(frozen=True)
class Experiment:
    recipe: Recipe = field(default_factory=Recipe)
    digits: Digits = field(default_factory=Digits)
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[Row, ...] = ROWS
    output_dir: Path = Path("runs/digits_mpl")
    wandb_project: str = "metapl-digits"
    jobs: int = 1  # runs at a time, in worker processes (2 on a 2-core CPU)
    json: bool = False  # print only the JSON summary

    def __post_init__(self):
        check_runs(self.seeds, self.jobs)


RECIPE = Recipe(
    steps=400,
    batch_l=0,
    batch_u=128,
    lr_teacher=0.05,
    lr_student=0.05,
    warmup_steps=30,
    uda_threshold=0.8,
    ema_decay=0.9,
    eval_every=25,
)
PRESETS = {
    "default": Experiment(recipe=RECIPE),
    "small": Experiment(recipe=replace(RECIPE, steps=300)),
}

# ----------------------------------------------------------------------------- data


def load_data(d: Digits, seed: int) -> Data:
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    return few_label_split(x, torch.tensor(digits.target), d.labeled_per_class, d.test_size, seed)


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


def strong(d: Digits, x: Tensor, gen: torch.Generator) -> Tensor:
    """Shift, rotation, Gaussian noise and a cutout square, each drawn per image."""
    x = rotate(weak(x, gen), d.rotate_degrees, gen)
    x = (x + d.noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return cutout(x, d.cutout, fill=0.0, generator=gen)


def cnn(d: Digits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c = d.channels
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
        nn.Dropout(d.dropout),
        nn.Linear(8 * c, 10),
    )


def task(d: Digits) -> Task:
    return Task(partial(cnn, d), weak, partial(strong, d), lambda x: x)


# ----------------------------------------------------------------------------- main


def one_run(exp: Experiment, datasets: dict[int, Data], seed: int, row: str, bar) -> dict:
    torch.set_num_threads(1)  # small convolutions: threads cost more than they give
    config = {**asdict(exp.recipe), **asdict(exp.digits)}
    out = exp.output_dir / f"seed{seed}" / row
    return run(
        exp.recipe,
        task(exp.digits),
        datasets[seed],
        seed,
        row,
        out,
        config,
        exp.wandb_project,
        "digits",
        bar,
    )


def main(argv: list[str] | None = None) -> dict[str, dict]:
    exp = parse(Experiment, argv, presets=PRESETS, description=__doc__.splitlines()[0])
    try:
        check(exp.recipe, exp.rows, exp.digits.labeled_per_class)
        datasets = {seed: load_data(exp.digits, seed) for seed in exp.seeds}
    except ValueError as err:
        fail(str(err))
    runs = [(seed, row) for seed in exp.seeds for row in exp.rows]
    start = time.perf_counter()
    outcomes = run_all(runs, partial(one_run, exp, datasets), exp.jobs, exp.recipe.steps)
    seconds = time.perf_counter() - start
    results: dict[str, list[dict]] = {row: [] for row in exp.rows}
    for (_, row), outcome in zip(runs, outcomes, strict=True):
        results[row].append(outcome)
    summary = summarize(results)
    plot_curves(results, list(exp.seeds), exp.output_dir / "curves.png")
    title = (
        f"digits, {10 * exp.digits.labeled_per_class} labels, {exp.recipe.steps} steps, "
        f"seeds {list(exp.seeds)}, {seconds:.0f} s; test accuracy (%) of the (EMA) student "
        "after the last step"
    )
    record = {"config": {**asdict(exp.recipe), **asdict(exp.digits)}, "seconds": seconds}
    report(summary, title, exp.json, record, exp.output_dir)
    return summary


if __name__ == "__main__":
    main()
