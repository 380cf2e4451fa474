"""Learned optimizer hyperparameters by hypergradient descent on sklearn's digits, with metapl.

The meta parameters are an optimizer's hyperparameters in an unconstrained space: SGD's
learning rate and momentum (``log_lr``, ``logit_momentum``), Adam's learning rate and beta1
(``log_lr``, ``logit_beta1``), AdamW's learning rate and weight decay (``log_lr``,
``log_weight_decay``). One meta-iteration trains a small MLP (64-64-10) for K steps of
minibatch training from a fresh random init with a fresh batch order (``--init same`` keeps
one init), then takes ``metapl.meta_grad`` of the validation loss after those K steps with
respect to the hyperparameters, through all K steps (``method="exact"``; the optimizer is a
function of the meta parameters, each step sees its own minibatch through ``inner_batches``)
and updates them with Adam (its learning rate decaying exponentially from ``meta_lr`` to
``meta_lr_end``). This is hypergradient descent on the finite-horizon objective "validation loss
after K steps" (Maclaurin et al. 2015; Franceschi et al. 2017).

Baseline: a grid over the same two hyperparameters at the same K. Every grid point, the initial
and the learned hyperparameters are scored the same way: the mean over ``eval_runs`` runs (each
its own init and batch order, none of them seen by the meta-iterations) of the validation loss
after K steps; test accuracy is reported for the same runs. One extra row learns SGD's
hyperparameters through K=100 steps with ``truncate=20`` (backpropagation through the last 20
steps only) next to the same row untruncated: the truncated hypergradient is cheaper and biased.

Data: 1797 digits split into 997 train / 300 validation / 500 test (``--seed`` picks the
split and every init and batch order).

Tables and reading: docs/examples_meta.md.

    python examples/hyperparameters.py                    # table + figure
    python examples/hyperparameters.py --preset smoke     # seconds
    python examples/hyperparameters.py --optimizers adam --steps 100 --json
    python examples/hyperparameters.py --help             # every field is a flag

The seconds per truncated and full hypergradient: benchmarks/truncation.py.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from _mlp_digits import Data, Params, forward, generator, init_mlp, load_data
from torch import Tensor
from torch.func import grad
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.training.cli import parse

Optimizer = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    steps: int = 50  # inner training steps K
    batch_size: int = 64  # minibatch of every inner step
    hidden: int = 64  # MLP 64-hidden-10
    meta_iters: int = 40  # hypergradient steps per row
    meta_lr: float = 0.3  # Adam on the unconstrained values
    meta_lr_end: float = 0.05  # the meta lr decays exponentially to this
    init: Literal["fresh", "same"] = "fresh"  # each meta-iteration's inner init: new or one
    eval_runs: int = 5  # runs scoring each hyperparameter
    grid_lr: int = 7  # learning rates in the grid (log-spaced)
    optimizers: tuple[Optimizer, ...] = OPTIMIZERS  # rows to run
    long_steps: int = 100  # K of the truncation rows (0: none)
    truncate: int = 20  # steps the truncated row backpropagates through

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden", "eval_runs", "grid_lr", "truncate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.meta_iters < 0 or self.long_steps < 0:
            raise ValueError("meta_iters and long_steps must be >= 0")
        if min(self.meta_lr, self.meta_lr_end) <= 0:
            raise ValueError(
                f"meta_lr and meta_lr_end must be > 0, got {self.meta_lr}, {self.meta_lr_end}"
            )
        if self.long_steps and self.truncate >= self.long_steps:
            raise ValueError(f"truncate ({self.truncate}) must be < long_steps ({self.long_steps})")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError("optimizers lists an optimizer twice")


@dataclass(frozen=True)
class Experiment:
    config: Config = field(default_factory=Config)
    seed: int = 0  # data split, inits and batch orders
    output_dir: Path = Path("runs/hyperparameters")  # results.json and the figure
    json: bool = False  # print only the JSON summary


PRESETS = {
    "fast": Experiment(),
    "smoke": Experiment(
        config=Config(
            steps=4,
            batch_size=16,
            hidden=16,
            meta_iters=2,
            eval_runs=1,
            grid_lr=2,
            long_steps=6,
            truncate=2,
        )
    ),
}

# ----------------------------------------------------------------------------- hyperparameters


class Space(NamedTuple):
    """Two hyperparameters of one optimizer, each stored unconstrained in the meta dict."""

    keys: tuple[str, str]  # the meta parameters, e.g. ("log_lr", "logit_momentum")
    names: tuple[str, str]  # what they are, e.g. ("lr", "momentum")
    to_value: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]
    to_meta: tuple[Callable[[float], float], Callable[[float], float]]
    initial: tuple[float, float]  # deliberately poor starting values
    grid: tuple[tuple[float, float], tuple[float, ...]]  # lr range (log-spaced), second values
    make: Callable[[Tensor | float, Tensor | float], optim.Optimizer]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


_LOG = {"to_value": torch.exp, "to_meta": math.log}
_LOGIT = {"to_value": torch.sigmoid, "to_meta": _logit}


def _space(keys, names, transforms, initial, grid, make) -> Space:
    return Space(
        keys,
        names,
        tuple(t["to_value"] for t in transforms),
        tuple(t["to_meta"] for t in transforms),
        initial,
        grid,
        make,
    )


SPACES = {
    "sgd": _space(
        keys=("log_lr", "logit_momentum"),
        names=("lr", "momentum"),
        transforms=(_LOG, _LOGIT),
        initial=(0.01, 0.5),
        grid=((3e-3, 3.0), (0.0, 0.5, 0.9, 0.95)),
        make=lambda lr, momentum: optim.sgd(lr, momentum=momentum),
    ),
    "adam": _space(
        keys=("log_lr", "logit_beta1"),
        names=("lr", "beta1"),
        transforms=(_LOG, _LOGIT),
        initial=(3e-4, 0.5),
        grid=((1e-4, 1e-1), (0.0, 0.5, 0.9, 0.95)),
        make=lambda lr, beta1: optim.adam(lr, betas=(beta1, 0.999)),
    ),
    "adamw": _space(
        keys=("log_lr", "log_weight_decay"),
        names=("lr", "weight_decay"),
        transforms=(_LOG, _LOG),
        initial=(1e-3, 1e-2),
        grid=((1e-4, 1e-1), (1e-2, 0.1, 1.0, 10.0)),
        make=lambda lr, weight_decay: optim.adamw(lr, weight_decay=weight_decay),
    ),
}


def optimizer_of(name: str) -> Callable[[Params], optim.Optimizer]:
    """``meta -> optimizer``: the optimizer whose hyperparameters are functions of ``meta``."""
    space = SPACES[name]

    def make(meta: Params) -> optim.Optimizer:
        first, second = (f(meta[k]) for f, k in zip(space.to_value, space.keys, strict=True))
        return space.make(first, second)

    return make


def meta_of(name: str, values: tuple[float, float], dtype=torch.float32) -> Params:
    """The meta dict (unconstrained) of hyperparameter ``values``."""
    space = SPACES[name]
    return {
        k: torch.tensor(inv(v), dtype=dtype)
        for k, inv, v in zip(space.keys, space.to_meta, values, strict=True)
    }


def values_of(name: str, meta: Params) -> tuple[float, float]:
    space = SPACES[name]
    pairs = zip(space.to_value, space.keys, strict=True)
    return tuple(float(f(meta[k].detach())) for f, k in pairs)


# ----------------------------------------------------------------------------- data and model


def batches(data: Data, gen: torch.Generator, steps: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with leading dimension K: step k trains on slice k."""
    idx = torch.randint(len(data.y_train), (steps, batch_size), generator=gen)
    return data.x_train[idx], data.y_train[idx]


