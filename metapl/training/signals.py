"""Stopping at a step boundary: SIGTERM (a preempted job), SIGINT (Ctrl-C) and SIGUSR1 (a
scheduler's warning) ask the training loop to checkpoint and stop instead of killing it."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from metapl import distributed

__all__ = ["STOP_SIGNALS", "StopRequests"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequests:
    """While inside the ``with`` block, the first of ``STOP_SIGNALS`` sets a flag instead of
    ending the process; a second SIGINT interrupts at once (KeyboardInterrupt), as usual.
    Outside the main thread nothing is installed (Python delivers signals there only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def requested(self, device: torch.device) -> str | None:
        """The name of the signal received (by any process, under torchrun), else None. With
        several processes this is one all-reduce of a scalar, so all stop at the same step."""
        received = self.received or 0
        if distributed.is_distributed():
            flag = torch.tensor(received, device=device, dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag)
        return signal.Signals(received).name if received else None
