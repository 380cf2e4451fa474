"""Supervised training of a module with a ``metapl.optim`` optimizer.

Used for MPL's last phase (finetuning the student on the labeled data) and for supervised
baselines.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from metapl.distributed import all_reduce_mean, all_reduce_mean_floats
from metapl.functional import buffers_of, forward, params_of, write_back
from metapl.optim import Optimizer

__all__ = ["finetune"]


def finetune(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: Optimizer,
    label_smoothing: float = 0.0,
    dropout: bool = True,
) -> list[float]:
    """Train ``model`` in place on ``(x [B, ...], y [B])`` batches with cross-entropy, one
    optimizer step per batch (gradients and BatchNorm running statistics averaged across
    processes when distributed). ``dropout=False`` switches its dropout layers off for the
    duration (BatchNorm still trains). Returns the loss of every step."""
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
        params, state = optimizer.step(params, all_reduce_mean(grads), state)
        buffers = all_reduce_mean_floats(buffers)
        losses.append(float(loss))
    write_back(model, params, buffers)
    model.train()
    return losses
