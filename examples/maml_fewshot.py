"""MAML with the classic 4-conv BatchNorm network on few-shot tasks drawn from MNIST's classes.

A task is 5-way classification: 5 digit classes in a random order, ``shots`` labelled support
images per class and 15 query images per class. Meta-training draws its tasks from the digits
0-4 of MNIST's training images, evaluation from the digits 5-9 of its test images: classes and
images no meta-iteration saw. The network is the 4-block convolutional net of Finn et al.
(ICML 2017) for few-shot images (each block: 3x3 convolution, BatchNorm, ReLU, 2x2 max-pool;
28 -> 14 -> 7 -> 3 -> 1), then a linear layer to the 5 ways. MAML adapts it with
``inner_steps`` SGD steps on the support set and takes the exact second-order meta-gradient of
the query loss (``metapl.meta_grad``); Adam on the meta parameters.

BatchNorm is where few-shot learners differ; the two rows compare:

============  ===============================================================================
transductive  MAML's original protocol: BatchNorm normalises every batch with its own
              statistics, the query batch included (its predictions depend on the other
              query images). The running statistics are carried through the steps but unused.
running       the running statistics start at (0, 1) for every task, accumulate over the inner
              steps on the support set (a cumulative average: ``BatchNorm2d(momentum=None)``),
              are carried through the steps as ``meta_grad(..., state=)`` and normalise the
              query images in eval mode: each query image is classified on its own.
============  ===============================================================================

    make mnist                                   # the data, once
    python examples/maml_fewshot.py              # both rows, 1-shot
    python examples/maml_fewshot.py --shots 5 --rows running --iterations 500 --json
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

import metapl
from metapl import optim
from metapl.data import load_mnist
from metapl.training.cli import fail, parse

Row = Literal["transductive", "running"]
ROWS: tuple[Row, ...] = get_args(Row)
TRAIN_CLASSES, TEST_CLASSES = range(0, 5), range(5, 10)


@dataclass(frozen=True)
class Config:
    shots: int = 1  # labelled support images per class
    ways: int = 5  # classes per task
    query: int = 15  # query images per class
    filters: int = 32  # channels of every convolution
    inner_lr: float = 0.1  # SGD step of the inner loop
    inner_steps: int = 5  # inner SGD steps in meta-training
    test_steps: int = 10  # inner SGD steps at evaluation
    meta_lr: float = 1e-3  # Adam learning rate on the meta parameters
    meta_batch: int = 4  # tasks per meta-iteration
    iterations: int = 1000  # meta-iterations
    test_tasks: int = 600  # held-out tasks (digits 5-9 of the test images)
    seed: int = 0  # initialisation and task stream

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "seed" and not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)}")
        if self.ways > 5:
            raise ValueError(f"ways must be <= 5 (each split has 5 digit classes), got {self.ways}")


@dataclass(frozen=True)
class Experiment:
    config: Config = field(default_factory=Config)
    rows: tuple[Row, ...] = ROWS
    data_dir: Path = Path("data/mnist")  # MNIST's IDX files (make mnist)
    output_dir: Path = Path("runs/maml_fewshot")  # results.json goes here
    json: bool = False  # print only the JSON results


def conv4(filters: int, ways: int) -> nn.Module:
    """Four blocks of 3x3 convolution, BatchNorm (cumulative running statistics), ReLU and
    2x2 max-pool, then a linear layer: 28x28 images to ``ways`` logits."""
    blocks, channels = [], 1
    for _ in range(4):
        blocks += [
            nn.Conv2d(channels, filters, 3, padding=1),
            nn.BatchNorm2d(filters, momentum=None),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = filters
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(filters, ways))


def class_pools(data_dir: Path) -> tuple[list[Tensor], list[Tensor]]:
    """Images by class, scaled to [0, 1]: digits 0-4 of the training images (meta-training),
    digits 5-9 of the test images (evaluation)."""
    pools = []
    for train_split, classes in ((True, TRAIN_CLASSES), (False, TEST_CLASSES)):
        images, labels = load_mnist(data_dir, train=train_split, dtype=torch.float32)
        pools.append([images[labels == c] for c in classes])
    return pools[0], pools[1]


def sample_task(pool: list[Tensor], cfg: Config, gen: torch.Generator) -> tuple[Tensor, ...]:
    """``(x_support [ways * shots, 1, 28, 28], y_support, x_query [ways * query, ...],
    y_query)``: ``ways`` classes of the pool in a random order, labelled 0..ways-1."""
    classes = torch.randperm(len(pool), generator=gen)[: cfg.ways]
    xs, ys, xq, yq = [], [], [], []
    for label, c in enumerate(classes.tolist()):
        pick = torch.randperm(len(pool[c]), generator=gen)[: cfg.shots + cfg.query]
        xs.append(pool[c][pick[: cfg.shots]])
        xq.append(pool[c][pick[cfg.shots :]])
        ys.append(torch.full((cfg.shots,), label))
        yq.append(torch.full((cfg.query,), label))
    return torch.cat(xs), torch.cat(ys), torch.cat(xq), torch.cat(yq)


class Learner:
    """The network run functionally: ``train`` (batch statistics, running ones updated) and
    ``evaluation`` (running statistics) are two copies of one architecture; parameters and
    statistics come from the caller."""

    def __init__(self, cfg: Config, row: str):
        torch.manual_seed(cfg.seed)
        self.train = conv4(cfg.filters, cfg.ways).train()
        self.evaluation = copy.deepcopy(self.train).eval()
        self.cfg, self.row = cfg, row

    def init(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The meta parameters and the statistics every task starts from."""
        return (
            {k: v.detach() for k, v in self.train.named_parameters()},
            {k: v.detach().clone() for k, v in self.train.named_buffers()},
        )

    def support_loss(self, x: Tensor, y: Tensor):
        def loss(s, m, stats):  # BatchNorm updates the copy of the statistics it is given
            return F.cross_entropy(functional_call(self.train, {**s, **stats}, (x,)), y), stats

        return loss

    def logits(self, s, stats, x: Tensor) -> Tensor:
        net = self.train if self.row == "transductive" else self.evaluation
        return functional_call(net, {**s, **stats}, (x,))

    def meta_grad(self, meta, stats, task) -> metapl.MetaGradResult:
        x_s, y_s, x_q, y_q = task
        return metapl.meta_grad(
            self.support_loss(x_s, y_s),
            lambda s, stats_: F.cross_entropy(self.logits(s, stats_, x_q), y_q),
            lambda m: m,
            meta,
            optim.sgd(self.cfg.inner_lr),
            steps=self.cfg.inner_steps,
            state=stats,
        )

    def accuracy_after_adaptation(self, meta, stats, task) -> float:
        """Query accuracy after ``test_steps`` SGD steps on the support set."""
        x_s, y_s, x_q, y_q = task
        loss, opt = self.support_loss(x_s, y_s), optim.sgd(self.cfg.inner_lr)
        s, opt_state = meta, opt.init(meta)
        for _ in range(self.cfg.test_steps):
            g, stats = torch.func.grad(loss, has_aux=True)(s, meta, stats)
            s, opt_state = opt.step(s, g, opt_state)
        with torch.no_grad():
            return (self.logits(s, stats, x_q).argmax(-1) == y_q).float().mean().item()


