"""Meta Pseudo Labels on MNIST with 10 or 1 labels per class, on a CPU.

Data: the original MNIST IDX files (``make mnist`` writes them to data/mnist/; any folder with
the four files works, torchvision's MNIST/raw too). A seeded, balanced split
(`metapl.data.mnist_split`, saved as <output-dir>/<preset>/seed<N>/split.json): 10 (or 1)
labeled images per class, 100 validation images per class held out of training, every other
training image unlabeled. The 10k test images are evaluated once per run, at the end.

Model: a small CNN (a 5x5 stride-2 conv, a 3x3 stride-2 conv, a 3x3 conv, BatchNorm, dropout,
a linear layer on the 7x7 maps; 30k parameters) for teacher, student and the supervised
baseline. Augmentation (`metapl.data.DigitAugment`, per sample, no flips): weak = shift /
rotation / scale jitter; strong = a larger affine, elastic wobble, stroke width, contrast and
a cutout.

Rows (every one trains from scratch for the same number of steps; training loops, rows and
report are shared with examples/digits_mpl.py in examples/_digits.py). The teacher's
unsupervised loss in the rows named uda is UDA's consistency (weak view -> strong view) plus
VAT (virtual adversarial training, `metapl.VAT`, on the weak view; `--vat-weight 0` drops it);
the student learns the teacher's soft pseudo labels for the weak view (`--student-view`):

====================  =========================================================================
supervised            the CNN on the labeled images only (weak augmentation)
uda                   teacher on labels + UDA + VAT; student on its soft labels (no MPL term)
mpl                   MPL, exact meta-gradient through the student's SGD step, soft labels
mpl_first_order       MPL, the paper's first-order (score-function) estimator, hard labels
mpl_uda               exact MPL + UDA teacher: the paper's full recipe
mpl_uda_first_order   first-order MPL + UDA teacher
====================  =========================================================================

The student is reported as its EMA; model selection: the checkpoint with the best validation
accuracy (evaluated every `eval_every` steps) is the one tested. Every run logs to Weights &
Biases (offline when WANDB_API_KEY is unset; WANDB_MODE=disabled turns it off), one group per
preset and row, one run per seed, plus a metrics.jsonl in its folder; the learning curves go
to <output-dir>/<preset>/curves.png and the summary (the --json output, with the config and
the time) to summary.json beside it. Results: docs/mpl.md.

    make mnist                                               # data/mnist/, md5-checked
    python examples/mnist_mpl.py --jobs 2                    # 10 labels/class, 6 rows x 3 seeds
    python examples/mnist_mpl.py --preset 1-label --jobs 2
    python examples/mnist_mpl.py --rows uda mpl_uda --seeds 0 --json
    python examples/mnist_mpl.py --steps 300 --lr-student 0.1 # every field is a flag
    python examples/mnist_mpl.py --rows mpl_uda --mpl-labels resampled  # MPL signal's own batch
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
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
    plot_curves,
    report,
    run,
    run_all,
    summarize,
)
from torch import Tensor, nn

import metapl  # noqa: F401 (the scripts' tests patch metapl.MPL through this name)
from metapl.data import DigitAugment, load_mnist, mnist_split
from metapl.training.bounds import check_bounds
from metapl.training.cli import fail, parse

ROWS: tuple[Row, ...] = tuple(row for row in get_args(Row) if row != "pseudo_label")


@dataclass(frozen=True)
class Mnist:
    """The data split, the augmentation and the CNN."""

    labels_per_class: int = 10
    val_per_class: int = 100  # held out of training, for model selection
    channels: int = 16  # conv widths: channels, 2 * channels
    dropout: float = 0.1
    cutout: int = 8  # side of the strong view's cutout square

    def __post_init__(self):
        check_bounds(
            self,
            {
                "labels_per_class": ">= 1",
                "val_per_class": ">= 1",
                "channels": ">= 1",
                "dropout": "in [0, 1)",
                "cutout": ">= 0",
            },
        )


@dataclass(frozen=True)
class Experiment:
    recipe: Recipe = field(default_factory=Recipe)
    mnist: Mnist = field(default_factory=Mnist)
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[Row, ...] = ROWS
    data_dir: Path = Path("data/mnist")
    output_dir: Path = Path("runs/mnist_mpl")
    wandb_project: str = "metapl-mnist"
    threads: int = 1  # torch CPU threads per run
    jobs: int = 1  # runs at a time, in worker processes (2 on a 2-core CPU)
    json: bool = False  # print only the JSON summary
    name: str = "10-labels"  # the runs' folder under output_dir (the preset's name)

    def __post_init__(self):
        check_runs(self.seeds, self.jobs)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


RECIPE = Recipe(batch_l=100, vat_weight=1.0, student_view="weak")
PRESETS = {
    "10-labels": Experiment(recipe=RECIPE),
    # the recipe its table was measured with: 400 steps, UDA alone, the student on strong views
    "1-label": Experiment(
        recipe=replace(RECIPE, batch_l=50, steps=400, vat_weight=0.0, student_view="strong"),
        mnist=Mnist(labels_per_class=1),
        name="1-label",
    ),
}

# ----------------------------------------------------------------------------- data


def load_data(m: Mnist, data_dir: Path, seed: int, manifest: Path) -> Data:
    x, y = load_mnist(data_dir, train=True)
    x_test, y_test = load_mnist(data_dir, train=False)
    split, val = mnist_split(y, m.labels_per_class, m.val_per_class, seed, manifest)
    lab, unl, val = (torch.from_numpy(a) for a in (split.labeled, split.unlabeled, val))
    return Data(x[lab], y[lab], x[unl], x[val], y[val], x_test, y_test)


WEAK = DigitAugment.weak()


def weak(x: Tensor, gen: torch.Generator) -> Tensor:
    return WEAK(x, gen).float() / 255


def strong(m: Mnist, x: Tensor, gen: torch.Generator) -> Tensor:
    return DigitAugment.strong(m.cutout)(x, gen).float() / 255


def cnn(m: Mnist, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c = m.channels
    return nn.Sequential(
        nn.Conv2d(1, c, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),  # 14
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),  # 7x7
        nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(m.dropout),
        nn.Linear(2 * c * 49, 10),
    )


def task(m: Mnist) -> Task:
    return Task(partial(cnn, m), weak, partial(strong, m), lambda x: x.float() / 255)


# ----------------------------------------------------------------------------- main

_DATA: dict[tuple, Data] = {}  # per process: the data of each seed, loaded once


def folder(exp: Experiment) -> Path:
    return exp.output_dir / exp.name


def one_run(exp: Experiment, seed: int, row: str, bar) -> dict:
    """One run in this process (a worker of --jobs, or the main process)."""
    torch.set_num_threads(exp.threads)
    key = (str(exp.data_dir), exp.name, seed)
    if key not in _DATA:
        _DATA.clear()
        manifest = folder(exp) / f"seed{seed}" / "split.json"
        _DATA[key] = load_data(exp.mnist, exp.data_dir, seed, manifest)
    config = {**asdict(exp.recipe), **asdict(exp.mnist), "preset": exp.name}
    out = folder(exp) / f"seed{seed}" / row
    return run(
        exp.recipe,
        task(exp.mnist),
        _DATA[key],
        seed,
        row,
        out,
        config,
        exp.wandb_project,
        exp.name,
        bar,
    )


def main(argv: list[str] | None = None) -> dict[str, dict]:
    exp = parse(Experiment, argv, presets=PRESETS, description=__doc__.splitlines()[0])
    try:
        check(exp.recipe, exp.rows, exp.mnist.labels_per_class)
        _, y = load_mnist(exp.data_dir, train=True)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    torch.set_num_threads(exp.threads)
    for seed in exp.seeds:  # write the split manifests once, before any worker reads them
        manifest = folder(exp) / f"seed{seed}" / "split.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        mnist_split(y, exp.mnist.labels_per_class, exp.mnist.val_per_class, seed, manifest)
    runs = [(seed, row) for seed in exp.seeds for row in exp.rows]
    start = time.perf_counter()
    outcomes = run_all(runs, partial(one_run, exp), exp.jobs, exp.recipe.steps)
    seconds = time.perf_counter() - start
    results: dict[str, list[dict]] = {row: [] for row in exp.rows}
    for (_, row), outcome in zip(runs, outcomes, strict=True):
        results[row].append(outcome)
    summary = summarize(results)
    plot_curves(results, list(exp.seeds), folder(exp) / "curves.png")
    title = (
        f"MNIST {exp.name} ({10 * exp.mnist.labels_per_class} labels), "
        f"{exp.recipe.steps} steps, seeds {list(exp.seeds)}, {seconds / 60:.1f} min; test "
        "accuracy (%) at the best validation step"
    )
    record = {
        "preset": exp.name,
        "config": {**asdict(exp.recipe), **asdict(exp.mnist)},
        "seconds": round(seconds, 1),
    }
    report(summary, title, exp.json, record, folder(exp))
    return summary


if __name__ == "__main__":
    main()
