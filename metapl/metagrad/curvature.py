"""How the adjoint of an inner gradient reaches the student and the meta parameters.

Step k computes ``g_k = grad_s inner(s_k, m, b_k)``. In the reverse pass the adjoint ``a`` of
``g_k`` contributes ``(H_ss a, H_ms a)`` (second derivatives of the inner loss) to the adjoints
of ``s_k`` and ``m``. Each method supplies these products its own way:

- ``Exact``: reverse mode over the gradient (double backward), recomputing step k's forward
  in the reverse pass so no step keeps its activations; the last step keeps its graph from the
  forward pass (it is needed at once), so one step costs no recomputation.
- ``FiniteDifference``: central differences of first-order gradients at ``s ± eps a``.
- ``FirstOrder``: the products dropped (first-order MAML and its generalisation).

``gradient`` runs in the forward pass; ``linearize`` in the reverse pass returns ``g_k`` and a
function ``a -> (H_ss a or None, H_ms a)``.
"""

from __future__ import annotations

import torch
from torch.func import grad, vjp

from metapl.metagrad import rng as rng_
from metapl.metagrad import tree
from metapl.metagrad.problem import Problem


class Exact:
    stores_gradients = False  # g_k comes back from the recomputation

    def __init__(self, problem: Problem, last: int):
        self.problem, self.last, self._kept = problem, last, None

    def _vjp(self, s, m, batch, need_s):
        inner_grad = self.problem.inner_grad
        if need_s:
            g, pull, aux = vjp(lambda s_, m_: inner_grad(s_, m_, batch), s, m, has_aux=True)
            return g, pull, aux
        g, pull, aux = vjp(lambda m_: inner_grad(s, m_, batch), m, has_aux=True)
        return g, (lambda a: (None, pull(a)[0])), aux

    def gradient(self, k, s, m, batch, need_s):
        if k == self.last:
            g, pull, aux = self._vjp(s, m, batch, need_s)
            self._kept = (g, pull)
            return g, aux
        return self.problem.inner_grad(s, m, batch)

    def linearize(self, k, s, m, batch, g, snapshot, need_s):
        if k == self.last:
            (g, pull), self._kept = self._kept, None
            return g, pull
        g, pull, _ = rng_.replayed(snapshot, self._vjp, s, m, batch, need_s)
        return g, pull


class FiniteDifference:
    """H a ≈ (∇L(s + eps a) − ∇L(s − eps a)) / (2 eps), with eps = radius / ||a||: each
    perturbation has norm ``radius`` in parameter space (as in DARTS)."""

    stores_gradients = True

    def __init__(self, problem: Problem, radius: float):
        self.problem, self.radius = problem, radius
        self._grad_both = grad(problem.inner_loss, argnums=(0, 1), has_aux=True)
        self._grad_meta = grad(problem.inner_loss, argnums=1, has_aux=True)

    def gradient(self, k, s, m, batch, need_s):
        return self.problem.inner_grad(s, m, batch)

    def linearize(self, k, s, m, batch, g, snapshot, need_s):
        def pull(a):
            eps = self.radius / torch.clamp(tree.norm(a), min=torch.finfo(tree.dtype(a)).eps)
            plus = {n: s[n] + eps * a[n] for n in s}
            minus = {n: s[n] - eps * a[n] for n in s}
            fn = self._grad_both if need_s else self._grad_meta
            g_plus, _ = rng_.replayed(snapshot, fn, plus, m, batch)
            g_minus, _ = rng_.replayed(snapshot, fn, minus, m, batch)
            if not need_s:
                return None, _central(g_plus, g_minus, eps)
            (s_plus, m_plus), (s_minus, m_minus) = g_plus, g_minus
            return _central(s_plus, s_minus, eps), _central(m_plus, m_minus, eps)

        return g, pull


class FirstOrder:
    stores_gradients = True

    def __init__(self, problem: Problem):
        self.problem = problem

    def gradient(self, k, s, m, batch, need_s):
        return self.problem.inner_grad(s, m, batch)

    def linearize(self, k, s, m, batch, g, snapshot, need_s):
        return g, lambda a: (None, None)


def _central(plus, minus, eps):
    return {n: (plus[n] - minus[n]) / (2 * eps) for n in plus}
