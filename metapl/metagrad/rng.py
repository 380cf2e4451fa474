"""Replaying random numbers: a loss evaluated twice must see the same dropout masks."""

from __future__ import annotations

from collections.abc import Callable

import torch

Snapshot = tuple | None


def snapshot() -> Snapshot:
    """The global RNG states (CPU and current CUDA device), so that a repeated evaluation can
    draw the same random numbers (dropout masks) as the first. None under torch.compile, which
    cannot restore RNG states: there every evaluation draws afresh."""
    if torch.compiler.is_compiling():
        return None
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def _restore(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def replayed(state: Snapshot, fn: Callable, *args, **kwargs):
    """``fn(*args)`` drawing the random numbers drawn after ``state``; afterwards the RNG
    continues from where it was, so later draws never repeat earlier ones."""
    if state is None:
        return fn(*args, **kwargs)
    now = snapshot()
    _restore(state)
    try:
        return fn(*args, **kwargs)
    finally:
        _restore(now)
