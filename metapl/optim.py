"""Functional, differentiable optimizers over dicts of tensors.

Each optimizer is a pair of pure functions, in the style of optax::

    opt = sgd(0.1, momentum=0.9)
    state = opt.init(params)                       # params: dict[str, Tensor]
    new_params, new_state = opt.step(params, grads, state)

Nothing is mutated in place, so a step can be differentiated with respect to the parameters,
the gradients and the hyperparameters (this is what a meta-gradient flows through). With the same
settings the updates equal ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` step for step.

Hyperparameters may be tensors, and then gradients reach them (learned hyperparameters):
``lr`` a 0-d tensor, or a dict of tensors keyed like the parameters (one learning rate per
parameter tensor, or per entry: Meta-SGD), and ``momentum``, ``weight_decay`` and ``betas`` 0-d
tensors. Whether a feature is on is decided by its type, never by a tensor's value: a tensor
momentum of 0 still runs the momentum code (with the same numbers as no momentum).

The state is a dict of tensors (a pytree), so a step can be traced by ``torch.compile`` and
transformed by ``torch.func``. ``state["step"]`` counts the steps taken so far as a 0-d float32
tensor (exact up to 2**24 steps; float so that ``torch.func.vjp`` can trace a step). A
learning-rate schedule is called with it (0 for the first update, like
``torch.optim.lr_scheduler``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]
State = dict[str, object]
Hyper = float | Tensor  # a constant, or a 0-d tensor that gradients reach
LrValue = float | Tensor | Mapping[str, Tensor]  # one lr, or one per parameter (Meta-SGD)
LearningRate = LrValue | Callable[[Tensor], LrValue]
DecayMask = Callable[[str, Tensor], bool]  # (name, param) -> apply weight decay?

__all__ = [
    "Optimizer",
    "adam",
    "adamw",
    "check_same_keys",
    "clip_grad_norm",
    "matrices_only",
    "sgd",
    "warmup_cosine",
]


class Optimizer(NamedTuple):
    """A functional optimizer: ``init(params) -> state`` and
    ``step(params, grads, state) -> (new_params, new_state)``."""

    init: Callable[[Mapping[str, Tensor]], State]
    step: Callable[[Mapping[str, Tensor], Mapping[str, Tensor], State], tuple[Params, State]]
    lr: LearningRate

    def lr_at(self, state: State) -> LrValue:
        """The learning rate the next ``step`` from ``state`` will use."""
        return _lr_at(self.lr, state["step"])


def check_same_keys(what: str, got: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Raise a ValueError naming the missing and unexpected keys of ``got``."""
    if got.keys() == expected.keys():
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    raise ValueError(
        f"{what} must have the same keys as the parameters; missing {missing}, unexpected "
        f"{extra}. Build it from the same dict (e.g. optimizer.init(params))."
    )


def _check_lr(lr: LearningRate) -> None:
    if isinstance(lr, Mapping):
        if not all(isinstance(v, Tensor) for v in lr.values()):
            raise TypeError("a per-parameter lr must be a dict of tensors keyed like the params")
        return
    if not (callable(lr) or isinstance(lr, (float, int, Tensor))):
        raise TypeError(
            "lr must be a float, a 0-d tensor, a dict of tensors keyed like the parameters or a "
            f"callable(step) -> lr, got {type(lr).__name__}"
        )
    if isinstance(lr, Tensor) and lr.dim() != 0:
        raise ValueError(
            f"a tensor lr must be 0-d, got shape {tuple(lr.shape)}; for one learning rate per "
            "parameter pass a dict keyed like the parameters"
        )


def _check_hyper(name: str, value: Hyper, low: float, high: float = math.inf) -> None:
    """Range-check a float hyperparameter; a tensor one must be 0-d (its value is not checked:
    that would synchronise with the device, and fail under vmap)."""
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"a tensor {name} must be 0-d, got shape {tuple(value.shape)}")
    elif not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")


def _is_on(value: Hyper) -> bool:
    """Whether a feature runs: always for a tensor (it may be learned away from 0)."""
    return isinstance(value, Tensor) or value != 0


def _check_lr_keys(lr: LearningRate, params: Mapping[str, Tensor]) -> None:
    if not isinstance(lr, Mapping):
        return
    check_same_keys("a per-parameter lr", lr, params)
    for k, p in params.items():
        try:
            fits = torch.broadcast_shapes(lr[k].shape, p.shape) == p.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"lr[{k!r}] has shape {tuple(lr[k].shape)}, which does not broadcast to the "
                f"parameter's {tuple(p.shape)}: use a 0-d tensor or one of the parameter's shape"
            )


def _lr_at(lr: LearningRate, step: Tensor) -> LrValue:
    # isinstance, not callable(): torch.compile cannot trace callable() on a dict (Meta-SGD).
    return lr if isinstance(lr, Mapping | Tensor | float | int) else lr(step)


