"""MAML, first-order MAML, Meta-SGD and iMAML on sinusoid regression, with metapl.meta_grad.

The setting of Finn et al. (ICML 2017, Sec. 5.1): a task is ``y = A sin(x + b)`` with amplitude
``A ~ U[0.1, 5]`` and phase ``b ~ U[0, pi]``; a learner sees K = 10 points ``x ~ U[-5, 5]`` and
adapts an MLP 1-40-40-1 (ReLU) by gradient descent on their mean squared error. Meta-training
takes 25 tasks per meta-iteration (batched with ``torch.func.vmap``; 10 support and 10 query
points each) and one Adam step (lr 1e-3) on the meta parameters. The paper trains 70k
meta-iterations; the default here is 10k (times: docs/maml.md).

Rows: every one starts from the same initialisation and sees the same task stream.

==========  ===========================================================================
pretrained  one network regressed on all tasks at once (no inner loop), fine-tuned at test
maml        ``meta_grad(..., lambda m: m, theta, sgd(0.01), steps=1)``: second order
fomaml      the same with ``method="first_order"`` (the second-order terms dropped)
meta_sgd    Li et al. (2017): the start and one learning rate per weight are both meta
            parameters (``optimizer=lambda m: sgd({k: m["lr_" + k] ...})``), rates start at 0.01
imaml       Rajeswaran et al. (2019): inner loss + lam/2 ||s - theta||^2 (lam 10), 10 Adam
            steps at lr 0.01, ``method="implicit"`` with 5 conjugate-gradient iterations
maml_bn     MAML with BatchNorm after the second layer, 5 SGD steps: the running statistics
            start at (0, 1) for every task, accumulate over the inner steps on the support
            set (a cumulative average, as ``BatchNorm1d(momentum=None)``), are carried through
            the steps as ``meta_grad(..., state=)`` and normalise the query points (eval
            mode: no statistics of the query batch are used)
==========  ===========================================================================

Evaluation: 600 held-out tasks, each with K = 10 support points; every row adapts with the
update it was meta-trained with (SGD at alpha = 0.01 for pretrained / maml / fomaml, the
learned per-weight rates for meta_sgd, Adam at ``imaml_lr`` on the proximal loss for imaml) and
is scored by the MSE on 100 evenly spaced points of [-5, 5] after 0, 1, ..., 10 steps; mean and
95% confidence interval over tasks. Results and timings: docs/maml.md.

    python examples/maml_sinusoid.py                          # all rows, 10k iterations each
    python examples/maml_sinusoid.py --rows maml fomaml --iterations 2000 --json
    python examples/maml_sinusoid.py --iterations 70000 --rows maml   # the paper's budget
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vmap
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.training.cli import parse
from metapl.training.tracking import Tracker

Params = dict[str, Tensor]
Row = Literal["pretrained", "maml", "fomaml", "meta_sgd", "imaml", "maml_bn"]
ROWS: tuple[Row, ...] = get_args(Row)
NAMES = ("w0", "b0", "w1", "b1", "w2", "b2")  # the MLP's parameters
BN_EPS = 1e-5


@dataclass(frozen=True)
class Config:
    iterations: int = 10_000  # meta-iterations of every row (the paper: 70000)
    meta_batch: int = 25  # tasks per meta-iteration
    shots: int = 10  # K: support points per task (and query points in meta-training)
    hidden: int = 40  # width of the MLP 1-hidden-hidden-1
    inner_lr: float = 0.01  # alpha: SGD step of maml / fomaml / pretrained fine-tuning
    meta_lr: float = 1e-3  # Adam learning rate on the meta parameters
    meta_sgd_init: float = 0.01  # meta_sgd: initial value of every per-weight rate
    imaml_lam: float = 10.0  # imaml: proximal strength lam in lam/2 ||s - theta||^2
    imaml_lr: float = 0.01  # imaml: inner Adam learning rate
    imaml_steps: int = 10  # imaml: inner Adam steps per task in meta-training
    imaml_cg: int = 5  # imaml: conjugate-gradient iterations
    bn_steps: int = 5  # maml_bn: inner SGD steps in meta-training
    test_tasks: int = 600  # held-out tasks
    test_steps: int = 10  # adaptation steps at test time (MSE after each is reported)
    test_points: int = 100  # evenly spaced evaluation points on [-5, 5]
    log_every: int = 500  # iterations between logged training losses
    compile: bool = True  # torch.compile each row's meta step (eager if it fails)
    seed: int = 0  # initialisation, training tasks; test tasks use seed + 10000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("seed", "compile") and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")


@dataclass(frozen=True)
class Experiment:
    config: Config = field(default_factory=Config)
    rows: tuple[Row, ...] = ROWS
    output_dir: Path = Path("runs/maml_sinusoid")  # figure, results.json, each row's metrics
    figure_copy: Path | None = None  # also save the figure here (docs/img/maml_sinusoid.png)
    wandb_project: str | None = None  # log each row there (offline without an API key)
    json: bool = False  # print only the JSON results


# ----------------------------------------------------------------------------- tasks and model


class Tasks(NamedTuple):
    amplitude: Tensor  # [n]
    phase: Tensor  # [n]
    x_support: Tensor  # [n, K, 1]
    y_support: Tensor
    x_query: Tensor  # [n, Q, 1]
    y_query: Tensor


def sinusoid(amplitude: Tensor, phase: Tensor, x: Tensor) -> Tensor:
    return amplitude[:, None, None] * torch.sin(x + phase[:, None, None])


def sample_tasks(
    gen: torch.Generator, n: int, shots: int, query: int | Tensor, dtype=torch.float32
) -> Tasks:
    """``n`` tasks with ``shots`` random support points; ``query`` random points per task, or
    a fixed 1-d tensor of query points shared by every task."""
    amplitude = 0.1 + 4.9 * torch.rand(n, generator=gen, dtype=dtype)
    phase = math.pi * torch.rand(n, generator=gen, dtype=dtype)
    x_s = -5 + 10 * torch.rand(n, shots, 1, generator=gen, dtype=dtype)
    if isinstance(query, Tensor):
        x_q = query.to(dtype).reshape(1, -1, 1).expand(n, -1, 1)
    else:
        x_q = -5 + 10 * torch.rand(n, query, 1, generator=gen, dtype=dtype)
    return Tasks(
        amplitude, phase, x_s, sinusoid(amplitude, phase, x_s), x_q, sinusoid(amplitude, phase, x_q)
    )


def init_mlp(gen: torch.Generator, hidden: int, dtype=torch.float32) -> Params:
    """MLP 1-hidden-hidden-1 as a dict, initialised like ``nn.Linear``."""
    sizes = (1, hidden, hidden, 1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = fan_in**-0.5
        params[f"w{i}"] = (torch.rand(fan_out, fan_in, generator=gen, dtype=dtype) * 2 - 1) * bound
        params[f"b{i}"] = (torch.rand(fan_out, generator=gen, dtype=dtype) * 2 - 1) * bound
    return params


def mlp(p: Params, x: Tensor) -> Tensor:
    x = torch.relu(F.linear(x, p["w0"], p["b0"]))
    x = torch.relu(F.linear(x, p["w1"], p["b1"]))
    return F.linear(x, p["w2"], p["b2"])


def mse(p: Params, x: Tensor, y: Tensor) -> Tensor:
    return (mlp(p, x) - y).square().mean()


def mlp_bn(p: Params, x: Tensor, stats: Params, training: bool) -> tuple[Tensor, Params]:
    """``mlp`` with BatchNorm after the second layer (whose bias it replaces): in training,
    normalise with the batch's statistics and fold them into the running ones (cumulative
    average, unbiased variance, as ``nn.BatchNorm1d(momentum=None)``); in eval mode,
    normalise with the running ones. Returns ``(output, new running statistics)``."""
    h = F.linear(torch.relu(F.linear(x, p["w0"], p["b0"])), p["w1"])
    if training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
        n, count = h.shape[0], stats["count"] + 1
        stats = {
            "mean": stats["mean"] + (mean.detach() - stats["mean"]) / count,
            "var": stats["var"] + (var.detach() * n / (n - 1) - stats["var"]) / count,
            "count": count,
        }
    else:
        mean, var = stats["mean"], stats["var"]
    h = (h - mean) / torch.sqrt(var + BN_EPS) * p["bn_weight"] + p["bn_bias"]
    return F.linear(torch.relu(h), p["w2"], p["b2"]), stats


def bn_stats(hidden: int, dtype=torch.float32) -> Params:
    """A task's running statistics before its first step."""
    return {
        "mean": torch.zeros(hidden, dtype=dtype),
        "var": torch.ones(hidden, dtype=dtype),
        "count": torch.zeros((), dtype=dtype),
    }


