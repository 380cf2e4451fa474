"""Divergence: a loss that is NaN or infinite or that explodes, or a parameter that is not
finite, stops the run before it can overwrite a good checkpoint (``DivergenceError``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from metapl.training.rundir import RunError

__all__ = ["DivergenceError", "DivergenceGuard", "check_parameters"]

HISTORY = 100  # the running median looks this many steps back
MIN_HISTORY = 10  # and a loss is judged once it has this many steps behind it
MEDIAN_FLOOR = 1.0  # against max(median, 1): a loss near 0 may grow to ordinary sizes


class DivergenceError(RunError):
    """A loss or parameter became NaN or infinite, or a loss exploded. The message names the
    first step and loss term; the last good checkpoint is left as it was."""


class Failure(NamedTuple):
    name: str
    step: int
    value: float
    ratio: float  # value / running median (explosions)
    median: float
    lrs: dict[str, float]  # the learning rates logged at that step


class DivergenceGuard:
    """Watches the step metrics without a host sync per step. Every metric must stay finite,
    and every loss (a metric named ``*loss*``) within ``factor`` times its usual size: its
    first value, or once it has ``MIN_HISTORY`` steps behind it the median of its magnitude
    over the previous ``HISTORY`` steps if that is smaller; at least ``MEDIAN_FLOOR`` (a loss
    near 0 may grow to ordinary sizes). ``factor=math.inf`` checks finiteness only. The first
    failure of each metric and the metrics of the first failing step stay on the device;
    ``check`` reads them (one sync) and raises."""

    def __init__(self, device: torch.device, factor: float = 1e3):
        self.device, self.factor = device, factor
        self.names: tuple[str, ...] = ()
        self.failure: Failure | None = None

    def update(self, metrics: dict, step: int) -> None:
        names = tuple(metrics)
        if names != self.names:  # another set of metrics: settle the old one first
            self.failure = self.failure or self._read()
            self._start(names)
        values = torch.stack(
            [
                torch.as_tensor(metrics[k], device=self.device).detach().float().reshape(())
                for k in names
            ]
        )
        size = values[self.losses].abs()  # long indices: no host sync (a mask would sync)
        ratio = torch.zeros_like(values)
        median = torch.zeros_like(values)
        if self.seen == 0:
            self.initial = size
        elif math.isfinite(self.factor):
            usual = self.initial
            if self.seen >= MIN_HISTORY:
                window = self.history[: min(self.seen, HISTORY)]
                usual = torch.minimum(window.median(dim=0).values, usual)
            median[self.losses] = usual
            ratio[self.losses] = size / usual.clamp(min=MEDIAN_FLOOR)
        new = (~torch.isfinite(values) | (ratio > self.factor)) & (self.first < 0)
        first_row = new.any() & (self.row_step < 0)
        self.first = torch.where(new, float(step), self.first)
        self.value = torch.where(new, values, self.value)
        self.ratio = torch.where(new, ratio, self.ratio)
        self.median = torch.where(new, median, self.median)
        self.row = torch.where(first_row, values, self.row)
        self.row_step = torch.where(first_row, float(step), self.row_step)
        self.history[self.seen % HISTORY] = size
        self.seen += 1

    def _start(self, names: tuple[str, ...]) -> None:
        n, dev = len(names), self.device
        self.names = names
        losses = [i for i, k in enumerate(names) if "loss" in k]
        self.losses = torch.tensor(losses, dtype=torch.int64, device=dev)
        self.history = torch.zeros(HISTORY, len(losses), device=dev)
        self.seen = 0
        self.first = torch.full((n,), -1.0, device=dev)
        self.value, self.ratio, self.median, self.row = (torch.zeros(n, device=dev) for _ in "1234")
        self.row_step = torch.tensor(-1.0, device=dev)

    def _read(self) -> Failure | None:
        if not self.names:
            return None
        bad = [(s, i) for i, s in enumerate(self.first.tolist()) if s >= 0]
        if not bad:
            return None
        step, i = min(bad)
        row = dict(zip(self.names, self.row.tolist(), strict=True))
        lrs = {k: v for k, v in row.items() if k.endswith("/lr")}
        return Failure(
            self.names[i],
            int(step),
            float(self.value[i]),
            float(self.ratio[i]),
            float(self.median[i]),
            lrs,
        )

    def check(self, ckpt_path: Path, saved_step: int | None) -> None:
        f = self.failure or self._read()
        if f is None:
            return
        if math.isfinite(f.value):
            what = (
                f"{f.name} exploded at step {f.step}: {f.value:.3g}, {f.ratio:.3g} times its "
                f"usual size {f.median:.3g} (the smaller of its recent median and its first "
                f"value; the limit, explosion_factor, is {self.factor:g})"
            )
            check_data = ""
        else:
            what = f"{f.name} is {f.value} at step {f.step} (the first non-finite value)"
            check_data = ", or check the input data for NaN"
        raise DivergenceError(
            f"training diverged: {what}; {kept(ckpt_path, saved_step)}. Lower the learning "
            f"rate{_suggestion(f.lrs)}{check_data}"
        )


def _suggestion(lrs: dict[str, float]) -> str:
    """`` (teacher/lr was 0.1 at that step: try 0.01)``, from the logged learning rates."""
    peak = {k: v for k, v in lrs.items() if v > 0}
    if not peak:
        return ""
    was = ", ".join(f"{k} was {v:.3g}" for k, v in peak.items())
    return f" ({was} at that step: try a tenth)"


def kept(ckpt_path: Path, saved_step: int | None) -> str:
    if saved_step is None:
        return "no checkpoint had been written"
    return f"the last good checkpoint, {ckpt_path} (step {saved_step}), is kept"


def check_parameters(
    nets: dict[str, nn.Module], when: str, ckpt_path: Path, saved_step: int | None
) -> None:
    """DivergenceError naming the first parameter or buffer of ``nets`` that is not finite."""
    tensors = [
        (f"{net}.{k}", t)
        for net, m in nets.items()
        for k, t in m.state_dict().items()
        if t.is_floating_point()
    ]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(finite.all()):
        return
    name = tensors[int((~finite).nonzero()[0, 0])][0]
    raise DivergenceError(
        f"training diverged: {name} is not finite after {when}; {kept(ckpt_path, saved_step)}. "
        "Lower the learning rate"
    )