def _lr_of(lr_now: LrValue, name: str, param: Tensor) -> float | Tensor:
    """The learning rate of one parameter, as a tensor in the parameter's dtype (a float64
    schedule must not promote a 0-d float32 parameter to float64)."""
    lr = lr_now[name] if isinstance(lr_now, Mapping) else lr_now
    return lr.to(param.dtype) if isinstance(lr, Tensor) else lr


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt whose derivative at exactly 0 is 0 instead of inf (which turns into NaN)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def _step_count(params: Mapping[str, Tensor]) -> Tensor:
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.float32, device=device)


def sgd(
    lr: LearningRate,
    momentum: Hyper = 0.0,
    nesterov: bool = False,
    weight_decay: Hyper = 0.0,
    decay_mask: DecayMask | None = None,
) -> Optimizer:
    """Stochastic gradient descent, equal to ``torch.optim.SGD`` (dampening 0).

    Momentum buffers start at zero, which reproduces torch's first-step ``buf = grad`` exactly.
    ``decay_mask(name, param)`` picks the parameters weight decay applies to (default: all),
    like torch's parameter groups; e.g. ``matrices_only`` exempts biases and norm scales.
    """
    _check_lr(lr)
    _check_hyper("momentum", momentum, 0.0)
    _check_hyper("weight_decay", weight_decay, 0.0)
    use_momentum, use_decay = _is_on(momentum), _is_on(weight_decay)
    if nesterov and not use_momentum:
        raise ValueError("nesterov=True needs momentum > 0 (as in torch.optim.SGD)")

    def init(params: Mapping[str, Tensor]) -> State:
        _check_lr_keys(lr, params)
        state: State = {"step": _step_count(params)}
        if use_momentum:
            state["momentum"] = {k: torch.zeros_like(p) for k, p in params.items()}
        return state

    def step(params, grads, state):
        check_same_keys("grads", grads, params)
        lr_now = _lr_at(lr, state["step"])
        new_params, new_buf = {}, {}
        for k, p in params.items():
            g = grads[k]
            if use_decay and (decay_mask is None or decay_mask(k, p)):
                g = g + weight_decay * p
            if use_momentum:
                buf = momentum * state["momentum"][k] + g
                new_buf[k] = buf
                g = g + momentum * buf if nesterov else buf
            new_params[k] = p - _lr_of(lr_now, k, p) * g
        new_state: State = {"step": state["step"] + 1}
        if use_momentum:
            new_state["momentum"] = new_buf
        return new_params, new_state

    return Optimizer(init, step, lr)


def _adam(lr, betas, eps, weight_decay, decoupled: bool, decay_mask) -> Optimizer:
    _check_lr(lr)
    beta1, beta2 = betas
    _check_hyper("betas[0]", beta1, 0.0, 1.0)
    _check_hyper("betas[1]", beta2, 0.0, 1.0)
    _check_hyper("weight_decay", weight_decay, 0.0)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    use_decay = _is_on(weight_decay)

    def init(params: Mapping[str, Tensor]) -> State:
        _check_lr_keys(lr, params)
        return {
            "step": _step_count(params),
            "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def step(params, grads, state):
        check_same_keys("grads", grads, params)
        lr_now = _lr_at(lr, state["step"])
        t = state["step"] + 1
        new_params, new_m, new_v = {}, {}, {}
        for k, p in params.items():
            g, lr_k = grads[k], _lr_of(lr_now, k, p)
            decay = use_decay and (decay_mask is None or decay_mask(k, p))
            if decay and decoupled:
                p = p * (1 - lr_k * weight_decay)
            elif decay:
                g = g + weight_decay * p
            m = beta1 * state["exp_avg"][k] + (1 - beta1) * g
            v = beta2 * state["exp_avg_sq"][k] + (1 - beta2) * g * g
            t_p = t.to(p.dtype)
            bias1 = 1 - beta1**t_p
            bias2_sqrt = torch.sqrt(1 - beta2**t_p)
            denom = _safe_sqrt(v) / bias2_sqrt + eps
            new_params[k] = p - (lr_k / bias1) * (m / denom)
            new_m[k], new_v[k] = m, v
        return new_params, {"step": t, "exp_avg": new_m, "exp_avg_sq": new_v}

    return Optimizer(init, step, lr)


def adam(
    lr: LearningRate,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    decay_mask: DecayMask | None = None,
) -> Optimizer:
    """Adam with L2 weight decay added to the gradient, equal to ``torch.optim.Adam``
    (``decay_mask`` as in ``sgd``)."""
    return _adam(lr, betas, eps, weight_decay, decoupled=False, decay_mask=decay_mask)


def adamw(
    lr: LearningRate,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 1e-2,
    decay_mask: DecayMask | None = None,
) -> Optimizer:
    """Adam with decoupled weight decay, equal to ``torch.optim.AdamW`` (``decay_mask`` as in
    ``sgd``)."""
    return _adam(lr, betas, eps, weight_decay, decoupled=True, decay_mask=decay_mask)


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

    def step(params, grads, state):
        norm = torch.sqrt(sum(torch.sum(g * g) for g in grads.values()))
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return optimizer.step(params, {k: g * scale for k, g in grads.items()}, state)

    return Optimizer(optimizer.init, step, optimizer.lr)
