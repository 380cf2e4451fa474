"""The MPL training loop: step-based schedule, evaluation, logging, atomic checkpoints, resume.

Determinism: the batch of step ``k`` and its augmentation depend only on ``(seed, k, rank)``
(epoch permutations and a generator seeded per step), and the checkpoint stores the global RNG
states (dropout, sampled pseudo labels). A run killed and resumed from its last checkpoint
therefore ends bit-identical on CPU to one never interrupted.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from metapl import distributed
from metapl.atomic import write_atomically
from metapl.mpl import MPL
from metapl.optim import sgd
from metapl.tracking import Tracker

__all__ = [
    "SSLData",
    "TrainConfig",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "stream_indices",
    "train",
]

# (uint8 images [B, C, H, W], generator) -> float, normalized model inputs [B, C, H, W]
Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class SSLData:
    """A semi-supervised data set: uint8 images [N, C, H, W] (stay uint8 until augmented) and
    int64 labels [N] on the training device. Images too large to hold may be any store indexed
    by an index tensor or a slice, e.g. ``metapl.data.lazy.DecodedImages``; batches are then
    moved to the device.

    ``weak`` / ``strong`` augment a uint8 batch into model inputs (the labeled batch and
    ``x_u`` get the weak view, ``x_u_strong`` the strong one); ``prepare`` turns evaluation
    images into model inputs without augmentation.
    """

    labeled_x: Tensor
    labeled_y: Tensor
    unlabeled_x: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    weak: Augment
    strong: Augment
    prepare: Callable[[Tensor], Tensor]


@dataclass
class TrainConfig:
    steps: int
    labeled_batch: int = 64
    unlabeled_ratio: int = 7  # mu: B_u = mu * B_l
    eval_every: int = 1000
    log_every: int = 50
    checkpoint_every: int = 1000
    eval_batch: int = 512
    seed: int = 0
    bf16: bool = True  # autocast on CUDA only
    channels_last: bool = False
    finetune_steps: int = 0
    finetune_batch: int = 512
    finetune_lr: float = 3e-5
    finetune_momentum: float = 0.9

    def __post_init__(self):
        for name in (
            "steps",
            "labeled_batch",
            "unlabeled_ratio",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "eval_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def stream_indices(n: int, start: int, count: int, seed: int) -> Tensor:
    """Positions ``[start, start + count)`` of an endless stream of epochs over ``range(n)``,
    each epoch a permutation seeded by ``(seed, epoch)``. [count] int64."""
    first, last = start // n, (start + count - 1) // n
    perms = [
        torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for epoch in range(first, last + 1)
    ]
    offset = start - first * n
    return torch.cat(perms)[offset : offset + count]


def _batch_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """This process's share of the global batch of ``step``."""
    world, rank = distributed.world_size(), distributed.rank()
    if batch % world:
        raise ValueError(f"batch size {batch} must be divisible by the {world} processes")
    share = batch // world
    return stream_indices(n, step * batch + rank * share, share, seed)


