"""The application layer: the MPL training loop, checkpoints and run folders, tracking,
progress, plots and the paper's recipe (docs/architecture.md). The core (``metapl.metagrad``,
``metapl.optim``, ``metapl.mpl``, ...) never imports it."""

from metapl.training.loop import (
    DivergenceError,
    SSLData,
    TrainConfig,
    evaluate,
    finetune_only,
    load_checkpoint,
    save_checkpoint,
    train,
)
from metapl.training.rundir import RunError
from metapl.training.tracking import Tracker, read_metrics

__all__ = [
    "DivergenceError",
    "RunError",
    "SSLData",
    "TrainConfig",
    "Tracker",
    "evaluate",
    "finetune_only",
    "load_checkpoint",
    "read_metrics",
    "save_checkpoint",
    "train",
]
