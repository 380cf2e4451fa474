"""metapl.optim: step-for-step equality with torch.optim, schedules, purity, differentiability."""

import math

import pytest
import torch
from reference import (
    F64,
    assert_close,
    one_thread,  # noqa: F401 (autouse fixture)
)

from metapl import optim

TORCH = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
TORCH_SLOTS = {  # metapl's slot name: torch's
    "momentum": "momentum_buffer",
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "max_exp_avg_sq": "max_exp_avg_sq",
    "square_avg": "square_avg",
    "grad_avg": "grad_avg",
    "sum": "sum",
}
CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"weight_decay": 0.1}),
    ("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("adam", {}),
    ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.3, "betas": (0.5, 0.9)}),
    ("sgd", {"momentum": 0.9, "dampening": 0.3}),
    ("sgd", {"momentum": 0.7, "dampening": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("sgd", {"maximize": True}),
    ("adam", {"amsgrad": True}),
    ("adam", {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    ("adamw", {"maximize": True, "eps_root": 0.0}),
    ("adamw", {"amsgrad": True, "weight_decay": 0.3, "betas": (0.5, 0.9)}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.9}),
    ("rmsprop", {"centered": True}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-4, "weight_decay": 0.1, "momentum": 0.5,
                 "centered": True, "maximize": True}),
    ("adagrad", {}),
    ("adagrad", {"lr_decay": 0.1}),
    ("adagrad", {"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.5,
                 "eps": 1e-6, "maximize": True}),
]  # fmt: skip


def case_ids(cases):
    return [f"{kind}-{'-'.join(f'{k}={v}' for k, v in hyper.items()) or 'default'}"
            for kind, hyper in cases]  # fmt: skip


IDS = case_ids(CASES)
LR = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01, "rmsprop": 0.01, "adagrad": 0.1}
METAPL_ONLY = ("eps_root",)  # options torch.optim does not have


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=gen, dtype=F64),
        "b": torch.randn(4, generator=gen, dtype=F64),
    }


def make_grads(n_steps, seed=1):
    """Random gradients; ``b`` is exactly zero at the first step (Adam's second moment stays 0)
    and ``w`` is exactly zero at step 5."""
    gen = torch.Generator().manual_seed(seed)
    grads = [
        {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in make_params().items()}
        for _ in range(n_steps)
    ]
    grads[0]["b"].zero_()
    if n_steps > 5:
        grads[5]["w"].zero_()
    return grads


def compare_with_torch(
    kind, hyper, lr, torch_lr, schedule=None, clip=None, n_steps=10, metapl_hyper=None
):
    """Run metapl (with ``metapl_hyper``, default ``hyper``) and torch.optim (with ``hyper``)
    side by side; compare params and state after every step."""
    params = make_params()
    opt = getattr(optim, kind)(lr, **(hyper if metapl_hyper is None else metapl_hyper))
    opt = optim.clip_grad_norm(opt, clip) if clip else opt
    state = opt.init(params)
    leaves = {k: v.clone() for k, v in params.items()}
    torch_hyper = {k: v for k, v in hyper.items() if k not in METAPL_ONLY}
    ref = TORCH[kind](leaves.values(), lr=torch_lr, **torch_hyper)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ref, schedule) if schedule else None
    for i, grads in enumerate(make_grads(n_steps)):
        params, state = opt.step(params, grads, state)
        for k, leaf in leaves.items():
            leaf.grad = grads[k].clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(leaves.values(), clip)
        ref.step()
        if scheduler:
            scheduler.step()
        assert_close(params, leaves)
        for slot, torch_slot in TORCH_SLOTS.items():
            if slot in state:
                assert_close(state[slot], {k: ref.state[v][torch_slot] for k, v in leaves.items()})
        assert state["step"].item() == i + 1
    return params


@pytest.mark.parametrize(("kind", "hyper"), CASES, ids=IDS)
def test_matches_torch_optim_step_for_step(kind, hyper):
    final = compare_with_torch(kind, hyper, LR[kind], LR[kind])
    assert (final["w"] - make_params()["w"]).abs().min() > 0  # every entry actually moved


@pytest.mark.parametrize(("kind", "hyper"), CASES[2::3], ids=IDS[2::3])
def test_tensor_lr(kind, hyper):
    compare_with_torch(kind, hyper, torch.tensor(LR[kind], dtype=F64), LR[kind])


