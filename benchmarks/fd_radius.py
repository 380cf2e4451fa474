"""How close finite_difference gets to exact on a real student, as a function of fd_radius.

The MPL meta-gradient with respect to the teacher's logits z (the quantity metapl.MPL uses):
a WRN-28-2 student (train-mode BatchNorm, as in training), soft pseudo labels softmax(z) on an
unlabeled batch, one SGD-momentum lookahead step, the labeled cross-entropy after it. For each
radius, the relative error ||g_fd - g_exact|| / ||g_exact|| in float32 (and the exact float64
gradient as the reference for both), optionally under bfloat16 autocast.

    python benchmarks/fd_radius.py                       # WRN-28-2, batch 8 + 8, CPU
    python benchmarks/fd_radius.py --autocast bf16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import metapl
from metapl import optim
from metapl.functional import forward, params_of, soft_cross_entropy
from metapl.models import wide_resnet28


def problem(dtype: torch.dtype, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    student = wide_resnet28(2).to(dtype).train()
    buffers = dict(student.named_buffers())
    gen = torch.Generator().manual_seed(seed + 1)
    x_u = torch.randn(batch, 3, 32, 32, generator=gen).to(dtype)
    x_l = torch.randn(batch, 3, 32, 32, generator=gen).to(dtype)
    y_l = torch.randint(0, 10, (batch,), generator=gen)
    z = {"z": 2 * torch.randn(batch, 10, generator=gen).to(dtype)}

    def inner(s, t):
        return soft_cross_entropy(forward(student, s, buffers, x_u)[0], torch.softmax(t["z"], -1))

    def outer(s):
        return F.cross_entropy(forward(student, s, buffers, x_l)[0], y_l)

    return inner, outer, params_of(student), z


def meta_grad(dtype, batch, method, autocast, **kwargs):
    inner, outer, s, z = problem(dtype, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        res = metapl.meta_grad(
            inner, outer, s, z, optim.sgd(0.05, momentum=0.9), method=method, **kwargs
        )
    return res.meta_grads["z"].double()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="labeled = unlabeled batch size")
    radii = [1.0, 0.1, 1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]
    parser.add_argument("--radii", type=float, nargs="+", default=radii)
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    args = parser.parse_args(argv)
    autocast = args.autocast == "bf16"
    start = time.perf_counter()
    reference = meta_grad(torch.float64, args.batch, "exact", autocast=False)
    exact32 = meta_grad(torch.float32, args.batch, "exact", autocast)
    print(
        f"WRN-28-2, batch {args.batch} + {args.batch}, train-mode BatchNorm, autocast "
        f"{args.autocast}; reference: exact in float64\n"
    )
    print("| method | fd_radius | relative error |\n|---|---|---|")
    err = (exact32 - reference).norm() / reference.norm()
    print(f"| exact, float32 | | {err:.2e} |")
    for radius in args.radii:
        for dtype in (torch.float64, torch.float32):
            if dtype == torch.float64 and autocast:
                continue
            fd = meta_grad(dtype, args.batch, "finite_difference", autocast, fd_radius=radius)
            err = (fd - reference).norm() / reference.norm()
            name = str(dtype).removeprefix("torch.")
            print(f"| finite_difference, {name} | {radius:g} | {err:.2e} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