def init_meta(row: str, cfg: Config, dtype=torch.float32) -> Params:
    theta = init_mlp(torch.Generator().manual_seed(cfg.seed), cfg.hidden, dtype)
    if row == "maml_bn":  # the BatchNorm's affine parameters replace the second layer's bias
        del theta["b1"]
        return {
            **theta,
            "bn_weight": torch.ones(cfg.hidden, dtype=dtype),
            "bn_bias": torch.zeros(cfg.hidden, dtype=dtype),
        }
    if row == "meta_sgd":
        return {
            **theta,
            **{f"lr_{k}": torch.full_like(v, cfg.meta_sgd_init) for k, v in theta.items()},
        }
    return theta


# ----------------------------------------------------------------------------- inner problems


class Inner(NamedTuple):
    """A row's inner loop on one task: where it starts, what it minimises, with which optimizer,
    and how the adapted student predicts."""

    start: Callable[[Params], Params]  # meta -> starting student
    loss: Callable[..., Tensor]  # (student, meta) -> 0-d, or with state: -> (0-d, new state)
    optimizer: optim.Optimizer | Callable[[Params], optim.Optimizer]
    steps: int  # in meta-training
    method: metapl.MethodSpec
    state: Params | None = None  # carried through the steps (BatchNorm statistics)
    predict: Callable[..., Tensor] = lambda s, x: mlp(s, x)  # (student[, state], x) -> y


