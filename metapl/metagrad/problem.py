"""The inner problem as pure functions of the meta parameters ``m``.

The user may pass the start, the optimizer and the outer loss as constants or as functions of
``m``, and may carry a state (BatchNorm running statistics) through the steps; ``Problem`` turns
every part into one shape so each method differentiates one kind of problem:

    s_0 = start(m)
    g_k, c_{k+1} = grad_s inner(s_k, m, c_k, b_k)         (c: the carried state, not differentiated)
    s_{k+1}, st_{k+1} = optimizer(m).step(s_k, g_k, st_k)
    loss = outer(s_K, m, c_K)

Without ``state=`` the carried state is ``()`` (an empty tree) and the user's functions never see
it. The user's functions receive a fresh copy of the state at every evaluation, so a BatchNorm
layer that updates its running statistics in place writes into the copy: nothing the caller or
the engine holds is mutated, and a step recomputed in the reverse pass sees the state it saw
going forward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor
from torch.func import grad

from metapl import _tree as tree
from metapl.optim import Optimizer

NO_STATE = ()


class Problem(NamedTuple):
    # (s, m, c, batch) -> (loss, (c_next, aux))
    inner_loss: Callable[[Any, Any, Any, Any], tuple[Tensor, tuple[Any, Any]]]
    # (s, m, c, batch) -> (g, (c_next, aux))
    inner_grad: Callable[[Any, Any, Any, Any], tuple[Any, tuple[Any, Any]]]
    outer_loss: Callable[[Any, Any, Any], Tensor]  # (s, m, c) -> loss
    start: Callable[[Any], Any]  # m -> s_0
    optimizer: Callable[[Any], Optimizer]  # m -> optimizer
    learns_start: bool  # the start depends on m
    learns_optimizer: bool  # the optimizer depends on m
    outer_takes_meta: bool  # outer_loss(s, m[, state])


class Schedule(NamedTuple):
    """How many steps, and what each sees (kept apart from ``Problem`` so that the compiled
    step functions, which see the problem, do not depend on K)."""

    steps: int
    batches: Any  # pytree with leading dimension `steps`, or None

    def batch(self, k: int):
        return None if self.batches is None else tree.index(self.batches, k)


def positional_arity(fn: Callable) -> int | None:
    """How many positional arguments ``fn`` requires (None: unknown, e.g. ``*args`` or a
    callable object). Reads the code object, which torch.compile can trace (inspect cannot)."""
    if isinstance(fn, functools.partial) or not hasattr(fn, "__code__"):
        return None
    code = fn.__code__
    if code.co_flags & inspect.CO_VARARGS:
        return None
    required = code.co_argcount - len(fn.__defaults__ or ())
    return required - 1 if inspect.ismethod(fn) else required


def outer_takes_meta(outer_loss: Callable, stateful: bool) -> bool:
    """``outer_loss(s, m)`` (or ``(s, m, state)``) rather than ``(s)`` (or ``(s, state)``)."""
    return positional_arity(outer_loss) == 2 + stateful


def make_problem(
    inner_loss: Callable,
    outer_loss: Callable,
    student_params: Any,
    optimizer: Optimizer | Callable | None,
    batched: bool,
    has_aux: bool,
    stateful: bool,
) -> Problem:
    """Normalise the user's arguments (already validated) into a ``Problem`` (``optimizer``
    None: no inner steps, as for a given solution)."""
    pair = has_aux or stateful
    inner = scalar_loss("inner_loss", inner_loss, pair, stateful)

    def inner4(s, m, c, b):
        args = (s, m) + ((tree.clone(c),) if stateful else ()) + ((b,) if batched else ())
        loss, out = inner(*args) if pair else (inner(*args), {})
        if not stateful:
            return loss, (c, out)
        _check_new_state(out, c)
        return loss, (tree.detach(out), {})

    takes_meta = outer_takes_meta(outer_loss, stateful)
    outer = scalar_loss("outer_loss", outer_loss, False, stateful)

    def outer3(s, m, c):
        args = (s,) + ((m,) if takes_meta else ()) + ((tree.clone(c),) if stateful else ())
        return outer(*args)

    learns_start = not tree.is_tree(student_params)
    if learns_start:
        start = student_params
    else:
        fixed = tree.detach(student_params)
        start = lambda m: fixed  # noqa: E731
    learns_optimizer = optimizer is not None and not isinstance(optimizer, Optimizer)
    opt = optimizer if learns_optimizer else (lambda m: optimizer)  # noqa: E731
    return Problem(
        inner_loss=inner4,
        inner_grad=grad(inner4, has_aux=True),
        outer_loss=outer3,
        start=start,
        optimizer=opt,
        learns_start=learns_start,
        learns_optimizer=learns_optimizer,
        outer_takes_meta=takes_meta,
    )


def scalar_loss(name: str, fn: Callable, returns_pair: bool, stateful: bool = False) -> Callable:
    """Wrap ``fn`` to check it returns a 0-d loss; with ``returns_pair`` the loss comes with
    a second output (``(loss, aux)``, or ``(loss, new_state)`` with ``state=``)."""
    pair = "(loss, new_state)" if stateful else "(loss, aux)"

    def checked(*args):
        out = fn(*args)
        second = {}
        if returns_pair:
            if not (isinstance(out, tuple) and len(out) == 2):
                flag = "state=" if stateful else "has_aux=True"
                raise ValueError(f"with {flag}, {name} must return {pair}")
            out, second = out
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{name} must return a 0-d tensor, got {shape}; reduce it, e.g. with .mean()"
                + (
                    ""
                    if returns_pair or name != "inner_loss"
                    else ", or pass has_aux=True if it returns (loss, aux)"
                )
            )
        return (out, second) if returns_pair else out

    return checked


def _check_new_state(new, old) -> None:
    tree.check_same_structure(
        "the state inner_loss returns",
        new,
        old,
        "Return (loss, new_state) with new_state shaped like the state it received.",
    )
