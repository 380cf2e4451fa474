"""``"exact"`` by plain reverse-mode autograd through the unroll, in segments, for eager calls.

Outside torch.func transforms and torch.compile, backpropagating through recorded steps with
``torch.autograd`` computes what the step-by-step reverse pass (metagrad/reverse.py) computes,
without torch.func's per-operation wrappers, which dominate small problems. Memory stays lean
by checkpointing (Griewank & Walther 2000): the steps are cut into segments of ``kept`` steps
counted back from the last; the forward pass records no graph and keeps only the student,
optimizer state, carried state and random-number state at the start of each segment, except
for the last segment, whose graph it records. The reverse pass backpropagates through that
graph, then replays each earlier segment with its graph (and its dropout masks) and
backpropagates through it, from the last segment to the first. With ``kept >= K`` nothing is
recomputed. Under ``vmap``, ``grad`` or ``torch.compile`` the reverse pass runs instead:
``torch.autograd.grad(create_graph=True)`` composes with neither.
"""

from __future__ import annotations

import torch

from metapl import _tree as tree
from metapl.metagrad import rng
from metapl.metagrad.methods import Exact, MethodSpec
from metapl.metagrad.problem import Problem, Schedule


def applies(spec: MethodSpec, reduce, compile: bool) -> bool:
    """Whether ``unrolled`` can stand in for the reverse pass of this call."""
    return (
        isinstance(spec, Exact)
        and spec.curvature == "reverse"
        and reduce is None
        and not compile
        and not torch.compiler.is_compiling()
        and torch._C._functorch.maybe_current_level() is None
    )


def segment_starts(steps: int, first: int, kept: int) -> list[int]:
    """The first step of each segment of ``[first, steps)``: segments of ``kept`` steps
    counted back from the last step (the earliest one may be shorter)."""
    starts, b = [], max(steps - kept, first)
    while True:
        starts.append(b)
        if b == first:
            return starts[::-1]
        b = max(b - kept, first)


def unrolled(
    problem: Problem, schedule: Schedule, meta, opt_state, state, truncate: int, kept: int
):
    """Returns ``(meta_grads, s_K, opt_state_K, state_K, outer_loss, first_aux, outer_grads)``."""
    steps = schedule.steps
    first = steps - truncate  # the steps before it carry no gradient
    starts = segment_starts(steps, first, kept)
    const = tree.detach(meta)
    with torch.enable_grad():
        m = tree.map(lambda x: x.detach().requires_grad_(), meta)
        opt_const = problem.optimizer(const)
        # the start, with a graph to m where it depends on m (a learned start; an optimizer
        # state initialised from learned hyperparameters, e.g. adagrad's accumulator)
        s_start = problem.start(m)
        st_start = problem.optimizer(m).init(s_start) if opt_state is None else opt_state
        s, st = tree.detach(s_start), tree.detach(st_start)
        c, first_aux, saved = state, None, []
        for k in range(starts[-1]):  # no graph up to the last segment
            if k in starts:
                saved.append((k, s, st, c, rng.snapshot()))
            g, (c, aux) = _gradient(problem, s, const, c, schedule.batch(k), create_graph=False)
            first_aux = aux if k == 0 else first_aux
            with torch.no_grad():
                s, st = opt_const.step(s, g, st)

        def segment(start, end, s_b, st_b, c_b):
            """Steps ``start..end-1`` with their graph: ``(inputs, s_end, st_end, c_end)``;
            the inputs (``s_b``, ``st_b`` as leaves requiring grad) are what the adjoints
            flow back to (none at the first segment: nothing earlier needs them)."""
            if start == 0:
                s_in, st_in = s_start, st_start
            elif start == first:
                s_in, st_in = s_b, st_b
            else:
                s_in, st_in = _requiring_grad(s_b), _requiring_grad(st_b)
            opt = problem.optimizer(m)  # each segment its own graph of the hyperparameters
            s_k, st_k, c_k, aux0 = s_in, st_in, c_b, None
            for k in range(start, end):
                g, (c_k, aux) = _gradient(problem, s_k, m, c_k, schedule.batch(k), True)
                aux0 = aux if k == 0 else aux0
                s_k, st_k = opt.step(s_k, g, st_k)
            inputs = (s_in, st_in) if start > first else ((), ())
            return inputs, s_k, st_k, c_k, aux0

        inputs, s_K, st_K, c_K, aux0 = segment(starts[-1], steps, s, st, c)
        first_aux = aux0 if starts[-1] == 0 else first_aux
        loss = problem.outer_loss(s_K, m, c_K)
        n_s, n_in = len(tree.leaves(s_K)), len(tree.leaves(inputs))
        grads = _grad(
            [loss],
            [torch.ones_like(loss)],
            [*tree.leaves(s_K), *tree.leaves(inputs), *tree.leaves(m)],
        )
        outer_grads = tree.unflatten(grads[:n_s], tree.structure(s_K))
        a_in, a_m = _unflatten_pair(grads[n_s:], n_in, inputs, m)
        while saved:  # frees each segment's start as the reverse pass passes it
            start, s_b, st_b, c_b, snapshot = saved.pop()
            end = starts[starts.index(start) + 1]
            inputs, s_end, st_end, _, _ = rng.replayed(
                snapshot, segment, start, end, s_b, st_b, c_b
            )
            outputs, cotangents = _differentiable((s_end, st_end), a_in)
            n_in = len(tree.leaves(inputs))
            grads = _grad(outputs, cotangents, [*tree.leaves(inputs), *tree.leaves(m)])
            a_in, a_m_segment = _unflatten_pair(grads, n_in, inputs, m)
            a_m = tree.add(a_m, a_m_segment)
    return (
        tree.detach(a_m),
        tree.detach(s_K),
        tree.detach(st_K),
        c_K,
        loss.detach(),
        first_aux,
        tree.detach(outer_grads),
    )


def _gradient(problem: Problem, s, m, c, batch, create_graph: bool):
    """``grad_s inner(s, m, c, batch)`` by autograd, and ``(c_next, aux)``."""
    s = tree.map(lambda x: x if x.requires_grad else x.detach().requires_grad_(), s)
    loss, carried = problem.inner_loss(s, m, c, batch)
    grads = torch.autograd.grad(
        loss, tree.leaves(s), create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return tree.unflatten(list(grads), tree.structure(s)), carried


def _requiring_grad(t):
    return tree.map(lambda x: x.detach().requires_grad_() if x.is_floating_point() else x, t)


def _differentiable(outputs, cotangents) -> tuple[list, list]:
    """The output leaves that carry a graph, with their cotangents."""
    pairs = [
        (out, cot)
        for out, cot in zip(tree.leaves(outputs), tree.leaves(cotangents), strict=True)
        if out.requires_grad
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _grad(outputs, cotangents, inputs) -> list:
    return list(
        torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True, materialize_grads=True)
    )


def _unflatten_pair(grads: list, n_first: int, first, second):
    return (
        tree.unflatten(grads[:n_first], tree.structure(first)),
        tree.unflatten(grads[n_first:], tree.structure(second)),
    )
