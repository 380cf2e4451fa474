"""What every benchmark prints about where it ran: the CPU's name and the commit measured."""

from __future__ import annotations

import os
import platform
import subprocess

__all__ = ["cpu_name", "git_commit"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=10,
        )
        return f"git {out.stdout.strip()}" if out.returncode == 0 else "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        return "git unavailable"