def train(learner: Learner, pool: list[Tensor], bar: tqdm | None = None):
    cfg = learner.cfg
    meta, stats = learner.init()
    meta_opt = optim.adam(cfg.meta_lr)
    opt_state = meta_opt.init(meta)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.iterations):
        results = [
            learner.meta_grad(meta, stats, sample_task(pool, cfg, gen))
            for _ in range(cfg.meta_batch)
        ]
        grads = {k: torch.stack([r.meta_grads[k] for r in results]).mean(0) for k in meta}
        meta, opt_state = meta_opt.step(meta, grads, opt_state)
        if bar is not None:
            loss = sum(r.outer_loss.item() for r in results) / len(results)
            bar.set_postfix(query_loss=f"{loss:.3f}", refresh=False)
            bar.update()
    return meta, stats


def evaluate(learner: Learner, meta, stats, pool: list[Tensor]) -> tuple[float, float]:
    """Mean query accuracy (%) over held-out tasks and the half-width of its 95% interval."""
    cfg = learner.cfg
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    acc = torch.tensor(
        [
            learner.accuracy_after_adaptation(meta, stats, sample_task(pool, cfg, gen))
            for _ in range(cfg.test_tasks)
        ]
    )
    return 100 * acc.mean().item(), 100 * 1.96 * acc.std().item() / math.sqrt(len(acc))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(Experiment, argv, description=__doc__.splitlines()[0])
    cfg = args.config
    try:
        train_pool, test_pool = class_pools(args.data_dir)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    torch.set_num_threads(2)
    results: dict[str, Any] = {"config": asdict(cfg), "rows": {}}
    with tqdm(total=len(args.rows) * cfg.iterations, file=sys.stderr, disable=None) as bar:
        for row in args.rows:
            bar.set_description(row)
            start = time.perf_counter()
            learner = Learner(cfg, row)
            meta, stats = train(learner, train_pool, bar)
            mean, half = evaluate(learner, meta, stats, test_pool)
            results["rows"][row] = {
                "accuracy": mean,
                "ci95": half,
                "seconds": round(time.perf_counter() - start, 1),
            }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps(results))
    else:
        print(
            f"\n{cfg.ways}-way {cfg.shots}-shot MNIST (train digits 0-4, test digits 5-9), "
            f"{cfg.iterations} meta-iterations, seed {cfg.seed}; query accuracy after "
            f"{cfg.test_steps} steps on {cfg.test_tasks} test tasks\n"
        )
        print("| row | accuracy (%) | time |\n|---|---|---|")
        for row, r in results["rows"].items():
            print(f"| {row} | {r['accuracy']:.1f} ± {r['ci95']:.1f} | {r['seconds']:.0f} s |")
    return results


if __name__ == "__main__":
    main()
