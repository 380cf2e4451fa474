"""Implicit differentiation: the hypergradient at a solution of the inner problem.

If ``s*`` is a stationary point of the inner loss, grad_s inner(s*, m) = 0, the implicit
function theorem gives ds*/dm = -H_ss^{-1} H_sm, so (Rajeswaran et al. 2019, Eq. 5; Lorraine
et al. 2020, Eq. 2)

    dL/dm = ∂L/∂m - H_ms x,   where   (H_ss + damping I) x = ∂L/∂s*.

Only the solution is used: how it was found (metapl's own unroll, LBFGS, a closed form, any
torch.optim loop) does not matter, nor does its cost. The linear system is solved with
Hessian-vector products by conjugate gradient or a Neumann series.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import vjp

from metapl import _tree as tree
from metapl.metagrad.problem import Problem
from metapl.metagrad.reverse import outer_grads_at

__all__ = ["CG", "Neumann"]

Matvec = Callable[[tree.Tree], tree.Tree]


@dataclass(frozen=True)
class CG:
    """Conjugate gradient for (H + damping I) x = v; H must be positive definite there (add
    damping otherwise). Stops after ``iterations`` or once ||residual|| <= tol * ||v|| (in eager
    mode; under torch.func transforms and torch.compile it runs all iterations, freezing the
    converged ones)."""

    iterations: int = 100
    tol: float = 1e-10
    damping: float = 0.0

    def __post_init__(self):
        _check_solver(self)
        if not self.tol >= 0:
            raise ValueError(f"CG needs tol >= 0, got {self.tol}")

    def solve(self, hvp: Matvec, v: tree.Tree) -> tree.Tree:
        # on the list of leaves: one flatten per iteration instead of one per vector operation
        b, spec = tree.flatten(v)
        damped = _damped(hvp, self.damping)

        def matvec(xs: list) -> list:
            return tree.leaves(damped(tree.unflatten(xs, spec)))

        x = [torch.zeros_like(b_) for b_ in b]
        r, p = b, b
        rr = _dot(r, r)
        threshold = (self.tol**2) * rr
        eager = can_branch(rr)
        for _ in range(self.iterations):
            if eager and bool(rr <= threshold):
                break
            ap = matvec(p)
            pap = _dot(p, ap)
            if eager:  # a plain step; the converged case has left the loop
                alpha = rr / pap
            else:  # freeze converged entries (no data-dependent exit under vmap / compile)
                active = rr > threshold
                alpha = torch.where(
                    active, rr / torch.where(active, pap, torch.ones_like(pap)), 0.0
                )
            x = [x_ + alpha * p_ for x_, p_ in zip(x, p, strict=True)]
            r = [r_ - alpha * ap_ for r_, ap_ in zip(r, ap, strict=True)]
            rr_new = _dot(r, r)
            if eager:
                beta = rr_new / rr
            else:
                beta = torch.where(
                    active, rr_new / torch.where(active, rr, torch.ones_like(rr)), 0.0
                )
            p = [r_ + beta * p_ for r_, p_ in zip(r, p, strict=True)]
            rr = rr_new if eager else torch.where(active, rr_new, rr)
        return tree.unflatten(x, spec)


def _dot(a: list, b: list) -> torch.Tensor:
    return sum(torch.sum(x * y) for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series x = alpha * sum_{j<iterations} (I - alpha A)^j v with
    A = H + damping I, which converges when A is positive definite and
    0 < alpha < 2 / lambda_max(A) (Lorraine et al. 2020).

    ``alpha=None`` (the default) takes ``alpha = 1 / lambda`` with lambda the largest eigenvalue
    of A estimated by ``power_iterations`` steps of the power method started from v (the
    series only grows v's eigencomponents): safe whenever the estimate is above half the true
    largest eigenvalue, and it costs ``power_iterations`` more Hessian-vector products. With a
    given ``alpha``, a diverging series raises (in eager mode) naming a safe alpha.
    """

    iterations: int = 100
    alpha: float | None = None
    damping: float = 0.0
    power_iterations: int = 20

    def __post_init__(self):
        _check_solver(self)
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(
                f"Neumann needs alpha > 0 (or None: chosen by power iteration), got {self.alpha}"
            )
        if not (isinstance(self.power_iterations, int) and self.power_iterations >= 1):
            raise ValueError(f"power_iterations must be an int >= 1, got {self.power_iterations}")

    def largest_eigenvalue(self, hvp: Matvec, v: tree.Tree) -> torch.Tensor:
        """The power method's estimate of lambda_max(H + damping I) on v's eigencomponents."""
        matvec = _damped(hvp, self.damping)
        u = tree.scale(v, 1 / torch.clamp(tree.norm(v), min=torch.finfo(tree.dtype(v)).tiny))
        estimate = torch.zeros((), dtype=tree.dtype(v))
        for _ in range(self.power_iterations):
            au = matvec(u)
            estimate = tree.dot(u, au)  # the Rayleigh quotient (||u|| = 1)
            size = torch.clamp(tree.norm(au), min=torch.finfo(tree.dtype(v)).tiny)
            u = tree.scale(au, 1 / size)
        return estimate

    def solve(self, hvp: Matvec, v: tree.Tree) -> tree.Tree:
        matvec = _damped(hvp, self.damping)
        if self.alpha is None:
            alpha = 1 / torch.clamp(self.largest_eigenvalue(hvp, v), min=1e-30)
        else:
            alpha = self.alpha
        term, total = v, v
        for _ in range(self.iterations - 1):
            a_term = matvec(term)
            term = tree.axpy(-alpha, a_term, term)
            total = tree.add(total, term)
        if self.alpha is not None and can_branch(tree.norm(term)):
            self._check_converging(hvp, v, term, total)
        return tree.scale(total, alpha)

    def _check_converging(self, hvp: Matvec, v, last_term, total) -> None:
        """Raise if the series' terms grew: for a positive definite A and a safe alpha each
        term is no longer than v."""
        grew = float(tree.norm(last_term)) > 2 * float(tree.norm(v))
        if not grew and all(bool(torch.isfinite(x).all()) for x in tree.leaves(total)):
            return
        lam = float(self.largest_eigenvalue(hvp, v))
        advice = (
            f"the largest eigenvalue of H + damping I is about {lam:.3g}, so pass "
            f"Neumann(alpha={1 / lam:.3g}) (any alpha < {2 / lam:.3g}) or alpha=None"
            if lam > 0 and math.isfinite(lam)
            else "H + damping I is not positive definite: add damping"
        )
        raise ValueError(
            f"the Neumann series diverged with alpha={self.alpha}: {advice}; if it still "
            "diverges, H is not positive definite there: add damping"
        )


