"""Learned hyperparameters through rmsprop and adagrad: metapl.meta_grad against the
plain-autograd float64 unroll in tests/reference.py (``reference_general`` with
``ref_rmsprop`` / ``ref_adagrad``), with meta parameters in the start, the inner loss, every
hyperparameter and the outer loss at once."""

import math

import pytest
import torch
from reference import (
    ALL_PATHS_SIZES,
    F64,
    REFERENCE,
    all_paths_data,
    all_paths_losses,
    assert_close,
    init_mlp,
    one_thread,  # noqa: F401 (autouse fixture)
    reference_general,
)
from test_metagrad_general import exact_and_reference

import metapl
from metapl import optim

KINDS = ["rmsprop", "rmsprop-centered", "rmsprop-per-parameter", "adagrad"]


def everywhere_problem(kind, seed=0):
    """Meta parameters in all four places: the start (``w*`` / ``b*``), example weights in the
    inner loss (``t``), every numeric hyperparameter of the optimizer and an outer penalty
    (``reg``). ``rmsprop-per-parameter``: one learning rate per entry of each weight, one per
    bias (Meta-SGD), and one alpha per tensor."""
    gen, x_u, y_u, x_l, y_l = all_paths_data(seed)
    meta = init_mlp(ALL_PATHS_SIZES, gen)
    keys = list(meta)
    meta["t"] = torch.randn(len(y_u), generator=gen, dtype=F64)
    meta["reg"] = torch.tensor(0.3, dtype=F64)
    meta["wd"] = torch.tensor(0.05, dtype=F64)
    meta["log_eps"] = torch.tensor(math.log(0.05), dtype=F64)
    if kind == "adagrad":
        meta["log_lr"] = torch.tensor(-1.5, dtype=F64)
        meta["lr_decay"] = torch.tensor(0.2, dtype=F64)
    elif kind == "rmsprop-per-parameter":
        for k in keys:
            shape = meta[k].shape if k.startswith("w") else ()
            meta[f"lr_{k}"] = 0.03 + 0.1 * torch.rand(shape, generator=gen, dtype=F64)
            meta[f"alpha_{k}"] = 0.8 + 0.15 * torch.rand((), generator=gen, dtype=F64)
    else:
        meta["log_lr"] = torch.tensor(-2.5, dtype=F64)
        meta["alpha"] = torch.tensor(0.9, dtype=F64)
    if kind != "adagrad":
        meta["mom"] = torch.tensor(0.6, dtype=F64)

    start, inner, outer = all_paths_losses(keys, x_u, y_u, x_l, y_l)

    def hyper(m):
        common = {"eps": m["log_eps"].exp(), "weight_decay": m["wd"]}
        if kind == "adagrad":
            return {
                **common,
                "lr": m["log_lr"].exp(),
                "lr_decay": m["lr_decay"],
                "initial_accumulator_value": 0.1,
            }
        common["momentum"] = m["mom"]
        if kind == "rmsprop-per-parameter":
            return {
                **common,
                "lr": {k: m[f"lr_{k}"] for k in keys},
                "alpha": {k: m[f"alpha_{k}"] for k in keys},
            }
        return {
            **common,
            "lr": m["log_lr"].exp(),
            "alpha": m["alpha"],
            "centered": kind == "rmsprop-centered",
        }

    name = kind.split("-")[0]

    def metapl_opt(m):
        return getattr(optim, name)(**hyper(m))

    def ref_opt(m):
        return REFERENCE[name](**hyper(m))

    return meta, start, inner, outer, metapl_opt, ref_opt


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("engine", ["autograd", "reverse"])
def test_exact_through_learned_hyperparameters_matches_reference(kind, steps, engine):
    res, (*_, st, _) = exact_and_reference(
        everywhere_problem(kind, seed=steps), steps, engine, late=("mom", "lr_decay")
    )
    slots = {k: v for k, v in res.opt_state.items() if k != "step"}
    assert_close(slots, {k: v for k, v in st.items() if k != "step"}, rtol=1e-12, atol=1e-14)
    assert res.opt_state["step"].item() == steps


@pytest.mark.parametrize("engine", ["autograd", "reverse"])
def test_learned_initial_accumulator_value(engine):
    """The one hyperparameter that acts through ``init`` rather than ``step``: meta_grad
    differentiates the optimizer's initial state too."""
    meta, start, inner, outer, _, _ = everywhere_problem("adagrad", seed=3)
    meta["iav"] = torch.tensor(0.1, dtype=F64)

    def metapl_opt(m):
        return optim.adagrad(m["log_lr"].exp(), initial_accumulator_value=m["iav"])

    def ref_opt(m):
        return REFERENCE["adagrad"](m["log_lr"].exp(), initial_accumulator_value=m["iav"])

    kw = {"reduce": lambda tree: tree} if engine == "reverse" else {}
    res = metapl.meta_grad(inner, outer, start, meta, metapl_opt, steps=3, **kw)
    grads, *_ = reference_general(inner, outer, start, ref_opt, meta, 3)
    assert grads["iav"].abs() > 1e-2
    assert_close(res.meta_grads, grads, rtol=1e-10, atol=1e-13)
