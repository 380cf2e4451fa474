"""Ablation grid for MPL on a CIFAR/SVHN preset: meta-gradient x UDA x seeds.

    python examples/ablations.py --preset cifar10-4k --data-dir data/ --output-dir runs/abl \
        --wandb-project metapl --seeds 0 1 2 -- --steps 50000

Every run is examples/cifar_mpl.py with its own output folder; all runs of one grid share one
wandb group (offline without an API key). Arguments after ``--`` go to every run. Prints the
summary table: test accuracy of the final student (mean ± std over seeds; the accuracy alone
for one seed) for each cell. ``--resume`` continues an interrupted grid: runs that had started
resume, the others start. The learning curves of the whole grid, overlaid:

    python -m metapl.training.plot runs/abl/*/seed* --output runs/abl/curves
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from metapl import distributed
from metapl.training.cli import parse
from metapl.training.rundir import CHECKPOINT, CONFIG

CIFAR_MPL = Path(__file__).resolve().parent / "cifar_mpl.py"
MetaGrad = Literal["none", "first_order", "exact", "finite_difference"]


@dataclass(frozen=True)
class Grid:
    data_dir: Path  # the preset's data
    output_dir: Path  # one folder per cell and seed below it
    preset: str = "cifar10-4k"
    meta_grads: tuple[MetaGrad, ...] = ("none", "first_order", "exact")
    uda: tuple[Literal["off", "on"], ...] = ("off", "on")
    seeds: tuple[int, ...] = (0, 1, 2)
    wandb_project: str | None = None
    group: str | None = None  # wandb group (default: ablation-<preset>)
    json: bool = False  # print the summary as JSON
    resume: bool = False  # continue an interrupted grid


def _cifar_mpl():
    if str(CIFAR_MPL.parent) not in sys.path:
        sys.path.insert(0, str(CIFAR_MPL.parent))  # its family's helpers (examples/_paper.py)
    spec = importlib.util.spec_from_file_location("cifar_mpl", CIFAR_MPL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict[str, dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = parse(Grid, argv[:split], description=__doc__), argv[split + 1 :]
    example = _cifar_mpl()
    group = args.group or f"ablation-{args.preset}"
    summary = {}
    with distributed.process_group():  # joined once for every run (under torchrun)
        for meta_grad, uda in itertools.product(args.meta_grads, args.uda):
            summary.update(_cell(example, args, passthrough, group, meta_grad, uda))
    print(json.dumps(summary) if args.json else table(summary))
    return summary


def _cell(example, args, passthrough: list[str], group: str, meta_grad: str, uda: str) -> dict:
    """Every seed of one (meta-gradient, UDA) cell, each run in its own output folder."""
    accuracies = []
    for seed in args.seeds:
        out = args.output_dir / f"{meta_grad}-uda-{uda}" / f"seed{seed}"
        run_argv = [
            "--preset",
            args.preset,
            "--data-dir",
            str(args.data_dir),
            "--output-dir",
            str(out),
            "--meta-grad",
            meta_grad,
            "--seed",
            str(seed),
            "--wandb-group",
            group,
            *passthrough,
        ]
        if uda == "off":
            run_argv.append("--no-uda")
        if args.wandb_project:
            run_argv += ["--wandb-project", args.wandb_project]
        if args.resume and any((out / f).exists() for f in (CONFIG, CHECKPOINT)):
            run_argv += ["--resume", str(out)]
        results = example.main(run_argv)
        # the final student's test accuracy (finetuned, EMA or raw: the run's last model)
        accuracies.append(next(v for k, v in results.items() if k.startswith("test/student")))
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    summary = {"mean": statistics.mean(accuracies), "std": std, "seeds": accuracies}
    return {f"{meta_grad}/uda-{uda}": summary}


def table(summary: dict[str, dict]) -> str:
    lines = ["| meta_grad / UDA | test accuracy (%) | seeds |", "|---|---|---|"]
    for cell, s in summary.items():
        spread = f" ± {100 * s['std']:.2f}" if len(s["seeds"]) > 1 else ""  # none for one seed
        lines.append(f"| {cell} | {100 * s['mean']:.2f}{spread} | {len(s['seeds'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
