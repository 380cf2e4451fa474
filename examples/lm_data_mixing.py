"""Learned data mixing for a small byte-level GPT, by lookahead meta-gradients, with metapl.

The training data is a mixture of five text sources built offline from the Python standard
library's own source files (``sysconfig.get_paths()["stdlib"]``, read as bytes):

==============  ==============================================================================
code            the source of the training files, as is
docstrings      their docstrings (extracted with ``ast``), one after another
shuffled        the code's bytes in a random order (its byte frequencies, no structure)
repeated        every line of the code repeated ``repeat`` times in a row
random          uniformly random bytes
==============  ==============================================================================

The clean target is the source of *other* files (a deterministic split by a hash of the file
name): the ``target`` files give the meta-gradient's outer loss, the ``test`` files, seen by
nothing, the reported loss. The meta parameters are per-source mixing logits ``w``: the
student (``metapl.models.GPT``) trains on ``sum_s softmax(w)_s * loss_s``, the next-byte loss
of a batch holding ``per_source`` windows of every source. Each iteration takes
``metapl.meta_grad`` of the target loss after a lookahead of K steps of the student's own
optimizer (Adam) on that mixture, updates ``w`` with Adam, then takes one real student step on
the mixture with the new weights. Rows, each over ``seeds``:

==============  ==============================================================================
uniform         fixed equal weights (1/5 each)
learned         weights learned online, starting equal
oracle          the clean sources only (code and docstrings, 1/2 each)
==============  ==============================================================================

Every row of a seed starts from the same student and takes its steps on the same batches.
Reported: the test files' next-byte loss (nats per byte; bits = nats / ln 2), mean ± std over
seeds, its paired difference to the uniform row, and the peak memory of one meta-step with
each ``curvature`` (second-order products by double backward or by forward-over-reverse). The
stdlib differs between Python versions, and so do the sources.

Results and reading: docs/examples_meta.md (learned data mixing).

    python examples/lm_data_mixing.py                      # 3 seeds, table + figure
    python examples/lm_data_mixing.py --lookahead 3        # 3-step lookahead
    python examples/lm_data_mixing.py --preset smoke       # seconds
    python examples/lm_data_mixing.py --help               # every field is a flag
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.models import GPT, next_byte_loss
from metapl.training.bounds import check_bounds
from metapl.training.cli import fail, parse

Params = dict[str, Tensor]
Curvature = Literal["reverse", "forward"]
CURVATURES: tuple[Curvature, ...] = get_args(Curvature)
SOURCES = ("code", "docstrings", "shuffled", "repeated", "random")
CLEAN = ("code", "docstrings")
Row = Literal["uniform", "learned", "oracle"]
ROWS: tuple[Row, ...] = get_args(Row)

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    context: int = 64  # bytes per window (the GPT's context)
    layers: int = 2  # GPT blocks
    width: int = 64  # GPT embedding width
    heads: int = 4  # attention heads
    iters: int = 300  # iterations: one meta-step (learned row) and one student step each
    per_source: int = 8  # windows of every source in an inner batch
    target_batch: int = 32  # target windows in the outer loss
    lr: float = 3e-3  # the student's Adam, decaying to lr / 10 (half a cosine)
    meta_lr: float = 0.05  # Adam on the mixing logits
    lookahead: int = 1  # K: student steps the meta-gradient looks through
    curvature: Curvature = "reverse"  # second-order products: double backward or jvp of grad
    eval_every: int = 25  # iterations between test-loss evaluations
    test_windows: int = 256  # windows of the test files scored at every evaluation
    max_bytes: int = 400_000  # bytes read for the training files (whole files, sorted order)
    repeat: int = 4  # times the repeated source repeats each line

    def __post_init__(self):
        check_bounds(
            self,
            {
                "context": ">= 2",
                "layers": ">= 1",
                "width": ">= 1",
                "heads": ">= 1",
                "iters": ">= 1",
                "per_source": ">= 1",
                "target_batch": ">= 1",
                "lr": "> 0",
                "meta_lr": "> 0",
                "lookahead": ">= 1",
                "eval_every": ">= 1",
                "test_windows": ">= 1",
                "max_bytes": ">= 10000",
                "repeat": ">= 2",
            },
        )
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")


@dataclass(frozen=True)
class Experiment:
    config: Config = field(default_factory=Config)
    seeds: tuple[int, ...] = (0, 1, 2)  # model init and batch order of every row
    rows: tuple[Row, ...] = ROWS  # rows to run, in this order
    memory: tuple[Curvature, ...] = CURVATURES  # meta-steps measured per curvature (none: skip)
    output_dir: Path = Path("runs/lm_data_mixing")  # results.json and the figure
    json: bool = False  # print only the JSON summary

    def __post_init__(self):
        if not self.seeds or not self.rows:
            raise ValueError("--seeds and --rows must not be empty")


PRESETS = {
    "default": Experiment(),
    "smoke": Experiment(
        config=Config(
            context=32,
            layers=1,
            width=32,
            iters=20,
            per_source=4,
            target_batch=8,
            meta_lr=0.2,
            eval_every=10,
            test_windows=32,
            max_bytes=20_000,
        ),
        seeds=(0,),
    ),
}

# ----------------------------------------------------------------------------- data


class Corpus(NamedTuple):
    sources: dict[str, Tensor]  # SOURCES -> [n] uint8 byte streams
    target: Tensor  # [n] uint8: the target files (the outer loss)
    test: Tensor  # [n] uint8: the test files (the reported loss)
    files: dict[str, list[str]]  # "train" / "target" / "test" -> the file names read


def split_of(name: str) -> Literal["train", "target", "test"]:
    """A file's split by the CRC-32 of its name: 1/8 test, 1/8 target, the rest training (the
    same on every run and machine)."""
    bucket = zlib.crc32(name.encode()) % 8
    return "test" if bucket == 0 else "target" if bucket == 1 else "train"


def read_files(paths: list[Path], max_bytes: int) -> list[tuple[str, bytes]]:
    """Whole files in the given order until ``max_bytes`` are read (the last may pass it)."""
    out, total = [], 0
    for path in paths:
        if total >= max_bytes:
            break
        data = path.read_bytes()
        out.append((path.name, data))
        total += len(data)
    return out


def docstrings(source: bytes) -> bytes:
    """The module's, classes' and functions' docstrings, blank-line separated."""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [ast.get_docstring(n) for n in ast.walk(ast.parse(source)) if isinstance(n, nodes)]
    return "\n\n".join(d for d in found if d).encode() + b"\n\n"


