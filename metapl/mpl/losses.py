"""The teacher's extra losses and the pseudo-label sampler of MPL."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["UDA", "sample_categorical"]


@dataclass(frozen=True)
class UDA:
    """Unsupervised Data Augmentation consistency loss for the teacher (Xie et al., 2020).

    ``weight * min(1, (step + 1) / ramp_steps) * mean_i[mask_i * CE(q_i, p_strong_i)]`` with
    ``q = softmax(logits_weak / temperature)`` (no gradient) and
    ``mask_i = max_c p_ic >= threshold``, where p is the unsharpened ``softmax(logits_weak)``
    (``mask_on="unsharpened"``: the UDA paper's convention) or the sharpened target q
    (``mask_on="sharpened"``: the official MPL code, for which its threshold 0.6 was tuned).
    ``ramp_steps=0`` disables the ramp.
    """

    weight: float = 1.0
    temperature: float = 0.4
    threshold: float = 0.8
    ramp_steps: int = 0
    mask_on: str = "unsharpened"

    def __post_init__(self):
        if self.weight < 0 or self.temperature <= 0 or not 0 <= self.threshold <= 1:
            raise ValueError(
                "UDA needs weight >= 0, temperature > 0 and 0 <= threshold <= 1, got "
                f"{self.weight}, {self.temperature}, {self.threshold}"
            )
        if self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.mask_on not in ("unsharpened", "sharpened"):
            raise ValueError(f"mask_on must be 'unsharpened' or 'sharpened', got {self.mask_on!r}")

    def loss(self, logits_weak: Tensor, logits_strong: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(loss, mask_fraction)``; logits: [B, C]."""
        weak = logits_weak.detach()
        target = torch.softmax(weak / self.temperature, dim=-1)
        confidence = target if self.mask_on == "sharpened" else torch.softmax(weak, dim=-1)
        mask = (confidence.amax(-1) >= self.threshold).to(logits_strong.dtype)
        per_example = -(target * F.log_softmax(logits_strong, dim=-1)).sum(-1)
        return (per_example * mask).mean(), mask.mean()

    def weight_at(self, step: Tensor) -> Tensor:
        if not self.ramp_steps:
            return torch.full_like(step, self.weight)
        return self.weight * torch.clamp((step + 1) / self.ramp_steps, max=1.0)


def sample_categorical(logits: Tensor) -> Tensor:
    """One class index per row of ``logits`` [B, C], sampled by the Gumbel-max trick in at
    least float32 (outside autocast): in bfloat16 the Gumbel noise loses its tails and rounding
    ties go to the lowest class, a visibly different distribution."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    with torch.autocast(logits.device.type, enabled=False):
        uniform = torch.rand_like(logits).clamp_(torch.finfo(logits.dtype).tiny, 1.0)
        return torch.argmax(logits - torch.log(-torch.log(uniform)), dim=-1)
