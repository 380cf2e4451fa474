"""Reverse-over-reverse against forward-over-reverse curvature in the exact method: peak memory
and time of one meta-gradient, side by side.

Transformer: a byte-level GPT student (``metapl.models.GPT``: context 128, 4 layers, width
128, 4 heads; 0.8M parameters) trained on a mixture of 4 sources (8 sequences each per step),
the per-source mixing logits the meta parameters, K Adam steps (one batch per step, after
three plain ones), the outer loss its next-byte loss on 16 target sequences. Rows per K, each
curvature: the default (reverse: eager calls backpropagate through the kept steps with plain
autograd; forward: each step's products from one jvp of its gradient, the kept steps'
gradients kept), ``checkpoint=True`` (reverse: every step but the last recomputed, the least
memory reverse mode has; forward: no gradient kept) and ``compile=True`` (each step's forward
and pullback one compiled graph, every step recomputed).

MPL: one ``metapl.MPL`` step (exact, soft pseudo labels, UDA) with WRN-28-2 teacher and
student on 32x32 images (8 labeled, 8 unlabeled with their strong views), ``curvature`` reverse
and forward (``--quick``: the MLP teacher and student of benchmarks/meta_step.py instead).

Peak memory: bytes above what was allocated before the call (torch.profiler's CPU allocator
events; CUDA: max_memory_allocated). Every forward row is checked against reverse first.

    python benchmarks/curvature.py --threads 1
    python benchmarks/curvature.py --quick        # small sizes, a few repeats
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _machine import cpu_name, git_commit
from _measure import peak_memory
from torch.func import functional_call, grad
from torch.utils._pytree import tree_leaves

import metapl
from metapl import optim
from metapl.models import GPT, MLP, next_byte_loss, wide_resnet28
from metapl.mpl import Batch, mpl_step

SOURCES, PER_SOURCE, TARGETS = 4, 8, 16


def transformer_rows(steps: int, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """(name, call) per curvature and checkpoint, on one fixed transformer problem."""
    gen = torch.Generator().manual_seed(0)
    size = (
        {"context": 32, "layers": 2, "width": 32, "heads": 2}
        if quick
        else {"context": 128, "layers": 4, "width": 128, "heads": 4}
    )
    torch.manual_seed(0)
    model = GPT(**size)
    student = {k: v.detach() for k, v in model.named_parameters()}
    t = size["context"]
    batches = torch.randint(0, 256, (steps, SOURCES * PER_SOURCE, t), generator=gen)
    target = torch.randint(0, 256, (TARGETS, t), generator=gen)
    mixing = {"logits": torch.zeros(SOURCES)}

    def inner(s, m, batch):
        losses = next_byte_loss(functional_call(model, s, (batch,)), batch)
        per_source = losses.view(SOURCES, PER_SOURCE).mean(1)
        return (torch.softmax(m["logits"], 0) * per_source).sum()

    def outer(s):
        return next_byte_loss(functional_call(model, s, (target,)), target).mean()

    # Adam's first step divides by sqrt(v) ~ |g|, where its derivative is lr * eps / (|g| +
    # eps)^2: rounding noise in the smallest gradients would decide the meta-gradient. Three
    # plain steps first give every parameter a second moment.
    opt = optim.adam(1e-3)
    opt_state = opt.init(student)
    for batch in torch.randint(0, 256, (3, SOURCES * PER_SOURCE, t), generator=gen):
        g = grad(inner)(student, mixing, batch)
        student, opt_state = opt.step(student, g, opt_state)

    def call(curvature: str, option: str) -> Callable[[], object]:
        checkpoint = True if option == "checkpoint=True" else None
        method = metapl.Exact(checkpoint=checkpoint, curvature=curvature)
        return lambda: (
            metapl.meta_grad(
                inner,
                outer,
                student,
                mixing,
                opt,
                opt_state,
                steps=steps,
                method=method,
                inner_batches=batches,
                compile=option == "compile=True",
            ).meta_grads
        )

    return [
        (f"{curvature}{', ' + option if option else ''}", call(curvature, option))
        for option in ("", "checkpoint=True", "compile=True")
        for curvature in ("reverse", "forward")
    ]


def mpl_rows(quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """The teacher after one MPL step (``metapl.mpl.mpl_step``, pure: every call starts from
    the same state), per curvature."""
    gen = torch.Generator().manual_seed(1)
    shape = (64,) if quick else (3, 32, 32)
    x_l, x_u, x_s = (torch.randn(8, *shape, generator=gen) for _ in range(3))
    y_l = torch.arange(8) % 10

    def build(seed: int):
        torch.manual_seed(seed)
        return MLP(64, (256, 256)) if quick else wide_resnet28(2, 10)

    def call(curvature: str) -> Callable[[], object]:
        mpl = metapl.MPL(
            build(0),
            build(1),
            optim.sgd(0.05, momentum=0.9),
            optim.sgd(0.05, momentum=0.9),
            uda=metapl.UDA(weight=1.0, temperature=0.7, threshold=0.6),
            curvature=curvature,
        )
        batch = Batch(x_l, y_l, x_u, x_s)
        return lambda: mpl_step(mpl.config, mpl.state, batch)[0].teacher.params

    return [(curvature, call(curvature)) for curvature in ("reverse", "forward")]


def timed(rows, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per row, round-robin so that background load hits every row alike."""
    for _, fn in rows:
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def check_agree(rows, rtol: float) -> None:
    """Every row's meta-gradient equals the first row's (reverse, the default)."""
    expected = rows[0][1]()
    for name, fn in rows[1:]:
        got = fn()
        for e, g in zip(tree_leaves(expected), tree_leaves(got), strict=True):
            err = ((g - e).norm() / e.norm().clamp_min(1e-30)).item()
            if err > rtol:
                raise AssertionError(f"{name}: relative error {err:.1e} to reverse")


def table(title: str, rows, repeats: int, warmup: int) -> str:
    medians = timed(rows, repeats, warmup)
    peaks = {name: peak_memory(fn, torch.device("cpu")) for name, fn in rows}
    base_t, base_m = medians[rows[0][0]], peaks[rows[0][0]]
    lines = [
        f"\n{title}\n",
        "| curvature | median ms | time / reverse | peak MiB | memory / reverse |",
        "|---|---|---|---|---|",
    ]
    for name, _ in rows:
        lines.append(
            f"| {name} | {1e3 * medians[name]:.1f} | {medians[name] / base_t:.2f} | "
            f"{peaks[name] / 2**20:.1f} | {peaks[name] / base_m:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row first")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4], help="inner steps K")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-mpl", action="store_true", help="the transformer rows only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    print(
        f"# {cpu_name()}, {args.threads} thread(s); torch {torch.__version__}, "
        f"Python {platform.python_version()}, {git_commit()}"
    )
    print(f"- {repeats} timed calls per row after {args.warmup} warm-up call(s), round-robin")
    for k in args.steps:
        rows = transformer_rows(k, args.quick)
        check_agree(rows, rtol=1e-4)
        print(table(f"Transformer data mixing, K={k} Adam steps:", rows, repeats, args.warmup))
    if not args.skip_mpl:
        rows = mpl_rows(args.quick)
        check_agree(rows, rtol=1e-4)
        name = "MLP 64-256-256-10" if args.quick else "WRN-28-2, 32x32"
        print(table(f"One MPL step ({name}):", rows, repeats, args.warmup))


if __name__ == "__main__":
    main()
