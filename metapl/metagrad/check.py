"""Validation of ``meta_grad``'s arguments: the one place that raises, at the public boundary."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from metapl.metagrad import tree
from metapl.metagrad.implicit import CG, Neumann
from metapl.metagrad.problem import positional_arity
from metapl.optim import Optimizer, check_same_keys

METHOD_HELP = (
    "'exact' (second order), 'finite_difference' (the same from first-order gradients), "
    "'first_order' (second-order terms dropped: first-order MAML), 'implicit' (implicit "
    "function theorem at the final student) or 'score_function' (sampled targets, needs "
    "log_prob)"
)


def check_arguments(
    *, inner_loss, outer_loss, student_params, teacher_params, optimizer, opt_state, steps,
    method, log_prob, inner_batches, truncate, solver, checkpoint, methods,
) -> None:  # fmt: skip
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; pass one of {METHOD_HELP}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    _check_dict("teacher_params", teacher_params)
    if student_params is teacher_params:
        raise ValueError(
            "student_params is the same dict as teacher_params, so the student's start would "
            "be a constant copy and get no gradient: for MAML (the start is the meta "
            "parameters) pass student_params=lambda meta: meta"
        )
    learns_start = not isinstance(student_params, Mapping)
    if not learns_start:
        _check_dict("student_params", student_params)
    elif not callable(student_params):
        raise TypeError(
            "student_params must be a dict of tensors, e.g. dict(model.named_parameters()), or "
            f"a callable meta -> dict, got {type(student_params).__name__}"
        )
    if not (isinstance(optimizer, Optimizer) or callable(optimizer)):
        raise TypeError(
            "optimizer must be a metapl.optim optimizer (optim.sgd / adam / adamw) or a "
            f"callable meta -> optimizer, got {type(optimizer).__name__}"
        )
    if opt_state is not None and isinstance(optimizer, Optimizer) and not learns_start:
        _check_opt_state(opt_state, optimizer, student_params)
    arity = positional_arity(outer_loss)
    if arity not in (None, 1, 2):
        raise TypeError(
            f"outer_loss must take (student) or (student, meta), but it requires {arity} "
            "positional arguments"
        )
    _check_batches(inner_loss, inner_batches, steps)
    if truncate is not None and (
        isinstance(truncate, bool) or not isinstance(truncate, int) or not 1 <= truncate <= steps
    ):
        raise ValueError(f"truncate must be an int in [1, steps={steps}], got {truncate!r}")
    if not isinstance(checkpoint, bool) and (not isinstance(checkpoint, int) or checkpoint < 1):
        raise ValueError(
            "checkpoint must be True (recompute all steps but the last), False (keep every "
            f"step's graph) or an int n >= 1 (keep the last n), got {checkpoint!r}"
        )
    _check_method_options(
        method, log_prob, truncate, solver, student_params, optimizer, arity, inner_batches
    )


def _check_dict(name: str, params) -> None:
    if not isinstance(params, Mapping) or not all(isinstance(v, Tensor) for v in params.values()):
        raise TypeError(
            f"{name} must be a dict of tensors, e.g. dict(model.named_parameters())"
            + (", or a callable meta -> dict" if name == "student_params" else "")
        )
    if not params:
        raise ValueError(f"{name} is empty")


def _check_opt_state(opt_state, optimizer: Optimizer, student) -> None:
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


def _check_batches(inner_loss, inner_batches, steps: int) -> None:
    if inner_batches is None:
        return
    for leaf in tree.leaves(inner_batches):
        if leaf.dim() == 0 or leaf.shape[0] != steps:
            raise ValueError(
                f"every inner_batches leaf needs a leading dimension of steps={steps} (step k "
                f"sees slice k), got a leaf of shape {tuple(leaf.shape)}"
            )
    if positional_arity(inner_loss) not in (None, 3):
        raise TypeError("with inner_batches, inner_loss must take (student, meta, batch)")


def _check_method_options(
    method, log_prob, truncate, solver, student_params, optimizer, outer_arity, inner_batches
) -> None:
    if method == "score_function" and log_prob is None:
        raise ValueError(
            "method='score_function' needs log_prob=(teacher_params) -> log-probability of the "
            "sampled targets the inner loss used"
        )
    if method != "score_function" and log_prob is not None:
        hint = (
            ": the score-function estimator (MPL's 'first order') is method='score_function'; "
            "method='first_order' drops second-order terms (first-order MAML)"
            if method == "first_order"
            else ""
        )
        raise ValueError(f"log_prob is only used by method='score_function', not {method!r}{hint}")
    learns_start = not isinstance(student_params, Mapping)
    learns_optimizer = not isinstance(optimizer, Optimizer)
    if method == "score_function" and (learns_start or learns_optimizer or outer_arity == 2):
        raise ValueError(
            "method='score_function' estimates the gradient through sampled targets only: "
            "pass student_params as a dict, a fixed optimizer and outer_loss(student), or use "
            "'exact' / 'finite_difference' / 'first_order' for the other paths"
        )
    if method == "first_order" and not (learns_start or learns_optimizer or outer_arity == 2):
        raise ValueError(
            "method='first_order' drops the second-order terms, and here every path from the "
            "meta parameters to the outer loss is second order (through the inner loss' "
            "gradient), so the result would be zero: use 'exact' or 'finite_difference' (or "
            "'score_function' for sampled targets)"
        )
    if method == "implicit":
        if learns_optimizer:
            raise ValueError(
                "method='implicit' assumes the inner problem has converged, where the "
                "optimizer's hyperparameters have no effect: pass a fixed optimizer, or use "
                "'exact' to learn them"
            )
        if inner_batches is not None or truncate is not None:
            raise ValueError(
                "method='implicit' differentiates the stationarity of one inner objective at "
                "the final student: inner_batches and truncate do not apply (evaluate the full "
                "inner batch inside inner_loss)"
            )
    if solver is not None and method != "implicit":
        raise ValueError(f"solver is only used by method='implicit', not {method!r}")
    if solver is not None and not isinstance(solver, CG | Neumann):
        raise TypeError(f"solver must be metapl.CG(...) or metapl.Neumann(...), got {solver!r}")
