"""Progress of a long loop that reads well both in a terminal and in a log file.

In a terminal (stderr is a tty) it is a tqdm bar. Otherwise (``nohup ... > log 2>&1``, a batch
job) tqdm's carriage returns would turn the log into one long line, so it prints a plain line
instead, at most once every ``interval`` seconds and at the end:

    mpl 1200/300000 (0.4%) 3.1 it/s, 26:42:10 left | t=1.234 s_lr=0.05
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Counts steps ``initial..total`` of one phase (``desc``); ``disable`` prints nothing.

    ``update()`` after each step, ``postfix(**values)`` to show the latest values, ``write(line)``
    for a line of its own (evaluation results) that does not break the bar, ``close()`` at the
    end. ``interval``: seconds between two plain lines when the output is not a terminal.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "",
        disable: bool = False,
        interval: float = 60.0,
        file: TextIO | None = None,
    ):
        self.file = file or sys.stderr
        self.total, self.n, self.desc, self.disable = total, initial, desc, disable
        self.interval, self._postfix = interval, ""
        self._bar = None
        if not disable and self.file.isatty():
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, file=self.file, dynamic_ncols=True
            )
        self._start = self._last = time.monotonic()
        self._start_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.disable and (
            time.monotonic() - self._last >= self.interval or self.n == self.total
        ):
            self._print_line()

    def postfix(self, **values: str) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix)

    def write(self, line: str) -> None:
        if self.disable:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _print_line(self) -> None:
        now = time.monotonic()
        self._last = now
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta = _clock(left) if left != float("inf") else "?"
        pct = 100 * self.n / self.total if self.total else 100.0
        line = f"{self.desc} {self.n}/{self.total} ({pct:.1f}%) {rate:.3g} it/s, {eta} left"
        print(f"{line} | {self._postfix}" if self._postfix else line, file=self.file, flush=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
