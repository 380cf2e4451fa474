"""Dataset distillation (Wang et al. 2018) on sklearn's 8x8 digits, with metapl.

The meta parameters are ``per_class`` synthetic 8x8 images per class (fixed labels) and the
inner learning rate (as ``log_lr``). One meta-iteration draws ``inits_per_iter`` fresh random
MLPs (64-64-10, initialised like ``nn.Linear``), trains each for K steps of plain SGD on the
synthetic images alone (all of them every step), and takes ``metapl.meta_grad`` of the
cross-entropy on a batch of real training images after those K steps with respect to the
images and the learning rate. The inits are batched with ``torch.func.vmap`` over
``meta_grad``; their gradients are averaged and Adam (its learning rate decaying exponentially
from ``meta_lr`` to ``meta_lr_end``) updates the images and ``log_lr``. The init is drawn
afresh every meta-iteration (Wang et al.'s "random init" setting), so the images have to teach
any network from the init distribution, not one particular network.

Evaluation on ``eval_runs`` fresh inits never seen in training (test accuracy, mean ± std):

==============  ==============================================================================
synthetic       K SGD steps on the synthetic images with the learned learning rate
real            K SGD steps on ``per_class`` random real training images per class (a new draw
                per run), the learning rate picked from a grid by validation accuracy
real_learned    the same real images with the synthetic images' learned learning rate
full            ``full_steps`` minibatch SGD-momentum steps on the whole training set
==============  ==============================================================================

Data: 1797 digits split into 997 train / 300 validation / 500 test (``--seed`` picks the split,
the initial images and every init and batch).

Results and reading: docs/examples_meta.md.

    python examples/distill.py                    # table + figure of the images
    python examples/distill.py --per-class 3      # 30 images
    python examples/distill.py --preset smoke --json
    python examples/distill.py --help             # every field is a flag
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _mlp_digits import Data, Params, forward, generator, init_mlp, load_data
from torch import Tensor
from torch.func import grad, vmap
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.training.cli import parse

ROWS = ("synthetic", "real", "real_learned", "full")

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    per_class: int = 1  # synthetic images per class
    steps: int = 20  # inner SGD steps K on the images
    hidden: int = 64  # MLP 64-hidden-10
    meta_iters: int = 300  # meta-iterations
    inits_per_iter: int = 4  # fresh inits per meta-iteration
    meta_lr: float = 0.05  # Adam on images and log_lr
    meta_lr_end: float = 0.005  # the meta lr decays exponentially to this
    initial_lr: float = 0.02  # inner lr before learning
    real_batch: int = 256  # real images in the outer loss
    eval_runs: int = 20  # fresh inits scoring every row
    full_steps: int = 300  # steps of the full-set row

    def __post_init__(self):
        for name, value in asdict(self).items():
            low = 0 if name == "meta_iters" else 1
            if isinstance(value, int) and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
            if isinstance(value, float) and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class Experiment:
    config: Config = field(default_factory=Config)
    seed: int = 0  # data split, initial images, inits, draws
    output_dir: Path = Path("runs/distill")  # results.json, distilled.pt and the figure
    json: bool = False  # print only the JSON summary


PRESETS = {
    "fast": Experiment(),
    "smoke": Experiment(
        config=Config(
            steps=3,
            hidden=16,
            meta_iters=3,
            inits_per_iter=2,
            real_batch=32,
            eval_runs=2,
            full_steps=5,
        )
    ),
}
REAL_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # the real-image baseline's grid
FULL_BATCH, FULL_LR, FULL_MOMENTUM = 64, 0.1, 0.9

# ----------------------------------------------------------------------------- data and model


def synthetic_labels(per_class: int) -> Tensor:
    """``0, 1, ..., 9, 0, 1, ...``: image ``i`` belongs to class ``i % 10``."""
    return torch.arange(10).repeat(per_class)


def initial_meta(cfg: Config, seed: int, dtype=torch.float32) -> Params:
    """Uniform noise images in [0, 1] and the initial inner learning rate."""
    images = torch.rand(10 * cfg.per_class, 64, generator=generator(seed, 0, 0)).to(dtype)
    return {"images": images, "log_lr": torch.tensor(math.log(cfg.initial_lr), dtype=dtype)}


def accuracy(params: Params, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (forward(params, x).argmax(-1) == y).float().mean().item()


# ----------------------------------------------------------------------------- distillation


def hypergradient(
    meta: Params, start: Params, labels: Tensor, x_real: Tensor, y_real: Tensor, steps: int
) -> metapl.MetaGradResult:
    """d real_loss(s_K) / d (images, log_lr): ``s_0 = start``, K SGD steps with lr
    ``exp(log_lr)`` on the cross-entropy of the synthetic images with their fixed labels."""

    def inner_loss(student: Params, m: Params) -> Tensor:
        return F.cross_entropy(forward(student, m["images"]), labels)

    def outer_loss(student: Params) -> Tensor:
        return F.cross_entropy(forward(student, x_real), y_real)

    def optimizer(m: Params) -> optim.Optimizer:
        return optim.sgd(m["log_lr"].exp())

    return metapl.meta_grad(inner_loss, outer_loss, start, meta, optimizer, steps=steps)


def batched_hypergradient(
    meta: Params, starts: Params, labels: Tensor, x_real: Tensor, y_real: Tensor, steps: int
) -> tuple[Params, Tensor]:
    """The hypergradient averaged over a batch of inits (``starts``: leading dim = inits),
    one ``vmap`` over ``meta_grad``; also the mean outer loss."""

    def one(start: Params) -> tuple[Params, Tensor]:
        res = hypergradient(meta, start, labels, x_real, y_real, steps)
        return res.meta_grads, res.outer_loss

    grads, losses = vmap(one)(starts)
    return {k: g.mean(0) for k, g in grads.items()}, losses.mean()


def stacked_inits(gen: torch.Generator, n: int, hidden: int) -> Params:
    inits = [init_mlp(gen, hidden) for _ in range(n)]
    return {k: torch.stack([p[k] for p in inits]) for k in inits[0]}


def distill(
    cfg: Config, data: Data, seed: int, bar: tqdm
) -> tuple[Params, list[float], list[float]]:
    """Learn the images and the lr; returns them, each meta-iteration's real loss and the
    learning rate after each meta-iteration."""
    meta = initial_meta(cfg, seed)
    labels = synthetic_labels(cfg.per_class)
    decay = (cfg.meta_lr_end / cfg.meta_lr) ** (1 / max(cfg.meta_iters - 1, 1))
    meta_opt = optim.adam(lambda step: cfg.meta_lr * decay**step)  # exponential decay
    state = meta_opt.init(meta)
    losses, lrs = [], []
    for i in range(cfg.meta_iters):
        gen = generator(seed, 1, i)
        starts = stacked_inits(gen, cfg.inits_per_iter, cfg.hidden)
        idx = torch.randint(len(data.y_train), (cfg.real_batch,), generator=gen)
        grads, loss = batched_hypergradient(
            meta, starts, labels, data.x_train[idx], data.y_train[idx], cfg.steps
        )
        meta, state = meta_opt.step(meta, grads, state)
        losses.append(loss.item())
        lrs.append(float(meta["log_lr"].exp()))
        bar.update()
    return meta, losses, lrs


# ----------------------------------------------------------------------------- evaluation


def train_on(x: Tensor, y: Tensor, lr: float, start: Params, steps: int) -> Params:
    """``steps`` plain SGD steps on all of ``(x, y)`` every step (what the images are for)."""
    opt = optim.sgd(lr)
    params, state = start, opt.init(start)
    loss_grad = grad(lambda p: F.cross_entropy(forward(p, x), y))
    for _ in range(steps):
        params, state = opt.step(params, loss_grad(params), state)
    return params


def train_full(data: Data, start: Params, gen: torch.Generator, steps: int) -> Params:
    """The reference: minibatch SGD with momentum on the whole training set."""
    opt = optim.sgd(FULL_LR, momentum=FULL_MOMENTUM)
    params, state = start, opt.init(start)
    loss_grad = grad(lambda p, x, y: F.cross_entropy(forward(p, x), y))
    for _ in range(steps):
        idx = torch.randint(len(data.y_train), (FULL_BATCH,), generator=gen)
        params, state = opt.step(
            params, loss_grad(params, data.x_train[idx], data.y_train[idx]), state
        )
    return params


def real_subset(data: Data, gen: torch.Generator, per_class: int) -> tuple[Tensor, Tensor]:
    """``per_class`` random training images of every class, ordered like the synthetic ones."""
    picks = [
        torch.nonzero(data.y_train == c).flatten()[
            torch.randperm(int((data.y_train == c).sum()), generator=gen)[:per_class]
        ]
        for c in range(10)
    ]
    idx = torch.stack(picks, 1).flatten()  # (per_class, 10) -> class-cyclic like the labels
    return data.x_train[idx], data.y_train[idx]


def evaluate(cfg: Config, data: Data, seed: int, meta: Params, bar: tqdm) -> dict[str, dict]:
    """Test accuracy of every row over ``eval_runs`` fresh inits (mean, std, per run)."""
    lr = float(meta["log_lr"].exp())
    images, labels = meta["images"].detach(), synthetic_labels(cfg.per_class)
    accs: dict[str, list[float]] = {row: [] for row in ROWS}
    real_val: dict[float, list[float]] = {r: [] for r in REAL_LRS}
    real_test: dict[float, list[float]] = {r: [] for r in REAL_LRS}
    for r in range(cfg.eval_runs):
        gen = generator(seed, 2, r)
        start = init_mlp(gen, cfg.hidden)
        accs["synthetic"].append(
            accuracy(train_on(images, labels, lr, start, cfg.steps), data.x_test, data.y_test)
        )
        x_real, y_real = real_subset(data, gen, cfg.per_class)
        trained = train_on(x_real, y_real, lr, start, cfg.steps)
        accs["real_learned"].append(accuracy(trained, data.x_test, data.y_test))
        for real_lr in REAL_LRS:
            trained = train_on(x_real, y_real, real_lr, start, cfg.steps)
            real_val[real_lr].append(accuracy(trained, data.x_val, data.y_val))
            real_test[real_lr].append(accuracy(trained, data.x_test, data.y_test))
        full = train_full(data, start, gen, cfg.full_steps)
        accs["full"].append(accuracy(full, data.x_test, data.y_test))
        bar.update()
    best_lr = max(REAL_LRS, key=lambda r: float(np.mean(real_val[r])))
    accs["real"] = real_test[best_lr]
    summary = {
        row: {
            "mean": float(np.mean(a)),
            "std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
            "runs": a,
        }
        for row, a in accs.items()
    }
    summary["real"]["lr"] = best_lr
    summary["synthetic"]["lr"] = summary["real_learned"]["lr"] = lr
    summary["full"]["lr"] = FULL_LR
    return summary


# ----------------------------------------------------------------------------- figure


def plot(meta: Params, data: Data, per_class: int, lr: float, path: Path) -> None:
    """The synthetic images (one row per image of each class) above the class means of the
    real training images, for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = meta["images"].detach().reshape(per_class, 10, 8, 8).numpy()
    means = np.stack(
        [data.x_train[data.y_train == c].mean(0).reshape(8, 8).numpy() for c in range(10)]
    )
    fig, axes = plt.subplots(
        per_class + 1, 10, figsize=(10, 1.15 * (per_class + 1) + 0.4), squeeze=False
    )
    for row in range(per_class + 1):
        for c in range(10):
            ax = axes[row, c]
            img = images[row, c] if row < per_class else means[c]
            ax.imshow(img, cmap="gray_r", vmin=min(0.0, img.min()), vmax=max(1.0, img.max()))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(str(c))
        axes[row, 0].set_ylabel("synthetic" if row < per_class else "real mean", fontsize=8)
    fig.suptitle(f"{10 * per_class} distilled digits (learned lr {lr:.3g})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse(Experiment, argv, presets=PRESETS, description=__doc__.splitlines()[0])
    cfg = args.config
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give

    data = load_data(args.seed)
    start = time.perf_counter()
    with tqdm(total=cfg.meta_iters + cfg.eval_runs, file=sys.stderr, disable=None) as bar:
        bar.set_description("distill")
        meta, losses, lrs = distill(cfg, data, args.seed, bar)
        distill_seconds = time.perf_counter() - start
        bar.set_description("evaluate")
        rows = evaluate(cfg, data, args.seed, meta, bar)
    seconds = time.perf_counter() - start
    lr = float(meta["log_lr"].exp())

    args.output_dir.mkdir(parents=True, exist_ok=True)
    figure = args.output_dir / "distill.png"
    plot(meta, data, cfg.per_class, lr, figure)
    torch.save({k: v.detach() for k, v in meta.items()}, args.output_dir / "distilled.pt")
    summary = {
        "config": asdict(cfg),
        "seed": args.seed,
        "learned_lr": lr,
        "rows": rows,
        "meta_losses": losses,
        "lr_trajectory": lrs,
        "seconds": seconds,
        "seconds_per_iter": distill_seconds / max(cfg.meta_iters, 1),
        "figure": str(figure),
    }
    (args.output_dir / "results.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        n = 10 * cfg.per_class
        print(
            f"\ndigits distilled to {n} images, MLP 64-{cfg.hidden}-10, K={cfg.steps} SGD steps, "
            f"{cfg.meta_iters} meta-iterations x {cfg.inits_per_iter} fresh inits, seed "
            f"{args.seed}, {seconds:.0f} s ({summary['seconds_per_iter']:.2f} s / meta-iteration)"
            f". Test accuracy over {cfg.eval_runs} fresh inits, mean ± std.\n"
        )
        what = {
            "synthetic": f"{n} synthetic images, K={cfg.steps}",
            "real": f"{n} real images, K={cfg.steps}, lr tuned on val",
            "real_learned": f"{n} real images, K={cfg.steps}, the learned lr",
            "full": f"all {len(data.y_train)} training images, {cfg.full_steps} steps (momentum)",
        }
        print("| row | trained on | lr | test accuracy (%) |")
        print("|---|---|---|---|")
        for row, r in rows.items():
            print(
                f"| {row} | {what[row]} | {r['lr']:.3g} "
                f"| {100 * r['mean']:.1f} ± {100 * r['std']:.1f} |"
            )
        print(f"\nfigure: {figure}; results: {args.output_dir / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
