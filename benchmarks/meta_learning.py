"""Meta-learning workloads timed side by side: metapl.meta_grad against `higher` (and a raw
torch.func unroll as the floor of what torch.func costs per call).

MAML: sinusoid regression (Finn et al. 2017): MLP 1-40-40-1 (ReLU), 10 support + 10 query points
per task, K = 5 inner SGD steps (lr 0.01), the gradient of the query MSE w.r.t. the initial
weights (second order). Rows: one task eager (the default keeps the last 5 steps' graphs, so
nothing is recomputed at K=5; also with checkpoint=True: every step but the last recomputed, the
least memory); 25 tasks (metapl under torch.func.vmap, higher in a loop); metapl compiled
(torch.compile of the function calling meta_grad).

Learned learning rate: MLP 64-256-256-10 on 1200 examples (full batch), SGD momentum 0.9 with lr
= exp(log_lr) a meta parameter, K = 5, 20 and 100 inner steps, the gradient of the validation
loss (300 examples) w.r.t. log_lr. Rows: metapl exact (memory-lean reverse pass: the last 5
steps keep their graphs), metapl exact with checkpoint=True (only the last), with compile=True
(the step compiled once for every K), metapl first_order, higher (learned lr via ``override``),
torchopt when it is installed and runs on this torch. Columns: median step time, ratio to
higher, peak memory above the start of the call (torch.profiler's CPU allocator events; CUDA:
max_memory_allocated). Compile times from torch's own accounting.

Every exact row is checked against higher's gradient.

    python benchmarks/meta_learning.py              # all rows
    python benchmarks/meta_learning.py --quick      # fewer repeats
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _machine import cpu_name, git_commit
from _measure import peak_memory
from _tasks import (
    BN_STEPS,
    MAML_LR,
    MAML_STEPS,
    MOMENTUM,
    RIDGE_D,
    RIDGE_N,
    TASKS,
    higher_bn_maml,
    higher_long,
    higher_maml,
    long_problem,
    maml_model,
    metapl_bn_maml,
    metapl_long,
    metapl_maml,
    metapl_ridge,
    ridge_problem,
    sinusoid_tasks,
    torchopt_long,
    torchopt_ridge,
)
from torch import nn
from torch.func import functional_call, grad

import metapl
from metapl import optim

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import higher

HYPER_SIZES, N_TRAIN, N_VAL = (64, 256, 256, 10), 1200, 300


# --------------------------------------------------------------------------- MAML


def torch_func_maml(model: nn.Module) -> Callable:
    """MAML written directly with torch.func (grad of the unrolled steps): the floor."""

    def query_loss(theta, x_s, y_s, x_q, y_q):
        def support(s):
            return F.mse_loss(functional_call(model, s, (x_s,)), y_s)

        s = theta
        for _ in range(MAML_STEPS):
            g = grad(support)(s)
            s = {k: s[k] - MAML_LR * g[k] for k in s}
        return F.mse_loss(functional_call(model, s, (x_q,)), y_q)

    return grad(query_loss)


def maml_rows(args) -> list[tuple]:
    model = maml_model()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    tasks = sinusoid_tasks(TASKS)
    one = tuple(t[0] for t in tasks)
    ours, floor, ref = metapl_maml(model), torch_func_maml(model), higher_maml(model)
    kept = metapl_maml(model, checkpoint=True)
    batched = torch.func.vmap(ours, in_dims=(None, 0, 0, 0, 0))
    kept_batched = torch.func.vmap(kept, in_dims=(None, 0, 0, 0, 0))
    floor_batched = torch.func.vmap(floor, in_dims=(None, 0, 0, 0, 0))
    compiled_one = torch.compile(ours, fullgraph=True)
    compiled_batched = torch.compile(batched, fullgraph=True)
    rows = [
        ("1 task: higher", lambda: ref(*one), "ref1"),
        ("1 task: torch.func unroll (floor)", lambda: floor(theta, *one), "ref1"),
        ("1 task: metapl eager", lambda: ours(theta, *one), "ref1"),
        ("1 task: metapl eager, checkpoint=True", lambda: kept(theta, *one), "ref1"),
        ("1 task: metapl compiled", lambda: compiled_one(theta, *one), "ref1"),
        (
            f"{TASKS} tasks: higher loop",
            lambda: [ref(*(t[i] for t in tasks)) for i in range(TASKS)],
            "ref25",
        ),
        (
            f"{TASKS} tasks: torch.func unroll, vmap (floor)",
            lambda: floor_batched(theta, *tasks),
            "ref25",
        ),
        (f"{TASKS} tasks: metapl vmap", lambda: batched(theta, *tasks), "ref25"),
        (
            f"{TASKS} tasks: metapl vmap, checkpoint=True",
            lambda: kept_batched(theta, *tasks),
            "ref25",
        ),
        (f"{TASKS} tasks: metapl vmap compiled", lambda: compiled_batched(theta, *tasks), "ref25"),
    ]
    table = _time_rows(rows, args, memory=False)
    expected = ref(*one)
    for name, fn in (("eager", ours), ("checkpoint=True", kept), ("compiled", compiled_one)):
        _check(name, fn(theta, *one), expected)
    loop = [ref(*(t[i] for t in tasks)) for i in range(TASKS)]
    per_task = [torch.stack([g[j] for g in loop]) for j in range(len(loop[0]))]
    for name, fn in (
        ("vmap", batched),
        ("vmap, checkpoint=True", kept_batched),
        ("vmap compiled", compiled_batched),
    ):
        _check(name, fn(theta, *tasks), per_task)
    return table


# --------------------------------------------------------------------------- learned lr


def hyper_problem():
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(HYPER_SIZES[:-1], HYPER_SIZES[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(HYPER_SIZES) - 2 else [])
    model = nn.Sequential(*layers)
    x, x_v = torch.randn(N_TRAIN, HYPER_SIZES[0]), torch.randn(N_VAL, HYPER_SIZES[0])
    y, y_v = torch.randint(0, 10, (N_TRAIN,)), torch.randint(0, 10, (N_VAL,))
    return model, x, y, x_v, y_v


def metapl_hyper(
    model,
    x,
    y,
    x_v,
    y_v,
    steps,
    method="exact",
    compile=False,
    whole=False,
    checkpoint: bool | int | None = None,
) -> Callable:
    s0 = {k: v.detach() for k, v in model.named_parameters()}
    meta = {"log_lr": torch.tensor(-3.0)}

    def inner(s, m):
        return F.cross_entropy(functional_call(model, s, (x,)), y)

    def outer(s):
        return F.cross_entropy(functional_call(model, s, (x_v,)), y_v)

    def optimizer(m):
        return optim.sgd(m["log_lr"].exp(), momentum=MOMENTUM)

    def run():
        return metapl.meta_grad(
            inner,
            outer,
            s0,
            meta,
            optimizer,
            steps=steps,
            method=method,
            compile=compile,
            checkpoint=checkpoint,
        ).meta_grads["log_lr"]

    return torch.compile(run, fullgraph=True) if whole else run


def higher_hyper(model, x, y, x_v, y_v, steps) -> Callable:
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=MOMENTUM)

    def run():
        log_lr = torch.tensor(-3.0, requires_grad=True)
        with higher.innerloop_ctx(model, opt, override={"lr": [log_lr.exp()]}) as (fm, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fm(x), y))
            (g,) = torch.autograd.grad(F.cross_entropy(fm(x_v), y_v), [log_lr])
        return g

    return run


def torchopt_hyper(model, x, y, x_v, y_v, steps) -> Callable | str:
    try:
        import torchopt
    except ImportError as e:
        return f"not installed ({e.name})"
    try:
        net = model

        def run():
            log_lr = torch.tensor(-3.0, requires_grad=True)
            opt = torchopt.MetaSGD(net, lr=log_lr.exp(), momentum=MOMENTUM)
            snapshot = torchopt.extract_state_dict(net)
            for _ in range(steps):
                opt.step(F.cross_entropy(net(x), y))
            (g,) = torch.autograd.grad(F.cross_entropy(net(x_v), y_v), [log_lr])
            torchopt.recover_state_dict(net, snapshot)
            return g

        run()
        return run
    except Exception as e:  # noqa: BLE001 (report any failure as a table row)
        return f"fails on torch {torch.__version__}: {type(e).__name__}: {e}"[:120]


def hyper_rows(args, steps: int) -> list[tuple]:
    problem = hyper_problem()
    ref = higher_hyper(*problem, steps)
    rows, exact = [(f"K={steps}: higher", ref, "ref")], []
    for name, kwargs in (
        ("metapl exact", {}),
        ("metapl exact, checkpoint=True", {"checkpoint": True}),
        ("metapl exact, compile=True", {"compile": True}),
        ("metapl first_order", {"method": "first_order"}),
    ):
        fn = metapl_hyper(*problem, steps, **kwargs)
        rows.append((f"K={steps}: {name}", fn, "ref"))
        exact += [(name, fn)] if "first_order" not in name else []
    other = torchopt_hyper(*problem, steps)
    if isinstance(other, str):
        print(f"torchopt: {other}")
    else:
        rows.append((f"K={steps}: torchopt (MetaSGD)", other, "ref"))
        exact.append(("torchopt", other))
    table = _time_rows(rows, args, memory=True)
    expected = ref()
    for name, fn in exact:  # float32 through K steps: agreement to ~1e-4 relative
        _check(name, [fn()], [expected], rtol=1e-3)
    return table


# --------------------------------------------------------------------------- long unrolls


def long_rows(args, steps: int) -> list[tuple]:
    """K = 200 / 400 steps: time and peak memory, every exact row checked against higher."""
    problem = long_problem(steps)
    ref = higher_long(*problem)
    rows = [(f"K={steps}: higher", ref, "ref")]
    exact = []
    for name, kwargs in (
        ("metapl exact (default: keeps K/2 steps' graphs)", {}),
        ("metapl exact, checkpoint=True (one-step segments)", {"checkpoint": True}),
        ("metapl exact, checkpoint=False (no recomputation)", {"checkpoint": False}),
        ("metapl exact, vmap/compile engine (reverse pass)", {"reduce": lambda tree: tree}),
        ("metapl first_order", {"method": "first_order"}),
    ):
        fn = metapl_long(*problem, **kwargs)
        rows.append((f"K={steps}: {name}", fn, "ref"))
        exact += [(name, fn)] if "first_order" not in name else []
    other = torchopt_long(*problem)
    if isinstance(other, str):
        print(f"torchopt: {other}")
    else:
        rows.append((f"K={steps}: torchopt (MetaSGD)", other, "ref"))
        exact.append(("torchopt", other))
    table = _time_rows(rows, args, memory=True)
    expected = ref()
    for name, fn in exact:
        _check(name, [fn()], [expected], rtol=1e-3)
    return table


# --------------------------------------------------------------------------- iMAML ridge


def ridge_rows(args) -> list[tuple] | str:
    problem = ridge_problem()
    ours, other = metapl_ridge(*problem), torchopt_ridge(*problem)
    if isinstance(other, str):
        return f"torchopt: {other}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchopt calls functorch.vjp
        table = _time_rows(
            [
                ("torchopt (custom_root, CG)", other, "ref"),
                ("metapl implicit_grad (CG)", ours, "ref"),
            ],
            args,
            memory=False,
            reference="torchopt",
        )
        _check("metapl implicit_grad", ours(), other(), rtol=1e-4)
    return table


# --------------------------------------------------------------------------- BatchNorm MAML


def bn_maml_model() -> nn.Module:
    """MLP 1-40-40-1 with BatchNorm after the second layer. Not after the first: a BatchNorm
    of an affine function of a scalar input does not depend on that layer, whose gradients
    are then rounding noise; the layer before a BatchNorm has no bias (its gradient is 0)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 40),
        nn.ReLU(),
        nn.Linear(40, 40, bias=False),
        nn.BatchNorm1d(40),
        nn.ReLU(),
        nn.Linear(40, 1),
    )