def as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def make_sources(files: list[tuple[str, bytes]], repeat: int) -> dict[str, Tensor]:
    """The five training sources (``SOURCES``) from the training files; the corruptions are
    drawn from a fixed generator, the same for every seed."""
    code = b"".join(data for _, data in files)
    gen = torch.Generator().manual_seed(0)
    code_t = as_tensor(code)
    lines = code.splitlines(keepends=True)
    return {
        "code": code_t,
        "docstrings": as_tensor(b"".join(docstrings(data) for _, data in files)),
        "shuffled": code_t[torch.randperm(len(code_t), generator=gen)],
        "repeated": as_tensor(b"".join(line * repeat for line in lines)),
        "random": torch.randint(256, (len(code_t),), generator=gen, dtype=torch.uint8),
    }


def load_corpus(cfg: Config) -> Corpus:
    """The training sources and the target and test byte streams from the standard library's
    top-level ``*.py`` files (sorted by name; ``max_bytes`` of training files, a quarter of
    that of target and of test files). ValueError if a stream is shorter than the context."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    by_split = {s: [p for p in paths if split_of(p.name) == s] for s in ("train", "target", "test")}
    train = read_files(by_split["train"], cfg.max_bytes)
    target = read_files(by_split["target"], cfg.max_bytes // 4)
    test = read_files(by_split["test"], cfg.max_bytes // 4)
    corpus = Corpus(
        make_sources(train, cfg.repeat),
        as_tensor(b"".join(data for _, data in target)),
        as_tensor(b"".join(data for _, data in test)),
        {
            s: [name for name, _ in f]
            for s, f in (("train", train), ("target", target), ("test", test))
        },
    )
    streams = {**corpus.sources, "target": corpus.target, "test": corpus.test}
    for name, stream in streams.items():
        if len(stream) < cfg.context:
            raise ValueError(
                f"the {name} bytes ({len(stream)}) are shorter than the context ({cfg.context}): "
                f"raise --max-bytes (the standard library at {sysconfig.get_paths()['stdlib']})"
            )
    return corpus


def windows(data: Tensor, n: int, length: int, gen: torch.Generator) -> Tensor:
    """``n`` random windows of the byte stream ``data`` [N]: [n, length] int64."""
    starts = torch.randint(len(data) - length + 1, (n,), generator=gen)
    return data[starts[:, None] + torch.arange(length)].long()


def mixture_batch(corpus: Corpus, cfg: Config, gen: torch.Generator) -> Tensor:
    """``per_source`` windows of every source in ``SOURCES`` order: [S * per_source, T]."""
    return torch.cat(
        [windows(s, cfg.per_source, cfg.context, gen) for s in corpus.sources.values()]
    )


def generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The student's batches (the same in every row of a seed) and the meta-step's own draws
    (the target windows, the lookahead's batches after the first)."""
    states = np.random.SeedSequence(seed).generate_state(2)
    return tuple(torch.Generator().manual_seed(int(s)) for s in states)


