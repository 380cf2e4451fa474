"""Image augmentation batched on the device, with every random choice drawn per sample.

Images are [N, C, H, W] uint8 (0..255) or float (0..1) tensors on any device; outputs keep the
shape, dtype and device. Random numbers come from `generator` (on any device) or else from the
global RNG of the images' device, so `torch.manual_seed` makes every call deterministic. No
Python loop runs over samples: each RandAugment layer evaluates its op families once for the
whole batch (point ops as one per-sample lookup table, blends as one blend, geometric ops as one
`grid_sample` with per-sample matrices) and picks per sample with masks.

kornia's RandAugment is not used because it draws one op sequence per batch
(`torch.randperm` over its sub-policies), not per sample.

RandAugment (Cubuk et al., 2020) with MPL's official op definitions. The level of an op is
r = m / 10 for a magnitude m (so m = 16, MPL's CIFAR setting, goes past the "max" level 10):

=========================  ==================================================================
Identity, Invert           no magnitude
AutoContrast, Equalize     per channel, exactly PIL's ImageOps (no magnitude)
Solarize                   invert pixels >= floor(256 r) (m >= 10: no-op, as in MPL)
Posterize                  keep floor(4 r) bits, at least 1 (MPL: 6 bits at m = 16)
Color, Contrast,           PIL ImageEnhance with factor 0.1 + 1.8 r (exactly PIL)
Brightness, Sharpness
Rotate                     +-30 r degrees about the center (random sign)
ShearX, ShearY             +-0.3 r about the top-left corner, like PIL / TF
TranslateX, TranslateY     +-translate * r * width (height) pixels
Cutout                     square of side 2 floor(cutout_op * r * min(H, W)), at a uniform center
=========================  ==================================================================

Geometric ops and cutouts fill with gray 128 (128/255 for float images). Float images are
quantized to 8-bit levels inside RandAugment, as every op is defined on integer pixels.

MPL's official code (google-research/meta_pseudo_labels) applies a fixed magnitude (16 for
CIFAR-10, 17 for ImageNet) to `MPL_OPS` and runs each layer with probability p ~ U(0.2, 0.8)
drawn per image: `RandAugment.mpl()`, which the CIFAR and ImageNet examples use. The PyTorch
port (kekmodel/MPL-pytorch, `RandAugmentCIFAR`) also uses a fixed magnitude and that apply
probability (drawn per op). The class default instead draws m ~ U(0, magnitude) per sample and
layer over the RandAugment paper's op list (the examples' `--randaugment uniform`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Invert",
    "Solarize",
    "Posterize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
)
_BLEND, _GEOMETRIC = OPS[6:10], OPS[10:15]
STANDARD_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Rotate",
    "Solarize",
    "Color",
    "Posterize",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
MPL_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
)


def uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """U[0, 1) float32 of `shape` on `device`, drawn on the generator's device."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _below(u: torch.Tensor, high: int) -> torch.Tensor:
    """Map U[0, 1) draws to integers uniform in [0, high)."""
    return (u * high).long().clamp_max(high - 1)


