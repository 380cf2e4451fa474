"""Validation of ``meta_grad``'s and ``implicit_grad``'s arguments: the one place that raises,
at the public boundary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from metapl import _tree as tree
from metapl.metagrad import rng
from metapl.metagrad.implicit import can_branch
from metapl.metagrad.methods import MethodSpec
from metapl.metagrad.problem import Problem, Schedule, positional_arity
from metapl.optim import Optimizer

# Truncation applies to the unrolled reverse pass; the other methods refuse it.
TRUNCATING = ("exact", "finite_difference", "first_order")


def check_arguments(
    *,
    inner_loss,
    outer_loss,
    student_params,
    teacher_params,
    optimizer,
    opt_state,
    steps,
    method: MethodSpec,
    truncate,
    inner_batches,
    state,
    has_aux,
) -> None:
    """``method``: the spec (its own options were checked when it was built)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    check_tree("teacher_params", teacher_params)
    if student_params is teacher_params:
        raise ValueError(
            "student_params is the same dict as teacher_params, so the student's start would "
            "be a constant copy and get no gradient: for MAML (the start is the meta "
            "parameters) pass student_params=lambda meta: meta"
        )
    learns_start = not tree.is_tree(student_params)
    if not learns_start:
        check_tree("student_params", student_params)
    if not (isinstance(optimizer, Optimizer) or callable(optimizer)):
        raise TypeError(
            "optimizer must be a metapl.optim optimizer (optim.sgd / adam / adamw / rmsprop / "
            f"adagrad) or a callable meta -> optimizer, got {type(optimizer).__name__}"
        )
    if opt_state is not None and isinstance(optimizer, Optimizer) and not learns_start:
        _check_opt_state(opt_state, optimizer, student_params)
    stateful = state is not None
    if stateful:
        check_tree("state", state, allow_empty=True)
        if has_aux:
            raise ValueError(
                "has_aux=True and state= do not combine: with state=, inner_loss returns "
                "(loss, new_state); carry what you want to keep in the state"
            )
    _check_arities(inner_loss, outer_loss, inner_batches, steps, stateful)
    _check_truncate(method, truncate, steps)
    _check_method_paths(
        method, truncate, steps, student_params, optimizer, outer_loss, inner_batches, stateful
    )


def check_tree(name: str, params, allow_empty: bool = False) -> None:
    """``params`` must be a tree (nested dicts / lists / tuples) of tensors, non-empty unless
    ``allow_empty``."""
    empty = tree.is_tree(params) and not tree.leaves(params)
    if empty and allow_empty:
        return
    if not tree.is_tree_of_tensors(params):
        if empty:
            raise ValueError(f"{name} is empty")
        raise TypeError(
            f"{name} must be a dict of tensors, e.g. dict(model.named_parameters()) (nested "
            "dicts, lists and tuples of tensors work too)"
            + (", or a callable meta -> dict" if name == "student_params" else "")
        )


def _check_opt_state(opt_state, optimizer: Optimizer, student) -> None:
    expected = optimizer.init(student)
    if not isinstance(opt_state, Mapping) or opt_state.keys() != expected.keys():
        got = sorted(opt_state) if isinstance(opt_state, Mapping) else type(opt_state).__name__
        raise ValueError(
            f"opt_state has slots {got} but this optimizer keeps {sorted(expected)}: pass "
            "optimizer.init(student_params) from the same optimizer, or None"
        )
    for key, slot in opt_state.items():
        if key != "step":
            tree.check_same_structure(f"opt_state[{key!r}]", slot, expected[key])


def _check_arities(inner_loss, outer_loss, inner_batches, steps: int, stateful: bool) -> None:
    names = "(student, meta" + (", state" if stateful else "")
    outer = positional_arity(outer_loss)
    allowed = (None, 2, 3) if stateful else (None, 1, 2)
    if outer not in allowed:
        form = (
            "(student, state) or (student, meta, state)"
            if stateful
            else ("(student) or (student, meta)")
        )
        raise TypeError(
            f"outer_loss must take {form}, but it requires {outer} positional arguments"
        )
    inner = positional_arity(inner_loss)
    if inner_batches is None:
        if inner not in (None, 2 + stateful):
            raise TypeError(f"inner_loss must take {names})")
        return
    if not tree.leaves(inner_batches) or not tree.is_tree_of_tensors(inner_batches):
        raise ValueError("inner_batches must be a tree (dict / list / tuple) of tensors")
    for leaf in tree.leaves(inner_batches):
        if leaf.dim() == 0 or leaf.shape[0] != steps:
            raise ValueError(
                f"every inner_batches leaf needs a leading dimension of steps={steps} (step k "
                f"sees slice k), got a leaf of shape {tuple(leaf.shape)}"
            )
    if inner not in (None, 3 + stateful):
        raise TypeError(f"with inner_batches, inner_loss must take {names}, batch)")


