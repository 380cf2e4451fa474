"""What every benchmark prints about where it ran: the CPU's name, its kernels, the commit."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

__all__ = ["cpu_kernels", "cpu_name", "git_commit"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_kernels() -> str:
    """The CPU kernels torch runs on here (AVX512, AVX2, ...; ``ATEN_CPU_CAPABILITY`` caps
    them): they set the order of float sums, so runs on other kernels differ in the last bits."""
    return torch.backends.cpu.get_cpu_capability()


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
