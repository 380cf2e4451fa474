"""What examples/digits_mpl.py, examples/mnist_mpl.py and examples/ising_mpl.py share: the rows,
the MPL recipe for a small CNN on few labeled images, the few-label split, the two training loops
(supervised, MPL), model selection and the report. Each script brings its data, its augmentation
and its CNN."""

from __future__ import annotations

import copy
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.mpl import MPLConfig
from metapl.training.bounds import check_bounds
from metapl.training.tracking import Tracker

Row = Literal[
    "supervised", "pseudo_label", "uda", "mpl", "mpl_first_order", "mpl_uda", "mpl_uda_first_order"
]
Augment = Callable[[Tensor, torch.Generator], Tensor]  # (uint8 or float images, gen) -> inputs


@dataclass(frozen=True)
class Recipe:
    """Teacher, student and the supervised baseline on a few labeled digits (every field is a
    flag of both scripts; each script's presets hold its values)."""

    steps: int = 1000
    batch_l: int = 0  # labeled images per step, drawn with replacement (0: all of them)
    batch_u: int = 256  # unlabeled images per step
    lr_teacher: float = 0.1  # SGD, momentum 0.9, nesterov, warm-up + cosine (both networks)
    lr_student: float = 0.1
    weight_decay: float = 5e-4
    warmup_steps: int = 50  # linear warm-up of both learning rates
    max_grad_norm: float = 1.0  # clip both networks' gradients (0: off); exact MPL needs it
    temperature: float = 1.0  # of the pseudo labels
    uda_weight: float = 1.0
    uda_temperature: float = 0.4
    uda_threshold: float = 0.6
    uda_ramp_steps: int = 0
    vat_weight: float = 0.0  # VAT beside UDA in the teacher's loss (the uda rows; 0: off)
    vat_epsilon: float = 2.0  # the adversarial perturbation's L2 length (pixels in [0, 1])
    lookahead_steps: int = 1  # student steps per MPL step on the same pseudo labels (MPL's K)
    mpl_weight: float = 1.0  # the MPL term's weight in the teacher's gradient
    # dropout in the forward that scores the updated student (the MPL signal); off: the MPL
    # rows draw the uda row's random numbers, so they differ from it only through the term
    mpl_dropout: bool = True
    log_prob_reduction: Literal["mean", "sum"] = "mean"  # first_order: the paper's 1/B, or sum
    student_bn: Literal["unlabeled", "joint"] = "unlabeled"  # the student's BatchNorm batch
    student_view: Literal["strong", "weak"] = "strong"  # the view the student learns on
    # the MPL signal's labeled batch: "same" as the teacher's, "resampled" (a draw of its own)
    # or "held_out" (from half of each class's labels, which the teacher's own loss then never
    # sees); rows without an MPL term: "same"
    mpl_labels: Literal["same", "resampled", "held_out"] = "same"
    ema_decay: float = 0.99  # of the student (and of the supervised model)
    finetune_steps: int = 0  # then train the reported student on the labels alone (0: off)
    finetune_lr: float = 0.01
    eval_every: int = 100  # validation accuracy (curves, model selection); test without one
    log_every: int = 25

    def __post_init__(self):
        check_bounds(
            self,
            {
                "steps": ">= 1",
                "batch_l": ">= 0",
                "batch_u": ">= 1",
                "lr_teacher": "> 0",
                "lr_student": "> 0",
                "weight_decay": ">= 0",
                "warmup_steps": ">= 0",
                "max_grad_norm": ">= 0",
                "temperature": "> 0",
                "uda_weight": ">= 0",
                "uda_temperature": "> 0",
                "uda_threshold": "in [0, 1]",
                "uda_ramp_steps": ">= 0",
                "vat_weight": ">= 0",
                "vat_epsilon": "> 0",
                "lookahead_steps": ">= 1",
                "mpl_weight": ">= 0",
                "ema_decay": "in [0, 1)",
                "finetune_steps": ">= 0",
                "finetune_lr": "> 0",
                "eval_every": ">= 1",
                "log_every": ">= 1",
            },
        )