@pytest.mark.parametrize(("kind", "hyper"), CASES[1::3] + CASES[5:6], ids=IDS[1::3] + IDS[5:6])
def test_callable_lr_matches_lambda_lr(kind, hyper):
    schedule = optim.warmup_cosine(LR[kind], total_steps=9, warmup_steps=3, wait_steps=1)
    compare_with_torch(kind, hyper, schedule, 1.0, schedule=lambda n: float(schedule(n)))


@pytest.mark.parametrize(("kind", "hyper"), CASES[1::4], ids=IDS[1::4])
def test_clip_grad_norm_matches_torch(kind, hyper):
    norms = [torch.cat([g.flatten() for g in grads.values()]).norm() for grads in make_grads(10)]
    assert min(norms) < 3.0 < max(norms)  # some steps are clipped, some are not
    compare_with_torch(kind, hyper, LR[kind], LR[kind], clip=3.0)


def test_warmup_cosine_by_hand():
    lr = optim.warmup_cosine(1.0, total_steps=20, warmup_steps=4, wait_steps=2, min_lr=0.1)
    expected = {
        0: 0.0, 1: 0.0,  # wait
        2: 0.25, 3: 0.5, 4: 0.75, 5: 1.0,  # linear warm-up to base_lr
        6: 1.0,  # cosine starts at base_lr; decay over 20 - 2 - 4 = 14 steps
        8: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 14)),
        13: 0.55,  # middle of the cosine: min_lr + (base_lr - min_lr) / 2
        20: 0.1, 30: 0.1,  # end, and clamped after it
    }  # fmt: skip
    for step, value in expected.items():
        assert lr(torch.tensor(float(step))).item() == pytest.approx(value, abs=1e-12), step
    no_warmup = optim.warmup_cosine(2.0, total_steps=10)
    assert [no_warmup(torch.tensor(s)).item() for s in (0, 5, 10)] == pytest.approx([2, 1, 0])


def snapshot(tree):
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    return tree.clone()


def assert_identical(tree, snap):
    """Same keys, same values (``snap`` was taken with ``snapshot`` before the call)."""
    assert isinstance(tree, dict) == isinstance(snap, dict)
    if isinstance(tree, dict):
        assert tree.keys() == snap.keys()
        for k in tree:
            assert_identical(tree[k], snap[k])
    else:
        assert torch.equal(tree, snap)


@pytest.mark.parametrize(("kind", "hyper"), CASES, ids=IDS)
def test_inputs_never_mutated(kind, hyper):
    opt = getattr(optim, kind)(LR[kind], **hyper)
    params, (g1, g2) = make_params(), make_grads(2)
    _, state = opt.step(params, g1, opt.init(params))  # a state with non-zero slots
    inputs = {"params": params, "grads": g2, "state": state}
    before = snapshot(inputs)
    new_params, new_state = opt.step(params, g2, state)
    assert_identical(inputs, before)
    assert not torch.equal(new_params["w"], params["w"])
    assert new_state["step"].item() == state["step"].item() + 1


def state_slots(state):
    return [k for k in TORCH_SLOTS if k in state]


@pytest.mark.parametrize(("kind", "hyper"), CASES, ids=IDS)
def test_gradcheck_one_step(kind, hyper):
    """d step / d (params, grads, lr, state slots) against torch's own finite differences."""
    params, (g1, g2) = make_params(), make_grads(2)
    # |g1| >= 1 keeps Adam's second moment >= 1e-3 so that gradcheck's perturbations (1e-6) stay
    # in the region where sqrt(v) is smooth.
    g1 = {k: v.sign() * (v.abs() + 1) for k, v in g1.items()}
    opt = getattr(optim, kind)(LR[kind], **hyper)
    _, state = opt.step(params, g1, opt.init(params))  # non-zero state slots
    keys, slots = list(params), state_slots(state)

    def one_step(lr, *flat):
        p, g = dict(zip(keys, flat[:2], strict=True)), dict(zip(keys, flat[2:4], strict=True))
        st = {"step": state["step"]}
        for i, slot in enumerate(slots):
            st[slot] = dict(zip(keys, flat[4 + 2 * i : 6 + 2 * i], strict=True))
        new_p, new_st = getattr(optim, kind)(lr, **hyper).step(p, g, st)
        return (*new_p.values(), *(v for s in slots for v in new_st[s].values()))

    inputs = [torch.tensor(LR[kind], dtype=F64), *params.values(), *g2.values()]
    inputs += [v for s in slots for v in state[s].values()]
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(one_step, inputs)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_zero_second_moment_has_finite_gradient(kind):
    """At the first step with a zero gradient entry, v = 0. The update there is
    -lr * g / (|g| + eps) (bias corrections cancel), whose derivative at g = 0 is -lr / eps;
    a plain sqrt would give 0 * inf = NaN instead."""
    lr, eps = 0.01, 1e-8
    opt = getattr(optim, kind)(lr, eps=eps)
    p = torch.tensor([0.3, -0.2, 0.1], dtype=F64, requires_grad=True)
    g = torch.tensor([0.5, 0.0, -0.7], dtype=F64, requires_grad=True)
    new_p, new_state = opt.step({"p": p}, {"p": g}, opt.init({"p": p}))
    assert new_state["exp_avg_sq"]["p"][1] == 0
    d_p, d_g = torch.autograd.grad(new_p["p"][1], (p, g))
    assert torch.isfinite(d_p).all() and torch.isfinite(d_g).all()
    assert d_g[1].item() == pytest.approx(-lr / eps, rel=1e-6)
    assert d_g[[0, 2]].abs().max() < 1e-12  # entries are independent
    decay = 1 - lr * 1e-2 if kind == "adamw" else 1.0  # AdamW's default weight_decay
    assert d_p[1].item() == pytest.approx(decay, rel=1e-12)