def _step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    rank = distributed.rank()
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 1024 + rank)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    prepare: Callable[[Tensor], Tensor],
    batch: int = 512,
    bf16: bool = True,
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 images ``x`` [N, C, H, W]."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=y.device)
    for i in range(0, len(x), batch):
        with _autocast(y.device, bf16):
            logits = model(prepare(x[i : i + batch].to(y.device, non_blocking=True)))
        correct += (logits.argmax(-1) == y[i : i + batch]).sum()
    model.train(was_training)
    return float(correct) / len(x)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` atomically: to a temporary file in the same folder, flushed to disk,
    then renamed over ``path``, so a crash never leaves a half-written checkpoint."""
    write_atomically(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def _rng_states() -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train(
    mpl: MPL,
    data: SSLData,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    tracker: Tracker | None = None,
    resume: bool = False,
) -> dict[str, float]:
    """Train ``mpl`` for ``config.steps`` steps (then finetune the student if configured) and
    return the final validation and test accuracies.

    Writes ``output_dir/checkpoint.pt`` every ``checkpoint_every`` steps and at the end;
    ``resume=True`` continues from it. Test accuracy is measured once, at the end: model
    selection, if any, uses the validation split.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = output_dir / "checkpoint.pt"
    is_main = distributed.rank() == 0
    tracker = tracker or Tracker(output_dir, enabled=is_main)
    device = data.labeled_y.device
    start = 0
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path, device)
        mpl.load_state_dict(state["mpl"])
        _set_rng_states(state["rng"])
        start = state["step"]

    n_l, n_u = len(data.labeled_x), len(data.unlabeled_x)
    b_l, b_u = config.labeled_batch, config.labeled_batch * config.unlabeled_ratio
    eval_model = mpl.ema_student if mpl.ema_student is not None else mpl.student
    tick, images = time.perf_counter(), 0
    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        disable=not is_main,
        desc="mpl",
        dynamic_ncols=True,
    )
    for step in bar:
        idx_l = _batch_indices(n_l, b_l, step, config.seed).to(device)
        idx_u = _batch_indices(n_u, b_u, step, config.seed + 1).to(device)
        generator = _step_generator(device, config.seed, step)
        x_u = _take(data.unlabeled_x, idx_u, device)
        x_l = data.weak(_take(data.labeled_x, idx_l, device), generator)
        x_uw, x_us = data.weak(x_u, generator), data.strong(x_u, generator)
        if config.channels_last:
            x_l, x_uw, x_us = (
                x.contiguous(memory_format=torch.channels_last) for x in (x_l, x_uw, x_us)
            )
        with _autocast(device, config.bf16):
            metrics = mpl.step(x_l, data.labeled_y[idx_l], x_uw, x_us, sync=False)
        images += len(idx_l) + len(idx_u)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            logged = {k: float(v) for k, v in metrics.items()}
            logged["images_per_s"] = images * distributed.world_size() / (now - tick)
            tick, images = now, 0
            tracker.log(logged, step=done)
            bar.set_postfix(t=f"{logged['teacher/loss']:.3f}", s_lr=f"{logged['student/lr']:.3g}")
        if done % config.eval_every == 0 or done == config.steps:
            tracker.log(_val_metrics(mpl, eval_model, data, config), step=done)
        if is_main and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(
                ckpt_path,
                {
                    "mpl": mpl.state_dict(),
                    "step": done,
                    "rng": _rng_states(),
                    "config": asdict(config),
                },
            )

    results = {}
    if config.finetune_steps:
        results["val/student_before_finetune"] = evaluate(
            mpl.student, data.val_x, data.val_y, data.prepare, config.eval_batch, config.bf16
        )
        batches = _finetune_batches(data, config, device)
        optimizer = sgd(config.finetune_lr, momentum=config.finetune_momentum, nesterov=True)
        with _autocast(device, config.bf16):
            mpl.finetune(batches, optimizer)
        eval_model = mpl.student
    for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
        results[f"{split}/student"] = evaluate(
            eval_model, x, y, data.prepare, config.eval_batch, config.bf16
        )
        results[f"{split}/teacher"] = evaluate(
            mpl.teacher, x, y, data.prepare, config.eval_batch, config.bf16
        )
    tracker.log(results, step=config.steps + config.finetune_steps)
    tracker.summary(results)
    return results


def _val_metrics(mpl: MPL, eval_model: nn.Module, data: SSLData, config: TrainConfig) -> dict:
    args = (data.val_x, data.val_y, data.prepare, config.eval_batch, config.bf16)
    return {"val/student": evaluate(eval_model, *args), "val/teacher": evaluate(mpl.teacher, *args)}


def _finetune_batches(data: SSLData, config: TrainConfig, device) -> Iterator[tuple]:
    """Labeled batches (weakly augmented, like the paper's finetuning) for the student."""
    n = len(data.labeled_x)
    for k in range(config.finetune_steps):
        idx = _batch_indices(n, config.finetune_batch, k, config.seed + 2).to(device)
        generator = _step_generator(device, config.seed + 2, k)
        yield data.weak(_take(data.labeled_x, idx, device), generator), data.labeled_y[idx]


def _take(images, idx: Tensor, device: torch.device) -> Tensor:
    """``images[idx]`` on ``device``, for a tensor on any device or a lazy image store."""
    if isinstance(images, Tensor):
        idx = idx.to(images.device)
    return images[idx].to(device, non_blocking=True)
