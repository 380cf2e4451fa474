"""Experiment tracking: Weights & Biases (offline when there is no API key) plus a local JSONL.

Every run writes ``metrics.jsonl`` in its output folder whatever wandb does, so results stay
readable without an account. wandb runs online only when ``WANDB_API_KEY`` is set (or
``WANDB_MODE`` says otherwise); ``WANDB_MODE=disabled`` turns it off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["Tracker", "wandb_mode"]


def wandb_mode() -> str:
    """``WANDB_MODE`` if set, else "online" with an API key and "offline" without one."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Logs scalars to wandb (if a project is given and wandb imports) and to a JSONL file.

    Args:
        output_dir: folder for ``metrics.jsonl`` and wandb's files.
        project: wandb project, or None for the JSONL file only.
        group, name: wandb run group (e.g. one ablation) and run name.
        config: hyperparameters to record.
        enabled: False on non-zero ranks of a distributed run.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        project: str | None = None,
        group: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a")  # noqa: SIM115
        if project is not None and wandb_mode() != "disabled":
            import wandb

            self.run = wandb.init(
                project=project,
                group=group,
                name=name,
                config=dict(config or {}),
                dir=str(self.output_dir),
                mode=wandb_mode(),
                reinit="finish_previous",
            )

    def log(self, metrics: Mapping[str, float | Tensor], step: int) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def summary(self, metrics: Mapping[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(metrics))

    def finish(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.run is not None:
            self.run.finish()
