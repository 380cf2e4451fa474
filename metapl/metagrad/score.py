"""The score-function (REINFORCE) estimator, for inner losses on *sampled* targets.

When the inner loss trains on targets y drawn from p_m(y), the outer loss is not differentiable
in m through the samples. The estimator (MPL's "first order"; Pham et al. 2021, Eq. 12 up to
the baseline) is

    d/dm E_y[L(s_K(y))] = E_y[(L(s_K(y)) - b) d/dm log p_m(y)]

for any baseline b that does not depend on the sampled y; here b = L(s_0) plus the caller's
``baseline`` (a control variate such as a moving average of h = L(s_K) - L(s_0)).
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from metapl import _tree as tree
from metapl.metagrad import rng
from metapl.metagrad.problem import Problem, Schedule
from metapl.metagrad.reverse import run_forward


def score_function(
    problem: Problem, schedule: Schedule, meta, opt_state, state, log_prob, baseline, reduce
):
    """Returns ``(meta_grads, s_K, opt_state_K, state_K, outer_loss, first_aux, h)``; h compares
    the outer loss at ``(s_K, state_K)`` with that at ``(s_0, state_0)``."""
    s_0 = problem.start(meta)
    # L(s_K) must see L(s_0)'s dropout masks, so that h measures the steps alone: replay the
    # RNG in eager mode; under torch.compile (which cannot restore RNG states) evaluate both in
    # one vmap whose random numbers are shared.
    if torch.compiler.is_compiling():
        s, st, c, first_aux = run_forward(problem, schedule, meta, opt_state, state, reduce)
        pair = tree.map(lambda *x: torch.stack(x), (s_0, state), (s, c))
        both = vmap(lambda sc: problem.outer_loss(sc[0], meta, sc[1]), randomness="same")(pair)
        loss_before, loss_after = both[0], both[1]
    else:
        snapshot = rng.snapshot()
        loss_before = problem.outer_loss(s_0, meta, state)
        s, st, c, first_aux = run_forward(problem, schedule, meta, opt_state, state, reduce)
        loss_after = rng.replayed(snapshot, problem.outer_loss, s, meta, c)
    # h is a difference of losses over the *whole* outer batch: average across processes.
    losses = reduce({"before": loss_before, "after": loss_after})
    h = (losses["after"] - losses["before"]).detach()
    score = grad(log_prob)(meta)
    meta_grads = tree.scale(score, h - baseline)
    return meta_grads, s, st, c, losses["after"], first_aux, h