def _to_255(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float()
    if x.is_floating_point():
        return (x.float() * 255).round().clamp(0, 255)
    raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")


def _from_255(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y.to(torch.uint8) if dtype == torch.uint8 else (y / 255).to(dtype)


def weak_augment(
    x: torch.Tensor,
    pad: int = 4,
    flip: bool = True,
    pad_mode: str = "reflect",
    fill: float = 128.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop of the `pad`-padded image and horizontal flip (flip=False for SVHN).

    pad_mode "reflect" (FixMatch) or "constant" with `fill` on the 0..255 scale (MPL: 128;
    fill / 255 for float images).
    [N, C, H, W] -> [N, C, H, W], same dtype; pixels are moved, never resampled.
    """
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")
    n, c, h, w = x.shape
    if pad_mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {h}x{w}")
    u = uniform((3, n), generator, x.device)
    dy, dx = _below(u[0], 2 * pad + 1) - pad, _below(u[1], 2 * pad + 1) - pad
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip:
        cols = torch.where((u[2] < 0.5)[:, None], w - 1 - cols, cols)
    rows = torch.arange(h, device=x.device) + dy[:, None]  # [N, H] source rows
    cols = cols + dx[:, None]  # [N, W] source columns
    if pad_mode == "reflect":
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
    out = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
    out = out.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
    if pad_mode == "constant":
        in_rows = ((rows >= 0) & (rows < h))[:, None, :, None]
        inside = in_rows & ((cols >= 0) & (cols < w))[:, None, None, :]
        value = fill if x.dtype == torch.uint8 else fill / 255
        out = torch.where(inside, out, torch.tensor(value, dtype=x.dtype, device=x.device))
    return out


def _random_squares(size: torch.Tensor, h: int, w: int, u: torch.Tensor) -> torch.Tensor:
    """bool [N, 1, H, W]: per-sample squares of side size [N] centered at uniform pixels drawn
    from u [2, N], covering rows [cy - size // 2, cy - size // 2 + size) (clipped), same for x."""
    cy, cx = _below(u[0], h), _below(u[1], w)
    y0, x0 = (cy - size // 2)[:, None], (cx - size // 2)[:, None]
    rows = torch.arange(h, device=u.device)
    cols = torch.arange(w, device=u.device)
    in_rows = (rows >= y0) & (rows < y0 + size[:, None])
    in_cols = (cols >= x0) & (cols < x0 + size[:, None])
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


def cutout(
    x: torch.Tensor, size: int, fill: float = 128.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill a size x size square at a uniform per-sample center (clipped at the borders) with
    `fill` on the 0..255 scale (fill / 255 for float images). [N, C, H, W] -> same."""
    n, _, h, w = x.shape
    side = torch.full((n,), size, device=x.device)
    mask = _random_squares(side, h, w, uniform((2, n), generator, x.device))
    value = fill if x.dtype == torch.uint8 else fill / 255
    return torch.where(mask, torch.tensor(value, dtype=x.dtype, device=x.device), x)


def _is(op: torch.Tensor, name: str, ndim: int = 4) -> torch.Tensor:
    """bool [N, 1, ...] with `ndim` dims: which samples run op `name` (op: [N] indices in OPS)."""
    return (op == OPS.index(name)).view(-1, *(1,) * (ndim - 1))


def _autocontrast_lut(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's autocontrast tables [N, C, 256] for pixels q [N, C, HW] (float64 like PIL)."""
    lo = q.amin(-1, keepdim=True).double()
    hi = q.amax(-1, keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp_min(1)
    lut = (v.double() * scale - lo * scale).trunc().clamp(0, 255).float()
    return torch.where(hi > lo, lut, v)


def _equalize_lut(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's equalize tables [N, C, 256] for pixels q [N, C, HW] (exact integer arithmetic)."""
    hist = torch.zeros(*q.shape[:2], 256, dtype=torch.long, device=q.device)
    hist = hist.scatter_add(2, q, torch.ones_like(q))
    step = (q.shape[-1] - hist.gather(2, q.amax(-1, keepdim=True))) // 255
    lut = (step // 2 + hist.cumsum(2) - hist) // step.clamp_min(1)
    return torch.where(step > 0, lut.clamp_max(255).float(), v)


def _point_ops(img: torch.Tensor, op: torch.Tensor, r: torch.Tensor, ops: tuple) -> torch.Tensor:
    """Identity, AutoContrast, Equalize, Invert, Solarize, Posterize as one per-sample,
    per-channel 256-entry table lookup."""
    n, c = img.shape[:2]
    q = img.long().flatten(2)
    v = torch.arange(256, device=img.device, dtype=torch.float32).expand(n, c, 256)
    r = r.view(-1, 1, 1)
    lut = torch.where(_is(op, "Invert", 3), 255 - v, v)
    solarized = torch.where(v < (256 * r).floor(), v, 255 - v)
    lut = torch.where(_is(op, "Solarize", 3), solarized, lut)
    step = 2.0 ** (8 - (4 * r).floor().clamp(1, 8)).float()
    lut = torch.where(_is(op, "Posterize", 3), (v / step).floor() * step, lut)
    if "AutoContrast" in ops:
        lut = torch.where(_is(op, "AutoContrast", 3), _autocontrast_lut(q, v), lut)
    if "Equalize" in ops:
        lut = torch.where(_is(op, "Equalize", 3), _equalize_lut(q, v), lut)
    return lut.gather(2, q).view_as(img)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L, exactly: [N, 3, H, W] -> [N, 1, H, W] (single channels pass through)."""
    if img.shape[1] == 1:
        return img
    weights = torch.tensor([19595, 38470, 7471], device=img.device).view(1, 3, 1, 1)
    return (((img.long() * weights).sum(1, keepdim=True) + 0x8000) >> 16).float()


def _smooth(img: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded), borders kept.

    The 3x3 sum is taken from shifted slices (exact on integers, and faster than a depthwise
    convolution on CPU)."""
    h, w = img.shape[-2:]
    total = 4 * img[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + img[..., dy : dy + h - 2, dx : dx + w - 2]
    out = img.clone()
    out[..., 1:-1, 1:-1] = (total / 13 + 0.5).floor()
    return out


def _blend_ops(img: torch.Tensor, op: torch.Tensor, r: torch.Tensor, ops: tuple) -> torch.Tensor:
    """Color, Contrast, Brightness, Sharpness: PIL's blend of a per-op degenerate image with the
    image by factor 0.1 + 1.8 r, truncated to integers like PIL."""
    degenerate = torch.zeros_like(img)  # Brightness
    if "Color" in ops or "Contrast" in ops:
        gray = _grayscale(img)
        degenerate = torch.where(_is(op, "Color"), gray.expand_as(img), degenerate)
        mean = (gray.double().mean((1, 2, 3), keepdim=True) + 0.5).floor().float()
        degenerate = torch.where(_is(op, "Contrast"), mean.expand_as(img), degenerate)
    if "Sharpness" in ops:
        degenerate = torch.where(_is(op, "Sharpness"), _smooth(img), degenerate)
    factor = (0.1 + 1.8 * r).float().view(-1, 1, 1, 1)
    return (degenerate + factor * (img - degenerate)).clamp(0, 255).floor()


def _geometric_ops(
    img: torch.Tensor, op: torch.Tensor, v: torch.Tensor, translate: float, fill: float, mode: str
) -> torch.Tensor:
    """Rotate, ShearX/Y, TranslateX/Y with signed levels v [N], as one batched grid_sample."""
    n, _, h, w = img.shape
    # Per-sample maps from output to input pixel coordinates (origin at the top-left corner,
    # PIL's convention), selected per op; identity for samples running no geometric op.
    eye = torch.eye(3, device=img.device, dtype=v.dtype).expand(n, 3, 3)
    angle = torch.deg2rad(30 * v)
    cos, sin = angle.cos(), angle.sin()
    zero, one = torch.zeros_like(v), torch.ones_like(v)
    cx, cy = w / 2, h / 2
    rotate = torch.stack(  # counter-clockwise about the center
        [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zero, zero, one],
        -1,
    ).view(n, 3, 3)
    shear = 0.3 * v
    shear_x = torch.stack([one, shear, zero, zero, one, zero, zero, zero, one], -1).view(n, 3, 3)
    shear_y = torch.stack([one, zero, zero, shear, one, zero, zero, zero, one], -1).view(n, 3, 3)
    tx, ty = translate * w * v, translate * h * v  # content moves right / down
    move_x = torch.stack([one, zero, -tx, zero, one, zero, zero, zero, one], -1).view(n, 3, 3)
    move_y = torch.stack([one, zero, zero, zero, one, -ty, zero, zero, one], -1).view(n, 3, 3)
    matrix = eye
    for name, m in zip(_GEOMETRIC, (rotate, shear_x, shear_y, move_x, move_y), strict=True):
        matrix = torch.where(_is(op, name, 3), m, matrix)
    # grid_sample's normalized coordinates u (align_corners=False): pixel x = (u + 1) * w / 2.
    to_pixels = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], dtype=v.dtype)
    to_normalized = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], dtype=v.dtype)
    theta = (to_normalized.to(v.device) @ matrix @ to_pixels.to(v.device))[:, :2].float()
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    out = F.grid_sample(img - fill, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return (out + fill).round().clamp(0, 255)


@dataclass(frozen=True)
class RandAugment:
    """RandAugment drawn per sample: `num_ops` layers, each picking one of `ops` per sample
    (see the module docstring for the ops), then a `cutout` x `cutout` gray square (0: none).

    magnitude_sampling: "uniform" (m ~ U(0, magnitude) per sample and layer) or "fixed".
    apply_prob: None (every layer applies) or (lo, hi): per image p ~ U(lo, hi), and each layer
    applies with probability p (MPL: (0.2, 0.8)). translate / cutout_op: fractions of the image
    size at level 1. interpolation of geometric ops: "nearest" (PIL / TF default) or "bilinear".
    Call: images [N, C, H, W] (uint8 or float in [0, 1]) -> same shape and dtype.
    """

    num_ops: int = 2
    magnitude: float = 16.0
    ops: tuple[str, ...] = STANDARD_OPS
    magnitude_sampling: str = "uniform"
    apply_prob: tuple[float, float] | None = None
    cutout: int = 16
    translate: float = 0.125
    cutout_op: float = 0.125
    fill: float = 128.0
    interpolation: str = "nearest"

    def __post_init__(self):
        unknown = set(self.ops) - set(OPS)
        if unknown or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {OPS}; unknown: {unknown}")
        if self.magnitude_sampling not in ("uniform", "fixed"):
            raise ValueError("magnitude_sampling must be 'uniform' or 'fixed'")
        if self.interpolation not in ("nearest", "bilinear"):
            raise ValueError("interpolation must be 'nearest' or 'bilinear'")
        object.__setattr__(self, "ops", tuple(self.ops))

    @classmethod
    def mpl(cls, image_size: int = 32, magnitude: float = 16.0) -> "RandAugment":
        """MPL's official CIFAR-10 setting: fixed magnitude (16) over `MPL_OPS`, each layer
        applied with p ~ U(0.2, 0.8), translations and cutout op up to image_size / 8 at level
        1, then a gray image_size / 2 cutout. (ImageNet: magnitude 17, cutout=0,
        translate=100 / 224, cutout_op=40 / 224.)"""
        return cls(2, magnitude, MPL_OPS, "fixed", (0.2, 0.8), image_size // 2, 0.125, 0.125)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = x.shape[0]
        img = _to_255(x)
        op_index = _indices(self.ops, x.device)
        u = uniform((self.num_ops, 6, n), generator, x.device)
        p = uniform((n,), generator, x.device)
        for layer in u:  # rows: op, magnitude, sign, apply, cutout-op center y, x
            op = op_index[_below(layer[0], len(self.ops))]
            # Levels in float64, so that op arguments round like PIL's Python-float ones.
            if self.magnitude_sampling == "uniform":
                r = self.magnitude / 10 * layer[1].double()
            else:
                r = torch.full_like(layer[1], self.magnitude / 10, dtype=torch.float64)
            sign = torch.where(layer[2] < 0.5, -1.0, 1.0).double()
            out = self._layer(img, op, r, sign, layer[4:])
            if self.apply_prob is not None:
                lo, hi = self.apply_prob
                out = torch.where((layer[3] < lo + (hi - lo) * p).view(-1, 1, 1, 1), out, img)
            img = out
        out = _from_255(img, x.dtype)
        return cutout(out, self.cutout, self.fill, generator) if self.cutout > 0 else out

    def _layer(
        self,
        img: torch.Tensor,
        op: torch.Tensor,
        r: torch.Tensor,
        sign: torch.Tensor,
        u: torch.Tensor,
    ) -> torch.Tensor:
        """One layer on img [N, C, H, W] (0..255): sample i runs OPS[op[i]] at level r[i] with
        sign[i] (geometric ops); u [2, N] places the Cutout op's squares."""
        out = _point_ops(img, op, r, self.ops)
        if any(o in _BLEND for o in self.ops):
            family = torch.isin(op, _indices(_BLEND, op.device)).view(-1, 1, 1, 1)
            out = torch.where(family, _blend_ops(img, op, r, self.ops), out)
        if any(o in _GEOMETRIC for o in self.ops):
            family = torch.isin(op, _indices(_GEOMETRIC, op.device)).view(-1, 1, 1, 1)
            geo = _geometric_ops(img, op, r * sign, self.translate, self.fill, self.interpolation)
            out = torch.where(family, geo, out)
        if "Cutout" in self.ops:
            h, w = img.shape[-2:]
            side = 2 * (self.cutout_op * min(h, w) * r).floor().long()
            out = torch.where(_is(op, "Cutout") & _random_squares(side, h, w, u), self.fill, out)
        return out


def _indices(names: tuple[str, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([OPS.index(o) for o in names], device=device)


def strong_augment(
    x: torch.Tensor,
    randaugment: RandAugment | None = None,
    pad: int = 4,
    flip: bool = True,
    pad_mode: str = "reflect",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MPL's strong view: weak_augment -> RandAugment (with its Cutout) -> weak_augment, the
    order of MPL's official CIFAR pipeline. `randaugment` defaults to `RandAugment()`.
    [N, C, H, W] uint8 or float -> same."""
    randaugment = RandAugment() if randaugment is None else randaugment
    x = weak_augment(x, pad, flip, pad_mode, randaugment.fill, generator)
    x = randaugment(x, generator)
    return weak_augment(x, pad, flip, pad_mode, randaugment.fill, generator)


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop of area fraction ~ U(scale) and aspect ratio log-uniform in
    `ratio`, resized back to the input size (bilinear), then a random horizontal flip: the
    ImageNet training crop, batched. Crops that would not fit are shrunk to fit.
    [N, C, H, W] uint8 or float -> same shape and dtype."""
    n, _, h, w = x.shape
    u = uniform((n, 5), generator, x.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_lo, log_hi = torch.log(torch.tensor(ratio, device=x.device))
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    # Width and height as fractions of the image's; the grid spans [-1, 1], so a crop of
    # fraction f has half-width f and its center may move by up to 1 - f.
    fw = torch.sqrt(area * aspect * h / w).clamp(max=1.0)
    fh = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    cx, cy = (1 - fw) * (2 * u[:, 2] - 1), (1 - fh) * (2 * u[:, 3] - 1)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones_like(fw)
    zero = torch.zeros_like(fw)
    theta = torch.stack(
        [torch.stack([fw * sign, zero, cx], -1), torch.stack([zero, fh, cy], -1)], 1
    )
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else out.to(x.dtype)
