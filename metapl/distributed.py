"""Data parallelism for functional parameters (``torchrun``, any torch.distributed backend).

Parameters live in dicts, so there is no DDP wrapper: the gradient dicts are averaged here.
Each process sees its share of the global batch; with the averages below every process takes
the same steps, and N processes give the parameters one process gets on the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

if dist.is_available():
    # Import before any process group exists. Its functions default to ``group=group.WORLD``,
    # a value read at import time; imported after init_process_group (torch.func imports it
    # lazily, through torch._dynamo, on first use) they hold the default group forever, so
    # destroy_process_group cannot free it and gloo's threads outlive the interpreter: at
    # exit, a peer closing its socket then wakes them inside the process's teardown, which
    # aborts now and then ("terminate called without an active exception", SIGABRT).
    import torch.distributed.nn  # noqa: F401

__all__ = [
    "all_reduce_mean",
    "barrier",
    "broadcast_module",
    "init_from_env",
    "is_distributed",
    "process_group",
    "rank",
    "reduce_mean",
    "shutdown",
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


@contextmanager
def process_group(backend: str | None = None) -> Iterator[torch.device]:
    """``init_from_env`` for the length of a block, which gets the device. A group the block
    joined is left at its end (``shutdown``: after a barrier when the block succeeded, at once
    when it raised); a group joined before the block is left alone."""
    joins = "RANK" in os.environ and not (dist.is_available() and dist.is_initialized())
    device = init_from_env(backend)
    try:
        yield device
    except BaseException:
        if joins:
            shutdown(clean=False)
        raise
    if joins:
        shutdown()


def barrier() -> None:
    """Wait until every process gets here (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Leave the process group at the end of a run (a no-op without one).

    ``clean=True`` (every process finished) first waits at a barrier, so that no process
    tears its connections down, or exits, while a peer is still using them; then destroys the
    group, so that no communication thread outlives the interpreter. ``clean=False`` (this
    process failed; its peers may be stuck in a collective) destroys the group at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


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


def reduce_mean() -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None:
    """What the core's ``reduce=`` takes under ``torchrun``: ``all_reduce_mean`` when this
    process is one of several, else None (one process: nothing to average)."""
    return all_reduce_mean if is_distributed() else None


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s parameters and buffers."""
    if is_distributed():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)
