"""MPL's training state: one tree in, one tree out of every step."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from metapl import _tree as tree
from metapl.optim import State

__all__ = ["MPLState", "Net", "ema_update"]

Params = dict[str, Tensor]


class Net(NamedTuple):
    """One network's tensors: parameters, buffers (BatchNorm statistics) and its optimizer's
    state (None for the EMA student, which no optimizer steps)."""

    params: Params
    buffers: Params
    opt: State | None = None


class MPLState(NamedTuple):
    """Everything one MPL step reads and writes. ``step``: 0-d, steps taken; ``h_baseline``:
    0-d, the moving average of the score-function estimator's ``h`` (0 when unused). ``ema``:
    the exponential moving average of the student, or None.

    A NamedTuple of dicts passes through ``torch.compile(fullgraph=True)`` and
    ``torch.func``; save it with ``_asdict()`` (``torch.load(weights_only=True)`` refuses
    NamedTuples)."""

    teacher: Net
    student: Net
    ema: Net | None
    step: Tensor
    h_baseline: Tensor


def ema_update(ema: Net, student: Net, decay: float) -> Net:
    """``decay * ema + (1 - decay) * student`` for the parameters and the floating-point
    buffers; integer buffers (BatchNorm's step counter) are copied."""
    params = tree.map(lambda e, s: decay * e + (1 - decay) * s, ema.params, student.params)
    buffers = {
        k: decay * v + (1 - decay) * student.buffers[k]
        if v.is_floating_point()
        else student.buffers[k]
        for k, v in ema.buffers.items()
    }
    return Net(params, buffers)
