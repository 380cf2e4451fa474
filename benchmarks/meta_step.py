"""One Meta Pseudo Labels step, timed side by side: torch.optim, `higher`, and metapl.

Teacher and student are MLPs 64-256-256-10 (float32), the batch is 64 labeled + 448 unlabeled
examples, both optimizers are SGD with momentum 0.9. Rows:

1. plain pseudo labels (torch.optim): the teacher labels x_u (soft, detached), takes a CE step on
   x_l; the student takes a CE step on the pseudo labels. Two nn.Modules, no meta-gradient.
2. exact MPL with `higher`: innerloop_ctx on the student with its differentiable SGD; the
   student's labeled CE after one lookahead step is backpropagated to the teacher, plus the
   teacher's supervised CE; torch.optim teacher step; the student keeps the lookahead.
3. exact MPL with metapl.meta_grad, eager.
4. (3) under one torch.compile(fullgraph=True) of the whole step.
5. finite_difference (eager, and compiled when it compiles).
6. first_order with sampled hard labels (eager and compiled).

Plus a reference row, "plain compiled": row 1 as a pure function with metapl.optim under
torch.compile, to separate what compiling buys from what the meta-gradient costs. Columns: median
and IQR of the per-step wall time, the fastest step, ratios of medians, the matmul FLOPs of one
step (torch.profiler), the peak memory one step allocates above what it started with (CUDA:
max_memory_allocated; CPU: the profiler's allocator events), and the first call (compile).

For 3-6 the whole step is one pure function of (teacher params, student params, both optimizer
states, batch); the student's real update is the lookahead ``res.student_params``. Before timing,
2, 3 and 4 are checked to give the same teacher gradient and the same new student.

    python benchmarks/meta_step.py --repeats 50
    python benchmarks/meta_step.py --device cuda
    python benchmarks/meta_step.py --profile "exact compiled"   # torch.profiler table of one row
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import statistics
import sys
from collections.abc import Callable

import higher
import torch
import torch.nn.functional as F
from _machine import cpu_name, git_commit
from _measure import measure_step, timed
from _tasks import (
    LR_STUDENT,
    LR_TEACHER,
    MOMENTUM,
    N_LABELED,
    N_UNLABELED,
    SIZES,
    make_batch,
    mlp,
)
from torch import Tensor, nn
from torch.func import functional_call, grad

import metapl
from metapl import optim
from metapl.functional import soft_cross_entropy

# ----------------------------------------------------------------------------- steps
# Each factory returns (step, teacher, student): step() advances its own copy of the models by
# one training step; teacher() / student() return the current parameters as dicts.


def plain_step(teacher: nn.Module, student: nn.Module, batch):
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=LR_TEACHER, momentum=MOMENTUM)
    s_opt = torch.optim.SGD(student.parameters(), lr=LR_STUDENT, momentum=MOMENTUM)
    x_l, y_l, x_u, _ = batch

    def step():
        with torch.no_grad():
            pseudo = F.softmax(teacher(x_u), dim=-1)
        t_opt.zero_grad()
        F.cross_entropy(teacher(x_l), y_l).backward()
        t_opt.step()
        s_opt.zero_grad()
        soft_cross_entropy(student(x_u), pseudo).backward()
        s_opt.step()

    return step, lambda: _params(teacher), lambda: _params(student)


def higher_step(teacher: nn.Module, student: nn.Module, batch):
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=LR_TEACHER, momentum=MOMENTUM)
    s_opt = torch.optim.SGD(student.parameters(), lr=LR_STUDENT, momentum=MOMENTUM)
    x_l, y_l, x_u, _ = batch

    def step():
        t_opt.zero_grad()
        with higher.innerloop_ctx(student, s_opt, copy_initial_weights=True) as (fs, diffopt):
            pseudo = F.softmax(teacher(x_u), dim=-1)  # with grad: the teacher learns through it
            diffopt.step(soft_cross_entropy(fs(x_u), pseudo))
            mpl_loss = F.cross_entropy(fs(x_l), y_l)
            (mpl_loss + F.cross_entropy(teacher(x_l), y_l)).backward()
            t_opt.step()
            # The student's real step is the lookahead: copy its params and momentum back.
            with torch.no_grad():
                pairs = zip(student.parameters(), fs.parameters(), strict=True)
                for i, (p, new) in enumerate(pairs):
                    p.copy_(new)
                    buf = diffopt.state[0][i]["momentum_buffer"].detach()
                    s_opt.state[p]["momentum_buffer"] = buf

    return step, lambda: _params(teacher), lambda: _params(student)


def mpl_step_fn(teacher: nn.Module, student: nn.Module, method: str) -> tuple[Callable, tuple]:
    """The whole MPL step as one pure function, and its initial (params, states)."""
    t_opt = optim.sgd(LR_TEACHER, momentum=MOMENTUM)
    s_opt = optim.sgd(LR_STUDENT, momentum=MOMENTUM)

    def step(t, s, t_state, s_state, x_l, y_l, x_u, gumbel):
        def outer_loss(s_):
            return F.cross_entropy(functional_call(student, s_, (x_l,)), y_l)

        if method == "first_order":
            with torch.no_grad():
                hard = torch.argmax(functional_call(teacher, t, (x_u,)) + gumbel, dim=-1)

            def inner_loss(s_, t_):
                return F.cross_entropy(functional_call(student, s_, (x_u,)), hard)

            def log_prob(t_):
                return -F.cross_entropy(functional_call(teacher, t_, (x_u,)), hard)

        else:
            log_prob = None

            def inner_loss(s_, t_):
                pseudo = F.softmax(functional_call(teacher, t_, (x_u,)), dim=-1)
                return soft_cross_entropy(functional_call(student, s_, (x_u,)), pseudo)

        res = metapl.meta_grad(
            inner_loss,
            outer_loss,
            s,
            t,
            s_opt,
            s_state,
            method="score_function" if method == "first_order" else method,
            log_prob=log_prob,
        )

        def supervised(t_):
            return F.cross_entropy(functional_call(teacher, t_, (x_l,)), y_l)

        sup = grad(supervised)(t)
        t_grads = {k: res.meta_grads[k] + sup[k] for k in t}
        new_t, new_t_state = t_opt.step(t, t_grads, t_state)
        return new_t, res.student_params, new_t_state, res.opt_state

    init = (
        _params(teacher),
        _params(student),
        t_opt.init(_params(teacher)),
        s_opt.init(_params(student)),
    )
    return step, init


def plain_step_fn(teacher: nn.Module, student: nn.Module) -> tuple[Callable, tuple]:
    """Row (1) as a pure function with metapl.optim: a reference for what compiling buys."""
    t_opt = optim.sgd(LR_TEACHER, momentum=MOMENTUM)
    s_opt = optim.sgd(LR_STUDENT, momentum=MOMENTUM)

    def step(t, s, t_state, s_state, x_l, y_l, x_u, gumbel):
        with torch.no_grad():
            pseudo = F.softmax(functional_call(teacher, t, (x_u,)), dim=-1)

        def supervised(t_):
            return F.cross_entropy(functional_call(teacher, t_, (x_l,)), y_l)

        def unlabeled(s_):
            return soft_cross_entropy(functional_call(student, s_, (x_u,)), pseudo)

        new_t, new_t_state = t_opt.step(t, grad(supervised)(t), t_state)
        new_s, new_s_state = s_opt.step(s, grad(unlabeled)(s), s_state)
        return new_t, new_s, new_t_state, new_s_state

    init = (
        _params(teacher),
        _params(student),
        t_opt.init(_params(teacher)),
        s_opt.init(_params(student)),
    )
    return step, init


def metapl_step(teacher, student, batch, method: str, compiled: bool):
    if method == "plain":
        fn, state = plain_step_fn(teacher, student)
    else:
        fn, state = mpl_step_fn(teacher, student, method)
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    box = [state]

    def step():
        box[0] = fn(*box[0], *batch)

    return step, lambda: box[0][0], lambda: box[0][1]


def mpl_class_step(teacher, student, batch, method: str, compiled: bool):
    """The same step through ``metapl.MPL``: one teacher forward on cat(x_l, x_u) and the
    meta-gradient taken with respect to the teacher's logits, then one teacher backward."""
    hard = method == "first_order"
    mpl = metapl.MPL(
        copy.deepcopy(teacher),
        copy.deepcopy(student),
        optim.sgd(LR_TEACHER, momentum=MOMENTUM),
        optim.sgd(LR_STUDENT, momentum=MOMENTUM),
        meta_grad=method,
        pseudo_labels="hard" if hard else "soft",
        compile=compiled,
    )
    x_l, y_l, x_u, _ = batch

    def step():
        mpl.step(x_l, y_l, x_u, sync=False)

    return step, lambda: _params(mpl.teacher), lambda: _params(mpl.student)


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# ----------------------------------------------------------------------------- measuring


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def check_same_teacher_gradient(rows: dict, t0: dict[str, Tensor]) -> str:
    """After one step from the same start, (2), (3) and (4) (where it ran) must have the same
    teacher gradient (read off the teacher's first update, ``g = (t0 - t1) / lr``, since the
    momentum starts at zero) and the same new student."""
    results = {}
    for name in (
        "higher (exact)",
        "exact eager",
        "exact compiled",
        "MPL exact eager",
        "MPL exact compiled",
    ):
        if name not in rows:
            continue
        _, teacher, student = rows[name]
        t1 = teacher()
        results[name] = ({k: (t0[k] - t1[k]) / LR_TEACHER for k in t0}, student())
    ref_g, ref_s = results["higher (exact)"]
    worst = 0.0
    for name, (g, s) in results.items():
        for k in ref_g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-3, atol=1e-5, msg=f"{name} {k}")
            torch.testing.assert_close(s[k], ref_s[k], rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
            scale = ref_g[k].abs().max().item()
            worst = max(worst, (g[k] - ref_g[k]).abs().max().item() / scale)
    names = [name.replace(" (exact)", "") for name in results]
    checked = ", ".join(names[:-1]) + " and " + names[-1]
    if "finite_difference eager" in rows:
        t1 = rows["finite_difference eager"][1]()
        g_fd = torch.cat([((t0[k] - t1[k]) / LR_TEACHER).flatten() for k in t0])
        g_ex = torch.cat([g.flatten() for g in results["exact eager"][0].values()])
        rel = (torch.linalg.norm(g_fd - g_ex) / torch.linalg.norm(g_ex)).item()
        fd_note = f"; finite_difference's teacher gradient is within {rel:.1e} (relative L2)"
    else:
        fd_note = ""
    return (
        f"checked before timing: {checked} give the same teacher "
        f"gradient (max diff {worst:.1e} of its max) and the same new student" + fd_note
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per row")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps per row (after compile)"
    )
    parser.add_argument("--block", type=int, default=5, help="steps per row per round-robin turn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument("--profile", default=None, help="print a torch.profiler table for a row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher, student = mlp(1).to(device), mlp(2).to(device)
    batch = make_batch(device)
    factories: dict[str, Callable] = {
        "plain (torch.optim)": lambda: plain_step(teacher, student, batch),
        "higher (exact)": lambda: higher_step(teacher, student, batch),
    }
    if not args.no_compile:
        factories["plain compiled (reference)"] = lambda: metapl_step(
            teacher, student, batch, "plain", True
        )
    for method in ("exact", "finite_difference", "first_order"):
        for compiled in (False, True):
            if compiled and args.no_compile:
                continue
            name = f"{method} {'compiled' if compiled else 'eager'}"
            factories[name] = lambda m=method, c=compiled: metapl_step(
                teacher, student, batch, m, c
            )
    for method in ("exact", "first_order"):
        for compiled in (False, True):
            if compiled and args.no_compile:
                continue
            name = f"MPL {method} {'compiled' if compiled else 'eager'}"
            factories[name] = lambda m=method, c=compiled: mpl_class_step(
                teacher, student, batch, m, c
            )

    if args.profile:
        factories = {args.profile: factories[args.profile]}
    print("meta_step: first call of every row (compiles the compiled ones)...", file=sys.stderr)
    t0 = _params(teacher)
    rows, notes, first_call = {}, [], {}
    for name, make in factories.items():
        row = make()
        try:
            first_call[name] = timed(row[0], device)
        except Exception as err:  # report, don't hide: the note says why the row is missing
            notes.append(f"{name}: failed on first call: {type(err).__name__}: {err}"[:400])
            continue
        rows[name] = row
    if {"higher (exact)", "exact eager"} <= rows.keys():
        notes.insert(0, check_same_teacher_gradient(rows, t0))

    if args.profile:
        step = rows[args.profile][0]
        for _ in range(args.warmup):
            step()
        with torch.profiler.profile(record_shapes=False) as prof:
            for _ in range(10):
                step()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=30))
        return

    for step, _, _ in rows.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in rows}
    rounds = -(-args.repeats // args.block)
    for _ in range(rounds):  # round-robin, so background load hits every row alike
        for name, (step, _, _) in rows.items():
            for _ in range(args.block):
                times[name].append(timed(step, device))
    measured = {name: measure_step(step, device) for name, (step, _, _) in rows.items()}

    stats = {name: quartiles([1e3 * t for t in ts]) for name, ts in times.items()}
    fastest = {name: 1e3 * min(ts) for name, ts in times.items()}
    plain = stats["plain (torch.optim)"][1]
    ref_higher = stats["higher (exact)"][1]
    print(_machine(device, args))
    print()
    print(
        "| step | ms/step (median) | IQR (ms) | min (ms) | × plain | × higher | matmul MFLOP "
        "| peak memory | first call (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (q1, med, q3) in stats.items():
        print(
            f"| {name} | {med:.2f} | {q3 - q1:.2f} | {fastest[name]:.2f} | {med / plain:.2f} "
            f"| {med / ref_higher:.2f} "
            f"| {measured[name][1] / 1e6:.0f} | {measured[name][0] / 2**20:.1f} MiB "
            f"| {first_call[name]:.2f} |"
        )
    print()
    for prefix in ("", "MPL "):
        ratios = []
        if f"{prefix}exact compiled" in stats:
            comp = stats[f"{prefix}exact compiled"][1]
            ratios.append(f"compiled {comp / plain:.2f}x plain and {comp / ref_higher:.2f}x higher")
        if f"{prefix}exact eager" in stats:
            ratios.append(f"eager {stats[f'{prefix}exact eager'][1] / ref_higher:.2f}x higher")
        if ratios:
            print(f"- {prefix}exact: {', '.join(ratios)} (medians)")
    if "exact compiled" in stats:
        f_plain, f_higher = fastest["plain (torch.optim)"], fastest["higher (exact)"]
        print(
            "- the same ratios from the fastest step of each row (least disturbed by other load): "
            f"compiled exact {fastest['exact compiled'] / f_plain:.2f}x plain and "
            f"{fastest['exact compiled'] / f_higher:.2f}x higher, eager exact "
            f"{fastest['exact eager'] / f_higher:.2f}x higher"
        )
    flops = {name: m[1] for name, m in measured.items()}
    print(
        f"- work: exact does {flops['exact eager'] / flops['plain (torch.optim)']:.2f}x the matmul "
        f"FLOPs of plain and {flops['exact eager'] / flops['higher (exact)']:.2f}x those of higher"
    )
    for note in notes:
        print(f"- {note}")


def _machine(device: torch.device, args) -> str:
    lines = [
        f"- machine: {platform.machine()} {cpu_name()}, {platform.system()} {platform.release()}",
        f"- CPU count: {os.cpu_count()}, torch threads: "
        f"{torch.get_num_threads()}, device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"higher {importlib.metadata.version('higher')}, metapl {metapl.__version__} "
        f"({git_commit()})",
        f"- MLP {'-'.join(map(str, SIZES))} teacher and student, {N_LABELED} labeled + "
        f"{N_UNLABELED} unlabeled, float32, SGD(momentum {MOMENTUM}); {args.repeats} timed steps "
        f"per row after {args.warmup} warm-up steps, round-robin in blocks of {args.block}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
