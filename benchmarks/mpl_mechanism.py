"""Why the exact MPL term can lose to its UDA baseline: probes of the teacher's gradient over
training, paired seeds, on sklearn's digits (examples/digits_mpl.py's data and recipe).

Every ``probe_every`` steps, before the step and on the step's own batch, each run (``uda``:
UDA alone, ``mpl_uda``: exact MPL + UDA, same seed: same split, networks and data order)
measures, from its current state and without changing it (``mpl_step`` is pure; the probes run
under a forked RNG, so the training is the example's, step for step):

- the teacher's gradient parts: ``mpl_step`` with the teacher optimizer ``optim.sgd(1.0)``
  (``old - new`` teacher parameters is the gradient), once with ``meta_grad=None`` (the own part:
  supervised + UDA) and once with ``"exact"`` (own + MPL); their difference is the MPL part.
  ``uda`` never applies its MPL part: there it is what the term would have been;
- the same MPL part scored on a held-out labeled batch (2 test images per class) instead of the
  training labels, and the student's loss after the lookahead on either batch;
- the pseudo labels' mean entropy, the teacher's accuracy, NLL and ECE on the test split, and
  the EMA student's test accuracy.

    python benchmarks/mpl_mechanism.py                       # seeds 0-4, 400 steps, jobs 2
    python benchmarks/mpl_mechanism.py --seeds 0 --steps 50 --probe-every 25
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_mpl  # noqa: E402
from _digits import Data, Task, accuracy, build_mpl  # noqa: E402
from _machine import cpu_name, git_commit  # noqa: E402

from metapl import optim  # noqa: E402
from metapl.functional import forward  # noqa: E402
from metapl.mpl import Batch, MPLConfig, MPLState, mpl_step  # noqa: E402

ROWS = ("uda", "mpl_uda")
Grads = dict[str, Tensor]
# the per-probe columns: (key, header, format)
COLUMNS = (
    ("cos_mpl_own", "cos(MPL, own)", "{:+.3f}"),
    ("norm_mpl_own", "‖MPL‖/‖own‖", "{:.3f}"),
    ("norm_own", "‖own‖ (clipped at 1)", "{:.3f}"),
    ("cos_mpl_train_held", "cos(MPL on labels, MPL on held-out)", "{:+.3f}"),
    ("cos_own_mpl_held", "cos(own, MPL on held-out)", "{:+.3f}"),
    ("loss_after_train", "student loss after lookahead: labels", "{:.3f}"),
    ("loss_after_held", "held-out", "{:.3f}"),
    ("entropy", "pseudo-label entropy (nats)", "{:.3f}"),
    ("teacher_nll", "teacher NLL (test)", "{:.3f}"),
    ("teacher_ece", "teacher ECE (test)", "{:.3f}"),
    ("teacher_acc", "teacher acc (test)", "{:.3f}"),
    ("student_acc", "EMA student acc (test)", "{:.3f}"),
)


# ----------------------------------------------------------------------------- gradient parts


def teacher_grad(config: MPLConfig, state: MPLState, batch: Batch, seed: int) -> tuple[Grads, dict]:
    """The teacher's gradient in one ``mpl_step`` from ``state`` (the step's own teacher
    optimizer replaced by plain SGD at lr 1, so ``old - new`` is the gradient) and the step's
    metrics; dropout masks from ``seed``, the caller's RNG untouched."""
    sgd = optim.sgd(1.0)
    state = state._replace(teacher=state.teacher._replace(opt=sgd.init(state.teacher.params)))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new, metrics = mpl_step(replace(config, teacher_optimizer=sgd, compile=False), state, batch)
    old = state.teacher.params
    return {k: old[k] - new.teacher.params[k] for k in old}, metrics


def gradient_parts(config: MPLConfig, state: MPLState, batch: Batch, held: Batch, seed: int):
    """``(own, MPL on the batch's labels, MPL on ``held``'s labels, metrics of both exact
    steps)``: own from ``meta_grad=None``, each MPL part as exact minus own."""
    own, _ = teacher_grad(replace(config, meta_grad=None, mpl_weight=1.0), state, batch, seed)
    exact = replace(config, meta_grad="exact", mpl_weight=1.0)
    full, m_train = teacher_grad(exact, state, batch, seed)
    held_batch = batch._replace(x_mpl=held.x_l, y_mpl=held.y_l)
    full_held, m_held = teacher_grad(exact, state, held_batch, seed)
    mpl = {k: full[k] - own[k] for k in own}
    mpl_held = {k: full_held[k] - own[k] for k in own}
    return own, mpl, mpl_held, (m_train, m_held)


