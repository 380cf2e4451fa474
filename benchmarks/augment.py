"""Throughput of the batched on-device augmentation for MPL's CIFAR unlabeled batch.

    python benchmarks/augment.py [--batch 896] [--repeats 20] [--device cuda] [--threads 1]

Prints images/s and ms per batch (medians over repeats, after warmup) for weak and strong
views of a uint8 [batch, 3, 32, 32] batch (896 = 7 * 128: MPL's uda_data=7 x batch 128).
"""

import argparse
import os
import platform
import statistics
import time

import torch
from _machine import cpu_name

from metapl.data.augment import RandAugment, strong_augment, weak_augment


def median_seconds(fn, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else lambda: None
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=7 * 128)
    parser.add_argument("--repeats", type=int, default=20)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"machine: {platform.platform()} | {device.type}: {name} | {os.cpu_count()} CPUs")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__} | python {platform.python_version()} | "
        f"CPU threads {torch.get_num_threads()} | load average {load}"
    )
    print(f"batch: uint8 [{args.batch}, 3, 32, 32] | median of {args.repeats} repeats\n")

    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    cases = {
        "weak (reflect pad 4 + flip)": weak_augment,
        "strong (RandAugment() + cutout 16)": lambda b: strong_augment(b, RandAugment()),
        "strong (RandAugment.mpl(), official)": lambda b: strong_augment(
            b, RandAugment.mpl(), pad_mode="constant"
        ),
    }
    print(f"{'augmentation':<40} {'images/s':>12} {'ms/batch':>10}")
    for label, fn in cases.items():
        seconds = median_seconds(fn, x, args.repeats)
        print(f"{label:<40} {args.batch / seconds:>12,.0f} {1e3 * seconds:>10.2f}")


if __name__ == "__main__":
    main()