def _check_truncate(method: MethodSpec, truncate, steps: int) -> None:
    if truncate is None:
        return
    if method.name not in TRUNCATING:
        users = " or ".join(repr(name) for name in TRUNCATING)
        raise ValueError(f"truncate is only used by method={users}, not {method.name!r}")
    if isinstance(truncate, bool) or not isinstance(truncate, int) or not 1 <= truncate <= steps:
        raise ValueError(f"truncate must be an int in [1, steps={steps}], got {truncate!r}")


def _check_method_paths(
    spec, truncate, steps, student_params, optimizer, outer_loss, inner_batches, stateful
) -> None:
    method = spec.name
    learns_start = not tree.is_tree(student_params)
    learns_optimizer = not isinstance(optimizer, Optimizer)
    outer_meta = positional_arity(outer_loss) == 2 + stateful
    if method == "score_function" and spec.log_prob is None:
        raise ValueError(
            "method='score_function' needs log_prob=(teacher_params) -> log-probability of the "
            "sampled targets the inner loss used"
        )
    if method == "score_function" and (learns_start or learns_optimizer or outer_meta):
        raise ValueError(
            "method='score_function' estimates the gradient through sampled targets only: "
            "pass student_params as a dict, a fixed optimizer and outer_loss(student), or use "
            "'exact' / 'finite_difference' / 'first_order' for the other paths"
        )
    truncated = truncate is not None and truncate < steps
    if method == "first_order" and not (
        learns_optimizer or outer_meta or (learns_start and not truncated)
    ):
        raise ValueError(
            "method='first_order' drops the second-order terms, and here every path from the "
            "meta parameters to the outer loss is second order (through the inner loss' "
            "gradient"
            + (", the start being cut off by truncate" if truncated and learns_start else "")
            + "), so the result would be zero: use 'exact' or 'finite_difference' (or "
            "'score_function' for sampled targets)"
        )
    if method == "implicit":
        if learns_optimizer:
            raise ValueError(
                "method='implicit' assumes the inner problem has converged, where the "
                "optimizer's hyperparameters have no effect: pass a fixed optimizer, or use "
                "'exact' to learn them"
            )
        if inner_batches is not None:
            raise ValueError(
                "method='implicit' differentiates the stationarity of one inner objective at "
                "the final student: inner_batches do not apply (evaluate the full inner batch "
                "inside inner_loss)"
            )


def check_truncation_reaches_meta(
    problem: Problem, schedule: Schedule, meta, state, truncate: int | None
) -> None:
    """With ``truncate < K`` the start gets no gradient; refuse when nothing else connects the
    meta parameters to the outer loss (the result would be all zeros). Whether the inner loss
    depends on them is probed by one evaluation (eager only; its random numbers are replayed)."""
    if truncate is None or truncate == schedule.steps or not problem.learns_start:
        return
    if problem.learns_optimizer or problem.outer_takes_meta:
        return
    if not can_branch(tree.leaves(meta)[0]):
        return
    probe = tree.map(lambda x: x.detach().requires_grad_(), meta)
    s = tree.detach(problem.start(tree.detach(meta)))
    with torch.enable_grad():
        loss, _ = rng.replayed(
            rng.snapshot(),
            problem.inner_loss,
            s,
            probe,
            state,
            schedule.batch(schedule.steps - truncate),
        )
    if not loss.requires_grad:
        raise ValueError(
            f"truncate={truncate} cuts the start off the gradient, and the meta parameters reach "
            "the outer loss only through the start here (not through the inner loss, the "
            "optimizer or the outer loss), so the result would be all zeros: drop truncate to "
            "differentiate through all the steps"
        )


@contextlib.contextmanager
def explained_batchnorm_errors() -> Iterator[None]:
    """BatchNorm's error under vmap with one state for all tasks, with the fix."""
    try:
        yield
    except RuntimeError as e:
        if "running_mean or running_var" not in str(e):
            raise
        raise ValueError(
            "under vmap, BatchNorm updates its running statistics per task, so the state must "
            "be batched too: pass one state per task (e.g. vmap over a state whose leaves are "
            "stacked n times: {k: b.expand(n, *b.shape).clone() for k, b in buffers.items()})"
        ) from e
