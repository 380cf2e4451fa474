"""The inner problem as pure functions of the meta parameters ``m``.

The user may pass the start, the optimizer and the outer loss as constants or as functions of
``m``; ``Problem`` turns every part into a function of ``m`` so each method differentiates one
shape of problem:

    s_0 = start(m);   s_{k+1}, st_{k+1} = optimizer(m).step(s_k, grad_s inner(s_k, m, b_k), st_k)
    loss = outer(s_K, m)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor
from torch.func import grad

from metapl.metagrad.tree import Params, index
from metapl.optim import Optimizer


class Problem(NamedTuple):
    inner_loss: Callable[[Params, Params, Any], tuple[Tensor, Any]]  # (s, m, batch) -> (loss, aux)
    inner_grad: Callable[[Params, Params, Any], tuple[Params, Any]]  # (s, m, batch) -> (g, aux)
    outer_loss: Callable[[Params, Params], Tensor]  # (s, m) -> loss
    start: Callable[[Params], Params]  # m -> s_0
    optimizer: Callable[[Params], Optimizer]  # m -> optimizer
    learns_start: bool  # the start depends on m
    learns_optimizer: bool  # the optimizer depends on m
    outer_takes_meta: bool  # outer_loss(s, m)


class Schedule(NamedTuple):
    """How many steps, and what each sees (kept apart from ``Problem`` so that the compiled
    step functions, which see the problem, do not depend on K)."""

    steps: int
    batches: Any  # pytree with leading dimension `steps`, or None

    def batch(self, k: int):
        return None if self.batches is None else index(self.batches, k)


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


def make_problem(
    inner_loss: Callable,
    outer_loss: Callable,
    student_params: Mapping[str, Tensor] | Callable,
    optimizer: Optimizer | Callable,
    batched: bool,
    has_aux: bool,
) -> Problem:
    """Normalise the user's arguments (already validated) into a ``Problem``."""
    inner = scalar_loss("inner_loss", inner_loss, has_aux)
    inner3 = inner if batched else (lambda s, m, b: inner(s, m))  # noqa: E731
    outer_takes_meta = positional_arity(outer_loss) == 2
    outer = scalar_loss("outer_loss", outer_loss, False)
    outer2 = outer if outer_takes_meta else (lambda s, m: outer(s))  # noqa: E731
    learns_start = not isinstance(student_params, Mapping)
    if learns_start:
        start = student_params
    else:
        fixed = {k: v.detach() for k, v in student_params.items()}
        start = lambda m: fixed  # noqa: E731
    learns_optimizer = not isinstance(optimizer, Optimizer)
    opt = optimizer if learns_optimizer else (lambda m: optimizer)  # noqa: E731
    return Problem(
        inner_loss=inner3,
        inner_grad=grad(inner3, has_aux=True),
        outer_loss=outer2,
        start=start,
        optimizer=opt,
        learns_start=learns_start,
        learns_optimizer=learns_optimizer,
        outer_takes_meta=outer_takes_meta,
    )


def scalar_loss(name: str, fn: Callable, has_aux: bool) -> Callable:
    """Wrap ``fn`` to check it returns a 0-d loss; the inner loss always returns
    ``(loss, aux)`` (aux ``{}`` without has_aux: torch.func wants a pytree of tensors)."""

    def checked(*args):
        out = fn(*args)
        aux = {}
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"with has_aux=True, {name} must return (loss, aux)")
            out, aux = out
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{name} must return a 0-d tensor, got {shape}; reduce it, e.g. with .mean()"
                + ("" if has_aux or name != "inner_loss" else
                   ", or pass has_aux=True if it returns (loss, aux)")
            )  # fmt: skip
        return (out, aux) if name == "inner_loss" else out

    return checked
