"""Reading wandb's offline run logs in tests."""

import time
from pathlib import Path


def wandb_log_has(run_dir: Path, *needles: bytes, timeout: float = 60.0) -> bool:
    """Whether the offline run's protobuf log contains every needle. wandb's service process
    writes it asynchronously and, on a loaded machine, after ``finish`` returns: poll."""
    deadline = time.monotonic() + timeout
    while True:
        (log,) = run_dir.glob("run-*.wandb")
        data = log.read_bytes()
        if all(n in data for n in needles) or time.monotonic() > deadline:
            return all(n in data for n in needles)
        time.sleep(0.5)
