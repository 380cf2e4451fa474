"""metapl against higher, torchopt, betty and learn2learn: the same meta-gradient per row, each
library in its own process per cell, side by side in one run.

Rows (benchmarks/_cells.py): MAML sinusoid (1 task; 25 tasks, metapl under torch.func.vmap),
MAML with a BatchNorm CNN (K=10), a Meta-Weight-Net step, a learned learning rate through
K=100 and K=400 steps, iMAML on ridge regression, one MPL step's teacher gradient, and the data
mixing of a byte-level GPT (one SGD or Adam lookahead). Each cell runs in a fresh interpreter
(so peak memory and imports do not leak between cells): it computes its gradient, checks it
against metapl's (the same numbers to the row's tolerance, relative L2) before timing, then
times repeated calls (the median) and measures the peak memory of one call above its start
(torch.profiler's CPU allocator events). Output: a Markdown table and JSON (ratios to the
fastest and to the least memory of each row) and a figure.

    python benchmarks/compare.py --threads 1                 # every row (~15 min, 2-core CPU)
    python benchmarks/compare.py --quick --rows maml-1 mpl   # the smallest sizes, some rows
    python benchmarks/compare.py --peers metapl higher       # some libraries
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = ("metapl", "metapl forward", "higher", "torchopt", "betty", "learn2learn")
MODULES = {
    "higher": "higher",
    "torchopt": "torchopt",
    "betty": "betty",
    "learn2learn": "learn2learn",
}
DISTRIBUTIONS = {
    "metapl": "metapl",
    "higher": "higher",
    "torchopt": "torchopt",
    "betty": "betty-ml",
    "learn2learn": "learn2learn",
    "torch": "torch",
}
REFERENCE = "metapl"  # every other peer's gradient is checked against this one's


@dataclass
class Cell:
    """One (row, peer): its median seconds and peak bytes, or why it has none."""

    row: str
    peer: str
    median_s: float | None = None
    calls: int = 0
    peak_bytes: int | None = None
    rel_err: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- inside a cell


def run_cell(row: str, peer: str, n: int, args: argparse.Namespace, ref: Path) -> Cell:
    """Build the cell, check its gradient against the reference's (saving it when this is the
    reference), time it and measure its peak memory."""
    import torch
    from _cells import ROWS
    from _measure import peak_memory

    torch.set_num_threads(args.threads)
    spec = ROWS[row]
    run = spec.build[peer](n)
    grads = torch.cat([g.detach().flatten() for g in run()])
    cell = Cell(row, peer)
    if peer == REFERENCE:
        torch.save(grads, ref)
    else:
        expected = torch.load(ref)
        cell.rel_err = float(torch.linalg.norm(grads - expected) / torch.linalg.norm(expected))
        if not cell.rel_err <= spec.tol:
            cell.note = f"gradient differs from metapl's: relative L2 {cell.rel_err:.1e}"
            return cell
    times = _time(run, args)
    cell.median_s, cell.calls = statistics.median(times), len(times)
    cell.peak_bytes = peak_memory(run, torch.device("cpu"))
    return cell


def _time(run, args: argparse.Namespace) -> list[float]:
    """Warm-up calls, then up to ``repeats`` timed calls, stopping after ``budget`` seconds
    (at least ``min_repeats`` calls)."""
    for _ in range(args.warmup):
        run()
    times: list[float] = []
    while len(times) < args.repeats:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if sum(times) > args.budget and len(times) >= args.min_repeats:
            break
    return times


# --------------------------------------------------------------------------- the driver


def cell_in_subprocess(row: str, peer: str, n: int, args, ref: Path) -> Cell:
    """One cell in a fresh interpreter; its last line of output is the cell as JSON."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--cell",
        row,
        peer,
        str(n),
        str(ref),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--min-repeats",
        str(args.min_repeats),
        "--warmup",
        str(args.warmup),
        "--budget",
        str(args.budget),
    ]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return Cell(row, peer, note=f"timed out after {args.timeout} s")
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return Cell(row, peer, note=_last_error(out.stderr))
    return Cell(**json.loads(lines[-1]))


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "failed without a message")[:200]


def import_errors(peers: list[str]) -> dict[str, str]:
    """Each peer that does not import in this environment, with the last line of its error."""
    errors = {}
    for peer in peers:
        if peer not in MODULES:
            continue
        code = f"import {MODULES[peer]}"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            errors[peer] = f"`{code}` fails: {_last_error(out.stderr)}"
    return errors


def run_all(args) -> list[Cell]:
    from _cells import ROWS

    broken = import_errors(args.peers)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows:
            spec = ROWS[row]
            n = spec.sizes[1] if args.quick else spec.sizes[0]
            ref = Path(tmp) / f"{row}.pt"
            for peer in args.peers:
                if peer in broken:
                    cell = Cell(row, peer, note=broken[peer])
                elif peer not in spec.build:
                    cell = Cell(row, peer, note=spec.cannot.get(peer, "not expressed"))
                elif peer != REFERENCE and not ref.exists():
                    cell = Cell(row, peer, note="no metapl gradient to check against")
                else:
                    cell = cell_in_subprocess(row, peer, n, args, ref)
                print(f"  {row} / {peer}: {_status(cell)}", file=sys.stderr, flush=True)
                cells.append(cell)
    return cells


