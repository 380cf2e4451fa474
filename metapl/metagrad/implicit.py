"""Implicit differentiation: the hypergradient at a converged inner problem.

If the inner steps have reached a stationary point, grad_s inner(s*, m) = 0, the implicit
function theorem gives ds*/dm = -H_ss^{-1} H_sm, so (Rajeswaran et al. 2019, Eq. 5; Lorraine
et al. 2020, Eq. 2)

    dL/dm = ∂L/∂m - H_ms x,   where   (H_ss + damping I) x = ∂L/∂s*.

Only the final student is used: memory and cost do not depend on K, and neither the start nor
the optimizer reaches the gradient (at a true stationary point they do not matter). The linear
system is solved with Hessian-vector products by conjugate gradient or a Neumann series.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import vjp

from metapl.metagrad import tree
from metapl.metagrad.problem import Problem, Schedule
from metapl.metagrad.reverse import _outer_grads, run_forward

__all__ = ["CG", "Neumann"]

Params = tree.Params


@dataclass(frozen=True)
class CG:
    """Conjugate gradient for (H + damping I) x = v; H must be positive definite there (add
    damping otherwise). Stops after ``iterations`` or once ||residual|| <= tol * ||v|| (in eager
    mode; under torch.func transforms and torch.compile it runs all iterations, freezing the
    converged ones)."""

    iterations: int = 100
    tol: float = 1e-10
    damping: float = 0.0

    def solve(self, hvp: Callable[[Params], Params], v: Params) -> Params:
        matvec = _damped(hvp, self.damping)
        x = tree.zeros_like(v)
        r, p = v, v
        rr = tree.dot(r, r)
        threshold = (self.tol**2) * rr
        for _ in range(self.iterations):
            if _can_stop(rr) and bool(rr <= threshold):
                break
            ap = matvec(p)
            pap = tree.dot(p, ap)
            active = rr > threshold
            alpha = torch.where(active, rr / torch.where(active, pap, torch.ones_like(pap)), 0.0)
            x = {k: x[k] + alpha * p[k] for k in x}
            r = {k: r[k] - alpha * ap[k] for k in r}
            rr_new = tree.dot(r, r)
            beta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)), 0.0)
            p = {k: r[k] + beta * p[k] for k in p}
            rr = torch.where(active, rr_new, rr)
        return x


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series x = alpha * sum_{j<iterations} (I - alpha A)^j v with
    A = H + damping I; converges when 0 < alpha < 2 / lambda_max(A) (Lorraine et al. 2020)."""

    iterations: int = 100
    alpha: float = 1.0
    damping: float = 0.0

    def solve(self, hvp: Callable[[Params], Params], v: Params) -> Params:
        matvec = _damped(hvp, self.damping)
        term, total = v, v
        for _ in range(self.iterations - 1):
            a_term = matvec(term)
            term = {k: term[k] - self.alpha * a_term[k] for k in term}
            total = tree.add(total, term)
        return tree.scale(total, self.alpha)


def implicit(problem: Problem, schedule: Schedule, meta, opt_state, solver: CG | Neumann):
    """Returns ``(meta_grads, s_K, opt_state_K, outer_loss, first_aux, outer_grads)``."""
    s, st, first_aux = run_forward(problem, schedule, meta, opt_state)
    a_s, a_m, loss = _outer_grads(problem, s, meta)

    def inner_grad_at(s_, m_):
        return problem.inner_grad(s_, m_, None)[0]

    _, hvp = vjp(lambda s_: inner_grad_at(s_, meta), s)  # H_ss is symmetric: VJP = HVP
    x = solver.solve(lambda u: hvp(u)[0], a_s)
    _, mixed = vjp(lambda m_: inner_grad_at(s, m_), meta)
    h_ms_x = mixed(x)[0]
    meta_grads = {k: a_m[k] - h_ms_x[k] for k in a_m}
    return meta_grads, s, st, loss, first_aux, a_s


def _damped(hvp, damping: float):
    if not damping:
        return hvp
    return lambda u: {k: v + damping * u[k] for k, v in hvp(u).items()}


def _can_stop(x: torch.Tensor) -> bool:
    """Whether a data-dependent early exit is possible (not under vmap or torch.compile)."""
    if torch.compiler.is_compiling():  # checked first: dynamo cannot trace the next check
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)
