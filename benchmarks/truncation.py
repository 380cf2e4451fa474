"""Seconds per hypergradient, full and truncated: one SGD hypergradient through K steps of
examples/hyperparameters.py (the learned-lr-and-momentum row), untruncated and with
``truncate=T``, the calls interleaved so that a busy machine slows both alike.

    python benchmarks/truncation.py                    # K=100, T=20, median of 5
    python benchmarks/truncation.py --steps 200 --truncate 50 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import hyperparameters as hp  # noqa: E402


def time_truncation(steps: int, truncate: int, repeats: int, seed: int = 0) -> dict[str, float]:
    cfg = hp.Config()
    data = hp.load_data(seed)
    meta = hp.meta_of("sgd", hp.SPACES["sgd"].initial)
    gen = hp.generator(seed, 4, 0)
    init = hp.init_mlp(gen, cfg.hidden)
    inner_batches = hp.batches(data, gen, steps, cfg.batch_size)
    times: dict[str, list[float]] = {"full": [], "truncated": []}
    for _ in range(repeats):
        for key, t in (("full", None), ("truncated", truncate)):
            start = time.perf_counter()
            hp.hypergradient("sgd", meta, init, inner_batches, data.x_val, data.y_val, t)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--truncate", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not 1 <= args.truncate < args.steps or args.repeats < 1:
        parser.error("need 1 <= --truncate < --steps and --repeats >= 1")
    torch.set_num_threads(1)
    t = time_truncation(args.steps, args.truncate, args.repeats)
    print(
        f"one SGD hypergradient through K={args.steps} steps (median of {args.repeats}, "
        f"interleaved): full {t['full']:.2f} s, truncate={args.truncate} "
        f"{t['truncated']:.2f} s ({t['truncated'] / t['full']:.2f}x)"
    )
    return t


if __name__ == "__main__":
    main()