def _status(cell: Cell) -> str:
    if cell.median_s is None:
        return cell.note
    return f"{cell.median_s * 1e3:.1f} ms, {cell.peak_bytes / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- reporting


def ratios(cells: list[Cell]) -> dict[tuple[str, str], tuple[float, float]]:
    """(row, peer) -> (time / the row's fastest, peak / the row's least), over measured cells."""
    out = {}
    for row in dict.fromkeys(c.row for c in cells):
        done = [c for c in cells if c.row == row and c.median_s is not None]
        if not done:
            continue
        fastest = min(c.median_s for c in done)
        least = max(1, min(c.peak_bytes for c in done))
        for c in done:
            out[(row, c.peer)] = (c.median_s / fastest, max(1, c.peak_bytes) / least)
    return out


def markdown(cells: list[Cell], titles: dict[str, str]) -> str:
    r = ratios(cells)
    lines = [
        "| row | library | median ms | × fastest | peak MiB | × least | rel. diff | calls |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for c in cells:
        if c.median_s is None:
            notes.append(f"- {titles[c.row]} / {c.peer}: {c.note}")
            continue
        t, m = r[(c.row, c.peer)]
        err = "ref" if c.rel_err is None else f"{c.rel_err:.0e}"
        lines.append(
            f"| {titles[c.row]} | {c.peer} | {c.median_s * 1e3:.1f} | {t:.2f} "
            f"| {c.peak_bytes / 2**20:.1f} | {m:.2f} | {err} | {c.calls} |"
        )
    return "\n".join(lines + ["", "Not measured:", "", *notes])


def figure(cells: list[Cell], titles: dict[str, str], path: Path) -> None:
    """Two panels, one bar per library and row: time and peak memory relative to the row's
    best (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = ratios(cells)
    rows = [row for row in dict.fromkeys(c.row for c in cells) if any(k[0] == row for k in r)]
    peers = [p for p in dict.fromkeys(c.peer for c in cells) if any(k[1] == p for k in r)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) * len(peers) / 3 + 2))
    height = 0.8 / len(peers)
    for panel, (ax, label) in enumerate(
        zip(axes, ("time / fastest", "peak memory / least"), strict=True)
    ):
        for i, peer in enumerate(peers):
            ys = [j + i * height for j, row in enumerate(rows) if (row, peer) in r]
            xs = [r[(row, peer)][panel] for row in rows if (row, peer) in r]
            ax.barh(ys, xs, height=height, label=peer)
        ax.set_xscale("log")
        ax.axvline(1, color="black", linewidth=0.8)
        ax.set_xlabel(f"{label} (log scale; 1 = the row's best)")
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
        ax.set_yticklabels([titles[row] for row in rows] if panel == 0 else [])
        ax.invert_yaxis()
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(args) -> dict[str, str]:
    from _machine import cpu_name, git_commit

    versions = {}
    for name, dist in DISTRIBUTIONS.items():
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": f"{platform.machine()} {cpu_name()}",
        "threads": str(args.threads),
        "python": platform.python_version(),
        "commit": git_commit(),
        **versions,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    from _cells import ROWS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument("--quick", action="store_true", help="the smallest size of every row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=30, help="most timed calls per cell")
    parser.add_argument("--min-repeats", type=int, default=5, help="least timed calls per cell")
    parser.add_argument(
        "--budget",
        type=float,
        default=8.0,
        help="seconds of timed calls per cell after which it stops (once it has --min-repeats)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per cell process")
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE.parent / "runs" / "compare",
        help="folder for compare.md and compare.json",
    )
    parser.add_argument("--figure", type=Path, default=HERE.parent / "docs" / "img" / "compare.png")
    parser.add_argument(
        "--cell", nargs=4, metavar=("ROW", "PEER", "N", "REF"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if REFERENCE not in args.peers:
        parser.error(f"--peers must include {REFERENCE}: every gradient is checked against it")
    args.peers = [REFERENCE] + [p for p in args.peers if p != REFERENCE]
    return args


def main(argv: list[str] | None = None) -> list[Cell]:
    args = parse(argv)
    if args.cell:
        row, peer, n, ref = args.cell
        print(json.dumps(asdict(run_cell(row, peer, int(n), args, Path(ref)))))
        return []
    from _cells import ROWS

    titles = {
        row: ROWS[row].title.format(n=ROWS[row].sizes[1 if args.quick else 0]) for row in ROWS
    }
    about = machine(args)
    print("\n".join(f"- {k}: {v}" for k, v in about.items()))
    cells = run_all(args)
    table = markdown(cells, titles)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(table + "\n")
    record = {"machine": about, "titles": titles, "cells": [asdict(c) for c in cells]}
    (args.out / "compare.json").write_text(json.dumps(record, indent=1) + "\n")
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure(cells, titles, args.figure)
    print(f"\nwrote {args.out / 'compare.md'}, {args.out / 'compare.json'} and {args.figure}")
    return cells


if __name__ == "__main__":
    main()
