"""Functional, differentiable optimizers over trees of tensors.

Each optimizer is a pair of pure functions, in the style of optax::

    opt = sgd(0.1, momentum=0.9)
    state = opt.init(params)                       # params: a tree of tensors
    new_params, new_state = opt.step(params, grads, state)

``params`` (and ``grads``, with the same structure) may be a flat dict of tensors, as
``dict(model.named_parameters())``, or any nested dicts, lists and tuples of tensors; results
come back in the parameters' structure. Nothing is mutated in place, so a step can be
differentiated with respect to the parameters, the gradients and the hyperparameters (this is
what a meta-gradient flows through). With constant hyperparameters ``sgd``, ``adam``,
``adamw``, ``rmsprop`` and ``adagrad`` equal ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` /
``RMSprop`` / ``Adagrad`` step for step, every option included (``maximize=True`` on all
five climbs the objective); ``adam`` / ``adamw`` add optax's ``eps_root``.

Every hyperparameter (``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``betas``, ``eps``,
``alpha``, ``lr_decay``, ...) is one of

- a float, range-checked when the optimizer is built;
- a 0-d tensor: gradients reach it (learned hyperparameters); its value is never checked (that
  would synchronise with the device, and fail under ``vmap``);
- a per-parameter tree with the parameters' structure whose leaves are tensors of shape ``()``
  or exactly the parameter's shape (one value per tensor, or per entry: Meta-SGD).

``lr`` may also be a callable ``schedule(step) -> lr``. Whether a feature is on is decided by
type, never by a tensor's value: a tensor momentum of 0 still runs the momentum code (with the
same numbers as no momentum). Flags (``nesterov``, ``centered``, ``amsgrad``, ``maximize``) are
plain bools.

The state is a dict (a pytree): one tree per slot (``"momentum"``, ``"exp_avg"``, ...) with the
parameters' structure, and ``state["step"]``, the number of steps taken so far as a 0-d float32
tensor (exact up to 2**24 steps; float so that ``torch.func.vjp`` can trace a step). A step can
be traced by ``torch.compile(fullgraph=True)`` and transformed by ``torch.func``. A
learning-rate schedule is called with ``state["step"]`` (0 for the first update, like
``torch.optim.lr_scheduler``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metapl import _tree

Tree = _tree.Tree  # a tensor, or nested dicts / lists / tuples of tensors
State = dict[str, Any]  # "step" and one tree per slot
Hyper = float | Tensor | Tree  # a constant, a 0-d tensor or a per-parameter tree
LearningRate = Hyper | Callable[[Tensor], Hyper]  # or a schedule(step) -> lr
DecayMask = Callable[[str, Tensor], bool]  # (dotted path, param) -> apply weight decay?
# One leaf's update: (param, grad, the leaf's slots, the leaf's hyperparameters, 1-based step)
# -> (new param, new slots).
_LeafUpdate = Callable[
    [Tensor, Tensor, dict[str, Tensor], dict[str, Any], Tensor], tuple[Tensor, dict[str, Tensor]]
]

__all__ = [
    "Optimizer",
    "adagrad",
    "adam",
    "adamw",
    "check_same_keys",
    "clip_grad_norm",
    "matrices_only",
    "rmsprop",
    "sgd",
    "warmup_cosine",
]

_PER_PARAMETER_FIX = (
    "Give one tensor per parameter, e.g. torch.utils._pytree.tree_map(lambda p: "
    "torch.tensor(0.1), params)."
)


class Optimizer(NamedTuple):
    """A functional optimizer: ``init(params) -> state`` and
    ``step(params, grads, state) -> (new_params, new_state)``."""

    init: Callable[[Tree], State]
    step: Callable[[Tree, Tree, State], tuple[Tree, State]]
    lr: LearningRate

    def lr_at(self, state: State) -> Hyper:
        """The learning rate the next ``step`` from ``state`` will use."""
        return _lr_at(self.lr, state["step"])


def check_same_keys(what: str, got: Tree, expected: Tree) -> None:
    """Raise a ValueError naming the missing and unexpected keys (leaf paths) of ``got``."""
    _tree.check_same_structure(what, got, expected)


def _is_schedule(lr: LearningRate) -> bool:
    # isinstance, not callable(): torch.compile cannot trace callable() on a dict (Meta-SGD).
    return not isinstance(lr, (int, float)) and not _tree.is_tree(lr)


def _lr_at(lr: LearningRate, step: Tensor) -> Hyper:
    return lr(step) if _is_schedule(lr) else lr


def _check_lr(lr: LearningRate) -> None:
    if _is_schedule(lr) and not callable(lr):
        raise TypeError(
            "lr must be a float, a 0-d tensor, a dict of tensors keyed like the parameters (any "
            f"tree with their structure) or a callable(step) -> lr, got {type(lr).__name__}"
        )
    if not _is_schedule(lr):
        _check_hyper("lr", lr, hint=" (for gradient ascent pass maximize=True)")


def _check_hyper(
    name: str,
    value: Hyper,
    low: float = 0.0,
    high: float = math.inf,
    closed: bool = False,
    hint: str = "",
) -> None:
    """Refuse a value of the wrong type, a float outside ``[low, high)`` (``[low, high]`` if
    ``closed``), a tensor that is not 0-d and a tree with a leaf that is not a tensor. A tensor's
    value is not checked (that would synchronise with the device, and fail under vmap)."""
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"a tensor {name} must be 0-d, got shape {tuple(value.shape)}; for one value "
                "per parameter pass a tree with the parameters' structure (e.g. a dict keyed "
                "like them)"
            )
    elif _tree.is_tree(value):
        found = _tree.leaves(value)
        if not found or not all(isinstance(leaf, Tensor) for leaf in found):
            kinds = sorted({type(leaf).__name__ for leaf in found} - {"Tensor"})
            raise TypeError(
                f"a per-parameter {name} must be a tree of tensors with the parameters' "
                f"structure, got {'leaves of type ' + ', '.join(kinds) if kinds else 'no leaves'}"
                f". {_PER_PARAMETER_FIX}"
            )
    elif isinstance(value, (int, float)):
        inside = low <= value <= high if closed else low <= value < high
        if not inside:
            bounds = (
                f">= {low:g}"
                if high == math.inf
                else (f"in [{low:g}, {high:g}{']' if closed else ')'}")
            )
            raise ValueError(f"{name} must be {bounds}, got {value}{hint}")
    else:
        raise TypeError(
            f"{name} must be a float, a 0-d tensor or a tree of tensors with the parameters' "
            f"structure, got {type(value).__name__}"
        )


def _is_on(value: Hyper) -> bool:
    """Whether a feature runs: always for a tensor or a tree (it may be learned away from 0)."""
    return not isinstance(value, (int, float)) or value != 0


def _per_leaf(name: str, value: Hyper, params: Tree, leaves: list[Tensor]) -> list:
    """``value`` for each parameter leaf: a float as it is, a tensor in the leaf's dtype (a
    float64 schedule must not promote a float32 parameter to float64)."""
    if isinstance(value, Tensor):
        return [value.to(p.dtype) for p in leaves]
    if not _tree.is_tree(value):
        return [value] * len(leaves)
    values = _tree.leaves_like(f"a per-parameter {name}", value, params, _PER_PARAMETER_FIX)
    for i, (v, p) in enumerate(zip(values, leaves, strict=True)):
        if v.shape not in ((), p.shape):
            path = _tree.paths(params)[i]
            raise ValueError(
                f"{name}[{path!r}] has shape {tuple(v.shape)} but the parameter {path!r} has "
                f"shape {tuple(p.shape)}: a per-parameter {name} takes a 0-d tensor or one of "
                "exactly the parameter's shape"
            )
    return [v.to(p.dtype) for v, p in zip(values, leaves, strict=True)]


def _leaf_hypers(hyper: dict[str, Hyper], params: Tree, leaves: list[Tensor]) -> list[dict]:
    """One dict of hyperparameter values per parameter leaf."""
    columns = {name: _per_leaf(name, value, params, leaves) for name, value in hyper.items()}
    return [{name: column[i] for name, column in columns.items()} for i in range(len(leaves))]


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt whose derivative at exactly 0 is 0 instead of inf (which turns into NaN)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def _optimizer(
    lr: LearningRate,
    hyper: dict[str, Hyper],
    slots: dict[str, Callable[[Tensor, dict], Tensor]],
    update: _LeafUpdate,
    decay_mask: DecayMask | None,
    maximize: bool,
    decoupled: bool = False,
) -> Optimizer:
    """The tree plumbing every optimizer shares. ``hyper`` holds the hyperparameters besides
    ``lr`` (``weight_decay`` among them), ``slots`` each state slot's initial leaf as a function
    of the parameter leaf and its hyperparameters. ``update`` sees the gradient already negated
    (``maximize``) and weight-decayed: added to it (L2), or, with ``decoupled``, the parameter
    shrunk by ``1 - lr * weight_decay`` first (AdamW)."""
    _check_lr(lr)
    use_decay = _is_on(hyper["weight_decay"])

    def init(params: Tree) -> State:
        leaves, spec = _tree.flatten(params)
        static = hyper if _is_schedule(lr) else {"lr": lr, **hyper}
        per_leaf = _leaf_hypers(static, params, leaves)  # validates the per-parameter trees
        device = leaves[0].device if leaves else None
        state: State = {"step": torch.zeros((), dtype=torch.float32, device=device)}
        for slot, make in slots.items():
            state[slot] = _tree.unflatten(
                [make(p, h) for p, h in zip(leaves, per_leaf, strict=True)], spec
            )
        return state

    def step(params: Tree, grads: Tree, state: State) -> tuple[Tree, State]:
        leaves, spec = _tree.flatten(params)
        grads = _tree.leaves_like(
            "grads", grads, params, "Take the gradients of these params.", spec
        )
        missing = [slot for slot in slots if slot not in state]
        if missing:
            raise ValueError(
                f"state has no slot {missing}: pass optimizer.init(params) of this optimizer"
            )
        old = {
            slot: _tree.leaves_like(f"state[{slot!r}]", state[slot], params, want=spec)
            for slot in slots
        }
        lr_now = _lr_at(lr, state["step"])
        if _is_schedule(lr):
            _check_hyper("lr (from the schedule)", lr_now)
        per_leaf = _leaf_hypers({"lr": lr_now, **hyper}, params, leaves)
        paths = _tree.paths(params) if use_decay and decay_mask is not None else None
        t = state["step"] + 1
        new_leaves, new_slots = [], {slot: [] for slot in slots}
        for i, (p, g, h) in enumerate(zip(leaves, grads, per_leaf, strict=True)):
            g = -g if maximize else g
            if use_decay and (paths is None or decay_mask(paths[i], p)):
                if decoupled:
                    p = p * (1 - h["lr"] * h["weight_decay"])
                else:
                    g = g + h["weight_decay"] * p
            p, leaf_slots = update(p, g, {slot: old[slot][i] for slot in slots}, h, t)
            new_leaves.append(p)
            for slot in slots:
                new_slots[slot].append(leaf_slots[slot])
        new_state: State = {"step": t}
        new_state.update({slot: _tree.unflatten(v, spec) for slot, v in new_slots.items()})
        return _tree.unflatten(new_leaves, spec), new_state

    return Optimizer(init, step, lr)


def _zeros(p: Tensor, h: dict) -> Tensor:
    return torch.zeros_like(p)


def sgd(
    lr: LearningRate,
    momentum: Hyper = 0.0,
    nesterov: bool = False,
    weight_decay: Hyper = 0.0,
    decay_mask: DecayMask | None = None,
    *,
    dampening: Hyper = 0.0,
    maximize: bool = False,
) -> Optimizer:
    """Stochastic gradient descent, equal to ``torch.optim.SGD``.

    Momentum buffers start at zero, which reproduces torch's first-step ``buf = grad`` exactly
    (no dampening on the first step, as in torch). ``decay_mask(path, param)`` picks the
    parameters weight decay applies to (default: all; ``path`` is the leaf's dotted path, the
    key in a flat dict), like torch's parameter groups; e.g. ``matrices_only`` exempts biases
    and norm scales.
    """
    _check_hyper("momentum", momentum)
    _check_hyper("dampening", dampening, 0.0, 1.0, closed=True)
    _check_hyper("weight_decay", weight_decay)
    use_momentum, use_dampening = _is_on(momentum), _is_on(dampening)
    if nesterov and (not use_momentum or use_dampening):
        raise ValueError("nesterov=True needs momentum > 0 and dampening=0 (as in torch.optim.SGD)")

    def update(p, g, s, h, t):
        if not use_momentum:
            return p - h["lr"] * g, {}
        d = g * (1 - h["dampening"] * (t > 1).to(p.dtype)) if use_dampening else g
        buf = h["momentum"] * s["momentum"] + d
        d = g + h["momentum"] * buf if nesterov else buf
        return p - h["lr"] * d, {"momentum": buf}

    hyper = {"momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
    slots = {"momentum": _zeros} if use_momentum else {}
    return _optimizer(lr, hyper, slots, update, decay_mask, maximize)


def _adam(lr, betas, eps, weight_decay, decay_mask, decoupled, amsgrad, maximize, eps_root):
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError("betas must be a pair (beta1, beta2)")
    _check_hyper("betas[0]", betas[0], 0.0, 1.0)
    _check_hyper("betas[1]", betas[1], 0.0, 1.0)
    _check_hyper("eps", eps)
    _check_hyper("eps_root", eps_root)
    _check_hyper("weight_decay", weight_decay)
    use_eps_root = _is_on(eps_root)

    def update(p, g, s, h, t):
        beta1, beta2 = h["betas[0]"], h["betas[1]"]
        m = beta1 * s["exp_avg"] + (1 - beta1) * g
        v = beta2 * s["exp_avg_sq"] + (1 - beta2) * g * g
        slots = {"exp_avg": m, "exp_avg_sq": v}
        if amsgrad:  # torch keeps the running maximum of the uncorrected second moment
            v = slots["max_exp_avg_sq"] = torch.maximum(s["max_exp_avg_sq"], v)
        t_p = t.to(p.dtype)
        bias1, bias2 = 1 - beta1**t_p, 1 - beta2**t_p
        # sqrt(v / bias2 + eps_root), written so that eps_root = 0 is torch's sqrt(v) / sqrt(bias2)
        v = v + h["eps_root"] * bias2 if use_eps_root else v
        denom = _safe_sqrt(v) / torch.sqrt(bias2) + h["eps"]
        return p - (h["lr"] / bias1) * (m / denom), slots

    hyper = {
        "betas[0]": betas[0],
        "betas[1]": betas[1],
        "eps": eps,
        "eps_root": eps_root,
        "weight_decay": weight_decay,
    }
    slots = {"exp_avg": _zeros, "exp_avg_sq": _zeros}
    if amsgrad:
        slots["max_exp_avg_sq"] = _zeros
    return _optimizer(lr, hyper, slots, update, decay_mask, maximize, decoupled)


def adam(
    lr: LearningRate,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    decay_mask: DecayMask | None = None,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    eps_root: Hyper = 0.0,
) -> Optimizer:
    """Adam with L2 weight decay added to the gradient, equal to ``torch.optim.Adam``
    (``decay_mask`` as in ``sgd``).

    ``eps_root`` is added inside the square root, as in optax's ``scale_by_adam``:
    ``denom = sqrt(v_hat + eps_root) + eps``; with ``eps_root > 0`` the update stays twice
    differentiable at a zero gradient (0 is torch's update).
    """
    return _adam(lr, betas, eps, weight_decay, decay_mask, False, amsgrad, maximize, eps_root)


def adamw(
    lr: LearningRate,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2,
    decay_mask: DecayMask | None = None,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
    eps_root: Hyper = 0.0,
) -> Optimizer:
    """Adam with decoupled weight decay, equal to ``torch.optim.AdamW`` (other options as in
    ``adam``, ``decay_mask`` as in ``sgd``)."""
    return _adam(lr, betas, eps, weight_decay, decay_mask, True, amsgrad, maximize, eps_root)


def rmsprop(
    lr: LearningRate = 1e-2,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
    maximize: bool = False,
    *,
    decay_mask: DecayMask | None = None,
) -> Optimizer:
    """RMSprop, equal to ``torch.optim.RMSprop``: ``eps`` is added to the square root of the
    (``centered``: variance-corrected) running average of squared gradients; momentum
    accumulates the normalised gradient. ``decay_mask`` as in ``sgd``."""
    _check_hyper("alpha", alpha, 0.0, 1.0, closed=True)
    _check_hyper("eps", eps)
    _check_hyper("weight_decay", weight_decay)
    _check_hyper("momentum", momentum)
    use_momentum = _is_on(momentum)

    def update(p, g, s, h, t):
        alpha = h["alpha"]
        square_avg = alpha * s["square_avg"] + (1 - alpha) * g * g
        slots, variance = {"square_avg": square_avg}, square_avg
        if centered:
            grad_avg = slots["grad_avg"] = s["grad_avg"] + (1 - alpha) * (g - s["grad_avg"])
            variance = square_avg - grad_avg * grad_avg
        d = g / (_safe_sqrt(variance) + h["eps"])
        if use_momentum:
            d = slots["momentum"] = h["momentum"] * s["momentum"] + d
        return p - h["lr"] * d, slots

    hyper = {"alpha": alpha, "eps": eps, "weight_decay": weight_decay, "momentum": momentum}
    slots = {"square_avg": _zeros}
    if use_momentum:
        slots["momentum"] = _zeros
    if centered:
        slots["grad_avg"] = _zeros
    return _optimizer(lr, hyper, slots, update, decay_mask, maximize)


def adagrad(
    lr: LearningRate = 1e-2,
    lr_decay: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    initial_accumulator_value: Hyper = 0.0,
    eps: Hyper = 1e-10,
    maximize: bool = False,
    *,
    decay_mask: DecayMask | None = None,
) -> Optimizer:
    """Adagrad, equal to ``torch.optim.Adagrad``: step ``t`` (from 1) uses the learning rate
    ``lr / (1 + (t - 1) * lr_decay)`` and divides by ``sqrt(sum of squared gradients) + eps``;
    the sum starts at ``initial_accumulator_value``. ``decay_mask`` as in ``sgd``."""
    _check_hyper("lr_decay", lr_decay)
    _check_hyper("weight_decay", weight_decay)
    _check_hyper("initial_accumulator_value", initial_accumulator_value)
    _check_hyper("eps", eps)
    use_lr_decay = _is_on(lr_decay)

    def update(p, g, s, h, t):
        lr_t = h["lr"] / (1 + (t.to(p.dtype) - 1) * h["lr_decay"]) if use_lr_decay else h["lr"]
        total = s["sum"] + g * g
        return p - lr_t * (g / (_safe_sqrt(total) + h["eps"])), {"sum": total}

    def initial_sum(p: Tensor, h: dict) -> Tensor:
        return torch.zeros_like(p) + h["initial_accumulator_value"]

    hyper = {
        "lr_decay": lr_decay,
        "weight_decay": weight_decay,
        "eps": eps,
        "initial_accumulator_value": initial_accumulator_value,
    }
    return _optimizer(lr, hyper, {"sum": initial_sum}, update, decay_mask, maximize)


def matrices_only(name: str, param: Tensor) -> bool:
    """A ``decay_mask`` that decays weight matrices and kernels but not biases or
    normalisation scales (every tensor with fewer than 2 dimensions)."""
    return param.dim() >= 2


def warmup_cosine(
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    wait_steps: int = 0,
    min_lr: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """The MPL schedule: 0 for ``wait_steps``, linear warm-up over ``warmup_steps``, then a
    half-cosine decay from ``base_lr`` to ``min_lr`` at ``total_steps``.

    Returns ``schedule(step) -> lr`` where ``step`` is the 0-d tensor count of updates already
    taken; written with tensor ops only, so it never recompiles under ``torch.compile``.
    """
    if total_steps <= wait_steps + warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed wait_steps + warmup_steps "
            f"({wait_steps} + {warmup_steps})"
        )
    if min(warmup_steps, wait_steps) < 0:
        raise ValueError("warmup_steps and wait_steps must be >= 0")
    decay_steps = total_steps - wait_steps - warmup_steps

    def schedule(step: Tensor) -> Tensor:
        step = torch.as_tensor(step, dtype=torch.float64)  # float64: exact like torch's floats
        since_wait = step - wait_steps
        warm = (since_wait + 1) / warmup_steps if warmup_steps else torch.ones_like(step)
        progress = torch.clamp((since_wait - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = min_lr + (base_lr - min_lr) * 0.5 * (1 + torch.cos(math.pi * progress))
        lr = torch.where(since_wait < warmup_steps, base_lr * warm, cosine)
        return torch.where(since_wait < 0, torch.zeros_like(lr), lr)

    return schedule


def clip_grad_norm(optimizer: Optimizer, max_norm: float) -> Optimizer:
    """``optimizer`` whose every step first rescales the gradients to a global L2 norm of at
    most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` does (differentiably)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    def step(params: Tree, grads: Tree, state: State) -> tuple[Tree, State]:
        scale = torch.clamp(max_norm / (_tree.norm(grads) + 1e-6), max=1.0)
        return optimizer.step(params, _tree.scale(grads, scale), state)

    return Optimizer(optimizer.init, step, optimizer.lr)
