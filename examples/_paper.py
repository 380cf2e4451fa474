"""What examples/cifar_mpl.py and examples/imagenet_mpl.py share: the command line and its
modes (train, ``--resume``, ``--evaluate``, ``--finetune-only``), the run folder, tracking and
the printed results. Each script brings its data and its presets."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from metapl import distributed
from metapl.data import Split, load_manifest, save_manifest
from metapl.training import RunError, SSLData, Tracker, finetune_only, train
from metapl.training.cli import fail, parse, pick, record, restore
from metapl.training.loop import evaluate, load_checkpoint
from metapl.training.recipe import Recipe, Settings, build_mpl, build_networks, train_config
from metapl.training.rundir import CHECKPOINT, CONFIG, FINAL, RESUMABLE, check_config, open_run

__all__ = ["cli", "fail", "run", "split_with_validation"]

NETWORKS = ("final", "ema_student", "student", "teacher")  # keys in final.pt / checkpoint.pt
# ... and their names in results, metrics and --evaluate (metapl.training.loop's names)
PUBLIC_NAMES = {
    "final": "student_finetuned",
    "ema_student": "student_ema",
    "student": "student_raw",
    "teacher": "teacher",
}
MODES = """Modes (besides training):
  --resume [RUN_DIR]          continue the run in RUN_DIR (or in --output-dir); its saved
                              configuration gives every other flag, and a flag typed again must
                              keep its value unless it only changes where the run reads and
                              writes or what it logs
  --evaluate RUN_DIR_or_FILE  test the networks a run saved (final.pt, else checkpoint.pt)
  --finetune-only FILE        finetune the (EMA) student a run saved, into --output-dir"""


class Experiment(Protocol):
    """What a script's experiment dataclass holds besides its data fields."""

    name: str
    settings: Settings
    recipe: Recipe


class Script(Protocol):
    """The data side of one script."""

    def load_data(
        self, exp: Any, device: torch.device, split_from: Path | None
    ) -> tuple[SSLData, int]: ...

    def test_set(self, exp: Any, device: torch.device) -> tuple[Tensor, Tensor, Callable, int]: ...

    def image_size(self, exp: Any) -> int: ...

    def about(self, exp: Any, num_classes: int) -> dict[str, Any]:
        """How final.pt's network reads an image: ``classes`` (names, in index order),
        ``image_size``, ``resize`` (the shorter side before the center crop) and
        ``normalization`` (a ``metapl.data.NORMALIZATION`` key)."""
        ...


