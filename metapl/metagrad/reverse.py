"""Reverse mode through the inner steps, one step at a time ("exact", "finite_difference",
"first_order").

The forward pass keeps only the trajectory (each step's student, optimizer state, carried
state and, where the method needs it, gradient), never a step's activations: memory grows
with K by the trajectory alone (see metagrad/curvature.py for each method's step). The
reverse pass walks back from the outer loss (the adjoint recursion of reverse-mode
hypergradients; Maclaurin et al. 2015, Alg. 2; Franceschi et al. 2017, Sec. 3):

    a_s  <- dL/ds_K,  a_m <- dL/dm (the outer loss' own meta path),  a_st <- 0
    for k = K-1 .. K-T:
        (a_s', a_g, a_st, a_m') = VJP of optimizer(m).step at (s_k, g_k, st_k, m)
                                  (g_k evaluated with the state c_k step k saw going forward)
        (H_ss a_g, H_ms a_g)    = the curvature's products at step k
        a_s = a_s' + H_ss a_g;  a_m += a_m' + H_ms a_g
    a_m += VJP of (start(m), optimizer(m).init(start(m))) with (a_s, a_st)   (only when T = K)

T = ``truncate`` (default K).
"""

from __future__ import annotations

import functools

import torch
from torch.func import grad_and_value, vjp

from metapl import _tree as tree
from metapl.metagrad import rng
from metapl.metagrad.problem import Problem, Schedule


def reverse(
    problem: Problem,
    schedule: Schedule,
    meta,
    opt_state,
    state,
    method,
    reduce,
    truncate: int,
    kept_graphs: int,
    compiled: bool,
):
    """Returns ``(meta_grads, s_K, opt_state_K, state_K, outer_loss, first_aux, outer_grads)``.

    The last ``kept_graphs`` steps (at least one) keep their graphs from the forward pass; the
    reverse pass recomputes the earlier ones (memory grows by at most ``kept_graphs`` steps'
    activations). ``compiled``: run each step's forward and
    pullback as a torch.compile'd function, the same graph for every step (compile time does
    not grow with K); random numbers are replayed around the compiled pullback, and every step
    is recomputed."""
    m, steps = meta, schedule.steps
    advance, pullback = method.advance, method.pullback
    if compiled:
        advance, pullback = _compiled_step(method)
    first = steps - truncate  # the earliest step the reverse pass reaches
    learns_init = opt_state is None and problem.learns_optimizer  # e.g. adagrad's accumulator
    reaches_start = first == 0 and (problem.learns_start or learns_init)

    def need_s(k: int) -> bool:  # is the adjoint of s_k needed?
        return k > first or reaches_start

    def initial(m_):
        s_ = problem.start(m_)
        return s_, problem.optimizer(m_).init(s_) if opt_state is None else opt_state

    if reaches_start:
        (s, st), start_pull = vjp(initial, m)
    else:
        s, st = initial(m)
    if compiled:  # a start aliasing the meta parameters (MAML) would need a graph of its own
        s = tree.clone(s)

    trajectory, first_aux, c = [], None, state
    for k in range(steps):
        snapshot = rng.snapshot()  # the reverse pass replays this step's dropout masks
        batch = schedule.batch(k)
        # Keep the step's graph near the end (where the reverse pass starts), and inside a
        # caller's torch.compile, where a recomputation could not replay the dropout masks.
        keep = (k >= steps - kept_graphs or torch.compiler.is_compiling()) and not compiled
        s_next, st_next, c_next, aux, memo = advance(s, st, c, m, batch, need_s(k), keep)
        first_aux = aux if k == 0 else first_aux
        if k >= first:
            trajectory.append((s, st, c, memo, snapshot))
        s, st, c = s_next, st_next, c_next

    a_s, a_m, loss = outer_grads_at(problem, s, m, c)
    a_s, loss = reduce(a_s), reduce({"loss": loss})["loss"]
    outer_grads, a_st = a_s, tree.zeros_like(st)
    for k in reversed(range(first, steps)):
        s_k, st_k, c_k, memo, snapshot = trajectory.pop()  # frees step k's trajectory as we go
        a_s_k, a_st, a_m_k = pullback(
            s_k, st_k, c_k, m, schedule.batch(k), memo, snapshot, need_s(k), a_s, a_st
        )
        if a_m_k is not None:
            a_m = tree.add(a_m, a_m_k)
        a_s = a_s_k
    if reaches_start:
        a_m = tree.add(a_m, start_pull((a_s, a_st))[0])
    return a_m, s, st, c, loss, first_aux, outer_grads


def _advance(method, s, st, c, m, batch, need_s):
    return method.advance(s, st, c, m, batch, need_s, False)


def _pullback(method, s, st, c, m, batch, memo, need_s, a_s, a_st):
    return method.pullback(s, st, c, m, batch, memo, None, need_s, a_s, a_st)


@functools.cache
def _compiled(fn):
    """``fn`` compiled once per process (compiling is set up on first use only, so that
    importing metapl does not import torch._dynamo)."""
    return torch.compile(fn, fullgraph=True)


def _compiled_step(method):
    """(advance, pullback) with the signatures of ``method``'s, each one compiled graph."""

    def advance(s, st, c, m, batch, need_s, keep):
        return _compiled(_advance)(method, s, st, c, m, batch, need_s)

    def pullback(s, st, c, m, batch, memo, snapshot, need_s, a_s, a_st):
        return rng.replayed(
            snapshot, _compiled(_pullback), method, s, st, c, m, batch, memo, need_s, a_s, a_st
        )

    return advance, pullback


def outer_grads_at(problem: Problem, s, m, c):
    """(dL/ds_K, dL/dm through the outer loss alone, L) at the final student and state."""
    if problem.outer_takes_meta:
        (a_s, a_m), loss = grad_and_value(problem.outer_loss, argnums=(0, 1))(s, m, c)
        return a_s, a_m, loss
    a_s, loss = grad_and_value(lambda s_: problem.outer_loss(s_, m, c))(s)
    return a_s, tree.zeros_like(m), loss


def run_forward(problem: Problem, schedule: Schedule, meta, opt_state, state, reduce=tree.identity):
    """The inner steps alone: ``(s_K, opt_state_K, state_K, first_aux)``."""
    s = problem.start(meta)
    opt = problem.optimizer(meta)
    st = opt.init(s) if opt_state is None else opt_state
    first_aux, c = None, state
    for k in range(schedule.steps):
        g, (c, aux) = problem.inner_grad(s, meta, c, schedule.batch(k))
        first_aux = aux if k == 0 else first_aux
        s, st = opt.step(s, reduce(g), st)
    return s, st, c, first_aux
