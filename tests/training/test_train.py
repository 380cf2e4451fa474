"""metapl.training.loop: the data stream that makes runs resumable and shardable; what a run writes
and what resuming it checks (faults and kills: test_faults.py)."""

import json
import random
from dataclasses import asdict
from unittest import mock

import numpy as np
import pytest
import torch
from faulty_run import CLASSES, tiny_config, tiny_data, tiny_mpl, tiny_train

from metapl import distributed
from metapl.training import loop
from metapl.training.loop import _seed_globals, evaluate, load_checkpoint, stream_indices
from metapl.training.rundir import RunError
from metapl.training.tracking import Tracker, read_metrics


def test_stream_is_a_permutation_per_epoch_and_deterministic():
    n = 10
    stream = stream_indices(n, start=0, count=3 * n, seed=7)
    for epoch in stream.view(3, n):
        assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # each epoch its own order
    assert torch.equal(stream_indices(n, 0, 3 * n, seed=7), stream)
    assert not torch.equal(stream_indices(n, 0, 3 * n, seed=8), stream)


def test_any_window_of_the_stream_can_be_read_directly():
    n, seed = 7, 3
    whole = stream_indices(n, 0, 50, seed)
    for start, count in [(0, 1), (5, 4), (6, 9), (13, 21), (49, 1)]:
        assert torch.equal(stream_indices(n, start, count, seed), whole[start : start + count])


# ------------------------------------------------------------------ outputs and resume


def test_the_finetuned_final_model_is_saved_with_its_evaluation(tmp_path):
    results = tiny_train(tmp_path, steps=6, finetune_steps=3)
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert final["results"] == results == json.loads((tmp_path / "results.json").read_text())
    assert {"final", "teacher", "student", "ema_student", "config"} <= final.keys()
    finetuned = any(not torch.equal(final["final"][k], v) for k, v in final["ema_student"].items())
    assert finetuned, "the final model is the EMA student after finetuning"
    model = tiny_mpl().student
    model.load_state_dict(final["final"])
    data = tiny_data()
    for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
        assert evaluate(model, x, y, data.prepare) == results[f"{split}/student_finetuned"]
    # Without finetuning the final model is the EMA student itself.
    tiny_train(tmp_path / "no_finetune", steps=3, finetune_steps=0)
    plain = torch.load(tmp_path / "no_finetune" / "final.pt", weights_only=False)
    assert plain["final"].keys() == plain["ema_student"].keys()
    assert all(torch.equal(plain["final"][k], v) for k, v in plain["ema_student"].items())


def test_best_pt_holds_the_student_at_its_best_validation_accuracy(tmp_path, monkeypatch):
    """Validation accuracies 0.3, 0.6, 0.5, 0.6 at steps 2, 4, 6, 8: best.pt is the EMA
    student of step 4 (the first best), as a run stopped at step 4 has it."""
    tiny_train(tmp_path / "short", steps=4, finetune_steps=0)
    accuracies = iter([0.3, 0.6, 0.5, 0.6])
    monkeypatch.setattr(
        loop, "_val_metrics", lambda *a: {"val/teacher": 0.5, "val/student_ema": next(accuracies)}
    )
    tiny_train(tmp_path / "run", steps=8, eval_every=2, finetune_steps=1)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert (best["step"], best["model"], best["val"]) == (4, "student_ema", 0.6)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["best"] == (0.6, 4)
    at_4 = load_checkpoint(tmp_path / "short" / "checkpoint.pt")["mpl"]["ema_student"]
    assert best["final"].keys() == at_4.keys()
    assert all(torch.equal(best["final"][k], v) for k, v in at_4.items())


def test_a_checkpoint_loads_onto_another_device(tmp_path):
    tiny_train(tmp_path, steps=3, finetune_steps=0)
    state = load_checkpoint(tmp_path / "checkpoint.pt", "meta")  # stands in for a GPU
    assert next(iter(state["mpl"]["teacher"].values())).device.type == "meta"
    assert state["step"] == 3


def test_a_run_draws_its_randomness_from_its_seed_alone(tmp_path):
    """Dropout masks and sampled pseudo labels (tiny_mpl has both) come from the global RNGs,
    which train() reseeds from (seed, step, rank): the caller's RNG state changes nothing."""
    final = {}
    for outside_seed in (1, 2):
        mpl = tiny_mpl()  # the same networks each time
        torch.manual_seed(outside_seed)
        np.random.seed(outside_seed)
        random.seed(outside_seed)
        out = tmp_path / str(outside_seed)
        tiny_train(out, steps=4, finetune_steps=2, mpl=mpl)
        final[outside_seed] = torch.load(out / "final.pt", weights_only=False)["final"]
    assert all(torch.equal(final[1][k], v) for k, v in final[2].items())