def inner_problem(row: str, cfg: Config, x: Tensor, y: Tensor) -> Inner:
    """The inner loop of ``row`` on the support set ``(x, y)`` of one task."""

    def task_loss(s: Params, m: Params) -> Tensor:
        return mse(s, x, y)

    if row == "meta_sgd":

        def start(m: Params) -> Params:
            return {k: m[k] for k in NAMES}

        def optimizer(m: Params) -> optim.Optimizer:  # one learned rate per weight
            return optim.sgd({k: m[f"lr_{k}"] for k in NAMES})

        return Inner(start, task_loss, optimizer, 1, metapl.Exact())
    if row == "imaml":

        def proximal_loss(s: Params, m: Params) -> Tensor:
            distance = sum((s[k] - m[k]).square().sum() for k in s)
            return task_loss(s, m) + cfg.imaml_lam / 2 * distance

        implicit = metapl.Implicit(solver=metapl.CG(iterations=cfg.imaml_cg))
        # Adam, not SGD: the implicit gradient assumes the inner problem is solved, so nothing
        # stops meta-training from sharpening the loss until SGD at a fixed lr diverges
        # (docs/maml.md); Adam's steps stay bounded.
        opt = optim.adam(cfg.imaml_lr)
        return Inner(_identity, proximal_loss, opt, cfg.imaml_steps, implicit)
    if row == "maml_bn":

        def bn_loss(s: Params, m: Params, stats: Params) -> tuple[Tensor, Params]:
            out, stats = mlp_bn(s, x, stats, training=True)
            return (out - y).square().mean(), stats

        def predict(s: Params, stats: Params, x_: Tensor) -> Tensor:
            return mlp_bn(s, x_, stats, training=False)[0]

        state = bn_stats(cfg.hidden, x.dtype)
        return Inner(
            _identity,
            bn_loss,
            optim.sgd(cfg.inner_lr),
            cfg.bn_steps,
            metapl.Exact(),
            state=state,
            predict=predict,
        )
    method = metapl.FirstOrder() if row == "fomaml" else metapl.Exact()
    return Inner(_identity, task_loss, optim.sgd(cfg.inner_lr), 1, method)


def _identity(m: Params) -> Params:
    return m


def task_meta_grad(
    row: str, cfg: Config, meta: Params, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor
) -> metapl.MetaGradResult:
    """d (query MSE after the row's inner loop on the support set) / d meta, for one task."""
    inner = inner_problem(row, cfg, x_s, y_s)
    if inner.state is None:
        query_loss = lambda s: mse(s, x_q, y_q)  # noqa: E731
    else:
        query_loss = lambda s, state: (inner.predict(s, state, x_q) - y_q).square().mean()  # noqa: E731
    return metapl.meta_grad(
        inner.loss,
        query_loss,
        inner.start,
        meta,
        inner.optimizer,
        steps=inner.steps,
        method=inner.method,
        state=inner.state,
    )


