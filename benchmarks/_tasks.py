"""Problems the benchmarks share (meta_learning.py, meta_step.py, compare.py) and their
metapl / higher / torchopt implementations. The peers are imported inside the functions that use
them, so that a process running one library's rows never imports another."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import metapl
from metapl import optim

MAML_STEPS, MAML_LR, TASKS, BN_STEPS, MOMENTUM = 5, 0.01, 25, 10, 0.9
RIDGE_N, RIDGE_D, RIDGE_TOL, RIDGE_ITERATIONS = 500, 100, 1e-6, 100
# One MPL step (meta_step.py): teacher and student MLPs, labeled + unlabeled batch
SIZES = (64, 256, 256, 10)
N_LABELED, N_UNLABELED = 64, 448
LR_TEACHER, LR_STUDENT = 0.05, 0.05


def import_higher() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import higher
    return higher


# --------------------------------------------------------------------------- MPL step


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_batch(device: torch.device) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x_l = torch.randn(N_LABELED, SIZES[0], generator=gen)
    y_l = torch.randint(SIZES[-1], (N_LABELED,), generator=gen)
    x_u = torch.randn(N_UNLABELED, SIZES[0], generator=gen)
    # Gumbel noise for the hard labels of first_order: y = argmax(logits + g) samples softmax.
    gumbel = -torch.log(-torch.log(torch.rand(N_UNLABELED, SIZES[-1], generator=gen)))
    return tuple(t.to(device) for t in (x_l, y_l, x_u, gumbel))


# --------------------------------------------------------------------------- MAML


def maml_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def sinusoid_tasks(n: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=gen)
    phase = torch.pi * torch.rand(n, 1, 1, generator=gen)
    x = 10 * torch.rand(n, 20, 1, generator=gen) - 5
    y = amp * torch.sin(x + phase)
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def metapl_maml(model: nn.Module, **kwargs) -> Callable:
    """MAML's per-task gradient w.r.t. the start, K = 5 SGD steps; ``kwargs`` for meta_grad."""
    opt = optim.sgd(MAML_LR)

    def task_grad(theta, x_s, y_s, x_q, y_q):
        def inner(s, m):
            return F.mse_loss(functional_call(model, s, (x_s,)), y_s)

        def outer(s):
            return F.mse_loss(functional_call(model, s, (x_q,)), y_q)

        return metapl.meta_grad(
            inner, outer, lambda m: m, theta, opt, steps=MAML_STEPS, **kwargs
        ).meta_grads

    return task_grad


def higher_maml(model: nn.Module) -> Callable:
    higher = import_higher()
    opt = torch.optim.SGD(model.parameters(), lr=MAML_LR)

    def task_grad(x_s, y_s, x_q, y_q):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(MAML_STEPS):
                diffopt.step(F.mse_loss(fmodel(x_s), y_s))
            query = F.mse_loss(fmodel(x_q), y_q)
            return torch.autograd.grad(query, list(model.parameters()))

    return task_grad


