"""Meta-gradients: the gradient of an outer loss through differentiable inner training steps.

The student ``s`` takes ``steps`` optimizer steps on ``inner_loss(s, t)``; the outer loss is
evaluated at the updated student. ``meta_grad`` returns d outer / d t, computed one of three ways
(see docs/meta_gradients.md for the math, cost and memory of each).

BatchNorm and other buffers: ``meta_grad`` may evaluate a loss more than once (the exact method
traces the inner loss once per step; finite_difference evaluates it three times per step;
first_order evaluates the outer loss before and after), and a function under a ``torch.func``
transform may not mutate tensors it captured. Loss functions must therefore be pure: pass buffers
through ``torch.func.functional_call`` next to the parameters, as a *copy* made inside the loss
when the module updates running statistics in training mode. To keep those statistics, return
the copy as auxiliary output with ``has_aux=True``: ``result.inner_aux`` is the aux of the first
inner evaluation (the student's forward at its starting parameters), so the running statistics
advance exactly once per call::

    buffers = dict(model.named_buffers())

    def inner_loss(s, t):
        scratch = {k: b.clone() for k, b in buffers.items()}  # running stats land here
        logits = torch.func.functional_call(model, {**s, **scratch}, (x_u,))
        return loss_fn(logits, t), scratch

    res = meta_grad(inner_loss, outer_loss, s, t, opt, has_aux=True)
    buffers = res.inner_aux                                   # updated once
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from metapl.optim import Optimizer, State, check_same_keys

Params = dict[str, Tensor]
METHODS = ("exact", "finite_difference", "first_order")

__all__ = ["METHODS", "MetaGradResult", "meta_grad"]


class MetaGradResult(NamedTuple):
    teacher_grads: Params  # d outer / d teacher_params, same keys and shapes
    student_params: Params  # the student after the inner steps (detached)
    opt_state: State  # the optimizer state after the inner steps
    outer_loss: Tensor  # 0-d, the outer loss at the updated student
    inner_aux: Any = None  # has_aux=True: aux of the first inner evaluation (at s_0)
    h: Tensor | None = None  # first_order: outer(s_K) - outer(s_0), before the baseline


def meta_grad(
    inner_loss: Callable[[Params, Params], Tensor],
    outer_loss: Callable[[Params], Tensor],
    student_params: Mapping[str, Tensor],
    teacher_params: Mapping[str, Tensor],
    optimizer: Optimizer,
    opt_state: State | None = None,
    steps: int = 1,
    method: str = "exact",
    log_prob: Callable[[Params], Tensor] | None = None,
    *,
    has_aux: bool = False,
    fd_radius: float = 1e-2,
    baseline: float | Tensor = 0.0,
    reduce: Callable[[Params], Params] | None = None,
) -> MetaGradResult:
    """Gradient of ``outer_loss(s_K)`` with respect to ``teacher_params``, where
    ``s_{k+1}, state_{k+1} = optimizer.step(s_k, grad_s inner_loss(s_k, teacher), state_k)``.

    Args:
        inner_loss: ``(student_params, teacher_params) -> 0-d loss`` the student trains on.
        outer_loss: ``(student_params) -> 0-d loss`` evaluated after the inner steps.
        student_params, teacher_params: dicts of tensors (not modified).
        optimizer: a ``metapl.optim`` optimizer; ``opt_state`` defaults to ``optimizer.init``.
        steps: number of inner steps K >= 1.
        method: ``"exact"`` (reverse mode through the unroll, second-order),
            ``"finite_difference"`` (the same product from first-order gradients only, by a
            central difference at ``s ± eps * a`` with ``eps = fd_radius / ||a||``: each
            perturbation has norm ``fd_radius`` in parameter space, as in DARTS), or
            ``"first_order"`` (the score-function estimator for sampled labels:
            ``(outer(s_K) - outer(s_0)) * grad log_prob(teacher)``).
        log_prob: ``(teacher_params) -> 0-d`` log-probability of the sampled targets the inner
            loss used; required by and only used by ``"first_order"``.
        has_aux: ``inner_loss`` returns ``(loss, aux)``; the aux of its first evaluation comes
            back as ``result.inner_aux`` (e.g. updated BatchNorm statistics, logits).
        fd_radius: ``"finite_difference"`` only: the norm of each perturbation.
        baseline: ``"first_order"`` only: subtracted from ``h = outer(s_K) - outer(s_0)``
            (a control variate, e.g. a moving average of h; it leaves the estimator unbiased).
        reduce: data parallelism: a function averaging a dict of tensors across processes
            (e.g. an all-reduce). It is applied to the student gradients before every inner
            step, to the outer gradient and losses, and to the student-side Hessian products,
            so every process takes the same student steps. The returned ``teacher_grads`` are
            this process's share: average them across processes too. With ``reduce``,
            ``"exact"`` runs the reverse pass step by step with exact Hessian products.
    """
    _check_inputs(student_params, teacher_params, optimizer, opt_state, steps, method, log_prob)
    student = {k: v.detach() for k, v in student_params.items()}
    teacher = {k: v.detach() for k, v in teacher_params.items()}
    state = optimizer.init(student) if opt_state is None else opt_state
    inner_loss = _scalar("inner_loss", inner_loss, has_aux)
    outer_loss = _scalar("outer_loss", outer_loss)
    inner_grad = grad(inner_loss, has_aux=True)  # -> (grads, aux) whether or not the user has aux
    args = (inner_grad, outer_loss, student, teacher, optimizer, state, steps)

    if method == "exact" and reduce is None:
        result = _exact(*args)
    elif method in ("exact", "finite_difference"):
        if method == "exact":
            products = _exact_hessian_products(inner_grad)
        else:
            products = _finite_difference_hessian_products(inner_loss, fd_radius)
        result = _reverse(*args, products, reduce or _identity)
    else:
        result = _first_order(*args, log_prob, baseline, reduce or _identity)
    if not has_aux:
        result = result._replace(inner_aux=None)
    return MetaGradResult(*(_detach(part) for part in result))


def _exact(inner_grad, outer_loss, student, teacher, optimizer, state, steps):
    def unrolled(teacher):
        s, st, first_aux = student, state, None
        for k in range(steps):
            g, aux = inner_grad(s, teacher)
            first_aux = aux if k == 0 else first_aux
            s, st = optimizer.step(s, g, st)
        loss = outer_loss(s)
        return loss, (s, st, loss, first_aux)

    teacher_grads, (s, st, loss, aux) = grad(unrolled, has_aux=True)(teacher)
    return MetaGradResult(teacher_grads, s, st, loss, aux)


def _reverse(inner_grad, outer_loss, student, teacher, optimizer, state, steps, products, reduce):
    """Reverse mode through the unroll, one step at a time, with pluggable Hessian products."""
    # Forward: keep every student iterate, its (averaged) gradient and optimizer state.
    trajectory, first_aux = [], None
    s, st = student, state
    for k in range(steps):
        rng = _rng_snapshot()  # the Hessian products replay this step's dropout masks
        g, aux = inner_grad(s, teacher)
        g = reduce(g)
        first_aux = aux if k == 0 else first_aux
        trajectory.append((s, g, st, rng))
        s, st = optimizer.step(s, g, st)
    adj_s, loss = grad_and_value(outer_loss)(s)
    adj_s, loss = reduce(adj_s), reduce({"loss": loss})["loss"]
    adj_state = _zeros_like(st)
    teacher_grads = _zeros_like(teacher)

    # Backward: the optimizer's own VJP (elementwise, first order) turns the adjoints of
    # (s_{k+1}, state_{k+1}) into adjoints of (s_k, g_k, state_k). The adjoint of
    # g_k = grad_s L(s_k, t) flows on through the Hessian products H_ss a and H_ts a.
    for k in reversed(range(steps)):
        s_k, g_k, st_k, rng = trajectory[k]
        _, step_vjp = vjp(optimizer.step, s_k, g_k, st_k)
        adj_s_direct, adj_g, adj_state = step_vjp((adj_s, adj_state))
        h_ss, h_ts = products(s_k, teacher, adj_g, k > 0, rng)  # s_0's adjoint is unused
        if k > 0:
            h_ss = reduce(h_ss)
            adj_s = {n: adj_s_direct[n] + h_ss[n] for n in s_k}
        teacher_grads = {n: teacher_grads[n] + h_ts[n] for n in teacher}
    return MetaGradResult(teacher_grads, s, st, loss, first_aux)


def _exact_hessian_products(inner_grad):
    """(H_ss a, H_ts a) by reverse mode over the gradient (double backward)."""

    def products(s, t, a, need_student, rng):
        if need_student:
            _, grad_vjp = _replayed(rng, vjp, lambda s_, t_: inner_grad(s_, t_)[0], s, t)
            return grad_vjp(a)
        _, grad_vjp = _replayed(rng, vjp, lambda t_: inner_grad(s, t_)[0], t)
        return None, grad_vjp(a)[0]

    return products


def _finite_difference_hessian_products(inner_loss, radius):
    """(H_ss a, H_ts a) from first-order gradients only, by a central difference:
    H a ≈ (∇L(s + eps a) − ∇L(s − eps a)) / (2 eps), with eps = radius / ||a||."""
    grad_both = grad(inner_loss, argnums=(0, 1), has_aux=True)
    grad_teacher = grad(inner_loss, argnums=1, has_aux=True)

    def products(s, t, a, need_student, rng):
        eps = radius / torch.clamp(_norm(a), min=torch.finfo(_dtype(a)).eps)
        plus = {n: s[n] + eps * a[n] for n in s}
        minus = {n: s[n] - eps * a[n] for n in s}
        grad_fn = grad_both if need_student else grad_teacher
        g_plus, _ = _replayed(rng, grad_fn, plus, t)
        g_minus, _ = _replayed(rng, grad_fn, minus, t)
        if not need_student:
            return None, _central(g_plus, g_minus, eps)
        (gs_plus, gt_plus), (gs_minus, gt_minus) = g_plus, g_minus
        return _central(gs_plus, gs_minus, eps), _central(gt_plus, gt_minus, eps)

    return products


def _central(plus: Params, minus: Params, eps: Tensor) -> Params:
    return {n: (plus[n] - minus[n]) / (2 * eps) for n in plus}


def _first_order(
    inner_grad, outer_loss, student, teacher, optimizer, state, steps, log_prob, baseline, reduce
):
    rng = _rng_snapshot()  # L(s_K) sees L(s_0)'s dropout masks: h measures the step alone
    loss_before = outer_loss(student)
    s, st, first_aux = student, state, None
    for k in range(steps):
        g, aux = inner_grad(s, teacher)
        first_aux = aux if k == 0 else first_aux
        s, st = optimizer.step(s, reduce(g), st)
    loss_after = _replayed(rng, outer_loss, s)
    # h is a difference of losses over the *whole* labeled batch: average across processes.
    losses = reduce({"before": loss_before, "after": loss_after})
    loss_before, loss_after = losses["before"], losses["after"]
    # Score function: d/dt E_y[L(s'(y))] = E_y[(L(s'(y)) - b) d/dt log p_t(y)] for any b that
    # does not depend on the sampled y; here b = L(s_0) (+ the caller's baseline).
    h = (loss_after - loss_before).detach()
    score = grad(_scalar("log_prob", log_prob))(teacher)
    teacher_grads = {n: (h - baseline) * g for n, g in score.items()}
    return MetaGradResult(teacher_grads, s, st, loss_after, first_aux, h)


def _scalar(name: str, fn: Callable, has_aux: bool = False) -> Callable:
    """Wrap ``fn`` to check it returns a 0-d loss; always returns ``(loss, aux)`` with aux."""

    def checked(*args):
        out = fn(*args)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"with has_aux=True, {name} must return (loss, aux)")
            out, aux = out
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{name} must return a 0-d tensor, got {shape}; reduce it, e.g. with .mean()"
                + ("" if has_aux else ", or pass has_aux=True if it returns (loss, aux)")
            )
        if name == "inner_loss":
            return out, (aux if has_aux else {})  # torch.func wants a pytree of tensors
        return out

    return checked


def _check_inputs(student, teacher, optimizer, opt_state, steps, method, log_prob) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; pass one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for name, params in (("student_params", student), ("teacher_params", teacher)):
        if not isinstance(params, Mapping) or not all(
            isinstance(v, Tensor) for v in params.values()
        ):
            raise TypeError(
                f"{name} must be a dict of tensors, e.g. dict(model.named_parameters())"
            )
        if not params:
            raise ValueError(f"{name} is empty")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            "optimizer must be a metapl.optim optimizer (optim.sgd / adam / adamw), "
            f"got {type(optimizer).__name__}"
        )
    if opt_state is not None:
        expected = optimizer.init({k: v.new_empty(0) for k, v in student.items()})
        if not isinstance(opt_state, Mapping) or opt_state.keys() != expected.keys():
            got = sorted(opt_state) if isinstance(opt_state, Mapping) else type(opt_state).__name__
            raise ValueError(
                f"opt_state has slots {got} but this optimizer keeps {sorted(expected)}: pass "
                "optimizer.init(student_params) from the same optimizer, or None"
            )
        for key, slot in opt_state.items():
            if isinstance(slot, Mapping):
                check_same_keys(f"opt_state[{key!r}]", slot, student)
    if method == "first_order" and log_prob is None:
        raise ValueError(
            "method='first_order' needs log_prob=(teacher_params) -> log-probability of the "
            "sampled targets the inner loss used"
        )
    if method != "first_order" and log_prob is not None:
        raise ValueError(f"log_prob is only used by method='first_order', not {method!r}")


def _rng_snapshot() -> tuple | None:
    """The global RNG states (CPU and current CUDA device), so that a repeated evaluation can
    draw the same random numbers (dropout masks) as the first. None under torch.compile, which
    cannot restore RNG states: there every evaluation draws afresh."""
    if torch.compiler.is_compiling():
        return None
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def _set_rng(snapshot: tuple) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1])


def _replayed(snapshot: tuple | None, fn: Callable, *args):
    """``fn(*args)`` drawing the random numbers drawn after ``snapshot``; afterwards the RNG
    continues from where it was, so later draws never repeat earlier ones."""
    if snapshot is None:
        return fn(*args)
    now = _rng_snapshot()
    _set_rng(snapshot)
    try:
        return fn(*args)
    finally:
        _set_rng(now)


def _identity(tree):
    return tree


def _detach(tree):
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


def _zeros_like(tree):
    if isinstance(tree, Tensor):
        return torch.zeros_like(tree)
    return {k: _zeros_like(v) for k, v in tree.items()}


def _norm(tree: Mapping[str, Tensor]) -> Tensor:
    return torch.sqrt(sum(torch.sum(v * v) for v in tree.values()))


def _dtype(tree: Mapping[str, Tensor]) -> torch.dtype:
    return next(iter(tree.values())).dtype