def bn_maml_rows(args) -> list[tuple]:
    model = bn_maml_model().train()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    tasks = sinusoid_tasks(TASKS)
    one = tuple(t[0] for t in tasks)
    per_task = {k: v.expand(TASKS, *v.shape).clone() for k, v in buffers.items()}
    ours, ref = metapl_bn_maml(model), higher_bn_maml(model)
    kept = metapl_bn_maml(model, checkpoint=True)
    first = metapl_bn_maml(model, method="first_order")
    batched = torch.func.vmap(ours, in_dims=(None, 0, 0, 0, 0, 0))
    rows = [
        ("1 task: higher", lambda: ref(*one), "ref1"),
        ("1 task: metapl exact", lambda: ours(theta, buffers, *one), "ref1"),
        ("1 task: metapl exact, checkpoint=True", lambda: kept(theta, buffers, *one), "ref1"),
        ("1 task: metapl first_order", lambda: first(theta, buffers, *one), "ref1"),
        (
            f"{TASKS} tasks: higher loop",
            lambda: [ref(*(t[i] for t in tasks)) for i in range(TASKS)],
            "ref25",
        ),
        (
            f"{TASKS} tasks: metapl vmap (one state per task)",
            lambda: batched(theta, per_task, *tasks),
            "ref25",
        ),
    ]
    table = _time_rows(rows, args, memory=False)
    _check_bn_maml_in_float64()
    return table


