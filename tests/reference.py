"""Independent float64 references for the meta-gradient tests.

Everything here is written with plain ``torch.autograd`` (``create_graph=True``) and the update
formulas of the torch.optim documentation, without importing metapl, so a bug in metapl cannot
hide on both sides of a comparison. State dicts use metapl's slot names ("step", "momentum",
"exp_avg", "exp_avg_sq") only so that results can be compared slot by slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

F64 = torch.float64
Params = dict[str, Tensor]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it single-threaded. These tests use tiny tensors, for
    which intra-op threads only add synchronization: on a busy 2-core machine they made each
    meta-gradient ~100x slower (0.4 s instead of 4 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- models and problems


def init_mlp(sizes: list[int], gen: torch.Generator, dtype=F64) -> Params:
    """Parameters ``w0, b0, w1, b1, ...`` of an MLP with layer widths ``sizes``."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = torch.randn(fan_out, fan_in, generator=gen, dtype=dtype) / fan_in**0.5
        params[f"b{i}"] = 0.3 * torch.randn(fan_out, generator=gen, dtype=dtype)
    return params


def mlp(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """tanh MLP (no activation after the last layer)."""
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"].T + params[f"b{i}"]
        if i < layers - 1:
            x = torch.tanh(x)
    return x


class Problem(NamedTuple):
    """A teacher producing soft labels on ``x_u`` for a student, judged on ``(x_l, y_l)``."""

    teacher: Params
    student: Params
    x_u: Tensor
    x_l: Tensor
    y_l: Tensor

    def inner_loss(self, s: Mapping[str, Tensor], t: Mapping[str, Tensor]) -> Tensor:
        soft = torch.softmax(mlp(t, self.x_u), dim=-1)
        return -(soft * torch.log_softmax(mlp(s, self.x_u), dim=-1)).sum(-1).mean()

    def outer_loss(self, s: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(mlp(s, self.x_l), self.y_l)


def make_problem(
    seed: int = 0,
    d_in: int = 3,
    hidden: int = 5,
    classes: int = 3,
    n_u: int = 6,
    n_l: int = 4,
    teacher_hidden: int | None = 4,
    student_sizes: list[int] | None = None,
    dtype=F64,
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    t_sizes = [d_in, teacher_hidden, classes] if teacher_hidden else [d_in, classes]
    s_sizes = student_sizes or [d_in, hidden, classes]
    return Problem(
        teacher=init_mlp(t_sizes, gen, dtype),
        student=init_mlp(s_sizes, gen, dtype),
        x_u=torch.randn(n_u, d_in, generator=gen, dtype=dtype),
        x_l=torch.randn(n_l, d_in, generator=gen, dtype=dtype),
        y_l=torch.randint(0, classes, (n_l,), generator=gen),
    )


ALL_PATHS_SIZES = [3, 5, 3]


def all_paths_data(seed: int = 0, n_u: int = 7, n_l: int = 5):
    """``(gen, x_u, y_u, x_l, y_l)``: 3 features, 3 classes; ``gen`` continues the stream."""
    gen = torch.Generator().manual_seed(seed)
    x_u = torch.randn(n_u, 3, generator=gen, dtype=F64)
    x_l = torch.randn(n_l, 3, generator=gen, dtype=F64)
    y_u = torch.randint(0, 3, (n_u,), generator=gen)
    y_l = torch.randint(0, 3, (n_l,), generator=gen)
    return gen, x_u, y_u, x_l, y_l


def all_paths_losses(keys: list[str], x_u, y_u, x_l, y_l):
    """``(start, inner, outer)`` with the meta parameters on every path but the optimizer's:
    the start (``keys``), a weight per unlabeled example (``sigmoid(m.t)``) in the inner loss
    and an outer L2 penalty (``m.reg``)."""

    def start(m):
        return {k: m[k] for k in keys}

    def inner(s, m):
        per_example = F.cross_entropy(mlp(s, x_u), y_u, reduction="none")
        return (torch.sigmoid(m["t"]) * per_example).mean()

    def outer(s, m):
        return F.cross_entropy(mlp(s, x_l), y_l) + m["reg"] * flat(s).square().sum() / 2

    return start, inner, outer


class Ridge(NamedTuple):
    """inner(s, m) = ||X s - y||^2 / 2n + exp(m.log_lam) / 2 ||s - m.center||^2, whose
    minimiser is s* = A^{-1} (X^T y / n + lam c), A = X^T X / n + lam I (closed form); the
    outer loss is the validation loss ||X_v s - y_v||^2 / 2n."""

    meta: Params
    x: Tensor
    x_v: Tensor
    y: Tensor
    y_v: Tensor

    def inner(self, s, m):
        fit = (self.x @ s["w"] - self.y).square().mean() / 2
        return fit + m["log_lam"].exp() / 2 * (s["w"] - m["center"]).square().sum()

    def outer(self, s):
        return (self.x_v @ s["w"] - self.y_v).square().mean() / 2

    def closed_form(self, m):
        n, d = self.x.shape
        lam = m["log_lam"].exp()
        a = self.x.T @ self.x / n + lam * torch.eye(d, dtype=F64)
        return {"w": torch.linalg.solve(a, self.x.T @ self.y / n + lam * m["center"])}

    def hypergradient(self) -> Params:
        """d outer(s*(m)) / d m by autograd through the closed form."""
        m = {k: v.clone().requires_grad_() for k, v in self.meta.items()}
        grads = torch.autograd.grad(self.outer(self.closed_form(m)), list(m.values()))
        return dict(zip(m, grads, strict=True))


def ridge(seed: int, n: int, d: int, log_lam: float, center_scale: float) -> Ridge:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    x_v, y_v = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    meta = {
        "log_lam": torch.tensor(log_lam, dtype=F64),
        "center": center_scale * torch.randn(d, generator=gen, dtype=F64),
    }
    return Ridge(meta, x, x_v, y, y_v)


# --------------------------------------------------------------------------- optimizers


class RefOptimizer(NamedTuple):
    init: Callable[[Params], dict]
    step: Callable[[Params, Params, dict], tuple[Params, dict]]


def ref_sgd(lr, momentum=0.0, nesterov=False, weight_decay=0.0) -> RefOptimizer:
    """torch.optim.SGD (dampening 0): the first step sets the buffer to the gradient."""

    def step(p, g, state):
        new_p, bufs = {}, {}
        for k in p:
            d = g[k] + weight_decay * p[k]
            if momentum:
                bufs[k] = d if state["step"] == 0 else momentum * state["momentum"][k] + d
                d = d + momentum * bufs[k] if nesterov else bufs[k]
            new_p[k] = p[k] - lr * d
        return new_p, {"step": state["step"] + 1, **({"momentum": bufs} if momentum else {})}

    return RefOptimizer(lambda p: {"step": 0}, step)


def ref_adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """Adam / AdamW in the textbook form ``p - lr * m_hat / (sqrt(v_hat) + eps)``."""
    b1, b2 = betas

    def init(p):
        zeros = {k: torch.zeros_like(v) for k, v in p.items()}
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": dict(zeros)}

    def step(p, g, state):
        t = state["step"] + 1
        new_p, ms, vs = {}, {}, {}
        for k in p:
            pk, d = p[k], g[k]
            if decoupled:
                pk = pk * (1 - lr * weight_decay)
            else:
                d = d + weight_decay * pk
            ms[k] = b1 * state["exp_avg"][k] + (1 - b1) * d
            vs[k] = b2 * state["exp_avg_sq"][k] + (1 - b2) * d * d
            m_hat, v_hat = ms[k] / (1 - b1**t), vs[k] / (1 - b2**t)
            new_p[k] = pk - lr * m_hat / (torch.sqrt(v_hat) + eps)
        return new_p, {"step": t, "exp_avg": ms, "exp_avg_sq": vs}

    return RefOptimizer(init, step)


def ref_adamw(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    return ref_adam(lr, betas, eps, weight_decay, decoupled=True)


def _at(value, k):
    """A hyperparameter's value for parameter ``k``: per parameter (a dict) or shared."""
    return value[k] if isinstance(value, Mapping) else value


def ref_rmsprop(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
    """torch.optim.RMSprop: ``v = alpha v + (1 - alpha) d^2`` (centered: minus the square of
    the running mean ``m = alpha m + (1 - alpha) d``), step ``d / (sqrt(v) + eps)``, through a
    buffer ``b = momentum b + step`` when there is momentum. Any hyperparameter may be a dict
    keyed like the parameters."""

    def init(p):
        zeros = {k: torch.zeros_like(v) for k, v in p.items()}
        state = {"step": 0, "square_avg": zeros}
        if isinstance(momentum, Mapping) or momentum:
            state["momentum"] = dict(zeros)
        if centered:
            state["grad_avg"] = dict(zeros)
        return state

    def step(p, g, state):
        new_p, new_state = {}, {"step": state["step"] + 1}
        new_state.update({slot: {} for slot in state if slot != "step"})
        for k in p:
            a = _at(alpha, k)
            d = g[k] + _at(weight_decay, k) * p[k]
            v = new_state["square_avg"][k] = a * state["square_avg"][k] + (1 - a) * d * d
            if centered:
                m = new_state["grad_avg"][k] = a * state["grad_avg"][k] + (1 - a) * d
                v = v - m * m
            d = d / (torch.sqrt(v) + _at(eps, k))
            if "momentum" in state:
                d = new_state["momentum"][k] = _at(momentum, k) * state["momentum"][k] + d
            new_p[k] = p[k] - _at(lr, k) * d
        return new_p, new_state

    return RefOptimizer(init, step)


def ref_adagrad(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
    """torch.optim.Adagrad: step t (from 1) ``p - lr / (1 + (t - 1) lr_decay) * d /
    (sqrt(sum) + eps)``, ``sum`` accumulating ``d^2`` from ``initial_accumulator_value``. Any
    hyperparameter may be a dict keyed like the parameters."""

    def init(p):
        return {
            "step": 0,
            "sum": {
                k: torch.zeros_like(v) + _at(initial_accumulator_value, k) for k, v in p.items()
            },
        }

    def step(p, g, state):
        t = state["step"] + 1
        new_p, sums = {}, {}
        for k in p:
            d = g[k] + _at(weight_decay, k) * p[k]
            sums[k] = state["sum"][k] + d * d
            rate = _at(lr, k) / (1 + (t - 1) * _at(lr_decay, k))
            new_p[k] = p[k] - rate * d / (torch.sqrt(sums[k]) + _at(eps, k))
        return new_p, {"step": t, "sum": sums}

    return RefOptimizer(init, step)


REFERENCE = {
    "sgd": ref_sgd,
    "adam": ref_adam,
    "adamw": ref_adamw,
    "rmsprop": ref_rmsprop,
    "adagrad": ref_adagrad,
}


# --------------------------------------------------------------------------- the unroll


class RefResult(NamedTuple):
    meta_grads: Params
    student_params: Params
    opt_state: dict
    outer_loss: Tensor


def reference_meta_grad(inner_loss, outer_loss, student, teacher, opt: RefOptimizer, steps):
    """d outer(s_K) / d teacher by plain autograd through ``steps`` reference updates."""
    teacher = {k: v.detach().clone().requires_grad_() for k, v in teacher.items()}
    s = {k: v.detach().clone().requires_grad_() for k, v in student.items()}
    state = opt.init(s)
    for _ in range(steps):
        gs = torch.autograd.grad(inner_loss(s, teacher), list(s.values()), create_graph=True)
        s, state = opt.step(s, dict(zip(s, gs, strict=True)), state)
    outer = outer_loss(s)
    tg = torch.autograd.grad(outer, list(teacher.values()), allow_unused=True)
    tg = {
        k: torch.zeros_like(v) if g is None else g
        for (k, v), g in zip(teacher.items(), tg, strict=True)
    }
    return RefResult(tg, detach(s), detach(state), outer.detach())


# --------------------------------------------------------------------------- comparisons


def detach(tree):
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: detach(v) for k, v in tree.items()}
    return tree


def _children(tree) -> dict | None:
    """Dicts, lists and tuples are nodes; everything else is a leaf (None)."""
    if isinstance(tree, Mapping):
        return dict(tree)
    if isinstance(tree, (list, tuple)):
        return dict(enumerate(tree))
    return None


def flat(tree) -> Tensor:
    """All leaves of a nested dict / list of tensors or numbers, in key order, as one float64
    vector."""
    children = _children(tree)
    if children is not None:
        return torch.cat([flat(children[k]) for k in sorted(children)] or [torch.zeros(0)])
    return torch.as_tensor(tree).detach().reshape(-1).to(F64)


def rel_err(got, expected) -> float:
    """||got - expected|| / ||expected|| over all leaves (structures must match)."""
    assert_same_structure(got, expected)
    g, e = flat(got), flat(expected)
    return ((g - e).norm() / e.norm()).item()


def assert_same_structure(a, b) -> None:
    ca, cb = _children(a), _children(b)
    assert (ca is None) == (cb is None), (type(a), type(b))
    if ca is None:
        assert torch.as_tensor(a).shape == torch.as_tensor(b).shape
        return
    assert sorted(ca) == sorted(cb), (sorted(ca), sorted(cb))
    for k in ca:
        assert_same_structure(ca[k], cb[k])


def assert_close(got, expected, rtol=1e-10, atol=1e-12) -> None:
    """Leafwise ``torch.testing.assert_close`` for nested dicts / lists (leaves as float64)."""
    assert_same_structure(got, expected)
    children = _children(got)
    if children is None:
        torch.testing.assert_close(flat(got), flat(expected), rtol=rtol, atol=atol)
    for k, child in (children or {}).items():
        assert_close(child, _children(expected)[k], rtol, atol)


# --------------------------------------------------------------------------- the general unroll


def reference_general(
    inner_loss,
    outer_loss,
    start,
    make_opt,
    meta,
    steps,
    *,
    batches=None,
    truncate=None,
    first_order=False,
):
    """Plain autograd through ``steps`` reference updates, with the meta parameters in every
    place: ``s_0 = start(meta)``, ``opt = make_opt(meta)``, ``inner_loss(s, meta[, batch_k])``,
    ``outer_loss(s, meta)``. ``truncate=T`` cuts the graph before the last T steps;
    ``first_order`` treats every inner gradient as a constant (no second-order terms).
    Returns ``(meta_grads, outer_grads, s_K, state_K, outer)``."""
    meta = {k: v.detach().clone().requires_grad_() for k, v in meta.items()}
    s = start(meta)
    opt = make_opt(meta)
    state = opt.init(s)
    first = steps - (truncate or steps)
    for k in range(steps):
        if k == first:
            if first > 0:  # truncated: steps before `first` are constants
                state = detach(state)
                s = {n: v.detach() for n, v in s.items()}
            s = {n: v if v.requires_grad else v.clone().requires_grad_() for n, v in s.items()}
        args = (s, meta) if batches is None else (s, meta, {n: b[k] for n, b in batches.items()})
        gs = torch.autograd.grad(inner_loss(*args), list(s.values()), create_graph=not first_order)
        s, state = opt.step(s, dict(zip(s, gs, strict=True)), state)
    outer = outer_loss(s, meta)
    both = list(meta.values()) + list(s.values())
    grads = torch.autograd.grad(outer, both, allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(both, grads, strict=True)]
    meta_grads = dict(zip(meta, grads[: len(meta)], strict=True))
    outer_grads = dict(zip(s, grads[len(meta) :], strict=True))
    return meta_grads, outer_grads, detach(s), detach(state), outer.detach()
