"""Supervised training of a module with a ``metapl.optim`` optimizer.

Used for MPL's last phase (finetuning the student on the labeled data) and for supervised
baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from metapl.functional import buffers_of, forward, params_of, reduce_float_buffers, write_back
from metapl.optim import Optimizer

__all__ = ["finetune"]


def finetune(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: Optimizer,
    label_smoothing: float = 0.0,
    dropout: bool = True,
    reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> list[float]:
    """Train ``model`` in place on ``(x [B, ...], y [B])`` batches with cross-entropy, one
    optimizer step per batch. ``dropout=False`` switches its dropout layers off for the
    duration (BatchNorm still trains). ``reduce`` (data parallel) averages a flat dict of
    tensors across processes: the gradients and the floating-point BatchNorm statistics of
    every step. Returns the loss of every step."""
    params, buffers = params_of(model), buffers_of(model)
    state = optimizer.init(params)
    model.train()
    if not dropout:
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()

    def loss_fn(p, b, x, y):
        logits, new_buffers = forward(model, p, b, x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, (new_buffers, loss.detach())

    losses = []
    for x, y in batches:
        grads, (buffers, loss) = grad(loss_fn, has_aux=True)(params, buffers, x, y)
        if reduce is not None:
            grads = reduce(grads)
            buffers = reduce_float_buffers(reduce, buffers)
        params, state = optimizer.step(params, grads, state)
        losses.append(float(loss))
    write_back(model, params, buffers)
    model.train()
    return losses