def _check_bn_maml_in_float64() -> None:
    """metapl against higher on the same problem in float64: in float32 ten steps through a
    BatchNorm of 10 examples amplify rounding (features of small variance) until engines that
    order their operations differently disagree in the third digit."""
    with _default_dtype(torch.float64):
        model = bn_maml_model().double().train()
        theta = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        tasks = [t.double() for t in sinusoid_tasks(4)]
        per_task = {k: v.expand(4, *v.shape).clone() for k, v in buffers.items()}
        ours, ref = metapl_bn_maml(model), higher_bn_maml(model)
        kept = metapl_bn_maml(model, checkpoint=True)
        loop = [ref(*(t[i] for t in tasks)) for i in range(4)]
        for name, fn in (("BN exact", ours), ("BN checkpoint=True", kept)):
            _check(name, fn(theta, buffers, *(t[0] for t in tasks)), loop[0], rtol=1e-9)
        batched = torch.func.vmap(ours, in_dims=(None, 0, 0, 0, 0, 0))(theta, per_task, *tasks)
        stacked = [torch.stack([g[j] for g in loop]) for j in range(len(loop[0]))]
        _check("BN vmap", batched, stacked, rtol=1e-9)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# --------------------------------------------------------------------------- import time


def import_times(args) -> str:
    """``import torch`` and ``import metapl`` each in a fresh interpreter, alternating."""
    code = {"torch": "import torch", "metapl": "import metapl"}
    times = {name: [] for name in code}
    for _ in range(args.import_repeats):
        for name, statement in code.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True)
            times[name].append(time.perf_counter() - start)
    probe = (
        "import sys, torch; before = set(sys.modules); import metapl; "
        "new = set(sys.modules) - before; "
        "print(len(new), 'torch._dynamo' in sys.modules, 'sympy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    torch_s, metapl_s = (statistics.median(times[n]) for n in code)
    return "\n".join(
        [
            "| interpreter runs | median s | ratio to `import torch` |",
            "|---|---|---|",
            f"| python -c 'import torch' | {torch_s:.2f} | 1.00x |",
            f"| python -c 'import metapl' | {metapl_s:.2f} | {metapl_s / torch_s:.2f}x |",
            "",
            f"`import metapl` after `import torch` loads {out[0]} more modules; torch._dynamo "
            f"imported: {out[1]}; sympy imported: {out[2]}.",
        ]
    )


def compile_times(args) -> str:
    """Seconds dynamo + inductor spend compiling (torch's own accounting, inductor's on-disk
    graph cache off so every row compiles from scratch): compile=True against one
    torch.compile around the whole call."""
    problem = hyper_problem()
    lines = ["| compiled | K | compile s |", "|---|---|---|"]
    cases = [("meta_grad(compile=True)", k, {"compile": True}) for k in args.compile_steps]
    cases += [("torch.compile(whole call)", k, {"whole": True}) for k in args.whole_steps]
    for name, steps, kwargs in cases:
        torch._dynamo.reset()
        torch._dynamo.utils.compilation_time_metrics.clear()
        with torch._inductor.config.patch(fx_graph_cache=False):
            metapl_hyper(*problem, steps, **kwargs)()
        headers, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
        seconds = float(dict(zip(headers, values, strict=True))["_compile.compile_inner"])
        lines.append(f"| {name} | {steps} | {seconds:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- timing


def _check(name: str, got, expected, rtol: float = 1e-4) -> None:
    got = list(got.values()) if isinstance(got, dict) else list(got)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(
            g, e, rtol=rtol, atol=1e-6, msg=f"{name} differs from the reference"
        )


def _time_rows(rows, args, memory: bool, reference: str = "higher") -> list[tuple]:
    """(name, median s, ratio to the row group's reference row, the one whose name contains
    ``reference``, peak bytes or None)."""
    for _name, fn, _ in rows:  # compiles the compiled rows, outside the timing
        for _ in range(1 + args.warmup):
            fn()
    times = {name: [] for name, _, _ in rows}
    for _ in range(args.repeats):  # round-robin: every row sees the same machine load
        for name, fn, _ in rows:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    refs = {group: medians[name] for name, _, group in rows if reference in name}
    out = []
    for name, fn, group in rows:
        peak = peak_memory(fn, torch.device("cpu")) if memory else None
        out.append((name, medians[name], medians[name] / refs[group], peak))
    return out


def _table(rows: list[tuple], reference: str = "higher") -> str:
    lines = [f"| row | median ms | ratio to {reference} | peak MiB |", "|---|---|---|---|"]
    for name, median, ratio, peak in rows:
        mib = "" if peak is None else f"{peak / 2**20:.0f}"
        lines.append(f"| {name} | {median * 1e3:.1f} | {ratio:.2f}x | {mib} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    parser.add_argument("--quick", action="store_true", help="5 repeats, K=5 only")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--compile-steps",
        type=int,
        nargs="*",
        default=[5, 100],
        help="K for the compile-time rows of compile=True",
    )
    parser.add_argument(
        "--whole-steps",
        type=int,
        nargs="*",
        default=[5, 20],
        help="K for the compile-time rows of torch.compile(whole call)",
    )
    parser.add_argument(
        "--import-repeats", type=int, default=10, help="interpreter starts per import-time row"
    )
    parser.add_argument(
        "--sections",
        nargs="*",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which tables to print (default: all)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 5
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.import_repeats < 1:
        parser.error("--repeats, --import-repeats and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    print(
        f"- machine: {platform.machine()} {cpu_name()}, {torch.get_num_threads()} torch "
        f"thread(s); python {platform.python_version()}, torch {torch.__version__}, higher "
        f"{importlib.metadata.version('higher')}, torchopt {_version('torchopt')}, metapl "
        f"{metapl.__version__} ({git_commit()})"
    )
    print(f"- {args.repeats} timed calls per row after {args.warmup} warm-up calls, round-robin")
    for section in args.sections:
        SECTIONS[section](args)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _print_compile(args) -> None:
    print("\nCompile time, learned learning rate, MLP 64-256-256-10:\n")
    print(compile_times(args))


def _print_maml(args) -> None:
    print("\nMAML, sinusoid, MLP 1-40-40-1, K=5:\n")
    print(_table(maml_rows(args)))


def _print_bn_maml(args) -> None:
    print(
        f"\nMAML with BatchNorm, sinusoid, MLP 1-40-40(BN)-1, K={BN_STEPS} (the running "
        "statistics carried as state=):\n"
    )
    print(_table(bn_maml_rows(args)))


def _print_hyper(args) -> None:
    for steps in (5,) if args.quick else (5, 20, 100):
        print(f"\nLearned learning rate, MLP 64-256-256-10, {N_TRAIN} examples, K={steps}:\n")
        print(_table(hyper_rows(args, steps)))


def _print_long(args) -> None:
    for steps in (200,) if args.quick else (200, 400):
        print(f"\nLearned learning rate, MLP 64-256-10, batch 128 per step, K={steps}:\n")
        print(_table(long_rows(args, steps)))


def _print_ridge(args) -> None:
    print(
        f"\niMAML ridge regression, n={RIDGE_N}, d={RIDGE_D}: implicit hypergradient at the "
        "closed-form solution:\n"
    )
    table = ridge_rows(args)
    print(table if isinstance(table, str) else _table(table, reference="torchopt"))


def _print_imports(args) -> None:
    print("\nImport time:\n")
    print(import_times(args))


SECTIONS = {
    "compile": _print_compile,
    "maml": _print_maml,
    "bn_maml": _print_bn_maml,
    "hyper": _print_hyper,
    "long": _print_long,
    "ridge": _print_ridge,
    "imports": _print_imports,
}


if __name__ == "__main__":
    main()
