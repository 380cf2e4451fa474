"""benchmarks/mpl_mechanism.py: the teacher's gradient parts it reads off ``mpl_step`` (checked
against a direct gradient and by linearity in ``mpl_weight``) and its smallest run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from support import BENCHMARKS, load_script

from metapl.functional import forward

mech = load_script(BENCHMARKS / "mpl_mechanism.py", "mpl_mechanism")
digits = mech.digits_mpl


@pytest.fixture(scope="module")
def setup():
    """An MPL + UDA object on digits (2 labels per class) after 2 steps, and a batch."""
    exp = digits.Experiment(digits=replace(digits.Digits(), labeled_per_class=2))
    task, data = digits.task(exp.digits), digits.load_data(exp.digits, 0)
    mpl = mech.build_mpl(exp.recipe, task, 0, "mpl_uda")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x_u = data.x_u[torch.randint(len(data.x_u), (16,), generator=gen)]
        batch = mech.Batch(
            task.weak(data.x_l, gen), data.y_l, task.weak(x_u, gen), task.strong(x_u, gen)
        )
        mpl.step(*batch[:4])
    return mpl, batch


def close(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-4) for k in a)


def test_own_part_is_the_direct_gradient_of_the_teachers_loss(setup):
    mpl, batch = setup
    config = replace(mpl.config, uda=None, meta_grad=None, mpl_weight=1.0)
    own, _ = mech.teacher_grad(config, mpl.state, batch, seed=7)
    teacher = mpl.state.teacher
    n_l = len(batch.y_l)

    def loss(params):
        x = torch.cat([batch.x_l, batch.x_u_strong])  # the teacher's rows without UDA
        logits, _ = forward(mpl.config.teacher, params, teacher.buffers, x)
        return F.cross_entropy(logits[:n_l], batch.y_l)

    torch.manual_seed(7)  # the same dropout masks
    direct = torch.func.grad(loss)(teacher.params)
    assert close(own, direct)


def test_mpl_part_is_linear_in_mpl_weight_and_zero_at_weight_0(setup):
    mpl, batch = setup
    state, config = mpl.state, mpl.config
    own, _ = mech.teacher_grad(replace(config, meta_grad=None, mpl_weight=1.0), state, batch, 3)
    by_weight = {
        w: mech.teacher_grad(replace(config, meta_grad="exact", mpl_weight=w), state, batch, 3)[0]
        for w in (0.0, 1.0, 2.0)
    }
    assert close(by_weight[0.0], own)
    one = {k: by_weight[1.0][k] - own[k] for k in own}
    two = {k: by_weight[2.0][k] - own[k] for k in own}
    assert close(two, {k: 2 * v for k, v in one.items()})
    assert mech.norm_ratio(one, own) > 0.0
    _, mpl_part, _, _ = mech.gradient_parts(config, state, batch, batch, 3)
    assert close(mpl_part, one)


def test_smallest_run_writes_tables_json_and_figure(tmp_path, capsys):
    out, fig = tmp_path / "r.json", tmp_path / "f.png"
    argv = ["--seeds", "0", "--steps", "2", "--probe-every", "2", "--jobs", "1"]
    runs = mech.main([*argv, "--out", str(out), "--figure", str(fig)])
    assert [(r["row"], len(r["probes"])) for r in runs] == [("uda", 1), ("mpl_uda", 1)]
    probe = runs[1]["probes"][0]
    assert set(probe) == {"step"} | {k for k, _, _ in mech.COLUMNS}
    assert -1 <= probe["cos_mpl_own"] <= 1 and probe["entropy"] > 0
    assert json.loads(out.read_text())["runs"][0]["seed"] == 0 and fig.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| step | cos(MPL, own) |" in printed and "mpl_uda - uda, same seed" in printed


def test_weight_0_step_is_the_baseline_step_from_the_same_rng(setup):
    """The docs' chaos control (MPL + UDA at ``mpl_weight=0``) takes UDA's step; only its
    random stream afterwards differs (the exact path draws dropout masks for the MPL batch)."""
    mpl, batch = setup
    states = []
    for method, weight in ((None, 1.0), ("exact", 0.0)):
        torch.manual_seed(5)
        config = replace(mpl.config, meta_grad=method, mpl_weight=weight)
        states.append(mech.mpl_step(config, mpl.state, batch)[0])
    base, control = states
    for net in ("teacher", "student"):
        a, b = getattr(base, net), getattr(control, net)
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
        assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