class Data(NamedTuple):
    """Images (uint8 or float, [N, 1, H, W]) and labels; ``x_val`` None: no model selection,
    the last (EMA) student is the reported one."""

    x_l: Tensor
    y_l: Tensor
    x_u: Tensor  # labels never used
    x_val: Tensor | None
    y_val: Tensor | None
    x_test: Tensor
    y_test: Tensor


def few_label_split(
    x: Tensor, y: Tensor, labeled_per_class: int, test_size: float, seed: int
) -> Data:
    """Images x [N, 1, H, W] and classes y [N] (0 .. C-1) -> a stratified test split
    (``test_size`` of each class), ``labeled_per_class`` labeled training images of each class
    and the other training images unlabeled; it depends only on ``seed``. Raises ValueError
    when the rarest class has too few training images."""
    classes = y.numpy()
    num_classes = int(classes.max()) + 1
    train, test = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=classes, random_state=seed
    )
    fewest = np.bincount(classes[train], minlength=num_classes).min()
    if labeled_per_class >= fewest:
        raise ValueError(
            f"labeled_per_class must be below {fewest} (the training images of the rarest class "
            f"with test_size={test_size}), got {labeled_per_class}"
        )
    rng = np.random.default_rng(seed)
    per_class = [train[classes[train] == c] for c in range(num_classes)]
    labeled = np.concatenate([rng.choice(p, labeled_per_class, replace=False) for p in per_class])
    unlabeled = np.setdiff1d(train, labeled)
    return Data(x[labeled], y[labeled], x[unlabeled], None, None, x[test], y[test])