def flat(g: Grads) -> Tensor:
    return torch.cat([t.flatten() for t in g.values()]).double()


def cosine(a: Grads, b: Grads) -> float:
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


def norm_ratio(a: Grads, b: Grads) -> float:
    return float(flat(a).norm() / flat(b).norm())


# ----------------------------------------------------------------------------- the teacher


@torch.no_grad()
def pseudo_label_entropy(config: MPLConfig, state: MPLState, batch: Batch, seed: int) -> float:
    """Mean entropy of the pseudo labels ``softmax(z / T)`` on the student's strong view, from
    the teacher's training-mode forward on the step's rows (labeled, weak, strong)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = torch.cat([batch.x_l, batch.x_u, batch.x_u_strong])
        logits, _ = forward(config.teacher, state.teacher.params, state.teacher.buffers, x)
    p = torch.softmax(logits[-len(batch.x_u_strong) :] / config.temperature, -1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())


@torch.no_grad()
def calibration(model: torch.nn.Module, x: Tensor, y: Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and expected calibration error (``bins`` equal-width confidence bins) of
    ``model`` in evaluation mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    conf, pred = torch.softmax(logits, -1).max(-1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1)
    ece = sum(
        (in_bin.double().mean() * (conf[in_bin].double().mean() - correct[in_bin].mean()).abs())
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        if (in_bin := (conf > lo) & (conf <= hi)).any()
    )
    return {
        "teacher_acc": float(correct.mean()),
        "teacher_nll": float(F.cross_entropy(logits, y)),
        "teacher_ece": float(ece),
    }


# ----------------------------------------------------------------------------- one run


def held_out_batch(data: Data, task: Task, per_class: int, gen: torch.Generator) -> Batch:
    """``per_class`` test images of every class, weakly augmented like the labeled batch."""
    idx = torch.cat(
        [
            (i := torch.nonzero(data.y_test == c).flatten())[torch.randperm(len(i), generator=gen)][
                :per_class
            ]
            for c in range(10)
        ]
    )
    return Batch(task.weak(data.x_test[idx], gen), data.y_test[idx], data.x_test[:0])


def probe(mpl, batch: Batch, held: Batch, data: Data, seed: int) -> dict[str, float]:
    """Every column of ``COLUMNS`` from the MPL object's current state, on ``batch``."""
    config, state = mpl.config, mpl.state
    own, g_mpl, g_held, (m_train, m_held) = gradient_parts(config, state, batch, held, seed)
    return {
        "cos_mpl_own": cosine(g_mpl, own),
        "norm_mpl_own": norm_ratio(g_mpl, own),
        "norm_own": float(flat(own).norm()),
        "cos_mpl_train_held": cosine(g_mpl, g_held),
        "cos_own_mpl_held": cosine(own, g_held),
        "loss_after_train": float(m_train["student/loss_l"]),
        "loss_after_held": float(m_held["student/loss_l"]),
        "entropy": pseudo_label_entropy(config, state, batch, seed),
        **calibration(mpl.teacher, data.x_test, data.y_test),
        "student_acc": accuracy(mpl.ema_student, data.x_test, data.y_test, lambda x: x),
    }


