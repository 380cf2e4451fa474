"""Meta Pseudo Labels on two moons: the toy experiment of the MPL paper (Pham et al., Figure 1).

1000 points per class from sklearn's ``make_moons``, only 3 of them labeled per class (picked
with the seed), the rest unlabeled, and a held-out test set of another 1000 points. Small MLPs
(2-64-64-2). Each row trains from scratch and reports the test accuracy of the model that
would be deployed:

==============  ==============================================================================
supervised      one MLP trained on the 6 labeled points only
pseudo_label    teacher on the labels; student on the teacher's soft labels (no MPL term)
mpl             MPL alone: exact meta-gradient, soft labels; the student is reported
uda             UDA teacher (labels + noise consistency); student on its labels (no MPL term)
mpl_uda         exact MPL + UDA teacher: the paper's full recipe; the student is reported
==============  ==============================================================================

UDA's "strong view" of a 2-D point is the point plus Gaussian noise (std 0.1). The students
never see a label: everything they know comes from the teacher's pseudo labels. The figure
(one panel per row, with a legend) shows the labeled points as stars, the unlabeled points
as dots coloured by their true class, which no model sees, and as background the reported
model's probability of moon 1 with its decision boundary.

Results and reading: docs/mpl.md (two moons).

    python examples/two_moons.py                    # one seed, table + figure
    python examples/two_moons.py --seed 3 --json    # {"supervised": acc, ...}
    python examples/two_moons.py --preset small     # half the steps
    python examples/two_moons.py --help             # every field of Config is a flag
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from sklearn.datasets import make_moons
from torch import Tensor, nn
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.training.bounds import check_bounds
from metapl.training.cli import parse

# ----------------------------------------------------------------------------- config

MetaGrad = Literal["exact", "finite_difference", "first_order"]


@dataclass(frozen=True)
class Config:
    n_per_class: int = 1000  # training points per moon (labeled + unlabeled)
    noise: float = 0.1  # make_moons noise
    labeled_per_class: int = 3
    n_test: int = 1000  # held-out test points (both moons together)
    hidden: int = 64  # MLP 2-hidden-hidden-2
    steps: int = 2000  # training steps of every row
    batch_u: int = 256  # unlabeled points per step
    lr_teacher: float = 0.01  # Adam
    lr_student: float = 0.1  # SGD with momentum 0.9 (the lookahead MPL differentiates)
    temperature: float = 1.0  # of the pseudo labels
    meta_grad: MetaGrad = "exact"  # of the MPL rows; "first_order" samples hard pseudo labels
    strong_noise: float = 0.1  # std of the Gaussian noise that makes UDA's strong view
    uda_weight: float = 1.0
    uda_temperature: float = 0.4
    uda_threshold: float = 0.0  # 0: consistency on every point

    def __post_init__(self):
        check_bounds(
            self,
            {
                "n_per_class": ">= 2",
                "noise": ">= 0",
                "labeled_per_class": ">= 1",
                "n_test": ">= 1",
                "hidden": ">= 1",
                "steps": ">= 1",
                "batch_u": ">= 1",
                "lr_teacher": "> 0",
                "lr_student": "> 0",
                "temperature": "> 0",
                "strong_noise": ">= 0",
                "uda_weight": ">= 0",
                "uda_temperature": "> 0",
                "uda_threshold": "in [0, 1]",
            },
        )
        if self.labeled_per_class >= self.n_per_class:
            raise ValueError(
                f"labeled_per_class ({self.labeled_per_class}) must be below n_per_class "
                f"({self.n_per_class}): the rest of each moon is the unlabeled data"
            )
        if self.meta_grad not in get_args(MetaGrad):
            raise ValueError(
                "meta_grad must be 'exact', 'finite_difference' or 'first_order', got "
                f"{self.meta_grad!r}"
            )


Row = Literal["supervised", "pseudo_label", "mpl", "uda", "mpl_uda"]
ROWS: tuple[Row, ...] = get_args(Row)


@dataclass(frozen=True)
class Experiment:
    """What one command runs: the recipe (every field a flag), the seed and the rows."""

    config: Config = field(default_factory=Config)
    seed: int = 0  # data split, labels and init
    rows: tuple[Row, ...] = ROWS
    output_dir: Path = Path("runs/two_moons")
    json: bool = False  # print only the JSON accuracies

    def __post_init__(self):
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


PRESETS = {"default": Experiment(), "small": Experiment(config=Config(steps=1000))}

# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    x_l: Tensor  # [6, 2] labeled points
    y_l: Tensor  # [6]
    x_u: Tensor  # [1994, 2] unlabeled points (their labels are never used)
    y_u: Tensor  # [1994] for plotting only
    x_test: Tensor
    y_test: Tensor


def load_data(cfg: Config, seed: int) -> Data:
    """Two moons; ``labeled_per_class`` points of each moon labeled, chosen with ``seed``."""
    x, y = make_moons(2 * cfg.n_per_class, noise=cfg.noise, random_state=seed)
    x_test, y_test = make_moons(cfg.n_test, noise=cfg.noise, random_state=10_000 + seed)
    rng = np.random.default_rng(seed)
    labeled = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), cfg.labeled_per_class, replace=False) for c in (0, 1)]
    )
    unlabeled = np.setdiff1d(np.arange(len(y)), labeled)
    f32, i64 = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a))
    return Data(
        f32(x[labeled]),
        i64(y[labeled]),
        f32(x[unlabeled]),
        i64(y[unlabeled]),
        f32(x_test),
        i64(y_test),
    )


# ----------------------------------------------------------------------------- models


def mlp(cfg: Config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, 2),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return round((model(x).argmax(-1) == y).float().mean().item(), 4)


# ----------------------------------------------------------------------------- training


def train_supervised(cfg: Config, data: Data, seed: int, bar: tqdm) -> nn.Module:
    """The baseline: the teacher's architecture and optimizer on the 6 labels only."""
    model = mlp(cfg, seed)

    def batches():
        for _ in range(cfg.steps):
            yield data.x_l, data.y_l
            bar.update()

    metapl.finetune(model, batches(), optim.adam(cfg.lr_teacher))
    return model


