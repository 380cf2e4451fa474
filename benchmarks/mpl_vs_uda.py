"""Does the MPL term help over UDA? Paired seeds on sklearn's digits (examples/digits_mpl.py).

Each setting trains MPL + UDA (``mpl_uda``, or ``mpl_uda_first_order``) and the UDA baseline
with the same overrides (the baseline ignores the MPL-only knobs, so settings that differ only in
them share one baseline run per seed); the same seed gives both the same split, initial
networks and data order. Prints per-seed test accuracy differences (points) and writes every
run's accuracy to <output-dir>/results.json, which it reuses on a rerun (only missing runs
train).

    python benchmarks/mpl_vs_uda.py                                   # the grid in docs/mpl.md
    python benchmarks/mpl_vs_uda.py --settings paper weight_3 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_mpl  # noqa: E402

# name: (the MPL row, Config overrides). The knobs below are metapl.MPL's.
SETTINGS: dict[str, tuple[str, dict[str, object]]] = {
    "paper": ("mpl_uda", {}),  # exact, soft labels, weight 1, one lookahead step
    "weight_0.3": ("mpl_uda", {"mpl_weight": 0.3}),
    "weight_3": ("mpl_uda", {"mpl_weight": 3.0}),
    "lookahead_2": ("mpl_uda", {"lookahead_steps": 2}),  # the baseline takes 2 steps too
    "student_bn_joint": ("mpl_uda", {"student_bn": "joint"}),  # the official code's BatchNorm
    "first_order": ("mpl_uda_first_order", {}),  # hard labels, the paper's 1/B_u scale
    "first_order_sum": ("mpl_uda_first_order", {"log_prob_reduction": "sum"}),  # without 1/B_u
    # the MPL signal on half of each class's labels, the teacher's own loss on the other half
    # (the UDA baseline keeps every label for its supervised loss)
    "held_out_labels": ("mpl_uda", {"mpl_labels": "held_out"}),
    "resampled_labels": ("mpl_uda", {"mpl_labels": "resampled"}),  # another weak view
}
# knobs that leave the UDA baseline unchanged
MPL_ONLY = ("mpl_weight", "log_prob_reduction", "mpl_labels")


def overrides_text(overrides: dict[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(overrides.items())]


def train(row: str, overrides: dict[str, object], seed: int, args) -> float:
    os.environ["WANDB_MODE"] = "disabled"
    argv = [
        "--rows",
        row,
        "--seeds",
        str(seed),
        "--json",
        "--labeled-per-class",
        str(args.labeled_per_class),
        "--output-dir",
        str(args.output_dir / "runs"),
    ]
    for key, value in sorted(overrides.items()):
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return digits_mpl.main(argv)[row]["seeds"][0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--labeled-per-class", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/mpl_vs_uda"))
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir / f"{args.labeled_per_class}-per-class"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "results.json"
    runs: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def accuracy(row: str, overrides: dict[str, object], seed: int) -> float:
        key = " ".join([row, f"seed={seed}", *overrides_text(overrides)])
        if key not in runs:
            start = time.perf_counter()
            acc = train(row, overrides, seed, args)
            runs[key] = {"test": acc, "seconds": round(time.perf_counter() - start, 1)}
            path.write_text(json.dumps(runs, indent=1))  # after every run: resumable
            print(f"{key}: {100 * acc:.2f}", file=sys.stderr)
        return runs[key]["test"]

    table = {}
    for name in args.settings:
        row, overrides = SETTINGS[name]
        baseline = {k: v for k, v in overrides.items() if k not in MPL_ONLY}
        mpl = [accuracy(row, overrides, s) for s in args.seeds]
        uda = [accuracy("uda", baseline, s) for s in args.seeds]
        diffs = [round(100 * (a - b), 2) for a, b in zip(mpl, uda, strict=True)]
        table[name] = {
            "mpl": mpl,
            "uda": uda,
            "diff": diffs,
            "mean_diff": round(statistics.mean(diffs), 2),
            "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs),
        }
    (args.output_dir / "summary.json").write_text(json.dumps(table, indent=1))
    print(f"\ndigits, {10 * args.labeled_per_class} labels, seeds {args.seeds}: test accuracy (%)")
    print("| setting | MPL+UDA mean | UDA mean | MPL+UDA - UDA per seed (points) | mean | W/L |")
    print("|---|---|---|---|---|---|")
    for name, t in table.items():
        per_seed = " ".join(f"{d:+.2f}" for d in t["diff"])
        print(
            f"| {name} | {100 * statistics.mean(t['mpl']):.2f} | "
            f"{100 * statistics.mean(t['uda']):.2f} | {per_seed} | {t['mean_diff']:+.2f} | "
            f"{t['wins']}/{t['losses']} |"
        )
    return table


if __name__ == "__main__":
    main()
