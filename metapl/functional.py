"""Small pure helpers for running nn.Modules functionally (params and buffers as dicts)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]

__all__ = [
    "buffers_of",
    "forward",
    "forward_batch_stats",
    "params_of",
    "soft_cross_entropy",
    "write_back",
]


def params_of(module: nn.Module) -> Params:
    """The module's parameters as a dict of detached tensors sharing their storage."""
    return {k: p.detach() for k, p in module.named_parameters()}


def buffers_of(module: nn.Module) -> Params:
    """The module's buffers (e.g. BatchNorm running statistics) as a dict."""
    return dict(module.named_buffers())


def forward(
    module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], *args
) -> tuple[Tensor, Params]:
    """Run ``module(*args)`` with ``params`` and a *copy* of ``buffers``.

    Returns ``(output, new_buffers)``: in training mode BatchNorm updates its running statistics
    in the copy, so the inputs are never mutated and the call is safe under ``torch.func``
    transforms and ``torch.compile``. Keep ``new_buffers`` to advance the statistics.
    """
    scratch = {k: b.clone() for k, b in buffers.items()}
    return functional_call(module, {**params, **scratch}, args), scratch


def forward_batch_stats(
    module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], *args
) -> Tensor:
    """``module(*args)`` with ``params`` and ``buffers``, its BatchNorm layers normalising with
    the statistics of this batch and tracking none (their running statistics stand in as None).

    For a forward whose new running statistics would be thrown away; unlike ``forward`` it
    mutates no buffer, so it also runs under ``vmap`` over parameters. The output equals
    ``forward``'s in training mode.
    """
    untracked = {
        f"{name}.{stat}" if name else stat
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for stat in ("running_mean", "running_var", "num_batches_tracked")
    }
    state = {k: None if k in untracked else b.clone() for k, b in buffers.items()}
    return functional_call(module, {**params, **state}, args)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_c q_c log softmax(logits)_c``; logits, q: [B, C]."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@torch.no_grad()
def write_back(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]):
    """Copy new parameter and buffer values into ``module`` in place."""
    for k, p in module.named_parameters():
        p.copy_(params[k])
    for k, b in module.named_buffers():
        b.copy_(buffers[k])


def reduce_float_buffers(
    reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]], buffers: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``buffers`` with the floating-point ones (BatchNorm statistics) passed through
    ``reduce`` (an average across processes); integer counters kept as they are."""
    return {**buffers, **reduce({k: v for k, v in buffers.items() if v.is_floating_point()})}