def adaptation_curve(
    row: str,
    cfg: Config,
    meta: Params,
    x_s: Tensor,
    y_s: Tensor,
    x_q: Tensor,
    y_q: Tensor,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """Query MSE and predictions after 0..steps steps of the row's inner update, one task:
    ``([steps + 1], [steps + 1, Q, 1])``."""
    inner = inner_problem(row, cfg, x_s, y_s)
    opt = inner.optimizer(meta) if callable(inner.optimizer) else inner.optimizer
    s, stats = inner.start(meta), inner.state
    state = opt.init(s)

    def predict(s_):
        return inner.predict(s_, x_q) if stats is None else inner.predict(s_, stats, x_q)

    preds = [predict(s)]
    for _ in range(steps):
        if stats is None:
            g = grad(inner.loss)(s, meta)
        else:
            g, stats = grad(inner.loss, has_aux=True)(s, meta, stats)
        s, state = opt.step(s, g, state)
        preds.append(predict(s))
    preds = torch.stack(preds)
    return (preds - y_q).square().mean(dim=(1, 2)), preds


# ----------------------------------------------------------------------------- meta-training


def make_meta_step(row: str, cfg: Config, meta_opt: optim.Optimizer) -> Callable:
    """``(meta, opt_state, tasks...) -> (meta, opt_state, mean query loss)``: one Adam step on
    the task-averaged meta-gradient; the tasks are batched with vmap."""

    def per_task(meta, x_s, y_s, x_q, y_q):
        if row == "pretrained":  # regress every task's points at once, no inner loop
            x, y = torch.cat([x_s, x_q]), torch.cat([y_s, y_q])
            return grad_and_value(lambda m: mse(m, x, y))(meta)
        res = task_meta_grad(row, cfg, meta, x_s, y_s, x_q, y_q)
        return res.meta_grads, res.outer_loss

    def step(meta, opt_state, x_s, y_s, x_q, y_q):
        grads, losses = vmap(per_task, in_dims=(None, 0, 0, 0, 0))(meta, x_s, y_s, x_q, y_q)
        grads = {k: g.mean(0) for k, g in grads.items()}
        meta, opt_state = meta_opt.step(meta, grads, opt_state)
        return meta, opt_state, losses.mean()

    return step


def train(row: str, cfg: Config, tracker: Tracker | None = None, bar: tqdm | None = None) -> Params:
    """Meta-train ``row`` for ``cfg.iterations`` iterations; returns the meta parameters."""
    meta = init_meta(row, cfg)
    meta_opt = optim.adam(cfg.meta_lr)
    opt_state = meta_opt.init(meta)
    eager = make_meta_step(row, cfg, meta_opt)
    step = torch.compile(eager, fullgraph=True) if cfg.compile else eager
    gen = torch.Generator().manual_seed(cfg.seed)  # the same task stream for every row
    for it in range(cfg.iterations):
        t = sample_tasks(gen, cfg.meta_batch, cfg.shots, cfg.shots)
        batch = (t.x_support, t.y_support, t.x_query, t.y_query)
        try:
            meta, opt_state, loss = step(meta, opt_state, *batch)
        except Exception as err:  # only the first, compiling call may fall back
            if step is eager or it > 0:
                raise
            first_line = str(err).strip().splitlines()[0]
            print(
                f"{row}: torch.compile failed ({type(err).__name__}: {first_line}); running eager",
                file=sys.stderr,
            )
            step = eager
            meta, opt_state, loss = step(meta, opt_state, *batch)
        if tracker is not None and ((it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations):
            tracker.log({"train/query_mse": loss}, step=it + 1)
        if bar is not None:
            bar.update()
    return meta


@torch.no_grad()
def held_out_tasks(cfg: Config) -> Tasks:
    grid = torch.linspace(-5, 5, cfg.test_points)
    return sample_tasks(
        torch.Generator().manual_seed(cfg.seed + 10_000), cfg.test_tasks, cfg.shots, grid
    )


def evaluate(row: str, cfg: Config, meta: Params, tasks: Tasks) -> tuple[Tensor, Tensor]:
    """Per-task MSE ``[n, steps + 1]`` and predictions ``[n, steps + 1, Q, 1]``."""
    curve = vmap(lambda *t: adaptation_curve(row, cfg, meta, *t, steps=cfg.test_steps))
    return curve(tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)


def mean_ci(values: Tensor) -> tuple[list[float | None], list[float | None]]:
    """Mean over tasks (dim 0) and the half-width of its normal 95% confidence interval; None
    where some task's adaptation diverged (a non-finite MSE)."""
    n = values.shape[0]
    half = 1.96 * values.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(values[0])
    finite = values.isfinite().all(0).tolist()
    return (
        [v if ok else None for v, ok in zip(values.mean(0).tolist(), finite, strict=True)],
        [v if ok else None for v, ok in zip(half.tolist(), finite, strict=True)],
    )


# ----------------------------------------------------------------------------- figure


def plot(tasks: Tasks, preds: Tensor, mses: Tensor, path: Path, n: int = 3) -> None:
    """True function, the K shots and MAML's prediction after 0, 1 and 10 steps, ``n`` tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in (0, 1, 10) if s < preds.shape[1]]
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    x = tasks.x_query[0, :, 0]
    for i, ax in enumerate(axes[0][: min(n, len(preds))]):
        ax.plot(x, tasks.y_query[i, :, 0], color="k", lw=2, label="true function")
        for s, color in zip(steps, ("#bbbbbb", "#6baed6", "#d62728"), strict=False):
            label = f"MAML, {s} step{'s' * (s != 1)} (MSE {mses[i, s]:.2f})"
            ax.plot(
                x, preds[i, s, :, 0], color=color, lw=1.5, ls="--" if s == 0 else "-", label=label
            )
        ax.scatter(
            tasks.x_support[i, :, 0],
            tasks.y_support[i, :, 0],
            marker="^",
            s=45,
            color="#2ca02c",
            zorder=3,
            label=f"{tasks.x_support.shape[1]} shots",
        )
        ax.set_title(f"A = {tasks.amplitude[i]:.2f}, b = {tasks.phase[i]:.2f}", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(Experiment, argv, description=__doc__.splitlines()[0])
    cfg = args.config
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give

    tasks = held_out_tasks(cfg)
    results: dict[str, Any] = {"config": asdict(cfg), "rows": {}}
    figure_preds = None
    with tqdm(total=len(args.rows) * cfg.iterations, file=sys.stderr, disable=None) as bar:
        for row in args.rows:
            bar.set_description(row)
            start = time.perf_counter()
            (args.output_dir / row / "metrics.jsonl").unlink(missing_ok=True)  # a rerun replaces it
            tracker = Tracker(
                args.output_dir / row,
                args.wandb_project,
                group="maml_sinusoid",
                name=row,
                config={**asdict(cfg), "row": row},
            )
            meta = train(row, cfg, tracker, bar)
            mses, preds = evaluate(row, cfg, meta, tasks)
            seconds = time.perf_counter() - start
            mean, ci = mean_ci(mses)
            results["rows"][row] = {"mse": mean, "ci95": ci, "seconds": round(seconds, 1)}
            steps = (0, 1, cfg.test_steps)
            tracker.summary({f"test/mse_{s}": mean[s] for s in steps if mean[s] is not None})
            tracker.finish()
            if row == "maml":
                figure_preds = (preds, mses)
    if figure_preds is not None:
        figure = args.output_dir / "maml_sinusoid.png"
        plot(tasks, *figure_preds, figure)
        results["figure"] = str(figure)
        if args.figure_copy is not None:
            plot(tasks, *figure_preds, args.figure_copy)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1))

    if args.json:
        print(json.dumps(results))
    else:
        print_table(results, cfg)
    return results


def print_table(results: dict[str, Any], cfg: Config) -> None:
    last = cfg.test_steps
    print(
        f"\nsinusoid, K={cfg.shots}, {cfg.iterations} meta-iterations, seed {cfg.seed}; "
        f"MSE on {cfg.test_tasks} test tasks (mean ± 95% CI)\n"
    )
    print(f"| row        | 0 steps       | 1 step        | {last} steps      | time  |")
    print("|------------|---------------|---------------|---------------|-------|")
    for row, r in results["rows"].items():
        cells = " | ".join(_cell(r["mse"][s], r["ci95"][s]) for s in (0, 1, last))
        print(f"| {row:<10} | {cells} | {r['seconds']:4.0f}s |")
    if "figure" in results:
        print(f"\nfigure: {results['figure']}")


def _cell(mean: float | None, half: float | None) -> str:
    return "diverged".ljust(13) if mean is None else f"{mean:5.3f} ± {half:5.3f}"


if __name__ == "__main__":
    main()
