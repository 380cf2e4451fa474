"""Step time of the WRN-28-2 MPL step on synthetic CIFAR-shaped data, side by side.

    python benchmarks/wrn_step.py                               # CUDA if available, bf16
    python benchmarks/wrn_step.py --labeled-batch 16 --repeats 5 --no-compile   # a CPU sketch

Rows: meta_grad None (the UDA / pseudo-label step), first_order, exact; eager and compiled.
Prints medians over --repeats steps after warm-up (and compilation), images/s (labeled +
unlabeled images per second), peak CUDA memory per row ("n/a" on the CPU, where torch keeps no
allocator statistics; the process's peak resident memory over all rows is printed instead),
the machine and versions, and the estimated wall-clock of the paper's 300k-step schedule.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time

import torch

import metapl
from metapl import optim
from metapl.models import wide_resnet28


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--labeled-batch", type=int, default=128)
    p.add_argument("--unlabeled-ratio", type=int, default=7)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(method, compiled, args, device):
    torch.manual_seed(0)
    teacher, student = (wide_resnet28(2, 10, dropout=0.2).to(device) for _ in range(2))
    if device.type == "cuda":
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    hard = method == "first_order"
    mpl = metapl.MPL(
        teacher,
        student,
        optim.sgd(0.05, 0.9, nesterov=True, weight_decay=5e-4),
        optim.sgd(0.05, 0.9, nesterov=True, weight_decay=5e-4),
        meta_grad=method,
        pseudo_labels="hard" if hard else "soft",
        uda=metapl.UDA(8.0, 0.7, 0.6),
        label_smoothing=0.15,
        compile=compiled,
        ema_decay=0.995,
        h_baseline_decay=0.99 if hard else None,
    )
    b_l, b_u = args.labeled_batch, args.labeled_batch * args.unlabeled_ratio
    shape = (3, 32, 32)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x_l = torch.randn(b_l, *shape, device=device).contiguous(memory_format=fmt)
    y_l = torch.randint(0, 10, (b_l,), device=device)
    x_u = torch.randn(b_u, *shape, device=device).contiguous(memory_format=fmt)
    x_us = torch.randn(b_u, *shape, device=device).contiguous(memory_format=fmt)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else None
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.repeats):
        _sync(device)
        start = time.perf_counter()
        if autocast is not None:
            with autocast:
                mpl.step(x_l, y_l, x_u, x_us, sync=False)
        else:
            mpl.step(x_l, y_l, x_u, x_us, sync=False)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, b_l + b_u


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, python {platform.python_version()}"
    )
    print(
        f"WRN-28-2, {args.labeled_batch} labeled + {args.unlabeled_ratio}x"
        f"{args.labeled_batch} unlabeled (two views), UDA, EMA; median of {args.repeats}"
    )
    rows = []
    for method in (None, "first_order", "exact"):
        for compiled in (False,) if args.no_compile else (False, True):
            seconds, peak, images = measure(method, compiled, args, device)
            rows.append(
                (method or "None", "compiled" if compiled else "eager", seconds, peak, images)
            )
    base = rows[0][2]
    print("\n| meta_grad | mode | ms/step | x None eager | images/s | peak GiB | 300k steps (h) |")
    print("|---|---|---|---|---|---|---|")
    for method, mode, seconds, peak, images in rows:
        print(
            f"| {method} | {mode} | {1000 * seconds:.1f} | {seconds / base:.2f} | "
            f"{images / seconds:.0f} | {'n/a' if peak is None else f'{peak:.2f}'} | "
            f"{300_000 * seconds / 3600:.1f} |"
        )
    if device.type != "cuda":
        print(
            f"\npeak GiB: CUDA only (torch keeps no allocator statistics on the CPU); peak "
            f"resident memory of this process, all rows: {_peak_rss_gib():.2f} GiB"
        )


def _peak_rss_gib() -> float:
    """The process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


if __name__ == "__main__":
    main()