def parse_experiment(
    cls: type, argv: list[str] | None, presets: Mapping[str, Any], description: str
) -> tuple[Any, dict[str, Any]]:
    """The experiment and its mode (``resume``, ``evaluate``, ``finetune_only``: a path or
    None; ``schedule``: how a fresh run's shorter schedule was scaled, or None). A saved run
    (``--resume``, ``--evaluate RUN_DIR``) gives the defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = {
        "--resume": "path?",
        "--evaluate": "path",
        "--finetune-only": "path",
        "--preset": list(presets),
    }
    (resume, evaluate_path, finetune_path, preset), rest = pick(argv, options)
    options.pop("--preset")
    values = (resume, evaluate_path, finetune_path)
    chosen = [f for f, v in zip(options, values, strict=True) if v is not None]
    if len(chosen) > 1:
        fail(f"{' and '.join(chosen)} cannot be combined: pick one mode")
    run_dir = None
    if resume is not None:
        run_dir = Path(resume) if resume else _output_dir(rest)
        if run_dir is None:
            fail("--resume needs the run's folder: --resume RUN_DIR")
        run_dir = run_dir.parent if run_dir.is_file() else run_dir
        if not (run_dir / CONFIG).exists() and not (run_dir / CHECKPOINT).exists():
            fail(
                f"--resume: no run to resume in {run_dir} (no {CONFIG} or {CHECKPOINT}); start "
                "without --resume"
            )
    if evaluate_path is not None:
        evaluate_path = Path(evaluate_path)
        if evaluate_path.is_dir():
            found = [evaluate_path / f for f in (FINAL, CHECKPOINT) if (evaluate_path / f).exists()]
            if not found:
                fail(f"--evaluate {evaluate_path}: the folder holds no {FINAL} or {CHECKPOINT}")
            evaluate_path, run_dir = found[0], evaluate_path
        elif not evaluate_path.is_file():
            fail(f"--evaluate {evaluate_path}: no such file or run folder")
        else:
            run_dir = evaluate_path.parent
    if finetune_path is not None and not Path(finetune_path).is_file():
        fail(
            f"--finetune-only {finetune_path}: no such file (pass a run's final.pt or "
            "checkpoint.pt)"
        )
    saved = _saved(cls, run_dir) if run_dir is not None else None
    if saved is not None and resume is not None:
        saved = _with(saved, output_dir=run_dir)
    base = saved or presets[preset or next(iter(presets))]
    names = ", ".join(presets)
    presets_help = f"--preset {{{names}}} (default: {next(iter(presets))}) sets the defaults."
    exp = parse(cls, rest, default=base, description=f"{description}\n\n{presets_help}\n\n{MODES}")
    note = None
    if saved is None:
        recipe, note = scaled(exp.recipe, base.recipe)
        exp = replace(exp, recipe=recipe)
    if saved is not None and resume is not None:
        try:
            check_config(record(saved), record(exp), RESUMABLE, f"the run in {run_dir}")
        except RunError as e:
            fail(str(e))
    if exp.settings.data_dir is None:
        fail("--data-dir is required (the data set's folder)")
    if not exp.settings.data_dir.is_dir():
        fail(f"--data-dir {exp.settings.data_dir} is not a folder (docs/data.md: the layout)")
    if evaluate_path is None and exp.settings.output_dir is None:
        fail("--output-dir is required (the run's folder)")
    modes = {
        "resume": run_dir if resume is not None else None,
        "evaluate": evaluate_path,
        "finetune_only": Path(finetune_path) if finetune_path else None,
        "schedule": note,
    }
    return exp, modes


def split_with_validation(
    exp: Any,
    targets: np.ndarray,
    new_split: Callable[[], Split],
    meta: dict,
    split_from: Path | None = None,
    files: list[tuple[str, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labeled, unlabeled, val)`` indices into the training images ``targets: [N]``.

    Reused from output-dir/split.json (or ``split_from``: --finetune-only's trained run) when
    one exists; otherwise ``new_split()`` with ``exp.data.val_per_class`` validation images of
    each class drawn from its unlabeled images, saved with ``meta``. The validation images are
    held out of training; the unlabeled set is every other training image. ``files``: the
    images the run reads as (relative path, size), the training images first in index order,
    saved beside the indices; a saved split whose files differ is refused, naming the first
    differences."""
    path = exp.settings.output_dir / "split.json"
    source = path if path.exists() else split_from
    if source is not None and source.exists():
        split, saved = load_manifest(source)
        if files is not None and "files" in saved:
            _check_same_files([tuple(f) for f in saved["files"]], list(files), source)
        val = np.asarray(saved["val"], dtype=np.int64)
        if source != path and distributed.rank() == 0:
            save_manifest(split, path, saved)
    else:
        split = new_split()
        rng = np.random.default_rng(exp.settings.seed + 1)
        pool = split.unlabeled
        per_class = [
            rng.choice(pool[targets[pool] == c], min(exp.data.val_per_class, count), replace=False)
            for c, count in zip(*np.unique(targets[pool], return_counts=True), strict=True)
        ]
        val = np.sort(np.concatenate(per_class))
        # saved as trained on: labeled and unlabeled never hold a validation image (the labeled
        # set was the pool beside an unlabeled folder; the unlabeled one is every other image)
        rest = np.setdiff1d(np.arange(len(targets)), val)
        split = replace(split, labeled=np.setdiff1d(split.labeled, val), unlabeled=rest)
        if distributed.rank() == 0:
            listed = {} if files is None else {"files": [list(f) for f in files]}
            save_manifest(split, path, {**meta, "val": val.tolist(), **listed})
    return split.labeled, np.setdiff1d(np.arange(len(targets)), val), val


