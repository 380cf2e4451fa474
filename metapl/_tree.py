"""Helpers over trees of tensors: nested dicts, lists and tuples (``torch.utils._pytree``).

Parameters, optimizer states, meta parameters, per-parameter hyperparameters and carried state
(BatchNorm buffers) are all trees; every helper here returns the caller's structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Tree = Any  # a tensor, or nested dicts / lists / tuples of tensors
TreeSpec = pytree.TreeSpec
_NODES = (dict, list, tuple, Tensor)  # a tuple: torch.compile cannot trace `dict | list`
_LEAF = pytree.treespec_leaf()

# The common tree is a flat dict of tensors (``dict(model.named_parameters())``); eager calls
# take it without torch.utils._pytree's per-node registry lookups (a few microseconds each,
# many per inner step). Under torch.compile the general path runs (dynamo traces pytree).


def _flat_dict(tree: Tree) -> bool:
    return (
        type(tree) is dict
        and not torch.compiler.is_compiling()
        and all(isinstance(v, Tensor) for v in tree.values())
    )


def _flat_dict_spec(spec: TreeSpec) -> bool:
    return spec.type is dict and spec.num_leaves == spec.num_children == spec.num_nodes - 1


def flatten(tree: Tree) -> tuple[list, TreeSpec]:
    if _flat_dict(tree):
        return list(tree.values()), TreeSpec(dict, list(tree), [_LEAF] * len(tree))
    return pytree.tree_flatten(tree)


def unflatten(leaves: list, spec: TreeSpec) -> Tree:
    if not torch.compiler.is_compiling() and _flat_dict_spec(spec):
        return dict(zip(spec.context, leaves, strict=True))
    return pytree.tree_unflatten(leaves, spec)


def leaves(tree: Tree) -> list:
    if _flat_dict(tree):
        return list(tree.values())
    return pytree.tree_leaves(tree)


def structure(tree: Tree) -> TreeSpec:
    return flatten(tree)[1]


def map(fn: Callable, tree: Tree, *rest: Tree) -> Tree:  # noqa: A001 (the pytree name)
    """``fn`` applied leafwise; ``rest`` must have ``tree``'s structure."""
    if _flat_dict(tree) and all(type(r) is dict and r.keys() == tree.keys() for r in rest):
        return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}
    return pytree.tree_map(fn, tree, *rest)


def _tensors(fn: Callable[[Tensor], Any]) -> Callable:
    return lambda x: fn(x) if isinstance(x, Tensor) else x


def detach(tree: Tree) -> Tree:
    return map(_tensors(Tensor.detach), tree)


def clone(tree: Tree) -> Tree:
    return map(_tensors(torch.clone), tree)


def to(tree: Tree, device: torch.device | str) -> Tree:
    return map(_tensors(lambda x: x.to(device)), tree)


def zeros_like(tree: Tree) -> Tree:
    return map(torch.zeros_like, tree)


def add(a: Tree, b: Tree) -> Tree:
    return map(torch.add, a, b)


def sub(a: Tree, b: Tree) -> Tree:
    return map(torch.sub, a, b)


def scale(tree: Tree, c: Tensor | float) -> Tree:
    return map(lambda x: c * x, tree)


def axpy(a: Tensor | float, x: Tree, y: Tree) -> Tree:
    """``a * x + y`` leafwise."""
    return map(lambda x_, y_: y_ + a * x_, x, y)


def dot(a: Tree, b: Tree) -> Tensor:
    """``sum_i <a_i, b_i>`` over the leaves (a 0-d tensor)."""
    return sum(torch.sum(x * y) for x, y in zip(leaves(a), leaves(b), strict=True))


def norm(tree: Tree) -> Tensor:
    return torch.sqrt(dot(tree, tree))


def dtype(tree: Tree) -> torch.dtype:
    return leaves(tree)[0].dtype


def index(tree: Tree, k: int) -> Tree:
    """Slice ``k`` of every leaf's leading dimension (a batch of per-step inputs)."""
    return map(lambda x: x[k], tree)


def identity(tree: Tree) -> Tree:
    return tree


def is_tree(x: Any) -> bool:
    """Whether ``x`` is a tree rather than, say, a function (torch.compile can trace this,
    not ``callable`` on a dict)."""
    return isinstance(x, _NODES)


def is_tree_of_tensors(tree: Tree) -> bool:
    """A non-empty tree whose every leaf is a tensor (``None`` counts as a leaf, not a node)."""
    found = leaves(tree)
    return bool(found) and all(isinstance(x, Tensor) for x in found)


def paths(tree: Tree) -> list[str]:
    """Each leaf's name: its keys and indices joined by dots (``"w"`` in a flat dict,
    ``"theta.w"`` or ``"layers.0"`` in nested ones), in leaf order."""
    flat, _ = pytree.tree_flatten_with_path(tree)
    return [".".join(_key_name(key) for key in path) for path, _ in flat]


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def check_same_structure(what: str, got: Tree, expected: Tree, fix: str = "") -> None:
    """Raise a ValueError naming the leaves ``got`` lacks and those it has in excess (or the
    first differing container) when its structure differs from ``expected``'s."""
    if _matches(got, expected):
        return
    have, want = set(paths(got)), set(paths(expected))
    missing, extra = sorted(want - have), sorted(have - want)
    detail = (
        f"missing {missing}, unexpected {extra}"
        if missing or extra
        else _container_mismatch(got, expected)
    )
    raise ValueError(
        f"{what} must have the same keys as the parameters; {detail}."
        + (f" {fix}" if fix else " Build it from the same tree (e.g. optimizer.init(params)).")
    )


def leaves_like(
    what: str, got: Tree, expected: Tree, fix: str = "", want: TreeSpec | None = None
) -> list:
    """``got``'s leaves in ``expected``'s leaf order (dict keys in any order), after
    ``check_same_structure``; ``want``: ``expected``'s structure, when the caller has it."""
    found, spec = flatten(got)
    want = structure(expected) if want is None else want
    if spec == want:  # the common case, without the structure check's per-leaf work
        return found
    check_same_structure(what, got, expected, fix)
    return want.flatten_up_to(got)


def _matches(got: Tree, expected: Tree) -> bool:
    """Whether ``got`` has ``expected``'s structure (dict keys in any order)."""
    if structure(got) == structure(expected):
        return True
    try:
        parts = structure(expected).flatten_up_to(got)
    except (ValueError, TypeError, KeyError):
        return False
    return all(structure(part).is_leaf() for part in parts)


def _container_mismatch(got: Tree, expected: Tree, path: str = "") -> str:
    """Where two trees with the same leaf names differ in a container's type."""
    if type(got) is not type(expected):
        where = f" at {path!r}" if path else ""
        return f"a {type(got).__name__} where a {type(expected).__name__} is expected{where}"
    if not isinstance(got, dict | list | tuple):
        return ""
    keys = got.keys() if isinstance(got, dict) else range(len(got))
    for key in keys:
        found = _container_mismatch(got[key], expected[key], f"{path}.{key}".lstrip("."))
        if found:
            return found
    return ""
