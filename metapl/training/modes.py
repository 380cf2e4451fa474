"""The example scripts' modes besides training: test the networks a run saved
(``--evaluate``) and finetune its student on its own (``--finetune-only``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from metapl.training.loop import SSLData, evaluate, finetune_only, load_checkpoint
from metapl.training.recipe import Recipe, print_results, tracker_for, train_config
from metapl.training.rundir import RunError

__all__ = ["evaluate_saved", "finetune_saved", "saved_networks"]

NETWORKS = ("final", "ema_student", "student", "teacher")


def saved_networks(path: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """The state dicts a run saved in ``path``: ``final.pt`` (``final``, ``ema_student``,
    ``student``, ``teacher``) or ``checkpoint.pt`` (the same but ``final``), those present.
    Any other file raises RunError naming it."""
    state = load_checkpoint(path)
    nets = state["mpl"] if isinstance(state.get("mpl"), dict) else state
    found = {k: nets[k] for k in NETWORKS if isinstance(nets.get(k), dict)}
    if not found:
        raise RunError(f"{path} holds no saved networks: pass a run's final.pt or checkpoint.pt")
    return found


def _load(model: nn.Module, state: dict, path, name: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunError(
            f"{path}: its {name} does not fit this model ({first}): pass the --model, --preset "
            "and data it was trained with"
        ) from None
    return model


def evaluate_saved(
    path: str | os.PathLike,
    build: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    prepare: Callable[[Tensor], Tensor],
    bf16: bool = True,
) -> dict[str, float]:
    """Top-1 accuracy on ``(x, y)`` of every network saved in ``path`` (``"test/<name>"``),
    each loaded into a fresh ``build()`` on ``y``'s device."""
    results = {}
    for name, state in saved_networks(path).items():
        model = _load(build(), state, path, name).to(y.device)
        results[f"test/{name}"] = evaluate(model, x, y, prepare, bf16=bf16)
    return results


def finetune_saved(
    path: Path, student: nn.Module, data: SSLData, recipe: Recipe, args, name: str
) -> dict[str, float]:
    """Load the saved EMA student of ``path`` (the student where there is no EMA) into
    ``student``, finetune it on ``data``'s labeled images with the recipe's finetuning
    settings, evaluate and save it in ``args.output_dir`` as a run's end does, and print the
    accuracies."""
    nets = saved_networks(path)
    key = next((k for k in ("ema_student", "student", "final") if k in nets), None)
    if key is None:
        raise RunError(f"{path} holds no student (only {sorted(nets)})")
    _load(student, nets[key], path, key)
    tracker = tracker_for(args, recipe, name)
    config = train_config(recipe, args, len(data.labeled_y))
    results = finetune_only(
        student, data, config, args.output_dir, tracker, networks={key: student}
    )
    tracker.finish()
    print_results(results, args.json)
    return results