def _check_same_files(saved: list[tuple], now: list[tuple], source: Path) -> None:
    """RunError naming the first files gone, new or resized since ``source`` was written (the
    split's indices would point at other images)."""
    if saved == now:
        return
    old, new = dict(saved), dict(now)
    kinds = {
        "gone": [f for f in old if f not in new],
        "new": [f for f in new if f not in old],
        "of another size": [f for f in old if f in new and old[f] != new[f]],
    }
    found = [
        f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
        for k, v in kinds.items()
        if v
    ]
    what = "; ".join(found) or "the same files in another order"
    raise RunError(
        f"the training images changed since {source} was written: {what}. Its indices would "
        "point at other images: restore the folder, or start a new run in another --output-dir"
    )


def scaled(recipe: Recipe, preset: Recipe) -> tuple[Recipe, str | None]:
    """The recipe a fresh run uses, and a line saying how it was scaled (None: not scaled).

    Fields that differ from the preset's were given on the command line and stay as given.
    ``--finetune-epochs`` beside a preset's ``finetune_steps`` takes over the finetuning length
    (giving both is refused). With another ``steps`` than the preset's, the preset's phases
    keep their share of the schedule (``Recipe.scaled_to``: warm-up, student wait, UDA ramp,
    EMA horizon, finetuning length)."""
    given = {f.name for f in fields(Recipe) if getattr(recipe, f.name) != getattr(preset, f.name)}
    if {"finetune_steps", "finetune_epochs"} <= given:
        fail(
            "--finetune-steps and --finetune-epochs both set the finetuning length: give one "
            "(--finetune-steps 0: no finetuning)"
        )
    kept = {name: getattr(recipe, name) for name in given}
    if "finetune_epochs" in given:
        kept["finetune_steps"] = None
    if recipe.steps == preset.steps:
        return replace(recipe, **kept), None
    out = replace(preset.scaled_to(recipe.steps), **kept)
    note = (
        f"--steps {out.steps} (the preset's {preset.steps}) scales its schedule: "
        f"{out.schedule()}; a flag given keeps its value (docs/reproducing.md)"
    )
    return out, note


def _output_dir(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--output-dir" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--output-dir="):
            return Path(arg.split("=", 1)[1])
    return None


