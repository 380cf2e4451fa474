"""Classify images with a finished run's final model.

    python -m metapl.training.predict RUN_DIR_or_final.pt IMAGE [IMAGE ...] [--json]

Prints one line per image: its path, the predicted class and the model's confidence (the
softmax probability of that class). ``final.pt`` says how to read an image (``"about"``: the
model, class names, input size, resize and normalization, written by the paper examples and by
``train(..., about=...)``), so no other flag is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from metapl.data import load_image, normalize
from metapl.training.loop import load_checkpoint
from metapl.training.recipe import build_network
from metapl.training.rundir import FINAL, RunError

__all__ = ["load_final", "main", "predict"]


def load_final(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The final network of a run folder or ``final.pt`` (eval mode) and its ``about``."""
    path = Path(path)
    path = path / FINAL if path.is_dir() else path
    if not path.is_file():
        raise RunError(f"no {FINAL} at {path}: pass a finished run's folder or its {FINAL}")
    state = load_checkpoint(path)
    about = state.get("about")
    if about is None or "final" not in state:
        raise RunError(
            f"{path} does not say how to read an image (written before final.pt held its "
            "model and classes): finetune it again with --finetune-only to get one that does"
        )
    net = build_network(about["model"], len(about["classes"]), 0.0, about["image_size"])
    net.load_state_dict(state["final"])
    return net.eval(), about


@torch.no_grad()
def predict(net: torch.nn.Module, about: dict, images: list[Path]) -> list[tuple[str, float]]:
    """``(class name, confidence)`` for each image file."""
    batch = torch.stack([load_image(p, about["image_size"], about["resize"]) for p in images])
    probs = torch.softmax(net(normalize(batch, about["normalization"])).float(), dim=-1)
    confidence, index = probs.max(dim=-1)
    pairs = zip(index.tolist(), confidence.tolist(), strict=True)
    return [(about["classes"][i], c) for i, c in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metapl.training.predict", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run", type=Path, help="a finished run's folder, or its final.pt")
    parser.add_argument("images", type=Path, nargs="+", help="image files (any size, RGB)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    try:
        net, about = load_final(args.run)
        missing = next((p for p in args.images if not p.is_file()), None)
        if missing is not None:
            raise RunError(f"no image file {missing}")
        predictions = predict(net, about, args.images)
    except (RunError, OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    for path, (name, confidence) in zip(args.images, predictions, strict=True):
        if args.json:
            print(json.dumps({"image": str(path), "class": name, "confidence": confidence}))
        else:
            print(f"{path}\t{name}\t{confidence:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
