"""Meta Pseudo Labels on the 2-D Ising model: which phase is a 16x16 spin lattice in?

Data: `metapl.data.load_ising` (``make ising`` writes data/ising/): 5000 spin configurations of
the 2-D Ising model, each labeled by its phase, ordered (0: below the critical temperature
T_c = 2.269) or disordered (1: above it); 2507 and 2493 images. A stratified, seeded 30% test
split; from the rest `labeled_per_class` labeled images per class, the others unlabeled (their
labels and temperatures never used). Inputs are the spins, -1 and +1.

Augmentation from the physics, batched tensor ops, drawn per image: weak = the lattice's
symmetries, which keep the energy and so the phase: a periodic translation by any offset
(torch.roll; the simulations' boundaries are periodic) and one of the square's 8 symmetries
(flips, transposition); strong = weak + the global spin flip (s -> -s, the model's Z2
symmetry) + flipping a random `spin_noise` fraction of the spins. The noise is the one part
that is not a symmetry: it breaks bonds, like heating, so it stays small. Model: a small CNN
(two 3x3 conv layers with circular padding, BatchNorm, max-pooling, dropout) for teacher,
student and baseline. Training as in examples/digits_mpl.py: SGD (nesterov) with warm-up,
cosine decay and clipping; the student is reported as its EMA after the last step.

Rows (every one trains from scratch for the same number of steps; training loops, rows and
report are shared with examples/digits_mpl.py in examples/_digits.py):

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
<output-dir>/seed<N>/<row>/metrics.jsonl, which ``python -m metapl.training.plot`` draws;
curves.png and summary.json go to <output-dir>. Results: docs/mpl.md.

    make ising                                          # data/ising/, md5-checked
    python examples/ising_mpl.py --jobs 2               # 7 rows x 3 seeds
    python examples/ising_mpl.py --rows supervised uda mpl_uda --seeds 0 1 --json
    python examples/ising_mpl.py --labeled-per-class 5 --spin-noise 0
    python examples/ising_mpl.py --help                 # every field is a flag
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import get_args

import torch
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
from torch import Tensor, nn

import metapl  # noqa: F401 (the scripts' tests patch metapl.MPL through this name)
from metapl.data import load_ising
from metapl.training.bounds import check_bounds
from metapl.training.cli import fail, parse

ROWS: tuple[Row, ...] = get_args(Row)


@dataclass(frozen=True)
class Ising:
    """The data split, the augmentation and the CNN."""

    test_size: float = 0.3
    labeled_per_class: int = 2
    channels: int = 16  # conv widths: channels, 2 * channels
    dropout: float = 0.2
    global_flip: bool = True  # strong augmentation: s -> -s for half of the images
    spin_noise: float = 0.002  # strong augmentation: the fraction of spins flipped at random

    def __post_init__(self):
        check_bounds(
            self,
            {
                "test_size": "in (0, 1)",
                "labeled_per_class": ">= 1",
                "channels": ">= 1",
                "dropout": "in [0, 1)",
                "spin_noise": "in [0, 1)",
            },
        )


@dataclass(frozen=True)
class Experiment:
    recipe: Recipe = field(default_factory=Recipe)
    ising: Ising = field(default_factory=Ising)
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[Row, ...] = ROWS
    data_dir: Path = Path("data/ising")
    output_dir: Path = Path("runs/ising_mpl")
    wandb_project: str = "metapl-ising"
    jobs: int = 1  # runs at a time, in worker processes (2 on a 2-core CPU)
    json: bool = False  # print only the JSON summary

    def __post_init__(self):
        check_runs(self.seeds, self.jobs)


RECIPE = Recipe(
    steps=300,
    batch_l=0,
    batch_u=128,
    lr_teacher=0.05,
    lr_student=0.05,
    warmup_steps=30,
    uda_threshold=0.8,
    ema_decay=0.9,
    eval_every=25,
)
PRESETS = {"default": Experiment(recipe=RECIPE)}

# ----------------------------------------------------------------------------- data


def load_data(d: Ising, x: Tensor, y: Tensor, seed: int) -> Data:
    """Splits of spins x [N, 1, 16, 16] and phases y [N] that depend only on ``seed``."""
    return few_label_split(x, y, d.labeled_per_class, d.test_size, seed)


def weak(x: Tensor, gen: torch.Generator) -> Tensor:
    """A periodic translation and one of the square's 8 symmetries, per image: [N, 1, L, L]
    -> same, one gather (the symmetries of a periodic lattice: they keep every bond)."""
    n, _, size, _ = x.shape
    shift = torch.randint(size, (n, 2, 1), generator=gen)
    flip, transpose = torch.rand(n, 2, 1, generator=gen) < 0.5, torch.rand(n, generator=gen) < 0.5
    at = torch.arange(size).expand(n, 2, size)
    at = (torch.where(flip, size - 1 - at, at) + shift) % size  # rows [:, 0], columns [:, 1]
    rows, cols = at[:, 0, :, None], at[:, 1, None, :]
    rows, cols = (
        torch.where(transpose[:, None, None], cols, rows),
        torch.where(transpose[:, None, None], rows, cols),
    )
    return x[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def strong(d: Ising, x: Tensor, gen: torch.Generator) -> Tensor:
    """The weak view, the global spin flip (half of the images) and spin noise."""
    x = weak(x, gen)
    n = len(x)
    if d.global_flip:
        x = x * torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
    return torch.where(torch.rand(x.shape, generator=gen) < d.spin_noise, -x, x)


def cnn(d: Ising, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c = d.channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, padding_mode="circular", bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8
        nn.Conv2d(c, 2 * c, 3, padding=1, padding_mode="circular", bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Flatten(),
        nn.Dropout(d.dropout),
        nn.Linear(32 * c, 2),
    )


def task(d: Ising) -> Task:
    return Task(partial(cnn, d), weak, partial(strong, d), lambda x: x)


# ----------------------------------------------------------------------------- main


def one_run(exp: Experiment, datasets: dict[int, Data], seed: int, row: str, bar) -> dict:
    torch.set_num_threads(1)  # small convolutions: threads cost more than they give
    config = {**asdict(exp.recipe), **asdict(exp.ising)}
    out = exp.output_dir / f"seed{seed}" / row
    return run(
        exp.recipe,
        task(exp.ising),
        datasets[seed],
        seed,
        row,
        out,
        config,
        exp.wandb_project,
        "ising",
        bar,
    )


def main(argv: list[str] | None = None) -> dict[str, dict]:
    exp = parse(Experiment, argv, presets=PRESETS, description=__doc__.splitlines()[0])
    try:
        check(exp.recipe, exp.rows, exp.ising.labeled_per_class)
        x, y, _ = load_ising(exp.data_dir)
        spins = x.float() / 127.5 - 1  # 0 / 255 -> -1 / +1
        datasets = {seed: load_data(exp.ising, spins, y, seed) for seed in exp.seeds}
    except (ValueError, FileNotFoundError) as err:
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
        f"Ising phases, {2 * exp.ising.labeled_per_class} labels, {exp.recipe.steps} steps, "
        f"seeds {list(exp.seeds)}, {seconds:.0f} s; test accuracy (%) of the (EMA) student "
        "after the last step"
    )
    record = {"config": {**asdict(exp.recipe), **asdict(exp.ising)}, "seconds": seconds}
    report(summary, title, exp.json, record, exp.output_dir)
    return summary


if __name__ == "__main__":
    main()