def inner_loss(student: Params, meta: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(forward(student, x), y)


# ----------------------------------------------------------------------------- hypergradient


def hypergradient(
    name: str,
    meta: Params,
    start: Params,
    inner_batches: tuple[Tensor, Tensor],
    x_val: Tensor,
    y_val: Tensor,
    truncate: int | None = None,
) -> metapl.MetaGradResult:
    """d val_loss(s_K) / d meta: ``s_0 = start``, K steps of ``optimizer_of(name)(meta)`` on
    the K minibatches; ``res.outer_loss`` is the validation loss after them."""

    def outer_loss(student: Params) -> Tensor:
        return F.cross_entropy(forward(student, x_val), y_val)

    steps = len(inner_batches[1])
    return metapl.meta_grad(
        inner_loss,
        outer_loss,
        start,
        meta,
        optimizer_of(name),
        steps=steps,
        inner_batches=inner_batches,
        truncate=truncate,
    )


def learn(
    name: str, cfg: Config, data: Data, seed: int, steps: int, truncate: int | None, bar: tqdm
) -> dict:
    """Hypergradient descent from the initial hyperparameters; the trajectory of values and of
    each meta-iteration's validation loss, and the seconds per meta-iteration."""
    meta = meta_of(name, SPACES[name].initial)
    decay = (cfg.meta_lr_end / cfg.meta_lr) ** (1 / max(cfg.meta_iters - 1, 1))
    meta_opt = optim.adam(lambda step: cfg.meta_lr * decay**step)
    state = meta_opt.init(meta)
    trajectory, losses = [values_of(name, meta)], []
    start = time.perf_counter()
    for i in range(cfg.meta_iters):
        gen = generator(seed, 1, i)
        init = init_mlp(generator(seed, 3, 0) if cfg.init == "same" else gen, cfg.hidden)
        inner_batches = batches(data, gen, steps, cfg.batch_size)
        res = hypergradient(name, meta, init, inner_batches, data.x_val, data.y_val, truncate)
        meta, state = meta_opt.step(meta, res.meta_grads, state)
        trajectory.append(values_of(name, meta))
        losses.append(float(res.outer_loss))
        bar.update()
    seconds = (time.perf_counter() - start) / max(cfg.meta_iters, 1)
    return {"trajectory": trajectory, "meta_losses": losses, "seconds_per_iter": seconds}


# ----------------------------------------------------------------------------- scoring


def train(opt: optim.Optimizer, start: Params, inner_batches: tuple[Tensor, Tensor]) -> Params:
    """K plain (non-meta) steps: what a hyperparameter setting does, for scoring."""
    params, state = start, opt.init(start)
    loss_grad = grad(inner_loss)
    for k in range(len(inner_batches[1])):
        batch = (inner_batches[0][k], inner_batches[1][k])
        params, state = opt.step(params, loss_grad(params, {}, batch), state)
    return params


def score(
    name: str, values: tuple[float, float], cfg: Config, data: Data, seed: int, steps: int
) -> dict[str, float]:
    """Mean validation loss and test accuracy over ``eval_runs`` held-out runs."""
    opt = SPACES[name].make(*values)
    val_losses, test_accs = [], []
    for r in range(cfg.eval_runs):
        gen = generator(seed, 2, r)
        params = train(opt, init_mlp(gen, cfg.hidden), batches(data, gen, steps, cfg.batch_size))
        with torch.no_grad():
            val_loss = F.cross_entropy(forward(params, data.x_val), data.y_val).item()
            test_acc = (forward(params, data.x_test).argmax(-1) == data.y_test).float().mean()
        # A diverged run (NaN or inf) scores as infinitely bad, never as the best.
        val_losses.append(val_loss if math.isfinite(val_loss) else math.inf)
        test_accs.append(test_acc.item())
    return {"val_loss": float(np.mean(val_losses)), "test_acc": float(np.mean(test_accs))}


def grid_points(name: str, cfg: Config) -> list[tuple[float, float]]:
    (lo, hi), others = SPACES[name].grid
    lrs = np.geomspace(lo, hi, cfg.grid_lr)
    return [(float(lr), float(v)) for lr in lrs for v in others]


def grid_search(
    name: str, cfg: Config, data: Data, seed: int, steps: int, bar: tqdm
) -> dict[str, object]:
    start, best, scores = time.perf_counter(), None, []
    for point in grid_points(name, cfg):
        result = score(name, point, cfg, data, seed, steps)
        scores.append({"values": point, **result})
        if best is None or result["val_loss"] < best["val_loss"]:
            best = scores[-1]
        bar.update()
    return {"best": best, "points": scores, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- rows


def rows_of(cfg: Config) -> list[tuple[str, str, int, int | None]]:
    """``(row, optimizer, K, truncate)``."""
    rows = [(name, name, cfg.steps, None) for name in cfg.optimizers]
    if cfg.long_steps:
        rows += [
            ("sgd_long", "sgd", cfg.long_steps, None),
            ("sgd_truncated", "sgd", cfg.long_steps, cfg.truncate),
        ]
    return rows


def run_row(
    name: str,
    cfg: Config,
    data: Data,
    seed: int,
    steps: int,
    truncate: int | None,
    grid: dict | None,
    bar: tqdm,
) -> dict:
    learned = learn(name, cfg, data, seed, steps, truncate, bar)
    if grid is None:
        grid = grid_search(name, cfg, data, seed, steps, bar)
    initial = SPACES[name].initial
    final = learned["trajectory"][-1]
    return {
        "optimizer": name,
        "steps": steps,
        "truncate": truncate,
        "names": list(SPACES[name].names),
        "initial": {"values": list(initial), **score(name, initial, cfg, data, seed, steps)},
        "learned": {"values": list(final), **score(name, final, cfg, data, seed, steps)},
        "grid": {
            "values": list(grid["best"]["values"]),
            "val_loss": grid["best"]["val_loss"],
            "test_acc": grid["best"]["test_acc"],
            "points": len(grid["points"]),
            "scores": grid["points"],
            "seconds": grid["seconds"],
        },
        "trajectory": [list(v) for v in learned["trajectory"]],
        "meta_losses": learned["meta_losses"],
        "seconds_per_iter": learned["seconds_per_iter"],
        "_grid": grid,
    }


# ----------------------------------------------------------------------------- figure


def plot(results: dict[str, dict], path: Path) -> None:
    """Per optimizer: both hyperparameters and the meta-iteration's validation loss against
    the meta-iteration, the grid optimum dashed; the K=100 rows (full and truncated) drawn in
    SGD's column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[r] for r in results if r in OPTIMIZERS]
    long = [r for r in ("sgd_long", "sgd_truncated") if r in results]
    if long and ["sgd"] in groups:
        groups[groups.index(["sgd"])] += long
    elif long:
        groups.append(long)
    fig, axes = plt.subplots(3, len(groups), figsize=(3.6 * len(groups), 7.2), squeeze=False)
    colors = ("tab:blue", "tab:green", "tab:red")
    for col, group in enumerate(groups):
        for r, color in zip(group, colors, strict=False):
            res = results[r]
            label = f"K={res['steps']}" + (f" T={res['truncate']}" if res["truncate"] else "")
            traj = np.array(res["trajectory"])
            for i in range(2):
                axes[i, col].plot(traj[:, i], color=color, label=label)
                axes[i, col].axhline(res["grid"]["values"][i], color=color, ls="--", lw=1)
            losses = res["meta_losses"]
            axes[2, col].plot(np.arange(1, len(losses) + 1), losses, color=color, alpha=0.8)
        row = group[0]
        for i, name in enumerate(res["names"]):
            axes[i, col].set_ylabel(name)
            if name in ("lr", "weight_decay"):
                axes[i, col].set_yscale("log")
        axes[0, col].set_title(f"{row} (dashed: grid optimum)", fontsize=10)
        axes[0, col].legend(fontsize=8)
        axes[2, col].set_ylabel("val loss after K steps")
        axes[2, col].set_xlabel("meta-iteration")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def _fmt(names: list[str], values: list[float]) -> str:
    return ", ".join(f"{n} {v:.3g}" for n, v in zip(names, values, strict=True))


def print_table(cfg: Config, results: dict[str, dict], seconds: float, seed: int) -> None:
    print(
        f"\ndigits, MLP 64-{cfg.hidden}-10, batch {cfg.batch_size}, {cfg.meta_iters} "
        f"meta-iterations ({cfg.init} init), seed {seed}, {seconds:.0f} s. Val loss and test "
        f"accuracy: mean of {cfg.eval_runs} held-out runs.\n"
    )
    print(
        "| row | K | initial | learned | grid best | val loss init / learned / grid "
        "| test acc init / learned / grid | s / hypergrad | grid s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row, r in results.items():
        k = f"{r['steps']}" + (f", truncate {r['truncate']}" if r["truncate"] else "")
        print(
            f"| {row} | {k} | {_fmt(r['names'], r['initial']['values'])} "
            f"| {_fmt(r['names'], r['learned']['values'])} "
            f"| {_fmt(r['names'], r['grid']['values'])} "
            f"| {r['initial']['val_loss']:.3f} / {r['learned']['val_loss']:.3f} / "
            f"{r['grid']['val_loss']:.3f} "
            f"| {100 * r['initial']['test_acc']:.1f} / {100 * r['learned']['test_acc']:.1f} / "
            f"{100 * r['grid']['test_acc']:.1f} "
            f"| {r['seconds_per_iter']:.2f} | {r['grid']['seconds']:.0f} ({r['grid']['points']}) |"
        )


def main(argv: list[str] | None = None) -> dict:
    exp = parse(Experiment, argv, presets=PRESETS, description=__doc__.splitlines()[0])
    cfg, seed = exp.config, exp.seed
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give

    data = load_data(seed)
    rows = rows_of(cfg)
    grids: dict[tuple[str, int], dict] = {}
    n_grid = {(opt, k) for _, opt, k, _ in rows}
    total = len(rows) * cfg.meta_iters + sum(len(grid_points(o, cfg)) for o, _ in n_grid)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    with tqdm(total=total, file=sys.stderr, disable=None) as bar:
        for row, name, steps, truncate in rows:
            bar.set_description(row)
            res = run_row(name, cfg, data, seed, steps, truncate, grids.get((name, steps)), bar)
            grids[(name, steps)] = res.pop("_grid")
            results[row] = res
    seconds = time.perf_counter() - start

    exp.output_dir.mkdir(parents=True, exist_ok=True)
    figure = exp.output_dir / "hyperparameters.png"
    plot(results, figure)
    summary = {
        "config": asdict(cfg),
        "seed": seed,
        "seconds": seconds,
        "rows": results,
        "figure": str(figure),
    }
    (exp.output_dir / "results.json").write_text(json.dumps(summary, indent=1))
    if exp.json:
        print(json.dumps(summary))
    else:
        print_table(cfg, results, seconds, seed)
        print(f"\nfigure: {figure}; results: {exp.output_dir / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