def _saved(cls: type, run_dir: Path) -> Any | None:
    """The experiment a run folder recorded in config.json (None without one)."""
    path = run_dir / CONFIG
    if not path.exists():
        return None
    try:
        return restore(cls, json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        fail(
            f"cannot read the configuration of the run in {run_dir} ({e}): pass the flags it "
            "was started with, or start a new run"
        )


def _with(exp: Any, **settings) -> Any:
    return replace(exp, settings=replace(exp.settings, **settings))


def run(
    cls: type, presets: Mapping[str, Any], script: Script, argv: list[str] | None, description: str
) -> dict[str, float]:
    """The whole command: parse, then train, resume, evaluate or finetune."""
    exp, modes = parse_experiment(cls, argv, presets, description)
    s = exp.settings
    if modes["evaluate"] is not None:
        with distributed.process_group() as device:
            x, y, prepare, num_classes = script.test_set(exp, device)
            results = evaluate_saved(
                modes["evaluate"], exp, num_classes, script.image_size(exp), x, y, prepare
            )
            print_results(results, s.json)
            return results
    resume = modes["resume"] is not None
    with (
        distributed.process_group() as device,
        open_run(s.output_dir, record(exp), resume, RESUMABLE),
    ):
        ft = modes["finetune_only"]
        data, num_classes = script.load_data(exp, device, ft.parent / "split.json" if ft else None)
        if modes["schedule"] and distributed.rank() == 0:
            print(modes["schedule"], file=sys.stderr)
        teacher, student = build_networks(
            s, exp.recipe, num_classes, script.image_size(exp), device
        )
        tracker = _tracker(exp, resume)
        config = train_config(exp.recipe, s, len(data.labeled_y))
        about = {"model": s.model, **script.about(exp, num_classes)}
        if ft is not None:
            key, name = _load_student(ft, student)
            results = finetune_only(
                student,
                data,
                config,
                s.output_dir,
                tracker,
                networks={key: student},
                name=name,
                about=about,
            )
        else:
            for module in (teacher, student):
                distributed.broadcast_module(module)  # identical replicas (a no-op alone)
            mpl = build_mpl(teacher, student, exp.recipe, s)
            results = train(mpl, data, config, s.output_dir, tracker, resume, about)
        tracker.finish()
        print_results(results, s.json)
        return results


def _tracker(exp: Any, resume: bool) -> Tracker:
    """The run's tracker (metrics.jsonl, and wandb with --wandb-project) on the main process."""
    s = exp.settings
    return Tracker(
        s.output_dir,
        s.wandb_project,
        group=s.wandb_group or f"{exp.name}-{s.meta_grad}",
        name=f"{exp.name}-{s.meta_grad}-uda{int(s.uda)}-seed{s.seed}",
        config=record(exp),
        enabled=distributed.rank() == 0,
        resume=resume,
    )


def saved_networks(path: Path) -> dict[str, tuple[str, dict[str, Tensor]]]:
    """The networks a run saved in ``path`` by their names in results (``student_finetuned``,
    ``student_ema``, ``student_raw``, ``teacher``): ``(key in the file, state dict)``, those
    present. ``final.pt``'s final model counts only when it was finetuned (else it is the
    EMA or raw student again)."""
    state = load_checkpoint(path)
    nets = state["mpl"] if isinstance(state.get("mpl"), dict) else state
    finetuned = bool(state.get("config", {}).get("finetune_steps"))
    found = {
        PUBLIC_NAMES[k]: (k, nets[k])
        for k in NETWORKS
        if isinstance(nets.get(k), dict) and (k != "final" or finetuned)
    }
    if not found:
        raise RunError(f"{path} holds no saved networks: pass a run's final.pt or checkpoint.pt")
    return found


def _load(model: nn.Module, state: dict, path: Path, name: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunError(
            f"{path}: its {name} does not fit this model ({first}): pass the --model and data it "
            "was trained with"
        ) from None
    return model


def evaluate_saved(
    path: Path, exp: Any, num_classes: int, image_size: int, x: Tensor, y: Tensor, prepare: Callable
) -> dict[str, float]:
    """Top-1 accuracy on ``(x, y)`` of every network saved in ``path`` (``"test/<name>"``)."""
    from metapl.training.recipe import build_network

    results = {}
    for name, (key, state) in saved_networks(path).items():
        model = build_network(exp.settings.model, num_classes, 0.0, image_size)
        model = _load(model, state, path, key).to(y.device)
        results[f"test/{name}"] = evaluate(model, x, y, prepare, bf16=exp.settings.bf16)
    return results


def _load_student(path: Path, student: nn.Module) -> tuple[str, str]:
    """Load the saved EMA student of ``path`` (the student where there is no EMA) into
    ``student``; its key in the file and its name in results."""
    nets = saved_networks(path)
    name = next((k for k in ("student_ema", "student_raw", "student_finetuned") if k in nets), None)
    if name is None:
        raise RunError(f"{path} holds no student (only {sorted(nets)})")
    key, state = nets[name]
    _load(student, state, path, key)
    return key, name


def print_results(results: Mapping[str, float], as_json: bool) -> None:
    """On the main process: a table of accuracies in percent, or the raw values as JSON."""
    if distributed.rank() != 0:
        return
    rows = "\n".join(f"| {k} | {100 * v:.2f} |" for k, v in results.items())
    table = f"| metric | accuracy (%) |\n|---|---|\n{rows}"
    print(json.dumps(results) if as_json else table, file=sys.stdout, flush=True)


def cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a script's ``main`` as a command: a run that cannot start or go on (RunError, a
    bad value, a file that cannot be read or written, a missing package) prints one
    ``error:`` line instead of a traceback and exits 1."""
    try:
        main(argv)
    except (RunError, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
