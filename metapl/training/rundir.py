"""The output folder of a training run, and the rules that keep what it holds consistent.

    <output-dir>/config.json         the run's full configuration, written before anything else
                 split.json          the data split (the example scripts)
                 checkpoint.pt       the latest checkpoint; checkpoint.prev.pt the one before it
                 final.pt            the final models with their evaluation; results.json the
                                     evaluation alone
                 metrics.jsonl       a header with the configuration, then every logged scalar
                 wandb-run-id        the wandb run that --resume continues

A fresh run refuses a folder that already holds a run; ``--resume`` continues a run only with
the configuration it was started with (fields in ``may_change``, such as logging intervals and
paths, excepted) and names the first field that differs. A fresh run that fails before its
first checkpoint removes the files it wrote, so the same command can simply be run again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from metapl import distributed
from metapl.atomic import write_atomically

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "FINAL",
    "PREVIOUS",
    "RESULTS",
    "RESUMABLE",
    "RUN_FILES",
    "RunError",
    "check_config",
    "flatten",
    "open_run",
    "remove_temporaries",
]

CONFIG, CHECKPOINT, PREVIOUS = "config.json", "checkpoint.pt", "checkpoint.prev.pt"
FINAL, RESULTS, BEST = "final.pt", "results.json", "best.pt"
RUN_FILES = (
    CONFIG,
    "split.json",
    CHECKPOINT,
    PREVIOUS,
    FINAL,
    BEST,
    RESULTS,
    "metrics.jsonl",
    "wandb-run-id",
)


# What a resumed run may change, by field name (at any depth of the configuration): where it
# reads and writes, how often it logs, evaluates and saves, and what it prints. None of them
# changes the trained weights.
RESUMABLE = frozenset(
    {
        "resume",
        "data_dir",
        "output_dir",
        "eval_every",
        "log_every",
        "checkpoint_every",
        "eval_batch",
        "json",
        "download",
        "decode_threads",
        "explosion_factor",
        "wandb_project",
        "wandb_group",
    }
)


class RunError(Exception):
    """A run that cannot start or go on as asked. The message names the file or field at
    fault and what to do instead; the example scripts print it as one line."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, with dataclasses and namespaces as dicts and
    every leaf as JSON gives it back (paths as strings, tuples as lists)."""
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    elif hasattr(config, "__dict__") and not isinstance(config, type):
        config = vars(config)
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(config, default=str))}


def _field_name(key: str) -> str:
    """``settings.labels_per_class`` -> ``--labels-per-class``: every field is a flag."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def check_config(
    saved: Mapping[str, Any],
    config: Mapping[str, Any],
    may_change: Collection[str] = (),
    source: str = "the saved run",
) -> None:
    """Raise RunError naming the first field (of the flattened configurations) on which
    ``config`` differs from ``saved``, ignoring the fields named in ``may_change`` (the last
    part of a flattened key: ``log_every`` covers ``settings.log_every``)."""
    old, new = flatten(saved), flatten(config)
    for key in sorted(old.keys() | new.keys()):
        if key.rsplit(".", 1)[-1] in may_change or old.get(key, "<unset>") == new.get(
            key, "<unset>"
        ):
            continue
        raise RunError(
            f"--resume: {_field_name(key)} is {new.get(key, '<unset>')!r} but {source} used "
            f"{old.get(key, '<unset>')!r}; resume with the run's settings, or start a new run in "
            "another --output-dir"
        )


def remove_temporaries(output_dir: str | os.PathLike) -> None:
    """Remove the temporary files of atomic writes that a killed run left in ``output_dir``
    (``.checkpoint.pt.<random>.tmp``, ...); the files they were to replace are untouched."""
    for name in RUN_FILES:
        for tmp in Path(output_dir).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _present(output_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (output_dir / name).exists()]


@contextmanager
def open_run(
    output_dir: str | os.PathLike,
    config: Any,
    resume: bool,
    may_change: Collection[str] = (),
) -> Iterator[Path]:
    """Check ``output_dir`` against the run about to start and record its configuration.

    Fresh (``resume=False``): refuse a folder that holds any of ``RUN_FILES``, then write
    ``config.json``. Resume: the folder must hold a run (``config.json`` or a checkpoint) whose
    configuration equals ``config`` outside ``may_change`` (a flattened key like
    ``args.log_every``). On an exception inside the block, a fresh run that wrote no
    checkpoint removes the run files it created. Distributed: every process checks, rank 0
    writes."""
    output_dir = Path(output_dir)
    record = flatten(config)
    present = _present(output_dir)
    config_path = output_dir / CONFIG
    if not resume and present:
        raise RunError(
            f"--output-dir {output_dir} already holds a run ({', '.join(present)}): pass "
            "--resume to continue it, or choose a new --output-dir"
        )
    if resume:
        if config_path.exists():
            try:
                saved = json.loads(config_path.read_text())
            except (OSError, ValueError) as e:
                raise RunError(f"--resume: cannot read {config_path}: {e}") from None
            check_config(saved, record, may_change, source=f"the run in {output_dir}")
        elif not (output_dir / CHECKPOINT).exists():
            raise RunError(
                f"--resume: no run to resume in {output_dir} (no {CONFIG} or {CHECKPOINT}); "
                "start without --resume"
            )
    distributed.barrier()  # every process has checked before rank 0 writes
    is_main = distributed.rank() == 0
    if is_main and not config_path.exists():
        text = json.dumps(record, indent=1, sort_keys=True)
        write_atomically(config_path, lambda f: f.write(text + "\n"), binary=False)
    try:
        yield output_dir
    except BaseException:
        if is_main and not resume and not (output_dir / CHECKPOINT).exists():
            for name in RUN_FILES:
                (output_dir / name).unlink(missing_ok=True)
        raise
