import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from metapl.data.augment import (
    MPL_OPS,
    STANDARD_OPS,
    RandAugment,
    cutout,
    strong_augment,
    weak_augment,
)


def images(n=8, h=12, w=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def single(op: str, magnitude: float, **kw) -> RandAugment:
    """Every sample runs `op` once at exactly `magnitude`, no final cutout."""
    return RandAugment(1, magnitude, (op,), "fixed", cutout=0, **kw)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


# ---------------------------------------------------------------- weak augmentation


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_weak_is_a_padded_crop_maybe_flipped(pad_mode):
    x, pad = images(16, 8, 8), 2
    out = weak_augment(x, pad=pad, pad_mode=pad_mode, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    fill = {"value": 128.0} if pad_mode == "constant" else {}
    padded = F.pad(x.float(), (pad,) * 4, mode=pad_mode, **fill).to(torch.uint8)
    for xo, xp in zip(out, padded, strict=True):
        crops = [
            view
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for view in (xp[:, dy : dy + 8, dx : dx + 8], xp[:, dy : dy + 8, dx : dx + 8].flip(-1))
        ]
        assert any(torch.equal(xo, c) for c in crops)


def test_weak_flip_only_and_no_flip():
    x = images(32)
    out = weak_augment(x, pad=0, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32
    assert torch.equal(weak_augment(x, pad=0, flip=False), x)


def test_weak_keeps_float_values_and_dtype():
    x = images().float() / 255
    out = weak_augment(x, pad_mode="constant")
    assert out.dtype == torch.float32
    values = set(x.unique().tolist()) | {128 / 255}
    assert set(out.unique().tolist()) <= values


def test_weak_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pad_mode"):
        weak_augment(images(), pad_mode="wrap")
    with pytest.raises(ValueError, match="pad < image size"):
        weak_augment(images(h=4, w=4), pad=4)


# ---------------------------------------------------------------- per-sample randomness


def test_deterministic_under_manual_seed_and_generator():
    x = images(16, 32, 32)
    torch.manual_seed(5)
    a = strong_augment(x)
    torch.manual_seed(5)
    b = strong_augment(x)
    assert torch.equal(a, b)
    c = strong_augment(x, generator=torch.Generator().manual_seed(5))
    d = strong_augment(x, generator=torch.Generator().manual_seed(5))
    e = strong_augment(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_identical_images_get_different_augmentations():
    x = images(1, 32, 32).expand(64, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert len({o.numpy().tobytes() for o in weak_augment(x, generator=g)}) >= 40
    assert len({o.numpy().tobytes() for o in strong_augment(x, generator=g)}) == 64
    # One op per sample at a fixed magnitude and no cutout: the variety comes from the op draws.
    ra = RandAugment(1, 10.0, STANDARD_OPS, "fixed", cutout=0)
    assert len({o.numpy().tobytes() for o in ra(x, g)}) >= 12


def test_apply_prob_zero_and_one():
    x = images()
    never = RandAugment(2, 10.0, MPL_OPS, "fixed", apply_prob=(0.0, 0.0), cutout=0)
    assert torch.equal(never(x), x)
    always = RandAugment(1, 10.0, ("Invert",), "fixed", apply_prob=(1.0, 1.0), cutout=0)
    assert torch.equal(always(x), 255 - x)


# ---------------------------------------------------------------- ops against references

PIL_OPS = {
    "AutoContrast": lambda im, r: ImageOps.autocontrast(im),
    "Equalize": lambda im, r: ImageOps.equalize(im),
    "Invert": lambda im, r: ImageOps.invert(im),
    "Solarize": lambda im, r: ImageOps.solarize(im, int(256 * r)),
    "Posterize": lambda im, r: ImageOps.posterize(im, max(1, int(4 * r))),
    "Color": lambda im, r: ImageEnhance.Color(im).enhance(0.1 + 1.8 * r),
    "Contrast": lambda im, r: ImageEnhance.Contrast(im).enhance(0.1 + 1.8 * r),
    "Brightness": lambda im, r: ImageEnhance.Brightness(im).enhance(0.1 + 1.8 * r),
    "Sharpness": lambda im, r: ImageEnhance.Sharpness(im).enhance(0.1 + 1.8 * r),
}


@pytest.mark.parametrize("magnitude", [0.0, 3.0, 7.0, 16.0])
@pytest.mark.parametrize("op", sorted(PIL_OPS))
def test_point_and_blend_ops_equal_pil_exactly(op, magnitude):
    x = images()
    x[0] = x[0] // 4 + 60  # a low-contrast image, where AutoContrast and Equalize do most
    out = single(op, magnitude)(x)
    expected = torch.stack([from_pil(PIL_OPS[op](to_pil(xi), magnitude / 10)) for xi in x])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("op", ["ShearX", "ShearY"])
def test_shear_equals_pil_affine_either_sign(op):
    x = images()
    out = single(op, 10.0)(x)  # shear +-0.3
    for xi, oi in zip(x, out, strict=True):
        refs = []
        for s in (0.3, -0.3):
            coeffs = (1, s, 0, 0, 1, 0) if op == "ShearX" else (1, 0, 0, s, 1, 0)
            im = to_pil(xi).transform(
                (16, 12), Image.AFFINE, coeffs, Image.NEAREST, fillcolor=(128,) * 3
            )
            refs.append(from_pil(im))
        assert any(torch.equal(oi, r) for r in refs)


def test_rotate_90_equals_rot90_either_direction():
    x = images(8, 16, 16)
    out = single("Rotate", 30.0)(x)  # +-90 degrees
    for xi, oi in zip(x, out, strict=True):
        assert torch.equal(oi, xi.rot90(1, (-2, -1))) or torch.equal(oi, xi.rot90(-1, (-2, -1)))


def shifted(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
    """torch.roll by t along dim with the wrapped-in pixels set to gray 128."""
    out = x.roll(t, dim)
    index = [slice(None)] * x.dim()
    index[dim] = slice(0, t) if t > 0 else slice(t, None)
    out[tuple(index)] = 128
    return out


@pytest.mark.parametrize("op, dim", [("TranslateX", -1), ("TranslateY", -2)])
def test_translate_by_integer_pixels_is_roll_with_fill(op, dim):
    x = images(8, 16, 16)
    out = single(op, 10.0, translate=2 / 16)(x)  # +-2 pixels
    for xi, oi in zip(x, out, strict=True):
        assert torch.equal(oi, shifted(xi, 2, dim)) or torch.equal(oi, shifted(xi, -2, dim))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("op", ["Identity", "Rotate", "ShearX", "ShearY", "TranslateX"])
def test_magnitude_zero_geometry_is_identity(op, interpolation):
    x = images()
    assert torch.equal(single(op, 0.0, interpolation=interpolation)(x), x)


def changed_box(before: torch.Tensor, after: torch.Tensor):
    """(rows, cols) spans of the changed pixels, asserting they form one filled rectangle."""
    changed = (before != after).any(0)
    rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
    r0, r1, c0, c1 = (
        rows.min().item(),
        rows.max().item() + 1,
        cols.min().item(),
        cols.max().item() + 1,
    )
    box = torch.zeros_like(changed)
    box[r0:r1, c0:c1] = True
    assert torch.equal(changed, box)
    return r0, r1, c0, c1


def assert_clipped_square(box, size: int, h: int, w: int):
    r0, r1, c0, c1 = box
    assert r1 - r0 == size or (r0 == 0 and r1 < size) or (r1 == h and r1 - r0 <= size)
    assert c1 - c0 == size or (c0 == 0 and c1 < size) or (c1 == w and c1 - c0 <= size)


def test_cutout_fills_a_clipped_square():
    x = images(64, 20, 20) // 2  # no pixel equals the fill 128
    out = cutout(x, 6, generator=torch.Generator().manual_seed(0))
    clipped = 0
    for xi, oi in zip(x, out, strict=True):
        box = changed_box(xi, oi)
        assert_clipped_square(box, 6, 20, 20)
        assert (oi[:, box[0] : box[1], box[2] : box[3]] == 128).all()
        clipped += (box[1] - box[0]) * (box[3] - box[2]) < 36
    assert clipped > 0  # some squares were cut by a border
    floats = cutout(x.float() / 255, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(floats, out.float() / 255)


def test_cutout_op_side_follows_the_level():
    x = images(32, 32, 32) // 2
    out = single("Cutout", 16.0)(x)  # side 2 * floor(32 / 8 * 1.6) = 12
    for xi, oi in zip(x, out, strict=True):
        assert_clipped_square(changed_box(xi, oi), 12, 32, 32)


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_strong_keeps_shape_dtype_and_range(dtype):
    x = images(16, 32, 32)
    x = x if dtype == torch.uint8 else x.to(dtype) / 255
    for ra in (RandAugment(), RandAugment.mpl(), RandAugment(interpolation="bilinear")):
        out = strong_augment(x, ra)
        assert out.dtype == dtype and out.shape == x.shape
        assert out.min() >= 0 and out.max() <= (255 if dtype == torch.uint8 else 1)


def test_float_images_on_the_8_bit_grid_are_exact():
    x = images()
    assert torch.equal(single("Identity", 0.0)(x.float() / 255), x.float() / 255)
    assert torch.equal(single("Invert", 0.0)(x.float() / 255), (255 - x).float() / 255)


def test_channels_last_input():
    x = images(8, 32, 32)
    g = torch.Generator().manual_seed(0)
    expected = strong_augment(x, generator=g)
    g = torch.Generator().manual_seed(0)
    out = strong_augment(x.contiguous(memory_format=torch.channels_last), generator=g)
    assert torch.equal(out, expected)


def test_mpl_preset_matches_the_official_setting():
    ra = RandAugment.mpl()
    assert (ra.num_ops, ra.magnitude, ra.ops, ra.magnitude_sampling) == (2, 16.0, MPL_OPS, "fixed")
    assert ra.apply_prob == (0.2, 0.8) and ra.cutout == 16


def test_randaugment_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Rotate"):
        RandAugment(ops=("Rotate", "Spin"))
    with pytest.raises(ValueError, match="magnitude_sampling"):
        RandAugment(magnitude_sampling="gaussian")
    with pytest.raises(ValueError, match="interpolation"):
        RandAugment(interpolation="bicubic")
    with pytest.raises(TypeError, match="uint8 or floating"):
        RandAugment()(torch.zeros(1, 3, 8, 8, dtype=torch.int32))


@pytest.mark.gpu
def test_on_cuda_matches_shapes_and_is_deterministic():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = images(64, 32, 32).cuda()
    torch.manual_seed(0)
    a = strong_augment(x, RandAugment.mpl())
    torch.manual_seed(0)
    b = strong_augment(x, RandAugment.mpl())
    assert a.device == x.device and a.dtype == torch.uint8 and torch.equal(a, b)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert strong_augment(x, generator=g).shape == x.shape


def test_random_resized_crop_full_scale_is_identity_or_flip():
    from metapl.data import random_resized_crop

    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    same = random_resized_crop(x, scale=(1, 1), ratio=(1, 1), flip=False)
    assert torch.equal(same, x)
    out = random_resized_crop(
        x, scale=(1, 1), ratio=(1, 1), generator=torch.Generator().manual_seed(3)
    )
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_random_resized_crop_draws_per_sample_and_is_seeded():
    from metapl.data import random_resized_crop

    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(16, 1, 1, 1)
    a = random_resized_crop(x, generator=torch.Generator().manual_seed(0))
    b = random_resized_crop(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert len({tuple(img.flatten().tolist()) for img in a}) == 16
