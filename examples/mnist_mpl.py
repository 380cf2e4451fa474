"""Meta Pseudo Labels on MNIST with 10 or 1 labels per class, on a CPU.

Data: the original MNIST IDX files (``make mnist`` writes them to data/mnist/; any folder with
the four files works, torchvision's MNIST/raw too). A seeded, balanced split
(`metapl.data.mnist_split`, saved as <output-dir>/<preset>/seed<N>/split.json): 10 (or 1)
labeled images per class, 100 validation images per class held out of training, every other
training image unlabeled. The 10k test images are evaluated once per run, at the end.

Model: a small CNN (a 5x5 stride-2 conv, a 3x3 stride-2 conv, a 3x3 conv, BatchNorm, dropout,
a linear layer on the 7x7 maps; 30k parameters) for teacher, student and the supervised
baseline. Augmentation
(`metapl.data.DigitAugment`, per sample, no flips): weak = shift / rotation / scale jitter;
strong = a larger affine, elastic wobble, stroke width, contrast and a cutout.

Rows (every one trains from scratch for the same number of steps). The teacher's
unsupervised loss in the rows named uda is UDA's consistency (weak view -> strong view) plus
VAT (virtual adversarial training, `metapl.VAT`, on the weak view; `vat_weight=0` drops it);
the student learns the teacher's soft pseudo labels for the weak view (`student_view`):

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
preset and row, one run per seed, plus a metrics.jsonl in its folder; the learning curves
(validation accuracy of student and teacher) go to <output-dir>/<preset>/curves.png and the
summary (the --json output, with the config and the time) to summary.json beside it.

Measured (10 labels per class, 1,000 steps, seeds 0-2, mean test accuracy %, `--jobs 2` on the
idle 2-core CPU: 39 min): supervised 93.8, uda 98.2, mpl 94.7, mpl_first_order 94.0, mpl_uda
98.1, mpl_uda_first_order 98.0: UDA + VAT give the gain, the MPL term ties (docs/mpl.md, with
how VAT and the weak view got there from 97.2). With 1 label per class (the first recipe: UDA
alone, the student on the strong view, 400 steps): supervised 52.5, uda 83.9, mpl_uda 93.7
(+19.0, +10.6, -0.0 points over uda per seed: the MPL term matters in two seeds of three).

    make mnist                                                 # data/mnist/, md5-checked
    python examples/mnist_mpl.py --jobs 2                      # 10 labels/class, 6 rows x 3 seeds
    python examples/mnist_mpl.py --preset 1-label --jobs 2
    python examples/mnist_mpl.py --rows uda mpl_uda --seeds 0 --json
    python examples/mnist_mpl.py --set steps=300 lr_student=0.1   # any Config field
    python examples/mnist_mpl.py --rows mpl_uda --set mpl_labels=resampled  # MPL signal's own batch
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.data import DigitAugment, load_mnist, mnist_split
from metapl.finetune import finetune
from metapl.training.recipe import check_mpl_options, mpl_options, set_fields, split_labels
from metapl.training.tracking import Tracker

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    labels_per_class: int = 10
    val_per_class: int = 100  # held out of training, for model selection
    channels: int = 16  # conv widths: channels, 2 * channels, 4 * channels
    dropout: float = 0.1
    steps: int = 1000
    batch_l: int = 100  # labeled images per step (drawn with replacement)
    batch_u: int = 256  # unlabeled images per step
    lr_teacher: float = 0.1  # SGD, momentum 0.9, nesterov, warm-up + cosine (both networks)
    lr_student: float = 0.1
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    max_grad_norm: float = 1.0  # clip both networks' gradients (0: off)
    temperature: float = 1.0  # of the pseudo labels
    uda_weight: float = 1.0
    uda_temperature: float = 0.4
    uda_threshold: float = 0.6
    uda_ramp_steps: int = 0
    vat_weight: float = 1.0  # VAT beside UDA in the teacher's loss (the uda rows; 0: off)
    vat_epsilon: float = 2.0  # the adversarial perturbation's L2 length (pixels in [0, 1])
    lookahead_steps: int = 1  # student steps per MPL step on the same pseudo labels (MPL's K)
    mpl_weight: float = 1.0  # the MPL term's weight in the teacher's gradient
    log_prob_reduction: str = "mean"  # first_order: "mean" (the paper's 1/B scale) or "sum"
    student_bn: str = "unlabeled"  # the student's BatchNorm batch: "unlabeled" or "joint"
    student_view: str = "weak"  # the student learns on the "weak" view or the "strong" one
    # the MPL signal's labeled batch: "same" as the teacher's, "resampled" (a draw of its
    # own) or "held_out" (drawn from half of each class's labels, which the teacher's own loss
    # then never sees); rows without an MPL term: "same"
    mpl_labels: str = "same"
    ema_decay: float = 0.99  # of the student (and of the supervised model)
    cutout: int = 8  # side of the strong view's cutout square
    finetune_steps: int = 0  # then train the selected student on the labels alone (0: off)
    finetune_lr: float = 0.01
    eval_every: int = 100  # validation accuracy, for the curves and the model selection
    log_every: int = 25


PRESETS = {
    "10-labels": Config(),
    # the recipe its table was measured with: 400 steps, UDA alone, the student on strong views
    "1-label": Config(
        labels_per_class=1, batch_l=50, steps=400, vat_weight=0.0, student_view="strong"
    ),
}
ROWS = ("supervised", "uda", "mpl", "mpl_first_order", "mpl_uda", "mpl_uda_first_order")

# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    x_l: Tensor  # uint8 [L, 1, 28, 28]
    y_l: Tensor
    x_u: Tensor  # uint8 [U, 1, 28, 28]; labels never used
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(cfg: Config, data_dir: Path, seed: int, manifest: Path) -> Data:
    x, y = load_mnist(data_dir, train=True)
    x_test, y_test = load_mnist(data_dir, train=False)
    split, val = mnist_split(y, cfg.labels_per_class, cfg.val_per_class, seed, manifest)
    lab, unl, val = (torch.from_numpy(a) for a in (split.labeled, split.unlabeled, val))
    return Data(x[lab], y[lab], x[unl], x[val], y[val], x_test, y_test)


WEAK = DigitAugment.weak()


def weak(x: Tensor, gen: torch.Generator) -> Tensor:
    return WEAK(x, gen).float() / 255


def strong(x: Tensor, cfg: Config, gen: torch.Generator) -> Tensor:
    return DigitAugment.strong(cfg.cutout)(x, gen).float() / 255


# ----------------------------------------------------------------------------- model


def cnn(cfg: Config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c = cfg.channels
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
        nn.Dropout(cfg.dropout),
        nn.Linear(2 * c * 49, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2000) -> float:
    was_training = model.training
    model.eval()
    correct = sum(
        (model(x[i : i + batch].float() / 255).argmax(-1) == y[i : i + batch]).sum().item()
        for i in range(0, len(x), batch)
    )
    model.train(was_training)
    return round(correct / len(x), 4)


def schedule(cfg: Config, lr: float):
    return optim.warmup_cosine(lr, cfg.steps, min(cfg.warmup_steps, cfg.steps // 2))


def sgd(cfg: Config, lr: float) -> optim.Optimizer:
    opt = optim.sgd(schedule(cfg, lr), momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return optim.clip_grad_norm(opt, cfg.max_grad_norm) if cfg.max_grad_norm else opt


# ----------------------------------------------------------------------------- training


class Selector:
    """Evaluates on the validation split every `eval_every` steps and keeps a copy of the
    models at the best validation accuracy of the reported one (first of `models`)."""

    def __init__(self, cfg: Config, data: Data, tracker: Tracker, bar: tqdm):
        self.cfg, self.data, self.tracker, self.bar = cfg, data, tracker, bar
        self.best_val, self.best_step, self.best = -1.0, 0, {}
        self.curve: list[tuple[int, float, float | None]] = []

    def __call__(self, step: int, metrics: dict, models: dict[str, nn.Module]) -> None:
        self.bar.update()
        done = step + 1
        if done % self.cfg.log_every == 0 or done == self.cfg.steps:
            self.tracker.log(metrics, step=done)
        if done % self.cfg.eval_every and done != self.cfg.steps:
            return
        val = {name: accuracy(m, self.data.x_val, self.data.y_val) for name, m in models.items()}
        self.tracker.log({f"val/{name}": a for name, a in val.items()}, step=done)
        reported = next(iter(val.values()))
        self.curve.append((done, reported, val.get("teacher")))
        if reported > self.best_val:
            self.best_val, self.best_step = reported, done
            self.best = {name: copy.deepcopy(m) for name, m in models.items()}


def train_supervised(cfg: Config, data: Data, seed: int, log: Selector) -> None:
    """The baseline in plain PyTorch: the teacher's CNN, optimizer and schedule on the labels
    only, evaluated as its EMA."""
    model = cnn(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(
        model.parameters(),
        cfg.lr_teacher,
        momentum=0.9,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    lr = schedule(cfg, 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr(torch.tensor(s))))
    ema = torch.optim.swa_utils.AveragedModel(
        model,
        multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
        use_buffers=True,
    )
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(data.x_l), (cfg.batch_l,), generator=gen)
        loss = F.cross_entropy(model(weak(data.x_l[idx], gen)), data.y_l[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        opt.step()
        sched.step()
        ema.update_parameters(model)
        log(step, {"train/loss": loss.item()}, {"model": ema.module})


def vat_term(cfg: Config) -> metapl.VAT | None:
    return metapl.VAT(cfg.vat_weight, cfg.vat_epsilon) if cfg.vat_weight else None


def train_mpl(cfg: Config, data: Data, seed: int, row: str, log: Selector) -> None:
    """Teacher + student; the row picks the MPL term and UDA."""
    method = None if row == "uda" else "exact"
    if row.endswith("first_order"):
        method = "first_order"
    uda = None
    if "uda" in row:
        uda = metapl.UDA(cfg.uda_weight, cfg.uda_temperature, cfg.uda_threshold, cfg.uda_ramp_steps)
    vat = vat_term(cfg) if uda else None
    mpl = metapl.MPL(
        cnn(cfg, seed),
        cnn(cfg, seed + 1),
        sgd(cfg, cfg.lr_teacher),
        sgd(cfg, cfg.lr_student),
        meta_grad=method,
        pseudo_labels="hard" if method == "first_order" else "soft",
        uda=uda,
        temperature=cfg.temperature,
        ema_decay=cfg.ema_decay,
        h_baseline_decay=0.9 if method == "first_order" else None,
        vat=vat,
        student_view=cfg.student_view,
        **mpl_options(cfg, method),
    )
    own = held = torch.arange(len(data.y_l))
    if method and cfg.mpl_labels == "held_out":
        own, held = split_labels(data.y_l)
    gen = torch.Generator().manual_seed(seed)
    for step in range(cfg.steps):
        i_l = own[torch.randint(len(own), (cfg.batch_l,), generator=gen)]
        x_u = data.x_u[torch.randint(len(data.x_u), (cfg.batch_u,), generator=gen)]
        x_l = weak(data.x_l[i_l], gen)
        mpl_batch = None
        if method and cfg.mpl_labels != "same":
            i_m = held[torch.randint(len(held), (cfg.batch_l,), generator=gen)]
            mpl_batch = (weak(data.x_l[i_m], gen), data.y_l[i_m])
        metrics = mpl.step(
            x_l, data.y_l[i_l], weak(x_u, gen), strong(x_u, cfg, gen), mpl_batch=mpl_batch
        )
        log(step, metrics, {"student": mpl.ema_student, "teacher": mpl.teacher})


def finetune_student(cfg: Config, data: Data, seed: int, student: nn.Module) -> None:
    """MPL's last phase: the selected student, in place, on the labeled images (weak views)."""
    gen = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(cfg.finetune_steps):
            idx = torch.randint(len(data.x_l), (cfg.batch_l,), generator=gen)
            yield weak(data.x_l[idx], gen), data.y_l[idx]

    opt = optim.sgd(cfg.finetune_lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    finetune(student.requires_grad_(True), batches(), opt)
    student.eval()


# ----------------------------------------------------------------------------- one run


def run(cfg: Config, data: Data, preset: str, seed: int, row: str, args, bar: tqdm) -> dict:
    """Train one row for one seed (its own wandb run); returns its accuracies and time."""
    out = args.output_dir / preset / f"seed{seed}" / row
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a repeated run replaces its records
    tracker = Tracker(
        out,
        project=args.wandb_project,
        group=f"{preset}/{row}",
        name=f"{row}-seed{seed}",
        config={**asdict(cfg), "preset": preset, "row": row, "seed": seed},
    )
    bar.set_description(f"{preset} seed {seed} {row}")
    selector = Selector(cfg, data, tracker, bar)
    start = time.perf_counter()
    if row == "supervised":
        train_supervised(cfg, data, seed, selector)
    else:
        train_mpl(cfg, data, seed, row, selector)
    model = next(iter(selector.best.values()))
    val = selector.best_val
    if cfg.finetune_steps and row != "supervised":
        finetune_student(cfg, data, seed, model)
        val = accuracy(model, data.x_val, data.y_val)
    seconds = time.perf_counter() - start
    result = {
        "test": accuracy(model, data.x_test, data.y_test),
        "val": val,
        "step": selector.best_step,
        "seconds": round(seconds, 3),
        "curve": selector.curve,
    }
    if "teacher" in selector.best:
        result["teacher_test"] = accuracy(selector.best["teacher"], data.x_test, data.y_test)
    tracker.summary({f"final/{k}": v for k, v in result.items() if k != "curve"})
    tracker.finish()
    tqdm.write(
        f"{preset} seed {seed} {row:<20} test {100 * result['test']:.2f}  val "
        f"{100 * result['val']:.2f} (step {result['step']})  {seconds:.0f} s",
        file=sys.stderr,
    )
    return result


# ----------------------------------------------------------------------------- report


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
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
    """Validation accuracy of the reported model (left) and of the teacher (right) per row,
    one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (row, runs) in enumerate(results.items()):
        color = f"C{i}"
        for seed, r in zip(seeds, runs, strict=True):
            steps = [s for s, _, _ in r["curve"]]
            label = row if seed == seeds[0] else None
            axes[0].plot(steps, [100 * a for _, a, _ in r["curve"]], color=color, label=label)
            if r["curve"] and r["curve"][0][2] is not None:
                teacher = [100 * t for _, _, t in r["curve"]]
                axes[1].plot(steps, teacher, color=color, label=label)
    axes[0].set_title("student (EMA; supervised: the model), validation")
    axes[1].set_title("teacher, validation")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(bottom=max(0.0, axes[0].get_ylim()[0]))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: dict, preset: str, cfg: Config, seeds: list[int], seconds: float):
    print(
        f"\nMNIST {preset} ({10 * cfg.labels_per_class} labels), {cfg.steps} steps, seeds "
        f"{seeds}, {seconds / 60:.1f} min; test accuracy (%) at the best validation step\n"
    )
    print("| row | mean ± std | per seed | s / run |")
    print("|---|---|---|---|")
    for row, s in summary.items():
        if row == "mpl_uda_minus_uda":
            continue
        per_seed = " ".join(f"{100 * a:.2f}" for a in s["seeds"])
        secs = statistics.mean(s["seconds"])
        print(f"| {row} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {per_seed} | {secs:.0f} |")
    if "mpl_uda_minus_uda" in summary:
        diffs = " ".join(f"{100 * d:+.2f}" for d in summary["mpl_uda_minus_uda"])
        print(f"\nmpl_uda - uda per seed (points): {diffs}")


# ----------------------------------------------------------------------------- main


_DATA: dict[tuple, Data] = {}  # per process: the data of each seed, loaded once


def task(cfg: Config, args: argparse.Namespace, seed: int, row: str, bar: tqdm | None = None):
    """One run in this process (a worker of --jobs, or the main process)."""
    torch.set_num_threads(args.threads)
    key = (str(args.data_dir), args.preset, seed)
    if key not in _DATA:
        _DATA.clear()
        manifest = args.output_dir / args.preset / f"seed{seed}" / "split.json"
        _DATA[key] = load_data(cfg, args.data_dir, seed, manifest)
    if bar is not None:
        return run(cfg, _DATA[key], args.preset, seed, row, args, bar)
    with tqdm(total=cfg.steps, disable=True) as quiet:
        return run(cfg, _DATA[key], args.preset, seed, row, args, quiet)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="10-labels")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    parser.add_argument("--output-dir", type=Path, default=Path("runs/mnist_mpl"))
    parser.add_argument("--wandb-project", default="metapl-mnist")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, in worker processes (2 on a 2-core CPU)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override any Config field, e.g. --set steps=300",
    )
    args = parser.parse_args(argv)
    try:
        cfg = set_fields(PRESETS[args.preset], args.set)
        check_mpl_options(
            cfg, cfg.labels_per_class, vat=vat_term(cfg), student_view=cfg.student_view
        )
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    _, y = load_mnist(args.data_dir, train=True)
    for seed in args.seeds:  # write the split manifests once, before any worker reads them
        manifest = args.output_dir / args.preset / f"seed{seed}" / "split.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        mnist_split(y, cfg.labels_per_class, cfg.val_per_class, seed, manifest)

    tasks = [(seed, row) for seed in args.seeds for row in args.rows]
    start = time.perf_counter()
    if args.jobs > 1:
        # spawn: fresh workers (no forked OpenMP state); deterministic all the same, as each
        # run seeds its own networks and generators.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = [pool.submit(task, cfg, args, seed, row) for seed, row in tasks]
            outcomes = [f.result() for f in futures]
    else:
        with tqdm(total=len(tasks) * cfg.steps, file=sys.stderr, disable=None) as bar:
            outcomes = [task(cfg, args, seed, row, bar) for seed, row in tasks]
    seconds = time.perf_counter() - start

    results: dict[str, list[dict]] = {row: [] for row in args.rows}
    for (_, row), outcome in zip(tasks, outcomes, strict=True):
        results[row].append(outcome)
    summary = summarize(results)
    plot_curves(results, args.seeds, args.output_dir / args.preset / "curves.png")
    record = {
        "preset": args.preset,
        "config": asdict(cfg),
        "seconds": round(seconds, 1),
        "summary": summary,
    }
    (args.output_dir / args.preset / "summary.json").write_text(json.dumps(record, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary, args.preset, cfg, args.seeds, seconds)
    return summary


if __name__ == "__main__":
    main()