def test_each_process_draws_its_own_global_randomness():
    draws = {}
    for rank in (0, 1, 0):
        with mock.patch.object(distributed, "rank", lambda r=rank: r):
            _seed_globals(3, 7)
            now = (torch.rand(4), np.random.rand(), random.random())
        assert draws.setdefault(rank, now)[0].equal(now[0]) and draws[rank][1:] == now[1:]
    assert not draws[0][0].equal(draws[1][0]) and draws[0][1:] != draws[1][1:]
    _seed_globals(3, 8)
    assert not torch.rand(4).equal(draws[0][0])  # and each step its own


def test_an_existing_checkpoint_is_never_overwritten_without_resume(tmp_path):
    tiny_train(tmp_path, steps=3, finetune_steps=0)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RunError, match="checkpoint.pt exists: resume"):
        tiny_train(tmp_path, steps=3, finetune_steps=0)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_names_the_config_field_that_differs(tmp_path):
    tiny_train(tmp_path, steps=3, finetune_steps=0)
    with pytest.raises(RunError, match="steps is 6 but checkpoint .* used 3"):
        tiny_train(tmp_path, steps=6, resume=True, finetune_steps=0)
    with pytest.raises(RunError, match="seed is 1 but"):
        tiny_train(tmp_path, steps=3, resume=True, finetune_steps=0, seed=1)
    # Logging and saving intervals may change.
    tiny_train(tmp_path, steps=3, resume=True, finetune_steps=0, log_every=1, eval_every=1)


def test_resume_forgets_the_metrics_logged_after_the_checkpoint(tmp_path):
    tracker = Tracker(tmp_path)
    for step in (1, 2, 3, 4):
        tracker.log({"loss": step}, step=step)
    tracker._jsonl.write('{"step": 5, "lo')  # a line cut short by a kill
    tracker.rewind(2)
    tracker.log({"loss": 3.5}, step=3)
    tracker.finish()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"config": {}},
        {"step": 1, "loss": 1},
        {"step": 2, "loss": 2},
        {"step": 3, "loss": 3.5},
    ]


def test_every_evaluation_prints_a_line_and_the_run_is_logged_with_its_config(tmp_path, capsys):
    results = tiny_train(tmp_path, steps=8, finetune_steps=3, log_every=2, eval_every=4)
    lines = [x for x in capsys.readouterr().err.splitlines() if "val top-1" in x]
    config, records = read_metrics(tmp_path)
    evals = [r for r in records if "val/teacher" in r and "test/teacher" not in r]
    assert [r["step"] for r in evals] == [4, 8] and len(lines) == 2
    best = max(evals, key=lambda r: r["val/student_ema"])  # the first of equals
    for line, r in zip(lines, evals, strict=True):
        assert line.startswith(
            f"step {r['step']}/8 | val top-1: teacher "
            f"{100 * r['val/teacher']:.2f}% student_raw "
            f"{100 * r['val/student_raw']:.2f}% student_ema "
            f"{100 * r['val/student_ema']:.2f}%"
        )
    assert lines[-1].endswith(
        f"best student_ema {100 * best['val/student_ema']:.2f}% (step {best['step']})"
    )
    assert config == {**asdict(tiny_config(8, finetune_steps=3, log_every=2, eval_every=4))}
    finetune = [(r["step"], r["finetune/loss"]) for r in records if "finetune/loss" in r]
    assert [s for s, _ in finetune] == [10, 11] and all(loss > 0 for _, loss in finetune)
    assert records[-1] == {"step": 11, **results}


def test_without_a_terminal_progress_is_plain_lines(tmp_path, capsys):
    tiny_train(tmp_path, steps=4, finetune_steps=2, eval_every=100)
    err = capsys.readouterr().err  # not a tty: no carriage returns, one line at each phase's end
    assert "\r" not in err
    assert [x.split()[:2] for x in err.splitlines()] == [
        ["step", "4/4"],
        ["mpl", "4/4"],
        ["finetune", "2/2"],
    ]


def test_labels_outside_the_teachers_classes_are_refused_before_training(tmp_path):
    data = tiny_data()
    data.labeled_y[5] = CLASSES  # the teacher has CLASSES outputs
    with pytest.raises(ValueError, match=rf"class indices 0..{CLASSES - 1} .* got label {CLASSES}"):
        tiny_train(tmp_path, steps=2, data=data)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = Tracker(tmp_path, project="metapl-test", name="run")
    run_id = first.run.id
    first.finish()
    resumed = Tracker(tmp_path, project="metapl-test", name="run", resume=True)
    assert resumed.run.id == run_id == (tmp_path / "wandb-run-id").read_text().strip()
    resumed.finish()
    fresh = Tracker(tmp_path / "other", project="metapl-test", name="run")
    assert fresh.run.id != run_id
    fresh.finish()