# ----------------------------------------------------------------------------- losses


def source_losses(net: GPT, params: Params, batch: Tensor) -> Tensor:
    """Mean next-byte loss of each source: batch [S * per_source, T] -> [S]."""
    losses = next_byte_loss(functional_call(net, params, (batch,)), batch)
    return losses.view(len(SOURCES), -1).mean(1)


def mixture_loss(net: GPT, params: Params, weights: Tensor, batch: Tensor) -> Tensor:
    """``sum_s weights[s] * loss_s``: weights [S], batch [S * per_source, T] -> 0-d."""
    return (weights * source_losses(net, params, batch)).sum()


def target_loss(net: GPT, params: Params, batch: Tensor) -> Tensor:
    """Mean next-byte loss (nats per byte) of batch [B, T] -> 0-d."""
    return next_byte_loss(functional_call(net, params, (batch,)), batch).mean()


def fixed_weights(row: Row) -> Tensor:
    """The weights of a row that does not learn them (uniform, oracle): [S]."""
    if row == "oracle":
        clean = torch.tensor([float(s in CLEAN) for s in SOURCES])
        return clean / clean.sum()
    return torch.full((len(SOURCES),), 1.0 / len(SOURCES))


# ----------------------------------------------------------------------------- meta-gradient


def lookahead(
    net: GPT,
    student: Params,
    opt_state: dict,
    logits: Tensor,
    optimizer: optim.Optimizer,
    batches: Tensor,
    target: Tensor,
    curvature: Curvature = "reverse",
) -> metapl.MetaGradResult:
    """d target_loss(s_K) / d logits: K steps of ``optimizer`` from ``(student, opt_state)``
    on the mixture ``softmax(logits)`` [S], step k on ``batches[k]`` ([K, S * per, T]);
    ``target`` [B, T] is the outer batch."""

    def inner(s: Params, m: Params, batch: Tensor) -> Tensor:
        return mixture_loss(net, s, torch.softmax(m["logits"], 0), batch)

    def outer(s: Params) -> Tensor:
        return target_loss(net, s, target)

    return metapl.meta_grad(
        inner,
        outer,
        student,
        {"logits": logits},
        optimizer,
        opt_state,
        steps=len(batches),
        method=metapl.Exact(curvature=curvature),
        inner_batches=batches,
    )


# ----------------------------------------------------------------------------- training


class Run(NamedTuple):
    test_loss: float  # nats per byte after the last iteration
    curve: list[tuple[int, float]]  # (iteration, test loss)
    weights: list[list[float]]  # the mixing weights before every iteration and after the last
    seconds: float


def student_optimizer(cfg: Config) -> optim.Optimizer:
    """Adam, its learning rate decaying from ``lr`` to ``lr / 10`` (half a cosine)."""
    return optim.adam(optim.warmup_cosine(cfg.lr, cfg.iters, min_lr=cfg.lr / 10))


def make_student(cfg: Config, seed: int) -> tuple[GPT, Params]:
    torch.manual_seed(seed)
    net = GPT(cfg.context, cfg.layers, cfg.width, cfg.heads)
    return net, {k: v.detach() for k, v in net.named_parameters()}


@torch.no_grad()
def evaluate(net: GPT, params: Params, test: Tensor) -> float:
    """Mean next-byte loss (nats per byte) of the test windows [N, T]."""
    losses = [next_byte_loss(functional_call(net, params, (b,)), b) for b in test.split(64)]
    return float(torch.cat(losses).mean())


