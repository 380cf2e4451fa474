"""``"exact"`` by plain reverse-mode autograd through the unroll, for eager calls that keep
every step's graph anyway (K <= ``checkpoint``'s n).

Outside torch.func transforms and torch.compile, backpropagating through the recorded unroll
with ``torch.autograd`` computes what the step-by-step reverse pass (metagrad/reverse.py)
computes, without torch.func's per-operation wrappers, which dominate small problems (one
MAML task: about 2x faster). Under ``vmap``, ``grad`` or ``torch.compile`` the reverse pass
runs instead: ``torch.autograd.grad(create_graph=True)`` composes with neither.
"""

from __future__ import annotations

import torch

from metapl.metagrad import tree
from metapl.metagrad.problem import Problem, Schedule


def applies(method: str, reduce, compile: bool, kept_graphs: int, steps: int) -> bool:
    """Whether ``unrolled`` can stand in for the reverse pass of this call."""
    return (
        method == "exact"
        and reduce is None
        and not compile
        and kept_graphs >= steps
        and not torch.compiler.is_compiling()
        and torch._C._functorch.maybe_current_level() is None
    )


def unrolled(problem: Problem, schedule: Schedule, meta, opt_state, truncate: int):
    """Returns ``(meta_grads, s_K, opt_state_K, outer_loss, first_aux, outer_grads)``."""
    with torch.enable_grad():
        m = {k: v.detach().requires_grad_() for k, v in meta.items()}
        first = schedule.steps - truncate  # steps before it carry no gradient
        s = problem.start(m)
        opt = problem.optimizer(m)
        st = opt.init(s) if opt_state is None else opt_state
        first_aux = None
        for k in range(schedule.steps):
            # The inner gradient needs a student that requires grad (a constant start, or
            # one detached before the truncation point: a leaf).
            s = {n: v if v.requires_grad else v.detach().requires_grad_() for n, v in s.items()}
            loss, aux = problem.inner_loss(s, m, schedule.batch(k))
            first_aux = aux if k == 0 else first_aux
            g = torch.autograd.grad(loss, list(s.values()), create_graph=k >= first,
                                    allow_unused=True, materialize_grads=True)  # fmt: skip
            s, st = opt.step(s, dict(zip(s, g, strict=True)), st)
            if k < first:
                s, st = tree.detach(s), tree.detach(st)
        loss = problem.outer_loss(s, m)
        inputs = [*m.values(), *s.values()]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    meta_grads = dict(zip(m, grads[: len(m)], strict=True))
    outer_grads = dict(zip(s, grads[len(m) :], strict=True))
    return meta_grads, s, st, loss, first_aux, outer_grads