def test_errors_name_the_fix():
    with pytest.raises(TypeError, match="lr must be a float, a 0-d tensor, a dict of tensors"):
        optim.sgd("0.1")
    with pytest.raises(ValueError, match="tensor lr must be 0-d"):
        optim.adam(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in"):
        optim.adam(0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        optim.clip_grad_norm(optim.sgd(0.1), 0.0)
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine(0.1, total_steps=5, warmup_steps=5)
    params = make_params()
    for kind in ("sgd", "adam", "adamw"):
        opt = getattr(optim, kind)(0.1)
        state = opt.init(params)
        with pytest.raises(ValueError, match=r"grads must have the same keys.*missing \['b'\]"):
            opt.step(params, {"w": params["w"]}, state)
        with pytest.raises(ValueError, match=r"unexpected \['c'\]"):
            opt.step(params, {**params, "c": params["b"]}, state)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_decay_mask_matches_torch_parameter_groups(kind):
    """``decay_mask=matrices_only`` == torch with the bias in a group without weight decay."""
    params = make_params()
    hyper = {"weight_decay": 0.2, **({"momentum": 0.9} if kind == "sgd" else {})}
    opt = getattr(optim, kind)(LR[kind], decay_mask=optim.matrices_only, **hyper)
    state = opt.init(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    groups = [{"params": [leaves["w"]]}, {"params": [leaves["b"]], "weight_decay": 0.0}]
    ref = TORCH[kind](groups, lr=LR[kind], **hyper)
    for grads in make_grads(6):
        params, state = opt.step(params, grads, state)
        for k, leaf in leaves.items():
            leaf.grad = grads[k].clone()
        ref.step()
        assert_close(params, {k: v.detach() for k, v in leaves.items()})
    # The mask made the difference: one step from the same start decays only ``w``.
    unmasked = getattr(optim, kind)(LR[kind], **hyper)
    start, grads = make_params(), make_grads(1)[0]
    plain, _ = unmasked.step(start, grads, unmasked.init(start))
    masked, _ = opt.step(start, grads, opt.init(start))
    assert torch.equal(plain["w"], masked["w"]) and not torch.equal(plain["b"], masked["b"])


def as_tensors(hyper):
    """Every numeric hyperparameter as a 0-d float64 tensor (the flags stay bools)."""
    out = {}
    for k, v in hyper.items():
        if k == "betas":
            out[k] = tuple(torch.tensor(b, dtype=F64) for b in v)
        elif isinstance(v, bool):
            out[k] = v
        else:
            out[k] = torch.tensor(v, dtype=F64)
    return out


@pytest.mark.parametrize(("kind", "hyper"), CASES, ids=IDS)
def test_tensor_hyperparameters_match_torch_optim_step_for_step(kind, hyper):
    """Every hyperparameter as a 0-d tensor: still torch.optim, step for step."""
    tensors = as_tensors(hyper)
    compare_with_torch(kind, hyper, torch.tensor(LR[kind], dtype=F64), LR[kind],
                       metapl_hyper=tensors)  # fmt: skip


def test_per_parameter_lr_matches_torch_parameter_groups():
    """A dict of learning rates keyed like the parameters = one torch param group per tensor."""
    params, lrs = make_params(), {"w": 0.05, "b": 0.2}
    opt = optim.sgd({k: torch.tensor(v, dtype=F64) for k, v in lrs.items()}, momentum=0.9)
    state = opt.init(params)
    leaves = {k: v.clone() for k, v in params.items()}
    ref = torch.optim.SGD([{"params": [leaves[k]], "lr": lrs[k]} for k in leaves], momentum=0.9)
    for grads in make_grads(6):
        params, state = opt.step(params, grads, state)
        for k, leaf in leaves.items():
            leaf.grad = grads[k].clone()
        ref.step()
        assert_close(params, leaves)


GRADCHECK_HYPER = [
    ("sgd", {"momentum": 0.9, "weight_decay": 0.1}),
    ("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("sgd", {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1, "maximize": True}),
    ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6, "eps_root": 1e-4,
              "amsgrad": True}),
    ("adamw", {"weight_decay": 0.3, "betas": (0.5, 0.9)}),
    ("rmsprop", {"alpha": 0.8, "eps": 1e-3}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-3, "weight_decay": 0.1, "momentum": 0.5,
                 "centered": True, "maximize": True}),
    ("adagrad", {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.3,
                 "eps": 1e-3}),
]  # fmt: skip


def per_parameter(value, seed=0):
    """A per-parameter tree around ``value``: one value per entry of ``w`` (within [0.5, 1] x
    value), one 0-d value for ``b``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": value * (0.5 + 0.5 * torch.rand(3, 4, generator=gen, dtype=F64)),
        "b": torch.tensor(value * 0.7, dtype=F64),
    }


@pytest.mark.parametrize("form", ["0-d", "per-parameter"])
@pytest.mark.parametrize(("kind", "hyper"), GRADCHECK_HYPER, ids=case_ids(GRADCHECK_HYPER))
def test_gradcheck_tensor_hyperparameters(kind, hyper, form):
    """d (two steps) / d (every numeric hyperparameter, lr included) against finite
    differences, each hyperparameter a 0-d tensor or a per-parameter tree."""
    params, grads = make_params(), make_grads(2)
    grads[0] = {k: v.sign() * (v.abs() + 1) for k, v in grads[0].items()}  # smooth sqrt(v)
    numbers = {"lr": LR[kind], **{k: v for k, v in hyper.items() if not isinstance(v, bool)}}
    if "betas" in numbers:
        numbers["beta1"], numbers["beta2"] = numbers.pop("betas")
    flags = {k: v for k, v in hyper.items() if isinstance(v, bool)}
    if form == "0-d":
        inputs = {k: torch.tensor(v, dtype=F64) for k, v in numbers.items()}
    else:
        inputs = {k: per_parameter(v, seed=i) for i, (k, v) in enumerate(numbers.items())}
    flat, spec = torch.utils._pytree.tree_flatten(inputs)

    def two_steps(*leaves):
        h = torch.utils._pytree.tree_unflatten(list(leaves), spec)
        if "beta1" in h:
            h["betas"] = (h.pop("beta1"), h.pop("beta2"))
        opt = getattr(optim, kind)(**h, **flags)
        p, st = params, opt.init(params)
        for g in grads:
            p, st = opt.step(p, g, st)
        return tuple(p.values())

    assert torch.autograd.gradcheck(two_steps, [x.requires_grad_() for x in flat])


def test_per_parameter_lr_errors_name_the_fix():
    params = make_params()
    with pytest.raises(ValueError, match=r"per-parameter lr must have the same keys.*\['b'\]"):
        optim.sgd({"w": torch.tensor(0.1)}).init(params)
    for bad in (torch.ones(3), torch.ones(2, 3, 4), torch.ones(1), torch.ones(1, 4)):
        with pytest.raises(ValueError, match=r"lr\['w'\] has shape .* but the parameter 'w' has"):
            optim.adam({"w": bad, "b": torch.ones(4)}).init(params)
    with pytest.raises(ValueError, match="a tensor momentum must be 0-d"):
        optim.sgd(0.1, momentum=torch.ones(2))


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_float64_schedule_keeps_float32_parameters_float32(kind):
    """warmup_cosine computes in float64; a 0-d float32 parameter (e.g. a learned
    hyperparameter meta-optimized with these optimizers) must stay float32."""
    params = {"log_lr": torch.tensor(-2.0), "w": torch.ones(3)}
    opt = getattr(optim, kind)(optim.warmup_cosine(0.1, total_steps=10, warmup_steps=2))
    new, _ = opt.step(params, {k: torch.ones_like(v) for k, v in params.items()}, opt.init(params))
    assert all(v.dtype == torch.float32 for v in new.values())
