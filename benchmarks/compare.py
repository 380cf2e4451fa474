"""metapl against higher, torchopt, betty and learn2learn: the same meta-gradient per row, each
library in its own process per cell, side by side in one run.

Rows (benchmarks/_cells.py): MAML sinusoid (1 task; 25 tasks, metapl under torch.func.vmap),
MAML with a BatchNorm CNN (K=10), a Meta-Weight-Net step, a learned learning rate through
K=100 and K=400 steps, iMAML on ridge regression, one MPL step's teacher gradient, and the data
mixing of a byte-level GPT (one SGD or Adam lookahead). Each cell runs in its own interpreter
(so peak memory and imports do not leak between cells): it computes its gradient and checks it
against metapl's (the same numbers to the row's tolerance, relative L2) before timing. A row's
cells then run side by side: their processes take turns, a block of calls each, so that load
on the machine hits every library alike; then each measures the peak memory of one call above
its start (torch.profiler's CPU allocator events). Output (--out): compare.md and compare.json
(medians, fastest calls, ratios to the fastest and to the least memory of each row) and a
figure (--figure).

    python benchmarks/compare.py --threads 1                 # every row (~10 min, 2-core CPU)
    python benchmarks/compare.py --quick --rows maml-1 mpl   # the smallest sizes, some rows
    python benchmarks/compare.py --peers metapl higher       # some libraries
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
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
MIN_PEAK = 2**20  # below a MiB, peak memory ratios are not reported
ANSWER = "@answer "  # marks a cell process's answers among whatever else it prints


@dataclass
class Cell:
    """One (row, peer): its median seconds and peak bytes, or why it has none."""

    row: str
    peer: str
    median_s: float | None = None
    min_s: float | None = None
    calls: int = 0
    peak_bytes: int | None = None
    rel_err: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- inside a cell


def serve_cell(row: str, peer: str, n: int, threads: int, ref: Path) -> None:
    """A cell's process: build the cell, check its gradient against the reference's (saving
    it when this is the reference), then answer the driver's lines on stdin: ``time K`` (K
    calls, their seconds), ``memory`` (the peak bytes of one call), ``quit``. Every answer is
    one JSON line on stdout."""
    import torch
    from _cells import ROWS
    from _measure import peak_memory

    torch.set_num_threads(threads)
    spec = ROWS[row]
    run = spec.build[peer](n)
    grads = torch.cat([g.detach().flatten() for g in run()])
    rel_err = None
    if peer == REFERENCE:
        torch.save(grads, ref)
    else:
        expected = torch.load(ref)
        rel_err = float(torch.linalg.norm(grads - expected) / torch.linalg.norm(expected))
    _answer({"rel_err": rel_err})
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "time":
            _answer([_timed(run) for _ in range(int(rest[0]))])
        elif command == "memory":
            _answer(peak_memory(run, torch.device("cpu")))
        else:
            return


def _answer(value) -> None:
    print(f"\n{ANSWER}{json.dumps(value)}", flush=True)


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- the driver


class Worker:
    """One cell's process, driven line by line (its stderr goes to a file)."""

    def __init__(self, row: str, peer: str, n: int, args, ref: Path):
        command = [sys.executable, str(Path(__file__).resolve()), "--cell", row, peer, str(n)]
        command += [str(ref), "--threads", str(args.threads)]
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )

    def read(self):
        """The next JSON answer; None when the process ended without one."""
        for line in self.process.stdout:  # a library's own output may come first
            if line.startswith(ANSWER):
                return json.loads(line[len(ANSWER) :])
        return None

    def ask(self, command: str):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def last_error(self) -> str:
        """The last line of the process's stderr."""
        self.process.wait()
        self.log.seek(0)
        return _last_error(self.log.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait()
        self.log.close()


def measure_row(row: str, peers: list[str], n: int, args, tmp: Path) -> list[Cell]:
    """Start the row's cells (the reference first: the others check against its gradient),
    warm them up, time them round-robin in blocks until each has ``repeats`` calls or the
    row's ``budget`` is spent (at least ``min_repeats`` each), then measure peak memory."""
    from _cells import ROWS

    tol, ref = ROWS[row].tol, tmp / f"{row}.pt"
    cells, workers = {}, {}
    for peer in peers:
        worker = Worker(row, peer, n, args, ref)
        first = worker.read()
        cells[peer] = cell = Cell(row, peer)
        if first is None:
            cell.note = worker.last_error()
            worker.close()
        elif first["rel_err"] is not None and not first["rel_err"] <= tol:
            cell.rel_err = first["rel_err"]
            cell.note = f"gradient differs from metapl's: relative L2 {first['rel_err']:.1e}"
            worker.close()
        else:
            cell.rel_err, workers[peer] = first["rel_err"], worker
        if peer == REFERENCE and peer not in workers:
            break
    times: dict[str, list[float]] = {peer: [] for peer in workers}
    for worker in workers.values():
        worker.ask(f"time {args.warmup}")
    start = time.perf_counter()
    while any(len(ts) < args.repeats for ts in times.values()):
        for peer, worker in workers.items():
            times[peer] += worker.ask(f"time {args.block}")
        spent = time.perf_counter() - start
        if spent > args.budget and min(map(len, times.values())) >= args.min_repeats:
            break
    for peer, worker in workers.items():
        cell = cells[peer]
        cell.median_s, cell.calls = statistics.median(times[peer]), len(times[peer])
        cell.min_s = min(times[peer])
        cell.peak_bytes = worker.ask("memory")
        worker.close()
    return [cells.get(peer, Cell(row, peer, note="metapl failed")) for peer in peers]


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
            runnable = [p for p in args.peers if p in spec.build and p not in broken]
            measured = {c.peer: c for c in measure_row(row, runnable, n, args, Path(tmp))}
            for peer in args.peers:
                if peer in measured:
                    cell = measured[peer]
                elif peer in broken:
                    cell = Cell(row, peer, note=broken[peer])
                else:
                    cell = Cell(row, peer, note=spec.cannot.get(peer, "not expressed"))
                print(f"  {row} / {peer}: {_status(cell)}", file=sys.stderr, flush=True)
                cells.append(cell)
    return cells


def _status(cell: Cell) -> str:
    if cell.median_s is None:
        return cell.note
    return f"{cell.median_s * 1e3:.1f} ms, {cell.peak_bytes / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- reporting


def ratios(cells: list[Cell]) -> dict[tuple[str, str], tuple[float, float]]:
    """(row, peer) -> (time / the row's fastest, peak / the row's least), over measured cells;
    the memory ratio is NaN in rows whose least peak is under MIN_PEAK (allocator noise)."""
    out = {}
    for row in dict.fromkeys(c.row for c in cells):
        done = [c for c in cells if c.row == row and c.median_s is not None]
        if not done:
            continue
        fastest = min(c.median_s for c in done)
        least = min(c.peak_bytes for c in done)
        for c in done:
            memory = c.peak_bytes / least if least >= MIN_PEAK else math.nan
            out[(row, c.peer)] = (c.median_s / fastest, memory)
    return out


def markdown(cells: list[Cell], titles: dict[str, str]) -> str:
    r = ratios(cells)
    lines = [
        "| row | library | median ms | × fastest | min ms | peak MiB | × least | rel. diff "
        "| calls |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {c.min_s * 1e3:.1f} "
            f"| {c.peak_bytes / 2**20:.1f} | {'–' if math.isnan(m) else f'{m:.2f}'} | {err} "
            f"| {c.calls} |"
        )
    return "\n".join(lines + ["", "Not measured:", "", *notes])


def figure(cells: list[Cell], titles: dict[str, str], path: Path) -> None:
    """Two panels, one bar per library and row: time and peak memory relative to the row's
    best (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    r = ratios(cells)
    rows = [row for row in dict.fromkeys(c.row for c in cells) if any(k[0] == row for k in r)]
    peers = [p for p in dict.fromkeys(c.peer for c in cells) if any(k[1] == p for k in r)]
    size = (13, 0.55 * len(rows) * len(peers) / 3 + 2)
    fig, axes = plt.subplots(1, 2, figsize=size, sharey=True)
    height = 0.8 / len(peers)
    for panel, (ax, label) in enumerate(
        zip(axes, ("time / the row's fastest", "peak memory / the row's least"), strict=True)
    ):
        for i, peer in enumerate(peers):
            bars = [
                (j + i * height, r[(row, peer)][panel])
                for j, row in enumerate(rows)
                if (row, peer) in r and not math.isnan(r[(row, peer)][panel])
            ]
            if bars:
                ax.barh(*zip(*bars, strict=True), height=height, label=peer)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1, color="black", linewidth=0.8)
        ax.set_xlabel(f"{label} (log scale)")
    axes[0].set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
    axes[0].set_yticklabels([titles[row] for row in rows])
    axes[0].invert_yaxis()
    axes[1].set_title("memory: rows whose least peak is >= 1 MiB", fontsize="medium")
    axes[1].legend(
        *axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.01, 0.5)
    )
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
        "load average at start": _load(),
    }


def _load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def parse(argv: list[str] | None) -> argparse.Namespace:
    from _cells import ROWS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument("--quick", action="store_true", help="the smallest size of every row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=30, help="most timed calls per cell")
    parser.add_argument("--min-repeats", type=int, default=5, help="least timed calls per cell")
    parser.add_argument("--block", type=int, default=3, help="calls per cell per turn")
    parser.add_argument(
        "--budget",
        type=float,
        default=30.0,
        help="seconds of timed calls per row after which it stops (once every cell has "
        "--min-repeats calls)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell")
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE.parent / "runs" / "compare",
        help="folder for compare.md and compare.json",
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=HERE.parent / "runs" / "compare" / "compare.png",
        help="the figure (docs/benchmarks.md's: docs/img/compare.png)",
    )
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="a compare.json: write its table and figure again without measuring",
    )
    parser.add_argument(
        "--cell", nargs=4, metavar=("ROW", "PEER", "N", "REF"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if REFERENCE not in args.peers:
        parser.error(f"--peers must include {REFERENCE}: every gradient is checked against it")
    args.peers = [REFERENCE] + [p for p in args.peers if p != REFERENCE]
    return args


def measure(args) -> tuple[dict[str, str], dict[str, str], list[Cell]]:
    """The machine, the rows' titles and every cell, measured."""
    from _cells import ROWS

    size = 1 if args.quick else 0
    titles = {row: ROWS[row].title.format(n=ROWS[row].sizes[size]) for row in ROWS}
    about = machine(args)
    print("\n".join(f"- {k}: {v}" for k, v in about.items()))
    cells = run_all(args)
    about["load average at end"] = _load()
    print(f"- load average at end: {about['load average at end']}")
    return about, titles, cells


def main(argv: list[str] | None = None) -> list[Cell]:
    args = parse(argv)
    if args.cell:
        row, peer, n, ref = args.cell
        serve_cell(row, peer, int(n), args.threads, Path(ref))
        return []
    if args.replot:
        record = json.loads(args.replot.read_text())
        about, titles = record["machine"], record["titles"]
        cells = [Cell(**c) for c in record["cells"]]
    else:
        about, titles, cells = measure(args)
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
