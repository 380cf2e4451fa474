"""What examples/hyperparameters.py and examples/distill.py share: sklearn's digits split into
train / validation / test, an MLP 64-hidden-10 as a function of a dict of parameters, and the
seeded generators that keep meta-training and scoring runs apart."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor

Params = dict[str, Tensor]


class Data(NamedTuple):
    x_train: Tensor  # (997, 64) in [0, 1]
    y_train: Tensor
    x_val: Tensor  # (300, 64)
    y_val: Tensor
    x_test: Tensor  # (500, 64): reported only
    y_test: Tensor


def load_data(seed: int, n_val: int = 300, n_test: int = 500, dtype=torch.float32) -> Data:
    """The 1797 digits, flattened, shuffled by ``seed`` into test, validation and training."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=dtype)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return Data(x[train], y[train], x[val], y[val], x[test], y[test])


def generator(seed: int, purpose: int, index: int) -> torch.Generator:
    """A generator for (split seed, purpose, index): meta-iterations and scoring runs never
    share an init, a batch order or a draw."""
    state = np.random.SeedSequence([seed, purpose, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def init_mlp(gen: torch.Generator, hidden: int, dtype=torch.float32) -> Params:
    """MLP 64-hidden-10 initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in))."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(((64, hidden), (hidden, 10))):
        bound = fan_in**-0.5
        params[f"w{i}"] = ((torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound).to(dtype)
        params[f"b{i}"] = ((torch.rand(fan_out, generator=gen) * 2 - 1) * bound).to(dtype)
    return params


def forward(params: Params, x: Tensor) -> Tensor:
    return F.linear(torch.relu(F.linear(x, params["w0"], params["b0"])), params["w1"], params["b1"])