def train(
    row: Row, cfg: Config, corpus: Corpus, test: Tensor, seed: int, bar: tqdm | None = None
) -> Run:
    """One row, one seed: ``iters`` student steps on the mixture; the ``learned`` row first
    moves the mixing logits by one meta-step whose lookahead starts with the same batch.
    Every row of a seed starts from the same student and sees the same batches."""
    net, student = make_student(cfg, seed)
    opt = student_optimizer(cfg)
    opt_state = opt.init(student)
    meta = {"logits": torch.zeros(len(SOURCES))}
    meta_opt = optim.adam(cfg.meta_lr)
    meta_state = meta_opt.init(meta)
    weights = torch.softmax(meta["logits"], 0) if row == "learned" else fixed_weights(row)
    loss_grad = grad(lambda p, w, b: mixture_loss(net, p, w, b))
    gen, meta_gen = generators(seed)
    curve, trajectory = [(0, evaluate(net, student, test))], [weights.tolist()]
    start = time.perf_counter()
    for i in range(1, cfg.iters + 1):
        batch = mixture_batch(corpus, cfg, gen)
        if row == "learned":
            later = [mixture_batch(corpus, cfg, meta_gen) for _ in range(cfg.lookahead - 1)]
            batches = torch.stack([batch, *later])
            target = windows(corpus.target, cfg.target_batch, cfg.context, meta_gen)
            res = lookahead(
                net, student, opt_state, meta["logits"], opt, batches, target, cfg.curvature
            )
            meta, meta_state = meta_opt.step(meta, res.meta_grads, meta_state)
            weights = torch.softmax(meta["logits"], 0)
        student, opt_state = opt.step(student, loss_grad(student, weights, batch), opt_state)
        trajectory.append(weights.tolist())
        if i % cfg.eval_every == 0 or i == cfg.iters:
            curve.append((i, evaluate(net, student, test)))
        if bar is not None:
            bar.update()
    return Run(curve[-1][1], curve, trajectory, time.perf_counter() - start)


# ----------------------------------------------------------------------------- memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start / stop lines (written straight to descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_cpu_memory(fn: Callable[[], object]) -> int:
    """Bytes allocated on the CPU above what was allocated before ``fn()``, at its peak: the
    allocator's events as torch.profiler records them, replayed in time order (the method of
    benchmarks/meta_step.py)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as p:
        fn()
    events = [
        e
        for e in p.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def measure_meta_step(cfg: Config, corpus: Corpus, curvature: Curvature) -> dict[str, float]:
    """Peak memory (MiB) and seconds (median of 3, after one warm-up) of one meta-step of the
    learned row from a fresh student (seed 0) with ``curvature``."""
    net, student = make_student(cfg, 0)
    opt = student_optimizer(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = torch.stack([mixture_batch(corpus, cfg, gen) for _ in range(cfg.lookahead)])
    target = windows(corpus.target, cfg.target_batch, cfg.context, gen)
    logits = torch.zeros(len(SOURCES))

    def step() -> metapl.MetaGradResult:
        return lookahead(net, student, opt.init(student), logits, opt, batches, target, curvature)

    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak_cpu_memory(step) / 2**20, "seconds": statistics.median(times)}


# ----------------------------------------------------------------------------- figure


def plot(runs: dict[str, list[Run]], path: Path) -> None:
    """Left: the test loss against the iteration from the first evaluation after the start
    (the start, ln 256 = 5.55, would flatten the rest), per row (mean over seeds; thin: each
    seed). Right: the learned row's mixing weights over the iterations, one line per source (mean
    over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"uniform": "tab:gray", "learned": "tab:blue", "oracle": "tab:green"}
    for row, row_runs in runs.items():
        steps = [i for i, _ in row_runs[0].curve[1:]]
        losses = np.array([[loss for _, loss in r.curve[1:]] for r in row_runs])
        for seed_losses in losses:
            left.plot(steps, seed_losses, color=colors[row], lw=0.6, alpha=0.4)
        left.plot(steps, losses.mean(0), color=colors[row], label=row)
    left.set_xlabel("iteration")
    left.set_ylabel("test loss (nats / byte)")
    left.legend()
    if "learned" in runs:
        weights = np.mean([r.weights for r in runs["learned"]], axis=0)  # [iters + 1, S]
        for s, source in enumerate(SOURCES):
            right.plot(weights[:, s], label=source)
        right.legend(fontsize=8)
    right.set_xlabel("iteration")
    right.set_ylabel("learned mixing weight")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run], uniform: list[Run] | None) -> dict:
    """A row's final test losses, their paired differences to the uniform row's (same seeds,
    same batches; None without that row), weights, curves and time."""
    losses = [r.test_loss for r in runs]
    mean, std = mean_std(losses)
    return {
        "mean": mean,
        "std": std,
        "runs": losses,
        "minus_uniform": None
        if uniform is None
        else [a - b.test_loss for a, b in zip(losses, uniform, strict=True)],
        "final_weights": np.mean([r.weights[-1] for r in runs], axis=0).tolist(),
        "curves": [r.curve for r in runs],
        "weights": [r.weights for r in runs],
        "seconds_per_run": statistics.mean(r.seconds for r in runs),
    }


