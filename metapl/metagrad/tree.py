"""Small helpers over dicts of tensors (possibly nested, as optimizer states are)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


def detach(tree):
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: detach(v) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(detach(v) for v in tree)
    return tree


def zeros_like(tree):
    if isinstance(tree, Tensor):
        return torch.zeros_like(tree)
    return {k: zeros_like(v) for k, v in tree.items()}


def add(a: Params, b: Params) -> Params:
    return {k: a[k] + b[k] for k in a}


def scale(tree: Params, c: Tensor | float) -> Params:
    return {k: c * v for k, v in tree.items()}


def dot(a: Params, b: Params) -> Tensor:
    return sum(torch.sum(a[k] * b[k]) for k in a)


def norm(tree: Params) -> Tensor:
    return torch.sqrt(dot(tree, tree))


def dtype(tree: Params) -> torch.dtype:
    return next(iter(tree.values())).dtype


def index(tree, k: int):
    """Slice ``k`` of every leaf's leading dimension (a batch of per-step inputs)."""
    if isinstance(tree, Tensor):
        return tree[k]
    if isinstance(tree, Mapping):
        return {key: index(v, k) for key, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(index(v, k) for v in tree)
    raise TypeError(f"inner_batches leaves must be tensors, got {type(tree).__name__}")


def leaves(tree) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [x for v in tree.values() for x in leaves(v)]
    if isinstance(tree, tuple | list):
        return [x for v in tree for x in leaves(v)]
    raise TypeError(f"inner_batches leaves must be tensors, got {type(tree).__name__}")


def identity(tree):
    return tree
