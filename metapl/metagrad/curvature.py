"""One inner step forward, and its pullback, for each reverse-mode method.

Step k maps ``(s_k, st_k, m)`` to ``optimizer(m).step(s_k, g_k, st_k)`` with
``g_k = grad_s inner(s_k, m, c_k, b_k)`` (``c_k``: the carried state, an input like the
batch). Its pullback maps the adjoints ``(a_s, a_st)`` of the
step's outputs to those of ``(s_k, st_k, m)``. Through ``g_k`` this needs the second-order
products ``(H_ss a_g, H_ms a_g)`` of the inner loss, which each method supplies its own way:

- ``ExactProducts``: reverse mode over the gradient (double backward). Step k's forward is
  recomputed in the reverse pass, so no step keeps its activations; the last step keeps its
  graph from the forward pass (it is needed at once). Without data parallelism the whole
  step is one VJP.
- ``ForwardProducts``: forward mode over the gradient (forward-over-reverse, as MixFlow-MG):
  one ``jvp`` of ``(grad_s L, grad_m L)`` in direction ``a`` gives ``(H_ss a, H_ms a)``, the
  VJP the reverse mode takes wherever the Hessian is symmetric (a twice differentiable inner
  loss; a detached value is a constant to both modes). No step keeps a graph; the kept steps
  keep their gradient (for the optimizer's VJP), the others recompute it.
- ``FiniteDifferenceProducts``: central differences of first-order gradients at ``s ± eps a``.
- ``NoProducts``: the products dropped (first-order MAML and its generalisation).

``advance`` runs in the forward pass and returns what the trajectory keeps for the step
(``keep=True``: the last step's graph, when the reverse pass will need it at once);
``pullback`` runs in the reverse pass. Neither depends on the step's index, so each compiles
once for all steps.
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vjp

from metapl import _tree as tree
from metapl.metagrad import rng
from metapl.metagrad.methods import Exact, FiniteDifference, MethodSpec
from metapl.metagrad.problem import Problem


class _Split:
    """Shared by the methods that pull back through the optimizer and the gradient separately:
    the optimizer's own VJP (first order, elementwise) gives ``a_g``, then ``products``."""

    def __init__(self, problem: Problem, reduce):
        self.problem, self.reduce = problem, reduce

    def advance(self, s, st, c, m, batch, need_s, keep):
        g, (c_next, aux) = self.problem.inner_grad(s, m, c, batch)
        g = self.reduce(g)
        s_next, st_next = self.problem.optimizer(m).step(s, g, st)
        return s_next, st_next, c_next, aux, g

    def gradient_and_products(self, s, c, m, batch, memo, snapshot, need_s):
        """``(g_k, a -> (H_ss a or None, H_ms a or None))``."""
        raise NotImplementedError

    def pullback(self, s, st, c, m, batch, memo, snapshot, need_s, a_s, a_st):
        """The adjoints of ``(s_k or None, st_k, m or None)`` from those of the step's output."""
        g, products = self.gradient_and_products(s, c, m, batch, memo, snapshot, need_s)
        problem = self.problem
        if problem.learns_optimizer:
            step = lambda s_, g_, st_, m_: problem.optimizer(m_).step(s_, g_, st_)  # noqa: E731
            _, step_vjp = vjp(step, s, g, st, m)
            a_s_direct, a_g, a_st, a_m = step_vjp((a_s, a_st))
        else:
            _, step_vjp = vjp(problem.optimizer(m).step, s, g, st)
            (a_s_direct, a_g, a_st), a_m = step_vjp((a_s, a_st)), None
        h_ss, h_ms = products(a_g)
        if h_ms is not None:
            a_m = h_ms if a_m is None else tree.add(a_m, h_ms)
        if need_s and h_ss is not None:
            a_s_direct = tree.add(a_s_direct, self.reduce(h_ss))
        return a_s_direct, a_st, a_m


class ExactProducts(_Split):
    def __init__(self, problem: Problem, reduce):
        super().__init__(problem, reduce)
        self.fused = reduce is tree.identity  # an all-reduce has no VJP: split the step then

    def _step_vjp(self, s, st, c, m, batch, need_s):
        """VJP of the whole step; ``(s_next, st_next), pull, (c_next, aux)``."""
        problem = self.problem

        def step(s_, st_, m_):
            g, carried = problem.inner_grad(s_, m_, c, batch)
            return problem.optimizer(m_).step(s_, g, st_), carried

        if need_s:
            return vjp(step, s, st, m, has_aux=True)
        out, pull_m, aux = vjp(lambda m_: step(s, st, m_), m, has_aux=True)
        return out, (lambda cot: (None, None, pull_m(cot)[0])), aux

    def _grad_vjp(self, s, c, m, batch, need_s):
        """``g, (a -> (H_ss a, H_ms a)), (c_next, aux)`` by reverse mode over the gradient."""
        inner_grad = self.problem.inner_grad
        if need_s:
            return vjp(lambda s_, m_: inner_grad(s_, m_, c, batch), s, m, has_aux=True)
        g, pull, carried = vjp(lambda m_: inner_grad(s, m_, c, batch), m, has_aux=True)
        return g, (lambda a: (None, pull(a)[0])), carried

    def advance(self, s, st, c, m, batch, need_s, keep):
        if not keep:
            s_next, st_next, c_next, aux, _ = super().advance(s, st, c, m, batch, need_s, keep)
            return s_next, st_next, c_next, aux, None
        if self.fused:
            (s_next, st_next), pull, (c_next, aux) = self._step_vjp(s, st, c, m, batch, need_s)
            return s_next, st_next, c_next, aux, pull
        g, products, (c_next, aux) = self._grad_vjp(s, c, m, batch, need_s)
        s_next, st_next = self.problem.optimizer(m).step(s, self.reduce(g), st)
        return s_next, st_next, c_next, aux, (g, products)

    def gradient_and_products(self, s, c, m, batch, memo, snapshot, need_s):
        g, products = (
            memo
            if memo is not None
            else rng.replayed(snapshot, self._grad_vjp, s, c, m, batch, need_s)[:2]
        )
        return self.reduce(g), products

    def pullback(self, s, st, c, m, batch, memo, snapshot, need_s, a_s, a_st):
        if not self.fused:
            return super().pullback(s, st, c, m, batch, memo, snapshot, need_s, a_s, a_st)
        if memo is None:
            _, memo, _ = rng.replayed(snapshot, self._step_vjp, s, st, c, m, batch, need_s)
        return memo((a_s, a_st))


