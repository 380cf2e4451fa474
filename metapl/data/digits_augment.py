"""Augmentation for handwritten digits (MNIST-like, one channel, dark background), batched on
the device with every random choice drawn per sample.

Flips and most of RandAugment's color ops make no sense for digits (a flipped 2 is no digit,
an inverted one has a white background); what varies between writers is position, size, slant,
stroke width and small local wobbles. `DigitAugment` draws, per image:

================  ===============================================================================
stroke            with probability `stroke_prob`, strokes 1 px thicker (2x2 max) or thinner
                  (half way to the 2x2 min: the full min erases 1-2 px strokes)
affine            rotation U(-degrees, degrees), scale U(scale), x-shear U(-shear, shear) and a
                  shift U(-translate, translate) px per axis
elastic           a smooth random displacement field: N(0, elastic_alpha^2) px offsets on an
                  `elastic_grid` x `elastic_grid` lattice, bicubically upsampled (Simard et al.,
                  2003, on a coarse lattice instead of a blurred per-pixel field)
contrast          intensities times U(contrast)
noise             + N(0, noise^2), clipped to [0, 1]
cutout            a `cutout` x `cutout` background square at a uniform center
================  ===============================================================================

The affine map and the elastic field are applied in one bilinear `grid_sample`; pixels outside
the image are background. `DigitAugment.weak()` is a small affine jitter, `DigitAugment.strong()`
all of the above. Images: [N, C, H, W] uint8 (0..255) or float in [0, 1]; outputs keep shape,
dtype and device. Random numbers come from `generator` (on any device), else the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metapl.data.augment import cutout, uniform

__all__ = ["DigitAugment"]


@dataclass(frozen=True)
class DigitAugment:
    """A per-sample digit augmentation; see the module docstring for each field's meaning.
    The defaults are `weak()`: a small affine jitter and nothing else."""

    degrees: float = 10.0
    translate: float = 2.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 0.0
    elastic_alpha: float = 0.0
    elastic_grid: int = 4
    stroke_prob: float = 0.0
    contrast: tuple[float, float] = (1.0, 1.0)
    noise: float = 0.0
    cutout: int = 0
    background: float = 0.0  # on the [0, 1] scale

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {self.scale}")
        lo, hi = self.contrast
        if not 0 <= lo <= hi:
            raise ValueError(f"contrast must be (lo, hi) with 0 <= lo <= hi, got {self.contrast}")
        if min(self.degrees, self.translate, self.shear, self.elastic_alpha, self.noise) < 0:
            raise ValueError("degrees, translate, shear, elastic_alpha and noise must be >= 0")
        if not 0 <= self.stroke_prob <= 1:
            raise ValueError(f"stroke_prob must be in [0, 1], got {self.stroke_prob}")
        if self.elastic_grid < 2 or self.cutout < 0:
            raise ValueError("elastic_grid must be >= 2 and cutout >= 0")

    @classmethod
    def weak(cls) -> DigitAugment:
        """Shift up to 2 px, rotate up to 10 degrees, scale 0.9-1.1."""
        return cls()

    @classmethod
    def strong(cls, cutout: int = 8) -> DigitAugment:
        """Shift up to 3 px, rotate up to 20 degrees, scale 0.8-1.15, shear 0.3, elastic
        wobble (1 px on a 4x4 lattice), stroke width +-1 px half the time, contrast 0.5-1,
        then a `cutout` x `cutout` background square (8 for 28x28 digits)."""
        return cls(
            degrees=20.0,
            translate=3.0,
            scale=(0.8, 1.15),
            shear=0.3,
            elastic_alpha=1.0,
            stroke_prob=0.5,
            contrast=(0.5, 1.0),
            cutout=cutout,
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dtype == torch.uint8:
            img = x.float() / 255
        elif x.is_floating_point():
            img = x.float()
        else:
            raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
        n, c, h, w = img.shape
        u = uniform((9, n), generator, x.device)
        img = self._stroke(img, u[0], u[1])
        img = self._warp(img, u[2:7], generator)
        lo, hi = self.contrast
        if (lo, hi) != (1.0, 1.0):
            gain = (lo + (hi - lo) * u[7]).view(n, 1, 1, 1)
            img = self.background + gain * (img - self.background)
        if self.noise > 0:
            source = generator.device if generator is not None else x.device
            z = torch.randn(img.shape, generator=generator, device=source).to(x.device)
            img = img + self.noise * z
        img = img.clamp(0, 1)
        if self.cutout > 0:
            img = cutout(img, self.cutout, fill=255 * self.background, generator=generator)
        if x.dtype == torch.uint8:
            return (img * 255).round().to(torch.uint8)
        return img.to(x.dtype)

    def _stroke(self, img: torch.Tensor, u_apply: torch.Tensor, u_kind: torch.Tensor):
        """Thicken (2x2 max) or thin (mean of the image and its 2x2 min) the strokes of a
        `stroke_prob` share of the images."""
        if self.stroke_prob == 0:
            return img
        padded = F.pad(img, (0, 1, 0, 1), value=self.background)
        thick = F.max_pool2d(padded, 2, stride=1)
        thin = (img - F.max_pool2d(-padded, 2, stride=1)) / 2
        changed = torch.where((u_kind < 0.5).view(-1, 1, 1, 1), thick, thin)
        return torch.where((u_apply < self.stroke_prob).view(-1, 1, 1, 1), changed, img)

    def _warp(self, img: torch.Tensor, u: torch.Tensor, generator: torch.Generator | None):
        """Affine (rows of u: angle, scale, shear, dx, dy) plus the elastic field, one resample."""
        n, _, h, w = img.shape
        angle = math.radians(self.degrees) * (2 * u[0] - 1)
        lo, hi = self.scale
        scale = lo + (hi - lo) * u[1]
        shear = self.shear * (2 * u[2] - 1)
        shift_x, shift_y = self.translate * (2 * u[3] - 1), self.translate * (2 * u[4] - 1)
        # Output pixel -> input pixel, in pixel units about the image center: undo the shift,
        # then the rotation and shear, then the scale (the content is scaled by `scale`).
        cos, sin = angle.cos(), angle.sin()
        a11, a12 = cos, -sin + cos * shear
        a21, a22 = sin, cos + sin * shear
        m = torch.stack([a11, a12, a21, a22], -1).view(n, 2, 2) / scale.view(n, 1, 1)
        t = -(m @ torch.stack([shift_x, shift_y], -1).unsqueeze(-1))  # [N, 2, 1]
        # grid_sample's normalized coordinates: x_norm = x_px * 2 / w (about the center).
        to_norm = torch.tensor([2 / w, 2 / h], device=img.device)
        theta = torch.cat(
            [m * to_norm.view(1, 2, 1) / to_norm.view(1, 1, 2), t * to_norm.view(1, 2, 1)], -1
        )
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)  # [N, H, W, 2]
        if self.elastic_alpha > 0:
            g = self.elastic_grid
            source = generator.device if generator is not None else img.device
            lattice = torch.randn((n, 2, g, g), generator=generator, device=source)
            field = F.interpolate(
                lattice.to(img.device), size=(h, w), mode="bicubic", align_corners=True
            )
            grid = grid + self.elastic_alpha * field.permute(0, 2, 3, 1) * to_norm
        out = F.grid_sample(
            img - self.background, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return out + self.background
