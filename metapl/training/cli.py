"""Command lines derived from configuration dataclasses, by tyro.

``parse(Experiment, argv)`` turns every field of the dataclass (and of the dataclasses nested in
it) into a flag with its default and its comment in ``--help``; nested fields keep their plain
names (``--teacher-lr``, not ``--recipe.teacher-lr``). A value tyro cannot parse, or one the
dataclass refuses in ``__post_init__`` (a ValueError), ends the program with one line,
``prog: error: ...``, and exit status 2, as argparse does, instead of tyro's framed report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TypeVar

import tyro

__all__ = ["fail", "parse"]

T = TypeVar("T")
_RULE = re.compile(r"^\s*[-─━]{3,}\s*$")


def parse(
    config: type[T],
    argv: Sequence[str] | None = None,
    *,
    presets: Mapping[str, T] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> T:
    """An instance of the dataclass ``config`` from ``argv`` (default: ``sys.argv[1:]``).

    ``presets``: named instances; ``--preset NAME`` picks the one whose values are the
    defaults (shown in ``--help``), the first one without it."""
    prog = prog or _prog()
    argv = list(sys.argv[1:] if argv is None else argv)
    default = None
    if presets:
        picker = argparse.ArgumentParser(prog=prog, add_help=False)
        picker.add_argument("--preset", choices=list(presets), default=next(iter(presets)))
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                chosen, argv = picker.parse_known_args(argv)
        except SystemExit:
            fail(f"--preset must be one of {list(presets)}", prog)
        default = presets[chosen.preset]
        names = ", ".join(presets)
        description = (
            f"{description or ''}\n\n--preset {{{names}}} (default: "
            f"{next(iter(presets))}) sets the defaults below."
        ).strip()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(
                config,
                args=argv,
                prog=prog,
                description=description,
                default=default if default is not None else tyro.MISSING_NONPROP,
                config=(tyro.conf.OmitArgPrefixes,),
            )
    except SystemExit as e:
        if e.code in (0, None):
            raise
        fail(one_line(captured.getvalue()), prog)


def one_line(report: str) -> str:
    """The message of tyro's framed error report, on one line."""
    lines = [_strip(line) for line in report.splitlines() if line.strip()]
    start = 1  # after the title (a frame's top border, or a line followed by a rule)
    if start < len(lines) and _RULE.match(lines[start]):
        start += 1
    end = next((i for i in range(start, len(lines)) if _RULE.match(lines[i])), len(lines))
    text = " ".join(line.strip() for line in lines[start:end] if line.strip())
    # "Error parsing recipe: --steps must be >= 1" names the dataclass, not a flag: drop it
    text = re.sub(r"^Error parsing (?!-)[\w.]+: ", "", text)
    text = re.sub(r"^Missing from \S+: ", "missing: ", text)
    return text or report.strip()


def fail(message: str, prog: str | None = None) -> None:
    """``prog: error: message`` on stderr, exit status 2 (argparse's convention)."""
    print(f"{prog or _prog()}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _strip(line: str) -> str:
    """A line of the report without colour codes and box-drawing borders."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return line.strip().strip("│╭╮╰╯|").strip()


def _prog() -> str:
    return sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "metapl"
