"""Learning to Reweight Examples (Ren et al., ICML 2018) on noisy-label digits, with metapl.

A second client of ``metapl.meta_grad``: here the "teacher parameters" are per-example weights
``eps`` on a training minibatch, the student is the classifier, and the outer loss is the
cross-entropy on a small clean meta set. One exact meta-gradient through the classifier's own
optimizer step (SGD with momentum) says which examples help the clean loss; the real step then
trains on those examples only, weighted.

Data: sklearn's 8x8 digits; 40% of the training labels flipped uniformly to a different class;
a clean meta set of 10 images per class; a held-out test set of 500. Baseline ("plain"): the same
model, optimizer and number of steps trained on the noisy labels with the plain mean
cross-entropy. Reference ("meta_only"): the same recipe on the 100 clean meta images alone.

Results and reading: docs/examples_meta.md (learning to reweight).

    python examples/reweight.py                 # seeds 0,1,2; table of test accuracy
    python examples/reweight.py --steps 500 --seeds 3 --json
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torch.func import grad
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.training.cli import parse

METHODS = ("plain", "reweight", "meta_only")


class Data(NamedTuple):
    x_train: Tensor  # (n, 64) float32 in [0, 1]
    y_train: Tensor  # noisy labels
    y_train_clean: Tensor  # the true labels (for reporting the noise rate only)
    x_meta: Tensor  # small clean set the reweighting is allowed to see
    y_meta: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int, noise: float = 0.4, meta_per_class: int = 10, n_test: int = 500) -> Data:
    """Split digits into noisy train / clean meta / test; the noise is uniform to another class."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, rest = order[:n_test], order[n_test:]
    meta = np.concatenate([rest[y[rest].numpy() == c][:meta_per_class] for c in range(10)])
    train = np.setdiff1d(rest, meta)
    train = train[rng.permutation(len(train))]

    y_clean = y[train]
    flip = torch.from_numpy(rng.random(len(train)) < noise)
    offset = torch.from_numpy(rng.integers(1, 10, size=len(train)))  # never the true class
    y_noisy = torch.where(flip, (y_clean + offset) % 10, y_clean)
    return Data(x[train], y_noisy, y_clean, x[meta], y[meta], x[test], y[test])


def init_mlp(seed: int, sizes: tuple[int, ...] = (64, 100, 10)) -> dict[str, Tensor]:
    """Parameters of an MLP as a dict, initialised like ``nn.Linear``."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = fan_in**-0.5
        params[f"w{i}"] = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
        params[f"b{i}"] = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
    return params


def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    n_layers = len(params) // 2
    for i in range(n_layers):
        x = F.linear(x, params[f"w{i}"], params[f"b{i}"])
        if i < n_layers - 1:
            x = torch.relu(x)
    return x


def reweight(
    params: dict[str, Tensor],
    optimizer: optim.Optimizer,
    opt_state: dict,
    x: Tensor,
    y: Tensor,
    x_meta: Tensor,
    y_meta: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per-example weights for the minibatch ``(x, y)``; returns ``(weights, eps_grad)``.

    Ren et al. (2018), Sec. 3.2 "online approximation" and Algorithm 1, with the classifier's own
    optimizer and state as the step:

        theta'(eps) = step(theta, grad_theta sum_i eps_i f_i(theta))      lookahead, eps = 0
        G(eps)      = 1/M sum_j f^v_j(theta'(eps))                         clean meta loss
        u_i         = -dG/d eps_i at eps = 0                               (times a step size)
        w_i         = max(u_i, 0) / sum_k max(u_k, 0)   (all 0 if the sum is 0)

    ``dG/d eps`` is one exact ``metapl.meta_grad``; see ``weights_from_grad`` for the last line.
    """

    def inner_loss(student, teacher):
        losses = F.cross_entropy(forward(student, x), y, reduction="none")
        return torch.sum(teacher["eps"] * losses)

    def outer_loss(student):
        return F.cross_entropy(forward(student, x_meta), y_meta)

    eps = {"eps": torch.zeros(len(y), dtype=x.dtype)}
    res = metapl.meta_grad(inner_loss, outer_loss, params, eps, optimizer, opt_state, steps=1)
    eps_grad = res.meta_grads["eps"]
    return weights_from_grad(eps_grad), eps_grad