def check_runs(seeds: list[int], jobs: int) -> None:
    """A one-line ValueError for seeds that repeat or leave [0, 2**32), or jobs below 1."""
    if any(not 0 <= s < 2**32 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds must be distinct and in [0, 2**32), got {seeds}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")


class Task(NamedTuple):
    """What a script hands to ``run_all``: how to build its CNN and its inputs."""

    cnn: Callable[[int], nn.Module]  # seed -> a fresh network
    weak: Augment
    strong: Augment
    prepare: Callable[[Tensor], Tensor]  # evaluation images -> inputs


# ----------------------------------------------------------------------------- the rows


def method_of(row: str) -> str | None:
    """The row's MPL term: None (no meta-gradient), "exact" or "first_order"."""
    if row in ("supervised", "pseudo_label", "uda"):
        return None
    return "first_order" if row.endswith("first_order") else "exact"


def mpl_options(r: Recipe, row: str) -> dict:
    """``metapl.MPL``'s options for ``row`` (the method, UDA, VAT) under recipe ``r``."""
    method = method_of(row)
    uda = None
    if "uda" in row:
        uda = metapl.UDA(r.uda_weight, r.uda_temperature, r.uda_threshold, r.uda_ramp_steps)
    return dict(
        meta_grad=method,
        uda=uda,
        vat=metapl.VAT(r.vat_weight, r.vat_epsilon) if uda and r.vat_weight else None,
        temperature=r.temperature,
        ema_decay=r.ema_decay,
        h_baseline_decay=0.9,
        student_view=r.student_view,
        student_bn=r.student_bn,
        lookahead_steps=r.lookahead_steps,
        log_prob_reduction=r.log_prob_reduction,
        **({"mpl_weight": r.mpl_weight, "mpl_dropout": r.mpl_dropout} if method else {}),
    )


def build_mpl(r: Recipe, task: Task, seed: int, row: str) -> metapl.MPL:
    """Teacher (the CNN at ``seed``) and student (at ``seed + 1``) for ``row``."""
    teacher, student = task.cnn(seed), task.cnn(seed + 1)
    return metapl.MPL(
        teacher, student, sgd(r, r.lr_teacher), sgd(r, r.lr_student), **mpl_options(r, row)
    )


def check(r: Recipe, rows: tuple[str, ...], labels_per_class: int) -> None:
    """A one-line ValueError for a recipe MPL would refuse, before any run starts."""
    if r.mpl_labels == "held_out":
        split_labels(torch.zeros(labels_per_class, dtype=torch.long))  # one class, its labels
    for row in rows:
        if row != "supervised":  # the options alone: the networks' structure is not checked
            opt = sgd(r, r.lr_teacher)
            MPLConfig(nn.Identity(), nn.Identity(), opt, opt, **mpl_options(r, row))


def schedule(r: Recipe, lr: float):
    """Linear warm-up, then cosine decay to 0 at the last step (short runs warm up less)."""
    return optim.warmup_cosine(lr, r.steps, min(r.warmup_steps, r.steps // 2))


def sgd(r: Recipe, lr: float) -> optim.Optimizer:
    opt = optim.sgd(schedule(r, lr), momentum=0.9, nesterov=True, weight_decay=r.weight_decay)
    return optim.clip_grad_norm(opt, r.max_grad_norm) if r.max_grad_norm else opt


def split_labels(y: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of a labeled set [N] in two halves per class (``mpl_labels="held_out"``): the
    first ``ceil(n_c / 2)`` of each class for the teacher's own loss, the rest for the MPL
    signal. Raises ValueError when a class has fewer than 2 labels."""
    own, held = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < 2:
            raise ValueError(
                f"mpl_labels='held_out' needs at least 2 labels per class, class {int(c)} has "
                f"{len(idx)}: use more labels per class or mpl_labels='same'"
            )
        half = (len(idx) + 1) // 2
        own.append(idx[:half])
        held.append(idx[half:])
    return torch.cat(own), torch.cat(held)


# ----------------------------------------------------------------------------- training


def _draw(n: int, batch: int, gen: torch.Generator) -> Tensor:
    """``batch`` indices of ``range(n)`` with replacement; all of them for batch 0."""
    return torch.arange(n) if batch == 0 else torch.randint(n, (batch,), generator=gen)


def train_supervised(r: Recipe, task: Task, data: Data, seed: int, log) -> None:
    """The baseline in plain PyTorch: the teacher's CNN, optimizer, schedule and clipping on
    the labels only (torch.optim.SGD equals metapl.optim.sgd step for step), evaluated as
    its EMA."""
    model = task.cnn(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(
        model.parameters(), r.lr_teacher, momentum=0.9, nesterov=True, weight_decay=r.weight_decay
    )
    lr = schedule(r, 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr(torch.tensor(s))))
    ema = torch.optim.swa_utils.AveragedModel(
        model,
        multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(r.ema_decay),
        use_buffers=True,
    )
    model.train()
    for step in range(r.steps):
        idx = _draw(len(data.x_l), r.batch_l, gen)
        loss = F.cross_entropy(model(task.weak(data.x_l[idx], gen)), data.y_l[idx])
        opt.zero_grad()
        loss.backward()
        if r.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.max_grad_norm)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        log(step, {"train/loss": loss.item()}, {"model": ema.module})


def train_mpl(r: Recipe, task: Task, data: Data, seed: int, row: str, log) -> None:
    """Teacher + student; the row picks the MPL term and UDA (+ VAT)."""
    mpl = build_mpl(r, task, seed, row)
    method = method_of(row)
    own = held = torch.arange(len(data.y_l))
    if method and r.mpl_labels == "held_out":
        own, held = split_labels(data.y_l)
    gen = torch.Generator().manual_seed(seed)
    for step in range(r.steps):
        i_l = own[_draw(len(own), r.batch_l, gen)]
        x_u = data.x_u[torch.randint(len(data.x_u), (r.batch_u,), generator=gen)]
        x_l = task.weak(data.x_l[i_l], gen)
        mpl_batch = None
        if method and r.mpl_labels != "same":
            i_m = held[_draw(len(held), r.batch_l, gen)]
            mpl_batch = (task.weak(data.x_l[i_m], gen), data.y_l[i_m])
        metrics = mpl.step(
            x_l, data.y_l[i_l], task.weak(x_u, gen), task.strong(x_u, gen), mpl_batch=mpl_batch
        )
        log(step, metrics, {"student": mpl.ema_student, "teacher": mpl.teacher})


def finetune_student(r: Recipe, task: Task, data: Data, seed: int, student: nn.Module) -> None:
    """MPL's last phase: the reported student, in place, on the labeled images (weak views)."""
    gen = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(r.finetune_steps):
            idx = _draw(len(data.x_l), r.batch_l, gen)
            yield task.weak(data.x_l[idx], gen), data.y_l[idx]

    opt = optim.sgd(r.finetune_lr, momentum=0.9, nesterov=True, weight_decay=r.weight_decay)
    metapl.finetune(student.requires_grad_(True), batches(), opt)
    student.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, prepare, batch: int = 2000) -> float:
    was_training = model.training
    model.eval()
    correct = sum(
        (model(prepare(x[i : i + batch])).argmax(-1) == y[i : i + batch]).sum().item()
        for i in range(0, len(x), batch)
    )
    model.train(was_training)
    return round(correct / len(x), 4)


class Selector:
    """Logs every ``log_every`` steps; evaluates every ``eval_every`` steps on the validation
    split (the test split where there is none, for the curves only) and keeps a copy of the
    models at the reported model's best validation accuracy (the first of ``models``)."""

    def __init__(self, r: Recipe, task: Task, data: Data, tracker: Tracker, bar: tqdm):
        self.r, self.task, self.data, self.tracker, self.bar = r, task, data, tracker, bar
        self.best_val, self.best_step, self.best = -1.0, 0, {}
        self.curve: list[tuple[int, float, float | None]] = []

    def __call__(self, step: int, metrics: dict, models: dict[str, nn.Module]) -> None:
        self.bar.update()
        done, r, data = step + 1, self.r, self.data
        if done % r.log_every == 0 or done == r.steps:
            self.tracker.log(metrics, step=done)
        if done % r.eval_every and done != r.steps:
            return
        split = "val" if data.x_val is not None else "test"
        x, y = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
        accs = {name: accuracy(m, x, y, self.task.prepare) for name, m in models.items()}
        self.tracker.log({f"{split}/{name}": a for name, a in accs.items()}, step=done)
        reported = next(iter(accs.values()))
        self.curve.append((done, reported, accs.get("teacher")))
        if split == "test":  # no selection on the test split: the last models are reported
            self.best_step, self.best = done, models
        elif reported > self.best_val:
            self.best_val, self.best_step = reported, done
            self.best = {name: copy.deepcopy(m) for name, m in models.items()}


def run(
    r: Recipe,
    task: Task,
    data: Data,
    seed: int,
    row: str,
    out: Path,
    config: dict,
    project: str | None,
    group: str,
    bar: tqdm,
) -> dict:
    """Train one row for one seed (its own wandb run and metrics.jsonl in ``out``); returns its
    test accuracy, validation accuracy, selected step, seconds and validation curve. ``bar``:
    a progress bar to advance, or None (a worker process)."""
    bar = bar if bar is not None else tqdm(total=r.steps, disable=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a repeated run replaces its records
    tracker = Tracker(
        out,
        project=project,
        group=f"{group}/{row}",
        name=f"{row}-seed{seed}",
        config={**config, "row": row, "seed": seed},
    )
    bar.set_description(f"seed {seed} {row}")
    selector = Selector(r, task, data, tracker, bar)
    start = time.perf_counter()
    if row == "supervised":
        train_supervised(r, task, data, seed, selector)
    else:
        train_mpl(r, task, data, seed, row, selector)
    model = next(iter(selector.best.values()))
    if r.finetune_steps and row != "supervised":
        finetune_student(r, task, data, seed, model)
    val = accuracy(model, data.x_val, data.y_val, task.prepare) if data.x_val is not None else None
    result = {
        "test": accuracy(model, data.x_test, data.y_test, task.prepare),
        "val": val,
        "step": selector.best_step,
        "seconds": round(time.perf_counter() - start, 3),
        "curve": selector.curve,
    }
    if "teacher" in selector.best:
        result["teacher_test"] = accuracy(
            selector.best["teacher"], data.x_test, data.y_test, task.prepare
        )
    tracker.summary({f"final/{k}": v for k, v in result.items() if k != "curve" and v is not None})
    tracker.finish()
    return result


# ----------------------------------------------------------------------------- many runs


def run_all(
    runs: list[tuple[int, str]], one: Callable[..., dict], jobs: int, steps: int
) -> list[dict]:
    """``one(seed, row, bar)`` for every ``(seed, row)``: in this process with a progress bar,
    or ``jobs`` at a time in fresh worker processes (spawned: no forked OpenMP state;
    deterministic all the same, as each run seeds its own networks and generators)."""
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(one, seed, row, None) for seed, row in runs]
            return [f.result() for f in futures]
    with tqdm(total=len(runs) * steps, file=sys.stderr, disable=None) as bar:
        return [one(seed, row, bar) for seed, row in runs]


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row: mean, std and per-seed test accuracy, validation accuracy, seconds, the
    teacher's test accuracy; and mpl_uda - uda per seed where both ran."""
    summary = {}
    for row, runs in results.items():
        accs = [r["test"] for r in runs]
        summary[row] = {
            "mean": round(statistics.mean(accs), 4),
            "std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
            "seeds": accs,
            "val": [r["val"] for r in runs],
            "seconds": [r["seconds"] for r in runs],
        }
        if "teacher_test" in runs[0]:
            summary[row]["teacher"] = [r["teacher_test"] for r in runs]
    if "uda" in results and "mpl_uda" in results:
        summary["mpl_uda_minus_uda"] = [
            round(a["test"] - b["test"], 4)
            for a, b in zip(results["mpl_uda"], results["uda"], strict=True)
        ]
    return summary


def plot_curves(results: dict[str, list[dict]], seeds: list[int], path: Path) -> None:
    """Accuracy of the reported model (left) and of the teacher (right) over the steps, per
    row, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (row, runs) in enumerate(results.items()):
        for seed, r in zip(seeds, runs, strict=True):
            steps = [s for s, _, _ in r["curve"]]
            label = row if seed == seeds[0] else None
            axes[0].plot(steps, [100 * a for _, a, _ in r["curve"]], color=f"C{i}", label=label)
            if r["curve"] and r["curve"][0][2] is not None:
                teacher = [100 * t for _, _, t in r["curve"]]
                axes[1].plot(steps, teacher, color=f"C{i}", label=label)
    split = (
        "validation" if results and next(iter(results.values()))[0]["val"] is not None else "test"
    )
    axes[0].set_title(f"student (EMA; supervised: the model), {split}")
    axes[1].set_title(f"teacher, {split}")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(summary: dict, title: str, as_json: bool, record: dict[str, Any], folder: Path) -> None:
    """summary.json in ``folder`` (with ``record``: the config and the time); the summary as
    JSON, or a table with the mean, the spread and every seed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({**record, "summary": summary}, indent=1))
    if as_json:
        print(json.dumps(summary))
        return
    print(f"\n{title}\n")
    seeds = len(next(iter(summary.values()))["seeds"])
    print(f"| row | {'mean ± std' if seeds > 1 else 'test'} | per seed | s / run |")
    print("|---|---|---|---|")
    for row, s in summary.items():
        if row == "mpl_uda_minus_uda":
            continue
        per_seed = " ".join(f"{100 * a:.2f}" for a in s["seeds"])
        mean = f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if seeds > 1 else "")
        print(f"| {row} | {mean} | {per_seed} | {statistics.mean(s['seconds']):.0f} |")
    if "mpl_uda_minus_uda" in summary:
        diffs = " ".join(f"{100 * d:+.2f}" for d in summary["mpl_uda_minus_uda"])
        print(f"\nmpl_uda - uda per seed (points): {diffs}")