def train_mpl(cfg: Config, data: Data, seed: int, row: str, bar: tqdm) -> nn.Module:
    """Teacher + student; ``row`` picks the MPL term (exact or none) and UDA (on or off)."""
    use_mpl, use_uda = row in ("mpl", "mpl_uda"), row in ("uda", "mpl_uda")
    uda = None
    if use_uda:
        uda = metapl.UDA(cfg.uda_weight, cfg.uda_temperature, cfg.uda_threshold)
    mpl = metapl.MPL(
        mlp(cfg, seed),
        mlp(cfg, seed + 1),
        optim.adam(cfg.lr_teacher),
        optim.sgd(cfg.lr_student, momentum=0.9),
        meta_grad=cfg.meta_grad if use_mpl else None,
        uda=uda,
        temperature=cfg.temperature,
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.steps):
        idx = torch.randint(len(data.x_u), (cfg.batch_u,), generator=gen)
        x_u = data.x_u[idx]
        x_strong = x_u + cfg.strong_noise * torch.randn(x_u.shape, generator=gen)
        metrics = mpl.step(data.x_l, data.y_l, x_u, x_strong if use_uda else None)
        bar.update()
    bar.set_postfix(teacher_loss=f"{metrics['teacher/loss']:.3f}")
    return mpl.student


def run_row(cfg: Config, data: Data, seed: int, row: str, bar: tqdm) -> nn.Module:
    bar.set_description(f"seed {seed} {row}")
    if row == "supervised":
        return train_supervised(cfg, data, seed, bar)
    return train_mpl(cfg, data, seed, row, bar)


# ----------------------------------------------------------------------------- figure


def plot(models: dict[str, nn.Module], accs: dict[str, float], data: Data, path: Path) -> None:
    """One panel per row: the model's probability of the blue moon (background) and decision
    boundary, the unlabeled points coloured by their hidden true moon, the 6 labels (stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    xs, ys = np.meshgrid(np.linspace(-1.6, 2.6, 200), np.linspace(-1.1, 1.6, 150))
    grid = torch.tensor(np.stack([xs.ravel(), ys.ravel()], 1), dtype=torch.float32)
    colors = np.array(["tab:red", "tab:blue"])
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.4), squeeze=False)
    for ax, (row, model) in zip(axes[0], models.items(), strict=True):
        model.eval()
        with torch.no_grad():
            p1 = torch.softmax(model(grid), -1)[:, 1].reshape(xs.shape).numpy()
        shading = ax.contourf(xs, ys, p1, levels=np.linspace(0, 1, 11), cmap="RdBu", alpha=0.6)
        ax.contour(xs, ys, p1, levels=[0.5], colors="k", linewidths=1)
        ax.scatter(*data.x_u.T, c=colors[data.y_u], s=2, alpha=0.25)
        ax.scatter(
            *data.x_l.T,
            c=colors[data.y_l],
            s=160,
            marker="*",
            edgecolors="k",
            linewidths=1.0,
            zorder=3,
        )
        ax.set_title(f"{row}: {100 * accs[row]:.1f}%", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    star = {"marker": "*", "markersize": 12, "markeredgecolor": "k", "linestyle": ""}
    dot = {"marker": "o", "markersize": 4, "alpha": 0.6, "linestyle": ""}
    handles = [
        Line2D([], [], color="tab:red", **star),
        Line2D([], [], color="tab:blue", **star),
        Line2D([], [], color="tab:red", **dot),
        Line2D([], [], color="tab:blue", **dot),
        Line2D([], [], color="k", linewidth=1),
    ]
    labels = [
        "labeled, moon 0",
        "labeled, moon 1",
        "unlabeled (hidden truth: moon 0)",
        "unlabeled (hidden truth: moon 1)",
        "decision boundary",
    ]
    fig.tight_layout(rect=(0, 0.12, 0.93, 1))
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=5,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.47, 0.02),
    )
    bar = fig.colorbar(shading, cax=fig.add_axes((0.94, 0.3, 0.012, 0.55)))
    bar.set_label("P(moon 1): student\n(supervised: the MLP)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    exp = parse(Experiment, argv, presets=PRESETS, description=__doc__.splitlines()[0])
    cfg, args = exp.config, exp
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give

    data = load_data(cfg, args.seed)
    models, accs = {}, {}
    start = time.perf_counter()
    with tqdm(total=len(args.rows) * cfg.steps, file=sys.stderr, disable=None) as bar:
        for row in args.rows:
            models[row] = run_row(cfg, data, args.seed, row, bar)
            accs[row] = accuracy(models[row], data.x_test, data.y_test)
    seconds = time.perf_counter() - start
    figure = args.output_dir / f"two_moons_seed{args.seed}.png"
    plot(models, accs, data, figure)

    if args.json:
        print(json.dumps(accs))
    else:
        print(
            f"\ntwo moons, {2 * cfg.labeled_per_class} labels, seed {args.seed}, "
            f"{cfg.steps} steps, {seconds:.0f} s; test accuracy\n"
        )
        print("| row          | test accuracy |")
        print("|--------------|---------------|")
        for row, acc in accs.items():
            print(f"| {row:<12} | {100 * acc:12.1f}% |")
        print(f"\nfigure: {figure}")
    return accs


if __name__ == "__main__":
    main()
