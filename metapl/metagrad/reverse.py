"""Reverse mode through the inner steps, one step at a time ("exact", "finite_difference",
"first_order").

The forward pass keeps only the trajectory (each step's student, optimizer state and, where
the curvature needs it, gradient), never a step's activations: memory grows with K by the
trajectory alone. The reverse pass walks back from the outer loss (Eq. numbers: the adjoint
recursion of reverse-mode hypergradients, Maclaurin et al. 2015, Alg. 2; Franceschi et al.
2017, Eq. 9):

    a_s  <- dL/ds_K,  a_m <- dL/dm (the outer loss' own meta path),  a_st <- 0
    for k = K-1 .. K-T:
        (a_s', a_g, a_st, a_m') = VJP of optimizer(m).step at (s_k, g_k, st_k, m)
        (H_ss a_g, H_ms a_g)    = the curvature's products at step k
        a_s = a_s' + H_ss a_g;  a_m += a_m' + H_ms a_g
    a_m += VJP of start(m) with a_s            (only when T = K)

T = ``truncate`` (default K).
"""

from __future__ import annotations

from torch.func import grad_and_value, vjp

from metapl.metagrad import rng, tree
from metapl.metagrad.problem import Problem


def reverse(problem: Problem, meta, opt_state, curvature, reduce, truncate: int):
    """Returns ``(meta_grads, s_K, opt_state_K, outer_loss, first_aux, outer_grads)``."""
    m, steps = meta, problem.steps
    first = steps - truncate  # the earliest step the reverse pass reaches
    reaches_start = first == 0 and problem.learns_start

    def need_s(k: int) -> bool:  # is the adjoint of s_k needed?
        return k > first or reaches_start

    if reaches_start:
        s, start_pull = vjp(problem.start, m)
    else:
        s = problem.start(m)
    opt = problem.optimizer(m)
    st = opt.init(s) if opt_state is None else opt_state

    trajectory, first_aux = [], None
    for k in range(steps):
        snapshot = rng.snapshot()  # the reverse pass replays this step's dropout masks
        batch = problem.batch(k)
        g, aux = curvature.gradient(k, s, m, batch, need_s(k))
        g = reduce(g)
        first_aux = aux if k == 0 else first_aux
        if k >= first:
            stored = g if curvature.stores_gradients else None
            trajectory.append((s, st, stored, snapshot))
        s, st = opt.step(s, g, st)

    a_s, a_m, loss = _outer_grads(problem, s, m)
    a_s, loss = reduce(a_s), reduce({"loss": loss})["loss"]
    outer_grads, a_st = a_s, tree.zeros_like(st)
    for k in reversed(range(first, steps)):
        s_k, st_k, g_k, snapshot = trajectory.pop()  # frees step k's trajectory as we go
        g_k, pull = curvature.linearize(k, s_k, m, problem.batch(k), g_k, snapshot, need_s(k))
        if not curvature.stores_gradients:
            g_k = reduce(g_k)
        if problem.learns_optimizer:
            step = lambda s_, g_, st_, m_: problem.optimizer(m_).step(s_, g_, st_)  # noqa: E731
            _, step_vjp = vjp(step, s_k, g_k, st_k, m)
            a_s_direct, a_g, a_st, a_m_opt = step_vjp((a_s, a_st))
            a_m = tree.add(a_m, a_m_opt)
        else:
            _, step_vjp = vjp(opt.step, s_k, g_k, st_k)
            a_s_direct, a_g, a_st = step_vjp((a_s, a_st))
        h_ss, h_ms = pull(a_g)
        if h_ms is not None:
            a_m = tree.add(a_m, h_ms)
        if need_s(k):
            a_s = a_s_direct if h_ss is None else tree.add(a_s_direct, reduce(h_ss))
    if reaches_start:
        a_m = tree.add(a_m, start_pull(a_s)[0])
    return a_m, s, st, loss, first_aux, outer_grads


def _outer_grads(problem: Problem, s, m):
    """(dL/ds_K, dL/dm through the outer loss alone, L)."""
    if problem.outer_takes_meta:
        (a_s, a_m), loss = grad_and_value(problem.outer_loss, argnums=(0, 1))(s, m)
        return a_s, a_m, loss
    a_s, loss = grad_and_value(lambda s_: problem.outer_loss(s_, m))(s)
    return a_s, tree.zeros_like(m), loss


def run_forward(problem: Problem, meta, opt_state, reduce=tree.identity):
    """The inner steps alone: ``(s_K, opt_state_K, first_aux)``."""
    s = problem.start(meta)
    opt = problem.optimizer(meta)
    st = opt.init(s) if opt_state is None else opt_state
    first_aux = None
    for k in range(problem.steps):
        g, aux = problem.inner_grad(s, meta, problem.batch(k))
        first_aux = aux if k == 0 else first_aux
        s, st = opt.step(s, reduce(g), st)
    return s, st, first_aux