class ForwardProducts(_Split):
    def __init__(self, problem: Problem, reduce):
        super().__init__(problem, reduce)
        self._grad_both = grad(problem.inner_loss, argnums=(0, 1), has_aux=True)
        self._grad_meta = grad(problem.inner_loss, argnums=1, has_aux=True)

    def advance(self, s, st, c, m, batch, need_s, keep):
        s_next, st_next, c_next, aux, g = super().advance(s, st, c, m, batch, need_s, keep)
        return s_next, st_next, c_next, aux, g if keep else None

    def gradient_and_products(self, s, c, m, batch, memo, snapshot, need_s):
        if memo is None:
            g, _ = rng.replayed(snapshot, self.problem.inner_grad, s, m, c, batch)
            memo = self.reduce(g)
        fn = self._grad_both if need_s else self._grad_meta

        def products(a):
            def gradient(s_):
                return fn(s_, m, c, batch)[0]

            try:
                _, tangent = rng.replayed(snapshot, jvp, gradient, (s,), (a,))
            except (NotImplementedError, RuntimeError) as error:
                # the forward pass evaluated this gradient already: what fails here is forward
                # mode (an operation without a formula, or torch's own forward-mode bugs)
                raise NotImplementedError(
                    "curvature='forward' could not differentiate the inner gradient in forward "
                    f"mode ({str(error).splitlines()[0]}): use curvature='reverse' (double "
                    "backward), or the operation's composite form (e.g. the math path of "
                    "scaled_dot_product_attention; (x - y).square().mean() for F.mse_loss, "
                    "whose forward-mode formula fails on torch 2.13)"
                ) from error
            return tangent if need_s else (None, tangent)

        return memo, products


class FiniteDifferenceProducts(_Split):
    """H a ≈ (∇L(s + eps a) − ∇L(s − eps a)) / (2 eps), with eps = radius / ||a||: each
    perturbation has norm ``radius`` in parameter space (as in DARTS)."""

    def __init__(self, problem: Problem, reduce, radius: float):
        super().__init__(problem, reduce)
        self.radius = radius
        self._grad_both = grad(problem.inner_loss, argnums=(0, 1), has_aux=True)
        self._grad_meta = grad(problem.inner_loss, argnums=1, has_aux=True)

    def gradient_and_products(self, s, c, m, batch, memo, snapshot, need_s):
        def products(a):
            eps = self.radius / torch.clamp(tree.norm(a), min=torch.finfo(tree.dtype(a)).eps)
            plus, minus = tree.axpy(eps, a, s), tree.axpy(-eps, a, s)
            fn = self._grad_both if need_s else self._grad_meta
            # Outside autocast: in bfloat16 weights a perturbation of norm `radius` rounds away.
            with torch.autocast(tree.leaves(s)[0].device.type, enabled=False):
                g_plus, _ = rng.replayed(snapshot, fn, plus, m, c, batch)
                g_minus, _ = rng.replayed(snapshot, fn, minus, m, c, batch)
            if not need_s:
                return None, _central(g_plus, g_minus, eps)
            (s_plus, m_plus), (s_minus, m_minus) = g_plus, g_minus
            return _central(s_plus, s_minus, eps), _central(m_plus, m_minus, eps)

        return memo, products


class NoProducts(_Split):
    def gradient_and_products(self, s, c, m, batch, memo, snapshot, need_s):
        return memo, lambda a: (None, None)


def for_method(spec: MethodSpec, problem: Problem, reduce) -> _Split:
    """The step's forward and pullback for a reverse-mode method spec."""
    if isinstance(spec, Exact):
        forward = spec.curvature == "forward"
        return (ForwardProducts if forward else ExactProducts)(problem, reduce)
    if isinstance(spec, FiniteDifference):
        return FiniteDifferenceProducts(problem, reduce, spec.radius)
    return NoProducts(problem, reduce)


def _central(plus, minus, eps):
    return tree.map(lambda p, q: (p - q) / (2 * eps), plus, minus)
