"""The MPL training loop: step-based schedule, evaluation, logging, atomic checkpoints, resume.

Determinism: everything random in step ``k`` depends only on ``(seed, k, rank)``: the batch
(epoch permutations), its augmentation (a generator seeded per step) and the global RNGs
(dropout masks, sampled pseudo labels), which are reseeded at every step. Processes therefore
draw different masks and noise for their shards, and a run killed and resumed from its last
checkpoint ends bit-identical on CPU to one never interrupted.

Nothing good is lost: checkpoints are written atomically, the one before the latest is kept as
``checkpoint.prev.pt``, and a loss that is not finite or explodes, or a parameter that is not
finite, stops the run (``DivergenceError``, metapl.training.guard) before it can overwrite a
good checkpoint. The final models are written to ``final.pt`` with their evaluation
(``results.json``). File names: ``metapl.training.rundir``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from metapl import distributed
from metapl.atomic import write_atomically
from metapl.finetune import finetune
from metapl.mpl import MPL
from metapl.optim import sgd
from metapl.training.guard import DivergenceError, DivergenceGuard, check_parameters, kept
from metapl.training.progress import Progress
from metapl.training.rundir import (
    BEST,
    CHECKPOINT,
    FINAL,
    PREVIOUS,
    RESULTS,
    RESUMABLE,
    RunError,
    check_config,
    remove_temporaries,
)
from metapl.training.signals import StopRequests
from metapl.training.tracking import Tracker

__all__ = [
    "DivergenceError",
    "SSLData",
    "Stopped",
    "TrainConfig",
    "evaluate",
    "finetune_only",
    "load_checkpoint",
    "save_checkpoint",
    "stream_indices",
    "train",
]


class Stopped(RunError):
    """A stop signal (SIGTERM, SIGINT, SIGUSR1) ended training at a step boundary, after a
    checkpoint of that step; ``resume=True`` continues from it."""


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
    # a loss above this many times the median size of its last 100 values (at least 1) stops
    # the run, as NaN and infinity do (metapl.training.guard); math.inf: finiteness only
    explosion_factor: float = 1e3
    # The last phase: the final student trained on the labeled data alone (SGD with Nesterov
    # momentum; dropout off, as the PyTorch port does; "strong" augments like the port's
    # finetuning, "weak" with the labeled batches' view).
    finetune_steps: int = 0
    finetune_batch: int = 512
    finetune_lr: float = 3e-5
    finetune_momentum: float = 0.9
    finetune_weight_decay: float = 0.0
    finetune_label_smoothing: float = 0.0
    finetune_augment: str = "weak"

    @classmethod
    def take(cls, *sources: object, **values) -> TrainConfig:
        """The fields in ``values``, the others from the first of ``sources`` (dataclasses of
        a run's settings, e.g. a recipe) that has an attribute of the same name."""
        for f in fields(cls):
            if f.name not in values:
                found = [getattr(s, f.name) for s in sources if hasattr(s, f.name)]
                if found:
                    values[f.name] = found[0]
        return cls(**values)

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
        if not self.explosion_factor > 1:
            raise ValueError(
                f"explosion_factor must be > 1 (math.inf: off), got {self.explosion_factor}"
            )
        if self.finetune_augment not in ("weak", "strong"):
            raise ValueError(
                f"finetune_augment must be 'weak' or 'strong', got {self.finetune_augment!r}"
            )


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


def save_checkpoint(path: str | os.PathLike, state: dict, keep_previous: bool = False) -> None:
    """Write ``state`` atomically: to a temporary file in the same folder, flushed to disk,
    then renamed over ``path``, so a crash never leaves a half-written checkpoint.

    ``keep_previous``: first keep the file being replaced as ``<stem>.prev<suffix>`` next to it
    (``checkpoint.prev.pt``), so a checkpoint that turns out bad never costs the one before."""
    path = Path(path)
    if keep_previous and path.exists():
        _copy_atomically(path, _previous(path))
    write_atomically(path, lambda f: torch.save(state, f), binary=True)


def _write(path: Path, state: dict, saved_step: int | None, keep_previous: bool = False) -> None:
    """``save_checkpoint``, or a RunError naming the file when the disk refuses it (full,
    read-only): the file it would have replaced is left as it was."""
    try:
        save_checkpoint(path, state, keep_previous)
    except OSError as e:
        raise RunError(
            f"cannot write {path}: {e.strerror or e}; {kept(path, saved_step)}. Free space or "
            "make the folder writable, then resume"
        ) from None


def _write_best(
    output_dir: Path,
    name: str,
    model: nn.Module,
    best: tuple[float, int],
    about: dict | None,
    saved: int | None,
) -> None:
    """``best.pt``: the evaluated student at its best validation accuracy so far, in the
    layout of ``final.pt`` (``"final"``, ``"about"``) with its step and accuracy."""
    state = {"final": model.state_dict(), "model": name, "val": best[0], "step": best[1]}
    _write(output_dir / BEST, {**state, **({"about": about} if about else {})}, saved)


def _previous(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _copy_atomically(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` in one rename: a hard link where the file system has
    them (no bytes copied), a copy otherwise."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already a link to it (a run killed while writing a checkpoint)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # rename() leaves it when both names were one file


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint, its tensors on ``device``. A file that cannot be read (missing, empty,
    truncated, not a checkpoint) raises RunError naming it."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=torch.device(device), weights_only=False)
    except Exception as e:  # torch raises many types for a damaged zip or pickle
        raise RunError(
            f"cannot read checkpoint {path} ({_first_line(e)}): the file is empty, truncated or "
            f"not a checkpoint{_previous_hint(path)}"
        ) from None
    if not isinstance(state, dict):
        raise RunError(f"{path} is not a checkpoint: it holds a {type(state).__name__}")
    return state


def _previous_hint(path: Path) -> str:
    if path.name == CHECKPOINT and (path.parent / PREVIOUS).exists():
        return (
            f"; the checkpoint before it is {path.parent / PREVIOUS}: move that to {path} to "
            "resume from it"
        )
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _seed_globals(seed: int, step: int, phase: int = 0) -> None:
    """Seed torch's (CPU and CUDA), numpy's and Python's global RNGs for ``step`` of ``phase``
    (0: MPL, 1: finetuning) on this process, from ``(seed, step, rank)`` alone."""
    key = np.random.SeedSequence([seed, step, phase, distributed.rank()]).generate_state(2)
    torch.manual_seed(int(key[0]) << 32 | int(key[1]))
    np.random.seed(int(key[0]))
    random.seed(int(key[1]))


def train(
    mpl: MPL,
    data: SSLData,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    tracker: Tracker | None = None,
    resume: bool = False,
    about: dict | None = None,
) -> dict[str, float]:
    """Train ``mpl`` for ``config.steps`` steps, finetune the final student if configured,
    and return the final validation and test accuracies. ``about``: what a user of
    ``final.pt`` needs besides the weights (its model, classes, input size and
    normalization: ``metapl.training.predict``), stored there as ``"about"``.

    Writes ``output_dir/checkpoint.pt`` every ``checkpoint_every`` steps and at the end (the
    one before kept as ``checkpoint.prev.pt``), then the final models with their accuracies
    (``final.pt``, ``results.json``), and at every evaluation that improves the student's
    validation accuracy that student (``best.pt``). The final student is the EMA student (the
    raw student without EMA), finetuned on the labeled data when ``finetune_steps > 0``, as the
    PyTorch port of the paper does. Test accuracy is measured once, at the end: model
    selection, if any, uses the validation split.

    ``resume=True`` continues from ``checkpoint.pt`` when there is one (else starts at step 0),
    after checking that it can be read and fits ``mpl`` and ``config``; without it an existing
    checkpoint is never overwritten. Either refusal raises RunError naming the file or field.
    A NaN, infinite or exploding loss (``config.explosion_factor``) or a NaN or infinite
    parameter raises DivergenceError before anything is saved.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = output_dir / CHECKPOINT
    if not resume and ckpt_path.exists():
        raise RunError(
            f"{ckpt_path} exists: resume that run (--resume, train(resume=True)) or write to a "
            "new output folder"
        )
    is_main = distributed.rank() == 0
    tracker = tracker or Tracker(output_dir, enabled=is_main, config=asdict(config))
    device = data.labeled_y.device
    mpl.check_labels(data.labeled_y, data.prepare(_take(data.labeled_x, torch.arange(1), device)))
    start, best = 0, None
    if resume:
        if ckpt_path.exists():
            start, best = _resume(mpl, config, ckpt_path, device)
        tracker.rewind(start)
        if is_main:
            remove_temporaries(output_dir)

    n_l, n_u = len(data.labeled_x), len(data.unlabeled_x)
    b_l, b_u = config.labeled_batch, config.labeled_batch * config.unlabeled_ratio
    eval_name, eval_model = _evaluated(mpl)
    guard = DivergenceGuard(device, config.explosion_factor)
    saved_step = start if ckpt_path.exists() else None
    tick, images = time.perf_counter(), 0
    bar = Progress(config.steps, start, desc="mpl", disable=not is_main)
    with StopRequests() as stop:
        for step in range(start, config.steps):
            idx_l = _batch_indices(n_l, b_l, step, config.seed).to(device)
            idx_u = _batch_indices(n_u, b_u, step, config.seed + 1).to(device)
            generator = _step_generator(device, config.seed, step)
            _seed_globals(config.seed, step)
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
            guard.update(metrics, done)
            log = done % config.log_every == 0 or done == config.steps
            val = done % config.eval_every == 0 or done == config.steps
            stopping = stop.requested(device)
            save = done % config.checkpoint_every == 0 or done == config.steps or bool(stopping)
            if log or val or save:
                guard.check(ckpt_path, saved_step)  # one host sync; every process raises alike
            if log:
                now = time.perf_counter()
                logged = {k: float(v) for k, v in metrics.items()}
                logged["images_per_s"] = images * distributed.world_size() / (now - tick)
                tick, images = now, 0
                tracker.log(logged, step=done)
                bar.postfix(t=f"{logged['teacher/loss']:.3f}", s_lr=f"{logged['student/lr']:.3g}")
            if val:
                accs = _val_metrics(mpl, data, config)
                tracker.log(accs, step=done)
                if best is None or accs[f"val/{eval_name}"] > best[0]:
                    best = (accs[f"val/{eval_name}"], done)
                    check_parameters({"student": eval_model}, f"step {done}", ckpt_path, saved_step)
                    if is_main:
                        _write_best(output_dir, eval_name, eval_model, best, about, saved_step)
                bar.write(_eval_line(accs, done, config.steps, best, eval_name))
            if save:
                check_parameters(_networks(mpl), f"step {done}", ckpt_path, saved_step)
                if is_main:
                    state = {
                        "mpl": mpl.state_dict(),
                        "step": done,
                        "config": asdict(config),
                        "best": best,
                        "world_size": distributed.world_size(),
                    }
                    _write(ckpt_path, state, saved_step, keep_previous=True)
                saved_step = done
            if stopping:
                raise Stopped(
                    f"stopped by {stopping} after step {done} of {config.steps}: {ckpt_path} "
                    "holds it; continue with --resume (train(..., resume=True))"
                )
            bar.update()
    bar.close()

    final, name, results = _finetune_final(
        eval_model, eval_name, data, config, tracker, config.steps, ckpt_path, saved_step
    )
    results.update(_evaluate_final(final, name, mpl.teacher, data, config))
    tracker.log(results, step=config.steps + config.finetune_steps)
    tracker.summary(results)
    if is_main:
        _save_final(output_dir, _networks(mpl), final, results, config, about)
    return results


def finetune_only(
    model: nn.Module,
    data: SSLData,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    tracker: Tracker | None = None,
    networks: dict[str, nn.Module] | None = None,
    about: dict | None = None,
    name: str = "student_ema",
) -> dict[str, float]:
    """The last phase of ``train`` on its own: finetune a copy of ``model`` (a trained student)
    for ``config.finetune_steps`` steps on the labeled data, evaluate it on the validation and
    test images and save it as ``train`` does (``final.pt`` with ``networks`` beside it,
    ``results.json``). ``model`` itself is left as it was. ``name``: what the results call
    ``model`` (``student_ema`` or ``student_raw``). Returns the accuracies."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    is_main = distributed.rank() == 0
    tracker = tracker or Tracker(output_dir, enabled=is_main)
    final, name, results = _finetune_final(
        model, name, data, config, tracker, 0, output_dir / CHECKPOINT, None
    )
    results.update(_evaluate_final(final, name, None, data, config))
    tracker.log(results, step=config.finetune_steps)
    tracker.summary(results)
    if is_main:
        _save_final(output_dir, networks or {}, final, results, config, about)
    return results


def _finetune_final(
    model: nn.Module,
    name: str,
    data: SSLData,
    config: TrainConfig,
    tracker: Tracker,
    first_step: int,
    ckpt_path: Path,
    saved_step: int | None,
) -> tuple[nn.Module, dict]:
    """``model`` (named ``name``) finetuned on the labeled data (a copy, dropout off) when
    ``config.finetune_steps > 0``, else ``model`` itself; the final model's name; and the
    validation accuracy of ``model`` before finetuning. Its losses are logged at steps
    ``first_step + 1, ...``."""
    if not config.finetune_steps:
        return model, name, {}
    device = data.labeled_y.device
    results = {
        f"val/{name}": evaluate(
            model, data.val_x, data.val_y, data.prepare, config.eval_batch, config.bf16
        )
    }
    final = copy.deepcopy(model)
    ft_bar = Progress(config.finetune_steps, desc="finetune", disable=distributed.rank() != 0)
    batches = _counted(_finetune_batches(data, config, device), ft_bar)
    optimizer = sgd(
        config.finetune_lr,
        momentum=config.finetune_momentum,
        nesterov=True,
        weight_decay=config.finetune_weight_decay,
    )
    _seed_globals(config.seed, 0, phase=1)
    with _autocast(device, config.bf16):
        losses = finetune(
            final,
            batches,
            optimizer,
            config.finetune_label_smoothing,
            dropout=False,
            reduce=distributed.reduce_mean(),
        )
    ft_bar.close()
    for k, loss in enumerate(losses, 1):
        if k % config.log_every == 0 or k == len(losses):
            tracker.log({"finetune/loss": loss}, step=first_step + k)
    bad = next((k for k, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        raise DivergenceError(
            f"finetuning diverged: finetune/loss is {losses[bad]} at finetune step "
            f"{bad + 1}; the checkpoint of the trained run ({ckpt_path}) is kept. Lower "
            "--finetune-lr or check the labeled data"
        )
    check_parameters({"final": final}, "finetuning", ckpt_path, saved_step)
    return final, STUDENT_FINETUNED, results


def _evaluate_final(
    final: nn.Module, final_name: str, teacher: nn.Module | None, data: SSLData, config
) -> dict[str, float]:
    results = {}
    for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
        for name, model in ((final_name, final), (TEACHER, teacher)):
            if model is not None:
                results[f"{split}/{name}"] = evaluate(
                    model, x, y, data.prepare, config.eval_batch, config.bf16
                )
    return results


# One name per model in metrics, results, the console and --evaluate: the teacher, the
# student's own weights, their moving average, and the student after finetuning.
TEACHER, STUDENT_RAW, STUDENT_EMA, STUDENT_FINETUNED = (
    "teacher",
    "student_raw",
    "student_ema",
    "student_finetuned",
)


def _evaluated(mpl: MPL) -> tuple[str, nn.Module]:
    """The student that model selection and finetuning use: the EMA one when there is one."""
    if mpl.ema_student is not None:
        return STUDENT_EMA, mpl.ema_student
    return STUDENT_RAW, mpl.student


def _networks(mpl: MPL) -> dict[str, nn.Module]:
    nets = {"teacher": mpl.teacher, "student": mpl.student, "ema_student": mpl.ema_student}
    return {k: m for k, m in nets.items() if m is not None}


def _save_final(
    output_dir: Path,
    networks: dict[str, nn.Module],
    final: nn.Module,
    results: dict,
    config: TrainConfig,
    about: dict | None,
) -> None:
    """``final.pt``: the final student (``"final"``) and the networks it came from, with the
    accuracies; ``results.json``: the accuracies alone. Both written atomically."""
    state = {
        "final": final.state_dict(),
        "results": results,
        "config": asdict(config),
        **({"about": about} if about is not None else {}),
        **{name: m.state_dict() for name, m in networks.items()},
    }
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    try:
        save_checkpoint(output_dir / FINAL, state)
        write_atomically(output_dir / RESULTS, lambda f: f.write(text), binary=False)
    except OSError as e:
        raise RunError(
            f"cannot write {e.filename or output_dir / FINAL}: {e.strerror or e}; the trained "
            f"run's {output_dir / CHECKPOINT} is kept. Free space or make the folder writable, "
            "then resume (it finetunes and saves again)"
        ) from None


def _resume(
    mpl: MPL, config: TrainConfig, path: Path, device: torch.device
) -> tuple[int, tuple[float, int] | None]:
    """Load the checkpoint at ``path`` into ``mpl``; return its step and the best validation
    accuracy of the student so far with its step (None before the first one)."""
    state = load_checkpoint(path, device)
    missing = sorted({"mpl", "step", "config"} - state.keys())
    if missing:
        raise RunError(f"{path} is not a metapl training checkpoint (it has no {missing})")
    check_config(state["config"], asdict(config), RESUMABLE, source=f"checkpoint {path}")
    saved_world = state.get("world_size", distributed.world_size())  # absent before it was kept
    if saved_world != distributed.world_size():
        raise RunError(
            f"checkpoint {path} was written by a run of {saved_world} process(es) and this one "
            f"has {distributed.world_size()}: the batches and results would differ; resume with "
            f"{saved_world} (torchrun --nproc-per-node {saved_world}) or start a new run"
        )
    _load_fitting(mpl, state["mpl"], path)
    best = state.get("best")  # absent in checkpoints written before it was kept
    return int(state["step"]), (float(best[0]), int(best[1])) if best else None


def _load_fitting(mpl: MPL, saved, path: Path) -> None:
    """``mpl.load_state_dict(saved)``, or a RunError naming the first tensor that does not fit."""
    for name, module in _networks(mpl).items():
        theirs = saved.get(name) if isinstance(saved, dict) else None
        if not isinstance(theirs, dict):
            raise RunError(f"checkpoint {path} holds no {name}: it is not from a run like this one")
        ours = module.state_dict()
        for k in sorted(ours.keys() | theirs.keys()):
            if k not in theirs:
                problem = f"lacks {name}.{k}"
            elif k not in ours:
                problem = f"has {name}.{k}, which this model lacks"
            elif ours[k].shape != theirs[k].shape:
                problem = (
                    f"has {name}.{k} of shape {tuple(theirs[k].shape)}, this model "
                    f"{tuple(ours[k].shape)}"
                )
            else:
                continue
            raise RunError(
                f"checkpoint {path} is of another model: it {problem}; resume with the settings "
                "it was trained with, or start a new run in another output folder"
            )
    try:
        mpl.load_state_dict(saved)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise RunError(f"checkpoint {path} does not fit this run: {_first_line(e)}") from None


def _val_metrics(mpl: MPL, data: SSLData, config: TrainConfig) -> dict[str, float]:
    """Validation accuracies: ``val/teacher``, ``val/student_raw`` and, with EMA,
    ``val/student_ema``."""
    args = (data.val_x, data.val_y, data.prepare, config.eval_batch, config.bf16)
    accs = {f"val/{TEACHER}": evaluate(mpl.teacher, *args)}
    accs[f"val/{STUDENT_RAW}"] = evaluate(mpl.student, *args)
    if mpl.ema_student is not None:
        accs[f"val/{STUDENT_EMA}"] = evaluate(mpl.ema_student, *args)
    return accs


def _eval_line(
    accs: dict[str, float], step: int, steps: int, best: tuple[float, int], name: str
) -> str:
    """``step 1000/300000 | val top-1: teacher 41.20% student_raw 43.10% student_ema 44.00% |
    best student_ema 44.00% (step 1000)``"""
    parts = " ".join(f"{k.split('/', 1)[1]} {100 * v:.2f}%" for k, v in accs.items())
    return (
        f"step {step}/{steps} | val top-1: {parts} | best {name} {100 * best[0]:.2f}% "
        f"(step {best[1]})"
    )


def _counted(batches: Iterator[tuple], bar: Progress) -> Iterator[tuple]:
    """``batches``, advancing ``bar`` once each has been used."""
    for batch in batches:
        yield batch
        bar.update()


def _finetune_batches(data: SSLData, config: TrainConfig, device) -> Iterator[tuple]:
    """Labeled batches for the student's finetuning, augmented as ``config.finetune_augment``."""
    n = len(data.labeled_x)
    for k in range(config.finetune_steps):
        idx = _batch_indices(n, config.finetune_batch, k, config.seed + 2).to(device)
        generator = _step_generator(device, config.seed + 2, k)
        augment = data.strong if config.finetune_augment == "strong" else data.weak
        yield augment(_take(data.labeled_x, idx, device), generator), data.labeled_y[idx]


def _take(images, idx: Tensor, device: torch.device) -> Tensor:
    """``images[idx]`` on ``device``, for a tensor on any device or a lazy image store."""
    if isinstance(images, Tensor):
        idx = idx.to(images.device)
    return images[idx].to(device, non_blocking=True)
