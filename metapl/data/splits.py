"""Seeded labeled / unlabeled splits of a training set, and their JSON manifests.

By the MPL / FixMatch / UDA convention the unlabeled set is the whole training set, labeled
images included (`unlabeled_includes_labeled=True`).
"""

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metapl.atomic import write_atomically


@dataclass(frozen=True)
class Split:
    """Sorted int64 indices into the training set."""

    labeled: np.ndarray
    unlabeled: np.ndarray


def _as_targets(targets: Any) -> np.ndarray:
    if isinstance(targets, torch.Tensor):
        targets = targets.cpu().numpy()
    targets = np.asarray(targets)
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be 1-D integers, got {targets.dtype} {targets.shape}")
    return targets.astype(np.int64)


def _split(labeled: list[np.ndarray], n: int, unlabeled_includes_labeled: bool) -> Split:
    lab = np.sort(np.concatenate(labeled)).astype(np.int64)
    unl = np.arange(n, dtype=np.int64)
    if not unlabeled_includes_labeled:
        unl = np.setdiff1d(unl, lab)
    return Split(labeled=lab, unlabeled=unl)


def labeled_unlabeled_split(
    targets: Any,
    labels_per_class: int,
    seed: int,
    num_classes: int | None = None,
    unlabeled_includes_labeled: bool = True,
) -> Split:
    """Exactly `labels_per_class` labeled examples of each class, drawn with
    `np.random.default_rng(seed)` (CIFAR-10-4K: 400, SVHN-1K: 100).

    targets: [N] integer class ids in [0, num_classes) (num_classes defaults to max + 1).
    """
    targets = _as_targets(targets)
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    labeled = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        if len(members) < labels_per_class:
            raise ValueError(
                f"class {c} has {len(members)} examples, fewer than labels_per_class="
                f"{labels_per_class}; pass a smaller labels_per_class"
            )
        labeled.append(rng.choice(members, labels_per_class, replace=False))
    return _split(labeled, len(targets), unlabeled_includes_labeled)


def labeled_fraction_split(
    targets: Any, fraction: float, seed: int, unlabeled_includes_labeled: bool = True
) -> Split:
    """round(fraction * n_c) (at least 1) labeled examples of each class c, seeded like
    `labeled_unlabeled_split` (ImageNet-10%: fraction=0.1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    targets = _as_targets(targets)
    rng = np.random.default_rng(seed)
    labeled = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        labeled.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return _split(labeled, len(targets), unlabeled_includes_labeled)


def save_manifest(split: Split, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write the split and JSON-serializable `meta` (dataset, seed, ...) to `path` atomically."""
    doc = {
        "meta": meta,
        "labeled": split.labeled.tolist(),
        "unlabeled": split.unlabeled.tolist(),
    }
    write_atomically(path, lambda f: json.dump(doc, f), binary=False)


def load_manifest(path: str | os.PathLike) -> tuple[Split, dict[str, Any]]:
    """Read a manifest written by `save_manifest`: (split, meta)."""
    with open(path) as f:
        doc = json.load(f)
    split = Split(
        labeled=np.asarray(doc["labeled"], dtype=np.int64),
        unlabeled=np.asarray(doc["unlabeled"], dtype=np.int64),
    )
    return split, doc["meta"]
