"""Experiment tracking: Weights & Biases (offline when there is no API key) plus a local JSONL.

Every run writes ``metrics.jsonl`` in its output folder whatever wandb does, so results stay
readable without an account: its first line is a header, ``{"config": {...}}``, the run's
configuration; every other line is ``{"step": k, "<name>": value, ...}``. ``read_metrics``
reads it back. wandb runs online only when ``WANDB_API_KEY`` is set (or
``WANDB_MODE`` says otherwise); ``WANDB_MODE=disabled`` turns it off. The wandb run's id is
kept in ``<output-dir>/wandb-run-id`` so that a resumed run logs to the same wandb run.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from metapl.atomic import write_atomically

__all__ = ["Tracker", "read_metrics", "wandb_mode"]


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
        config: hyperparameters to record (wandb's config and the header of a new
            ``metrics.jsonl``).
        enabled: False on non-zero ranks of a distributed run.
        resume: continue the wandb run whose id is in ``output_dir/wandb-run-id`` (a new run
            when there is none); otherwise start a new run and write its id there.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        project: str | None = None,
        group: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
        resume: bool = False,
    ):
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a")  # noqa: SIM115
        if self._jsonl.tell() == 0:  # a new file (a resumed run keeps its header)
            header = json.dumps({"config": dict(config or {})}, default=str)
            self._jsonl.write(header + "\n")
            self._jsonl.flush()
        if project is not None and wandb_mode() != "disabled":
            import wandb

            id_path = self.output_dir / "wandb-run-id"
            run_id = id_path.read_text().strip() if resume and id_path.exists() else None
            if not run_id:
                run_id = secrets.token_hex(4)
                write_atomically(id_path, lambda f: f.write(run_id + "\n"), binary=False)
            self.run = wandb.init(
                project=project,
                group=group,
                name=name,
                config=dict(config or {}),
                dir=str(self.output_dir),
                mode=wandb_mode(),
                reinit="finish_previous",
                id=run_id,
                resume="allow",
            )

    def log(self, metrics: Mapping[str, float | Tensor], step: int) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self.run is not None:
            self.run.log(values, step=step)

    def rewind(self, step: int) -> None:
        """Forget the JSONL records of steps after ``step`` (a resumed run logs them again);
        the header stays."""
        if not self.enabled:
            return
        self._jsonl.flush()
        path = self.output_dir / "metrics.jsonl"
        keep = 0
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):  # cut short by a crash
                    break
                try:
                    record = json.loads(line)
                    if not (keep == 0 and "config" in record) and record["step"] > step:
                        break
                except (ValueError, KeyError, TypeError):
                    break
                keep += len(line)
        os.truncate(path, keep)  # the file is open for appending: writes go to the new end

    def summary(self, metrics: Mapping[str, float]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(metrics))

    def finish(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self.run is not None:
            self.run.finish()


def read_metrics(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """``(config, records)`` of a ``metrics.jsonl`` (or of the run folder holding one): the
    header's configuration (``{}`` in a file without a header) and the ``{"step": k, ...}``
    records in file order. A line cut short by a crash at the end is ignored; any other
    unreadable line raises ValueError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"no metrics file at {path}: pass a run folder or its metrics.jsonl")
    config: dict[str, Any] = {}
    records = []
    lines = path.read_text().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # the last line, without its newline: a killed run
                break
            raise ValueError(f"{path}, line {number}, is not JSON: {line[:60]!r}") from None
        if not isinstance(record, dict) or not ("step" in record or "config" in record):
            raise ValueError(f"{path}, line {number}, is not a metapl metrics record")
        if "step" in record:
            records.append(record)
        else:
            config = record["config"]
    return config, records