Solver = CG | Neumann


def _check_solver(solver: CG | Neumann) -> None:
    name = type(solver).__name__
    if not (isinstance(solver.iterations, int) and solver.iterations >= 1):
        raise ValueError(f"{name} needs iterations >= 1 (an int), got {solver.iterations!r}")
    if not solver.damping >= 0:
        raise ValueError(f"{name} needs damping >= 0, got {solver.damping}")


def implicit_at(problem: Problem, s, c, meta, solver: Solver, stationary_tol: float):
    """The hypergradient at the solution ``s`` (state ``c``): ``(meta_grads, outer_loss,
    outer_grads)``. Checks (eagerly) that ``s`` is near a stationary point of the inner loss."""
    eager = can_branch(tree.leaves(s)[0])
    products = _autograd_products if eager else _func_products
    (a_s, a_m, loss), g, hvp, mixed = products(problem, s, c, meta)
    if eager and math.isfinite(stationary_tol):
        _check_stationary(g, s, hvp, solver.damping, stationary_tol)
    x = solver.solve(hvp, a_s)
    return tree.sub(a_m, mixed(x)), loss, a_s


def _func_products(problem: Problem, s, c, meta):
    """``(outer grads, g, u -> H_ss u, x -> H_ms x)`` by torch.func (under vmap / compile)."""

    def inner_grad_at(s_, m_):
        return problem.inner_grad(s_, m_, c, None)[0]

    g, hvp = vjp(lambda s_: inner_grad_at(s_, meta), s)  # H_ss is symmetric: VJP = HVP
    _, mixed = vjp(lambda m_: inner_grad_at(s, m_), meta)
    return (outer_grads_at(problem, s, meta, c), g, lambda u: hvp(u)[0], lambda x: mixed(x)[0])


