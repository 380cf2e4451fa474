"""Data parallelism for functional parameters (``torchrun``, any torch.distributed backend).

Parameters live in dicts, so there is no DDP wrapper: the gradient dicts are averaged here.
Each process sees its share of the global batch; with the averages below every process takes
the same steps, and N processes give the parameters one process gets on the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_reduce_mean",
    "broadcast_module",
    "init_from_env",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: str | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment (if any) and return
    this process's device (``cuda:LOCAL_RANK`` with NCCL when CUDA is available, else CPU)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return torch.device(f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")


def all_reduce_mean(tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The mean over processes of every tensor in ``tree``: one all-reduce per dtype, over a
    flat buffer. The identity when not distributed."""
    if not is_distributed():
        return dict(tree)
    out: dict[str, Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k, v in tree.items():
        by_dtype.setdefault(v.dtype, []).append(k)
    for keys in by_dtype.values():
        flat = torch.cat([tree[k].reshape(-1) for k in keys])
        dist.all_reduce(flat)
        flat = flat / dist.get_world_size()
        for k, piece in zip(keys, flat.split([tree[k].numel() for k in keys]), strict=True):
            out[k] = piece.view_as(tree[k])
    return out


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s parameters and buffers."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)
