"""Virtual adversarial training (Miyato et al., TPAMI 2018): a consistency loss that needs no
augmentation, the smoothness of the model's prediction within an L2 ball around each input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["VAT"]

LogitsFn = Callable[[Tensor], Tensor]  # inputs [B, ...] -> logits [B, C]


@dataclass(frozen=True)
class VAT:
    """``weight * mean_i KL(p(x_i) || p(x_i + r_i))`` with ``r_i`` the virtual adversarial
    perturbation of length ``epsilon``: the direction that most changes the prediction, found by
    ``power_iterations`` steps of the power method on the KL's Hessian at ``x_i`` (eq. 12-13 of
    the paper: ``d <- grad_d KL(p(x) || p(x + xi d))``, from a random unit ``d``). ``p(x)`` is a
    constant; the gradient flows through ``p(x + r)`` only.

    For ``MPL(vat=...)``, which adds it to the teacher's loss on the unlabeled batch ``x_u``.
    ``epsilon`` is in the input's units (2.0 for MNIST scaled to [0, 1], the paper's choice).
    """

    weight: float = 1.0
    epsilon: float = 2.0
    xi: float = 1e-6
    power_iterations: int = 1

    def __post_init__(self):
        if not (self.weight >= 0 and self.epsilon > 0 and self.xi > 0):
            raise ValueError(
                f"VAT needs weight >= 0, epsilon > 0 and xi > 0, got {self.weight}, "
                f"{self.epsilon}, {self.xi}"
            )
        if isinstance(self.power_iterations, bool) or not (
            isinstance(self.power_iterations, int) and self.power_iterations >= 1
        ):
            raise ValueError(f"power_iterations must be an int >= 1, got {self.power_iterations!r}")

    def perturbation(self, logits_fn: LogitsFn, x: Tensor, logits: Tensor) -> Tensor:
        """The adversarial perturbation r [B, ...] (no gradient), each row of L2 norm
        ``epsilon``; ``logits_fn`` maps inputs [B, ...] to logits [B, C], ``logits`` [B, C] are
        the model's on ``x``."""
        log_p = F.log_softmax(logits.detach(), dim=-1)
        d = torch.randn_like(x)
        for _ in range(self.power_iterations):
            d = self.xi * _unit(d)
            d = torch.func.grad(lambda d: _kl(log_p, logits_fn(x + d)))(d)
        return (self.epsilon * _unit(d)).detach()

    def loss(self, logits_fn: LogitsFn, x: Tensor, logits: Tensor) -> Tensor:
        """The unweighted VAT loss (0-d): mean over the batch of ``KL(p(x) || p(x + r))``, with
        gradients through ``logits_fn`` at ``x + r``."""
        r = self.perturbation(logits_fn, x, logits)
        return _kl(F.log_softmax(logits.detach(), dim=-1), logits_fn(x + r))


def _unit(d: Tensor) -> Tensor:
    """Each row of d [B, ...] scaled to unit L2 norm."""
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    return d / norm.view(-1, *([1] * (d.dim() - 1)))


def _kl(log_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean over the batch of KL(p || softmax(logits_q)); log_p, logits_q: [B, C]."""
    return (log_p.exp() * (log_p - F.log_softmax(logits_q, dim=-1))).sum(-1).mean()