def long_problem(steps: int):
    """MLP 64-256-10, a fresh batch of 128 examples at every inner step (``inner_batches``),
    SGD momentum 0.9 with a learned learning rate, validation loss on 300 examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    gen = torch.Generator().manual_seed(1)
    xs, ys = (
        torch.randn(steps, 128, 64, generator=gen),
        torch.randint(0, 10, (steps, 128), generator=gen),
    )
    x_v, y_v = torch.randn(300, 64, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    return model, xs, ys, x_v, y_v


def metapl_long(model, xs, ys, x_v, y_v, **kwargs) -> Callable:
    s0 = {k: v.detach() for k, v in model.named_parameters()}

    def inner(s, m, batch):
        return F.cross_entropy(functional_call(model, s, (batch[0],)), batch[1])

    def outer(s):
        return F.cross_entropy(functional_call(model, s, (x_v,)), y_v)

    def optimizer(m):
        return optim.sgd(m["log_lr"].exp(), momentum=MOMENTUM)

    def run():
        return metapl.meta_grad(
            inner,
            outer,
            s0,
            {"log_lr": torch.tensor(-3.0)},
            optimizer,
            steps=len(xs),
            inner_batches=(xs, ys),
            **kwargs,
        ).meta_grads["log_lr"]

    return run


def higher_long(model, xs, ys, x_v, y_v) -> Callable:
    higher = import_higher()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=MOMENTUM)

    def run():
        log_lr = torch.tensor(-3.0, requires_grad=True)
        with higher.innerloop_ctx(model, opt, override={"lr": [log_lr.exp()]}) as (fm, diffopt):
            for x, y in zip(xs, ys, strict=True):
                diffopt.step(F.cross_entropy(fm(x), y))
            (g,) = torch.autograd.grad(F.cross_entropy(fm(x_v), y_v), [log_lr])
        return g

    return run


def torchopt_long(model, xs, ys, x_v, y_v) -> Callable | str:
    try:
        import torchopt
    except ImportError as e:
        return f"not installed ({e.name}; `make bench-env`)"

    def run():
        log_lr = torch.tensor(-3.0, requires_grad=True)
        opt = torchopt.MetaSGD(model, lr=log_lr.exp(), momentum=MOMENTUM)
        snapshot = torchopt.extract_state_dict(model)
        for x, y in zip(xs, ys, strict=True):
            opt.step(F.cross_entropy(model(x), y))
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_v), y_v), [log_lr])
        torchopt.recover_state_dict(model, snapshot)
        return g

    try:
        run()
    except Exception as e:  # noqa: BLE001 (report any failure as a table line)
        return f"fails on torch {torch.__version__}: {type(e).__name__}: {e}"[:120]
    return run


RIDGE_N, RIDGE_D, RIDGE_TOL, RIDGE_ITERATIONS = 500, 100, 1e-6, 100


def ridge_problem():
    """iMAML's inner problem on ridge regression: inner(w; theta, lam) = ||X w - y||^2 / 2n +
    lam / 2 ||w - theta||^2, solved in closed form; the hypergradient of the validation loss
    w.r.t. (theta, log lam) by implicit differentiation, CG to a relative residual of 1e-6."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(RIDGE_N, RIDGE_D, generator=gen), torch.randn(RIDGE_N, generator=gen)
    x_v, y_v = torch.randn(RIDGE_N, RIDGE_D, generator=gen), torch.randn(RIDGE_N, generator=gen)
    meta = {"theta": 0.1 * torch.randn(RIDGE_D, generator=gen), "log_lam": torch.tensor(-1.0)}

    def inner(w, theta, log_lam):
        fit = (x @ w - y).square().mean() / 2
        return fit + log_lam.exp() / 2 * (w - theta).square().sum()

    def solve(theta, log_lam):
        a = x.T @ x / RIDGE_N + log_lam.exp() * torch.eye(RIDGE_D)
        return torch.linalg.solve(a, x.T @ y / RIDGE_N + log_lam.exp() * theta)

    def outer(w):
        return (x_v @ w - y_v).square().mean() / 2

    return meta, inner, solve, outer


def metapl_ridge(meta, inner, solve, outer) -> Callable:
    solver = metapl.CG(iterations=RIDGE_ITERATIONS, tol=RIDGE_TOL)

    def run():
        w = solve(meta["theta"], meta["log_lam"])
        res = metapl.implicit_grad(
            lambda s, m: inner(s, m["theta"], m["log_lam"]), outer, w, meta, solver=solver
        )
        return res.meta_grads["theta"], res.meta_grads["log_lam"]

    return run


def torchopt_ridge(meta, inner, solve, outer) -> Callable | str:
    try:
        import torchopt
    except ImportError as e:
        return f"not installed ({e.name}; `make bench-env`)"

    def optimality(w, theta, log_lam):
        return torch.func.grad(inner)(w, theta, log_lam)

    @torchopt.diff.implicit.custom_root(
        optimality,
        argnums=(1, 2),
        solve=torchopt.linear_solve.solve_cg(maxiter=RIDGE_ITERATIONS, rtol=RIDGE_TOL),
    )
    def solver(w0, theta, log_lam):
        return solve(theta, log_lam)

    def run():
        theta, log_lam = (meta[k].clone().requires_grad_() for k in ("theta", "log_lam"))
        w = solver(torch.zeros(RIDGE_D), theta, log_lam)
        return torch.autograd.grad(outer(w), [theta, log_lam])

    return run


def metapl_bn_maml(
    model: nn.Module, steps: int = BN_STEPS, loss: Callable = F.mse_loss, **kwargs
) -> Callable:
    """MAML through K steps of a BatchNorm network: the running statistics are the state."""
    opt = optim.sgd(MAML_LR)

    def task_grad(theta, buffers, x_s, y_s, x_q, y_q):
        def inner(s, m, state):
            return loss(functional_call(model, {**s, **state}, (x_s,)), y_s), state

        def outer(s, state):
            return loss(functional_call(model, {**s, **state}, (x_q,)), y_q)

        res = metapl.meta_grad(
            inner, outer, lambda m: m, theta, opt, steps=steps, state=buffers, **kwargs
        )
        return res.meta_grads

    return task_grad


def higher_bn_maml(
    model: nn.Module, steps: int = BN_STEPS, loss: Callable = F.mse_loss
) -> Callable:
    """higher's functional module updates the running statistics in place: every call starts
    from the same statistics."""
    higher = import_higher()
    opt = torch.optim.SGD(model.parameters(), lr=MAML_LR)
    start = {k: v.clone() for k, v in model.named_buffers()}

    def task_grad(x_s, y_s, x_q, y_q):
        for k, b in model.named_buffers():
            b.copy_(start[k])
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss(fmodel(x_s), y_s))
            query = loss(fmodel(x_q), y_q)
            return torch.autograd.grad(query, list(model.parameters()))

    return task_grad