def weights_from_grad(eps_grad: Tensor) -> Tensor:
    """Ren et al. (2018), Sec. 3.2: ``w = max(-grad, 0)`` normalised to sum to one, or all zero
    (no step on this batch) when no example lowers the meta loss."""
    w = torch.clamp(-eps_grad, min=0)
    total = w.sum()
    return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), w)


def accuracy(params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (forward(params, x).argmax(-1) == y).float().mean().item()


def train(
    method: str,
    seed: int,
    steps: int = 1500,
    batch_size: int = 100,
    lr: float = 0.03,
    momentum: float = 0.9,
    hidden: int = 100,
    data: Data | None = None,
    progress: tqdm | None = None,
) -> dict[str, Tensor]:
    """Train the MLP for ``steps`` minibatch steps with ``method``; returns the final params."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; pass one of {', '.join(METHODS)}")
    data = load_data(seed) if data is None else data
    if method == "meta_only":  # reference: ignore the noisy set, train on the clean meta set
        data = data._replace(x_train=data.x_meta, y_train=data.y_meta)
    params = init_mlp(seed, (64, hidden, 10))
    opt = optim.sgd(lr, momentum=momentum)
    state = opt.init(params)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)

    def weighted_loss(p, x, y, w):
        return torch.sum(w * F.cross_entropy(forward(p, x), y, reduction="none"))

    for _ in range(steps):
        idx = torch.randint(n, (batch_size,), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        if method != "reweight":
            w = torch.full((batch_size,), 1.0 / batch_size)
        else:
            w, _ = reweight(params, opt, state, x, y, data.x_meta, data.y_meta)
        params, state = opt.step(params, grad(weighted_loss)(params, x, y, w), state)
        if progress is not None:
            progress.update()
    return params


@dataclass(frozen=True)
class Experiment:
    steps: int = 1500  # training steps per run
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 100
    lr: float = 0.03  # SGD
    momentum: float = 0.9
    hidden: int = 100  # MLP 64-hidden-10
    json: bool = False  # print only a JSON summary

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or not self.seeds:
            raise ValueError("lr must be > 0, momentum in [0, 1), and --seeds not empty")


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(Experiment, argv, description=__doc__.splitlines()[0])
    seeds = list(args.seeds)
    torch.set_num_threads(1)  # small matmuls: threads cost more than they give

    results: dict[str, list[float]] = {m: [] for m in METHODS}
    with tqdm(total=len(seeds) * len(METHODS) * args.steps, file=sys.stderr, disable=None) as bar:
        for seed in seeds:
            data = load_data(seed)
            for method in METHODS:
                bar.set_description(f"seed {seed} {method}")
                params = train(
                    method,
                    seed,
                    args.steps,
                    args.batch_size,
                    args.lr,
                    args.momentum,
                    args.hidden,
                    data=data,
                    progress=bar,
                )
                results[method].append(accuracy(params, data.x_test, data.y_test))

    summary: dict[str, float] = {}
    for method, accs in results.items():
        summary[method] = statistics.mean(accs)
        summary[f"{method}_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    if args.json:
        print(json.dumps({**summary, "seeds": seeds, "steps": args.steps}))
    else:
        noise = (data.y_train != data.y_train_clean).float().mean().item()
        print(
            f"\ndigits, {noise:.0%} of training labels flipped, {args.steps} steps, "
            f"seeds {seeds}; test accuracy (%)\n"
        )
        spread = len(seeds) > 1  # one seed has no spread to show
        print(f"| method    | test accuracy{' (mean ± std)' if spread else ''} |")
        print(f"|-----------|---------------{'-------------' if spread else ''}|")
        for method in METHODS:
            std = f" ± {100 * summary[method + '_std']:3.1f}" if spread else ""
            print(f"| {method:<9} | {100 * summary[method]:5.1f}{std} |")
    return summary


if __name__ == "__main__":
    main()