def print_tables(exp: Experiment, rows: dict, memory: dict, files: dict, seconds: float) -> None:
    cfg = exp.config
    print(
        f"\nGPT {cfg.layers} layers x {cfg.width} wide, context {cfg.context}, {cfg.iters} "
        f"iterations, batch {cfg.per_source} windows x {len(SOURCES)} sources, lookahead "
        f"K={cfg.lookahead} ({cfg.curvature}), seeds {list(exp.seeds)}, {seconds:.0f} s; "
        f"{len(files['train'])} training / {len(files['target'])} target / "
        f"{len(files['test'])} test files. Test loss after the last iteration.\n"
    )
    names = " / ".join(SOURCES)
    print(
        f"| row | nats / byte | bits / byte | per seed | minus uniform (paired) "
        f"| weights: {names} | s / run |"
    )
    print("|---|---|---|---|---|---|---|")
    for row, r in rows.items():
        per_seed = " ".join(f"{v:.3f}" for v in r["runs"])
        paired = ""
        if r["minus_uniform"] is not None and row != "uniform":
            paired = "{:+.3f} ± {:.3f}".format(*mean_std(r["minus_uniform"]))
        weights = " / ".join(f"{w:.2f}" for w in r["final_weights"])
        print(
            f"| {row} | {r['mean']:.3f} ± {r['std']:.3f} | {r['mean'] / math.log(2):.3f} "
            f"| {per_seed} | {paired} | {weights} | {r['seconds_per_run']:.0f} |"
        )
    if not memory:
        return
    print(f"\nOne meta-step (K={cfg.lookahead}), fresh student, CPU:\n")
    print("| curvature | peak MiB | s / meta-step |")
    print("|---|---|---|")
    for curvature, m in memory.items():
        print(f"| {curvature} | {m['peak_mib']:.1f} | {m['seconds']:.3f} |")


def main(argv: list[str] | None = None) -> dict:
    exp = parse(Experiment, argv, presets=PRESETS, description=__doc__.splitlines()[0])
    cfg = exp.config
    torch.set_num_threads(1)  # small matmuls: threads cost more than they give

    try:
        corpus = load_corpus(cfg)
    except ValueError as e:
        fail(str(e))
    test = windows(corpus.test, cfg.test_windows, cfg.context, torch.Generator().manual_seed(0))
    runs: dict[str, list[Run]] = {}
    start = time.perf_counter()
    with tqdm(
        total=len(exp.rows) * len(exp.seeds) * cfg.iters, file=sys.stderr, disable=None
    ) as bar:
        for row in exp.rows:
            runs[row] = []
            for seed in exp.seeds:
                bar.set_description(f"{row} seed {seed}")
                runs[row].append(train(row, cfg, corpus, test, seed, bar))
    seconds = time.perf_counter() - start
    memory = {c: measure_meta_step(cfg, corpus, c) for c in exp.memory}

    exp.output_dir.mkdir(parents=True, exist_ok=True)
    figure = exp.output_dir / "lm_data_mixing.png"
    plot(runs, figure)
    rows = {row: summarize(r, runs.get("uniform")) for row, r in runs.items()}
    summary = {
        "config": asdict(cfg),
        "seeds": list(exp.seeds),
        "sources": list(SOURCES),
        "files": corpus.files,
        "rows": rows,
        "memory": memory,
        "seconds": seconds,
        "figure": str(figure),
    }
    (exp.output_dir / "results.json").write_text(json.dumps(summary, indent=1))
    if exp.json:
        print(json.dumps(summary))
    else:
        print_tables(exp, rows, memory, corpus.files, seconds)
        print(f"\nfigure: {figure}; results: {exp.output_dir / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
