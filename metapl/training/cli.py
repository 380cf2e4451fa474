"""Command lines derived from configuration dataclasses, by tyro.

``parse(Experiment, argv)`` turns every field of the dataclass (and of the dataclasses nested in
it) into a flag with its default and its comment in ``--help``; nested fields keep their plain
names (``--teacher-lr``, not ``--recipe.teacher-lr``). A value tyro cannot parse, or one the
dataclass refuses in ``__post_init__`` (a ValueError), ends the program with one line,
``prog: error: ...``, and exit status 2, as argparse does, instead of tyro's framed report.

``record`` and ``restore`` write a configuration as flat JSON (``{"recipe.steps": 400}``) and
read it back, so a run folder can describe itself (``--resume RUN_DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro

__all__ = ["fail", "parse", "pick", "record", "restore"]

T = TypeVar("T")
_RULE = re.compile(r"^\s*[-─━]{3,}\s*$")


def parse(
    config: type[T],
    argv: Sequence[str] | None = None,
    *,
    presets: Mapping[str, T] | None = None,
    default: T | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> T:
    """An instance of the dataclass ``config`` from ``argv`` (default: ``sys.argv[1:]``).

    ``presets``: named instances; ``--preset NAME`` picks the one whose values are the
    defaults (shown in ``--help``), the first one without it. ``default``: the instance whose
    values are the defaults (instead of the presets)."""
    prog = prog or _prog()
    argv = list(sys.argv[1:] if argv is None else argv)
    if presets:
        (name,), argv = pick(argv, {"--preset": list(presets)}, prog)
        default = default or presets[name or next(iter(presets))]
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


def pick(
    argv: Sequence[str], options: Mapping[str, list[str] | str], prog: str | None = None
) -> tuple[list, list[str]]:
    """Take ``options`` out of ``argv`` before tyro sees the rest: a list of choices (one value
    of them), ``"path"`` (one value) or ``"path?"`` (a value or none: ``""``). Returns each
    option's value (None when absent) in order, and the other arguments."""
    picker = argparse.ArgumentParser(prog=prog or _prog(), add_help=False)
    for flag, kind in options.items():
        if kind == "path?":
            picker.add_argument(flag, nargs="?", const="", default=None)
        elif kind == "path":
            picker.add_argument(flag, default=None)
        else:
            picker.add_argument(flag, choices=kind, default=None)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            found, rest = picker.parse_known_args(list(argv))
    except SystemExit:
        wrong = [f"{f} must be one of {k}" for f, k in options.items() if isinstance(k, list)]
        fail("; ".join(wrong) or f"bad {', '.join(options)}", prog)
    values = [getattr(found, flag.lstrip("-").replace("-", "_")) for flag in options]
    return values, rest


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


def record(config: Any) -> dict[str, Any]:
    """A dataclass as flat JSON values: ``{"recipe.steps": 400, "output_dir": "runs/x"}``."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            flat.update({f"{f.name}.{k}": v for k, v in record(value).items()})
        else:
            flat[f.name] = json.loads(json.dumps(value, default=str))
    return flat


def restore(config: type[T], flat: Mapping[str, Any]) -> T:
    """The dataclass ``config`` from ``record``'s output (keys it lacks keep their defaults;
    keys it does not know raise ValueError)."""
    hints = typing.get_type_hints(config)
    known = {f.name for f in dataclasses.fields(config)}
    values: dict[str, Any] = {}
    for name in {key.split(".", 1)[0] for key in flat}:
        if name not in known:
            raise ValueError(f"{config.__name__} has no field {name!r}")
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            prefix = f"{name}."
            inner = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
            values[name] = restore(kind, inner)
        else:
            values[name] = _value(kind, flat[name])
    return config(**values)


def _value(kind: Any, value: Any) -> Any:
    """``value`` from JSON as the annotated type wants it: paths and tuples back."""
    if value is None:
        return None
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, _UnionType) else ()
    if Path in options or kind is Path:
        return Path(value)
    if typing.get_origin(kind) is tuple:
        return tuple(value)
    return value


_UnionType = type(int | None)


def _strip(line: str) -> str:
    """A line of the report without colour codes and box-drawing borders."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return line.strip().strip("│╭╮╰╯|").strip()


def _prog() -> str:
    return sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "metapl"
