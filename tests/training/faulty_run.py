"""A tiny MPL training run for the fault-injection tests, in process or as a script that can
SIGKILL itself at a chosen point:

    python tests/training/faulty_run.py OUT --steps 12 [--resume] [--die-at-step K]
        [--die-in-save N --die-while {torch_save,keeping_previous}]

``--die-at-step K``: SIGKILL inside the K-th MPL step this process takes. ``--die-in-save N``:
SIGKILL during the N-th checkpoint write of this process, halfway through writing the file
(``torch_save``) or while the previous checkpoint is being kept (``keeping_previous``).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from pathlib import Path

import torch

import metapl
from metapl import optim
from metapl.models import build_model
from metapl.training import loop as train
from metapl.training.loop import SSLData, TrainConfig
from metapl.training.rundir import RunError

CLASSES, FEATURES = 3, 16


def tiny_data(nan_at_step: int | None = None) -> SSLData:
    """Learnable 4x4 one-channel images of 3 classes; ``nan_at_step``: the labeled batch of
    that step (1-based) comes out of augmentation as NaN."""
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(CLASSES, 1, 4, 4, generator=g) * 255

    def split(n):
        y = torch.arange(n) % CLASSES
        x = (protos[y] + 30 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 255)
        return x.to(torch.uint8), y

    (x_l, y_l), (x_u, _), (x_v, y_v), (x_t, y_t) = split(12), split(36), split(9), split(9)
    weak_calls = [0]  # train() augments the labeled batch, then the unlabeled one

    def prepare(x):
        return x.float() / 255

    def weak(x, generator):
        weak_calls[0] += 1
        if nan_at_step is not None and weak_calls[0] == 2 * nan_at_step - 1:
            return torch.full(x.shape, float("nan"))
        return prepare(x) + 0.05 * torch.randn(x.shape, generator=generator)

    def strong(x, generator):
        return prepare(x) + 0.2 * torch.randn(x.shape, generator=generator)

    return SSLData(x_l, y_l, x_u, x_v, y_v, x_t, y_t, weak, strong, prepare)


def tiny_mpl(lr: float = 0.1, hidden: int = 8) -> metapl.MPL:
    """first_order (sampled labels), dropout and EMA: every RNG path a resume must restore."""
    torch.manual_seed(0)
    teacher, student = (
        build_model("mlp", CLASSES, in_features=FEATURES, hidden=(hidden,), dropout=0.2)
        for _ in range(2)
    )
    sgd = optim.sgd(lr, momentum=0.9, nesterov=True)
    return metapl.MPL(
        teacher,
        student,
        sgd,
        sgd,
        meta_grad="first_order",
        pseudo_labels="hard",
        uda=metapl.UDA(1.0, 0.7, 0.6),
        ema_decay=0.9,
        h_baseline_decay=0.9,
    )


def tiny_config(steps: int = 12, **kw) -> TrainConfig:
    kw = {
        "labeled_batch": 4,
        "unlabeled_ratio": 2,
        "eval_every": 4,
        "log_every": 2,
        "checkpoint_every": 3,
        "finetune_steps": 2,
        "finetune_batch": 4,
        "finetune_lr": 0.05,
        **kw,
    }
    return TrainConfig(steps=steps, **kw)


def tiny_train(out, steps: int = 12, resume: bool = False, mpl=None, data=None, **kw):
    return train.train(
        mpl or tiny_mpl(), data or tiny_data(), tiny_config(steps, **kw), out, resume=resume
    )


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-at-step", type=int)
    p.add_argument("--signal-at-step", type=int)  # sent to itself just before that step
    p.add_argument("--signal", choices=["SIGTERM", "SIGINT", "SIGUSR1"], default="SIGTERM")
    p.add_argument("--die-in-save", type=int)
    p.add_argument("--die-while", choices=["torch_save", "keeping_previous"], default="torch_save")
    args = p.parse_args()
    torch.set_num_threads(1)
    mpl = tiny_mpl()
    if args.die_at_step is not None:
        step, calls = mpl.step, [0]

        def dying_step(*a, **kw):
            calls[0] += 1
            if calls[0] == args.die_at_step:
                _die()
            return step(*a, **kw)

        mpl.step = dying_step
    if args.signal_at_step is not None:
        step, calls = mpl.step, [0]

        def signalled_step(*a, **kw):
            calls[0] += 1
            if calls[0] == args.signal_at_step:
                os.kill(os.getpid(), signal.Signals[args.signal])
            return step(*a, **kw)

        mpl.step = signalled_step
    if args.die_in_save is not None:
        saves = [0]
        if args.die_while == "torch_save":
            real_save = torch.save

            def dying_save(obj, f, *a, **kw):
                if isinstance(f, io.BytesIO):
                    return real_save(obj, f, *a, **kw)
                saves[0] += 1  # a file: checkpoint.pt, or final.pt at the end
                if saves[0] < args.die_in_save:
                    return real_save(obj, f, *a, **kw)
                buf = io.BytesIO()
                real_save(obj, buf, *a, **kw)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()

            torch.save = dying_save
        else:
            real_copy = train._copy_atomically

            def dying_copy(src, dst):
                saves[0] += 1
                if saves[0] < args.die_in_save:
                    return real_copy(src, dst)
                os.link(src, dst.with_name(f".{dst.name}.{os.getpid()}.tmp"))  # halfway
                _die()

            train._copy_atomically = dying_copy
    try:
        tiny_train(args.out, args.steps, args.resume, mpl=mpl)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