def run(exp: digits_mpl.Experiment, probe_every: int, seed: int, row: str) -> dict:
    """Train ``row`` as examples/digits_mpl.py does (batch_l = 0: every label each step),
    probing every ``probe_every`` steps; returns the probes and the final test accuracy."""
    torch.set_num_threads(1)
    r, task = exp.recipe, digits_mpl.task(exp.digits)
    data = digits_mpl.load_data(exp.digits, seed)
    mpl = build_mpl(r, task, seed, row)
    gen = torch.Generator().manual_seed(seed)
    probe_gen = torch.Generator().manual_seed(10_000 + seed)
    probes, start = [], time.perf_counter()
    for step in range(r.steps):
        x_u = data.x_u[torch.randint(len(data.x_u), (r.batch_u,), generator=gen)]
        x_l = task.weak(data.x_l, gen)
        batch = Batch(x_l, data.y_l, task.weak(x_u, gen), task.strong(x_u, gen))
        if step % probe_every == 0:
            held = held_out_batch(data, task, len(data.y_l) // 10, probe_gen)
            probes.append({"step": step, **probe(mpl, batch, held, data, seed * 100_003 + step)})
        mpl.step(batch.x_l, batch.y_l, batch.x_u, batch.x_u_strong)
    test = accuracy(mpl.ema_student, data.x_test, data.y_test, task.prepare)
    seconds = round(time.perf_counter() - start, 1)
    return {"seed": seed, "row": row, "test": test, "seconds": seconds, "probes": probes}


# ----------------------------------------------------------------------------- report


def medians(runs: list[dict], row: str) -> list[dict]:
    """Per probe step, the median of every column over the seeds of ``row``."""
    mine = [r for r in runs if r["row"] == row]
    out = []
    for i, p in enumerate(mine[0]["probes"]):
        cols = {k: statistics.median(r["probes"][i][k] for r in mine) for k, _, _ in COLUMNS}
        out.append({"step": p["step"], **cols})
    return out


def table(rows: list[dict]) -> str:
    head = "| step | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for p in rows:
        cells = " | ".join(fmt.format(p[k]) for k, _, fmt in COLUMNS)
        lines.append(f"| {p['step']} | {cells} |")
    return "\n".join(lines)


def paired_table(runs: list[dict], seeds: list[int]) -> str:
    """Per probe step, the median over seeds of mpl_uda - uda (same seed) of every column."""
    by = {(r["row"], r["seed"]): r["probes"] for r in runs}
    lines = [
        "| step | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for i, p in enumerate(by[("uda", seeds[0])]):
        cells = [
            statistics.median(by[("mpl_uda", s)][i][k] - by[("uda", s)][i][k] for s in seeds)
            for k, _, _ in COLUMNS
        ]
        lines.append(f"| {p['step']} | " + " | ".join(f"{c:+.3f}" for c in cells) + " |")
    return "\n".join(lines)


def accuracy_table(runs: list[dict], seeds: list[int]) -> str:
    by = {(r["row"], r["seed"]): r["test"] for r in runs}
    lines = ["| seed | uda | mpl_uda | difference (points) |", "|---|---|---|---|"]
    for s in seeds:
        u, m = by[("uda", s)], by[("mpl_uda", s)]
        lines.append(f"| {s} | {100 * u:.2f} | {100 * m:.2f} | {100 * (m - u):+.2f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """One panel per column: a thin line per run, a thick one for the median per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(COLUMNS)
    fig, axes = plt.subplots(2, math.ceil(n / 2), figsize=(3.4 * math.ceil(n / 2), 6.4))
    for ax, (key, head, _) in zip(axes.flat, COLUMNS, strict=False):
        for i, row in enumerate(ROWS):
            for r in (r for r in runs if r["row"] == row):
                steps = [p["step"] for p in r["probes"]]
                ax.plot(steps, [p[key] for p in r["probes"]], color=f"C{i}", alpha=0.3, lw=0.8)
            med = medians(runs, row)
            ax.plot([p["step"] for p in med], [p[key] for p in med], color=f"C{i}", lw=2, label=row)
        ax.set_title(head, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=digits_mpl.RECIPE.steps)
    p.add_argument("--labeled-per-class", type=int, default=2)
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/mpl_mechanism/results.json"))
    p.add_argument("--figure", type=Path, default=Path("docs/img/mpl_mechanism.png"))
    a = p.parse_args(argv)
    exp = digits_mpl.Experiment(
        recipe=replace(digits_mpl.RECIPE, steps=a.steps),
        digits=replace(digits_mpl.Digits(), labeled_per_class=a.labeled_per_class),
    )
    one = partial(run, exp, a.probe_every)
    jobs = [(s, row) for s in a.seeds for row in ROWS]
    start = time.perf_counter()
    if a.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
            runs = list(pool.map(one, *zip(*jobs, strict=True)))
    else:
        runs = [one(s, row) for s, row in jobs]
    seconds = time.perf_counter() - start
    print(
        f"digits, {a.labeled_per_class} labels per class, {a.steps} steps, seeds {a.seeds}; "
        f"{seconds:.0f} s on {cpu_name()}, {git_commit()}\n"
    )
    print(accuracy_table(runs, a.seeds))
    for row in ROWS:
        print(f"\n{row}: medians over seeds\n\n{table(medians(runs, row))}")
    print(f"\nmpl_uda - uda, same seed: medians over seeds\n\n{paired_table(runs, a.seeds)}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(a).items()}, "seconds": seconds, "runs": runs}
    a.out.write_text(json.dumps(record, indent=1))
    plot(runs, a.figure)
    return runs


if __name__ == "__main__":
    main()