def _autograd_products(problem: Problem, s, c, meta):
    """The same by plain autograd on one recorded gradient (eager: less overhead per product,
    which a solver takes dozens of)."""
    with torch.enable_grad():
        s_, m_ = (tree.map(lambda x: x.detach().requires_grad_(), t) for t in (s, meta))
        s_leaves, m_leaves = tree.leaves(s_), tree.leaves(m_)
        outer = problem.outer_loss(s_, m_, c)
        grads = _grad(outer, s_leaves + m_leaves)
        a_s = tree.unflatten(grads[: len(s_leaves)], tree.structure(s))
        a_m = tree.unflatten(grads[len(s_leaves) :], tree.structure(meta))
        loss, _ = problem.inner_loss(s_, m_, c, None)
        g = _grad(loss, s_leaves, create_graph=True)

    def hvp(u):
        return tree.unflatten(_grad(g, s_leaves, tree.leaves(u), retain=True), tree.structure(s))

    def mixed(x):
        return tree.unflatten(_grad(g, m_leaves, tree.leaves(x), retain=True), tree.structure(meta))

    g_tree = tree.detach(tree.unflatten(list(g), tree.structure(s)))
    return (a_s, a_m, outer.detach()), g_tree, hvp, mixed


def _grad(outputs, inputs, cotangents=None, create_graph=False, retain=False) -> list:
    grads = torch.autograd.grad(
        outputs,
        inputs,
        cotangents,
        create_graph=create_graph,
        retain_graph=retain or create_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return [x.detach() for x in grads] if not create_graph else list(grads)


def _check_stationary(g, s, matvec: Matvec, damping: float, tol: float) -> None:
    """Refuse a solution clearly away from a stationary point: the length of the Cauchy step
    t g, t = <g, g> / <g, (H + damping I) g> (the minimiser of the quadratic model along g;
    one Hessian-vector product), relative to ||s||, must be at most ``tol``."""
    g_norm = float(tree.norm(g))
    if g_norm == 0:
        return
    curvature = float(tree.dot(g, matvec(g))) + damping * g_norm**2
    s_norm = float(tree.norm(s))
    distance = g_norm**3 / curvature if curvature > 0 else math.inf
    if distance <= tol * max(s_norm, 1e-12):
        return
    where = (
        f"the gradient there has norm {g_norm:.3g} and a Newton-like step to stationarity "
        f"would move the solution by {distance:.3g} ({distance / max(s_norm, 1e-12):.2g} of "
        f"its norm {s_norm:.3g})"
        if curvature > 0
        else f"the gradient there has norm {g_norm:.3g} and the inner loss does not curve "
        "upwards along it (not a minimum: add damping to the solver)"
    )
    raise ValueError(
        "implicit differentiation needs the solution to be a stationary point of the inner "
        f"loss, and {where}: solve the inner problem further, or pass "
        f"stationary_tol=math.inf (now {tol:g}) to accept it"
    )


def _damped(hvp: Matvec, damping: float) -> Matvec:
    if not damping:
        return hvp
    return lambda u: tree.axpy(damping, u, hvp(u))


def can_branch(x: torch.Tensor) -> bool:
    """Whether a data-dependent branch is possible (not under vmap or torch.compile)."""
    if torch.compiler.is_compiling():  # checked first: dynamo cannot trace the next check
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)
