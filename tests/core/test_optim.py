"""metapl.optim: step-for-step equality with torch.optim, schedules, purity, differentiability."""

import math

import pytest
import torch
from reference import (
    F64,
    assert_close,
    one_thread,  # noqa: F401 (autouse fixture)
)
from torch.utils import _pytree as pytree

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
    (
        "rmsprop",
        {
            "alpha": 0.9,
            "eps": 1e-4,
            "weight_decay": 0.1,
            "momentum": 0.5,
            "centered": True,
            "maximize": True,
        },
    ),
    ("adagrad", {}),
    ("adagrad", {"lr_decay": 0.1}),
    (
        "adagrad",
        {
            "lr_decay": 0.05,
            "weight_decay": 0.1,
            "initial_accumulator_value": 0.5,
            "eps": 1e-6,
            "maximize": True,
        },
    ),
]


def case_ids(cases):
    return [
        f"{kind}-{'-'.join(f'{k}={v}' for k, v in hyper.items()) or 'default'}"
        for kind, hyper in cases
    ]


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
        0: 0.0,
        1: 0.0,  # wait
        2: 0.25,
        3: 0.5,
        4: 0.75,
        5: 1.0,  # linear warm-up to base_lr
        6: 1.0,  # cosine starts at base_lr; decay over 20 - 2 - 4 = 14 steps
        8: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 14)),
        13: 0.55,  # middle of the cosine: min_lr + (base_lr - min_lr) / 2
        20: 0.1,
        30: 0.1,  # end, and clamped after it
    }
    for step, value in expected.items():
        assert lr(torch.tensor(float(step))).item() == pytest.approx(value, abs=1e-12), step
    no_warmup = optim.warmup_cosine(2.0, total_steps=10)
    assert [no_warmup(torch.tensor(s)).item() for s in (0, 5, 10)] == pytest.approx([2, 1, 0])


def snapshot(tree):
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def assert_identical(tree, snap):
    """Same structure, same values (``snap`` was taken with ``snapshot`` before the call)."""
    leaves, spec = pytree.tree_flatten(tree)
    snap_leaves, snap_spec = pytree.tree_flatten(snap)
    assert spec == snap_spec
    for leaf, before in zip(leaves, snap_leaves, strict=True):
        assert torch.equal(leaf, before) if isinstance(leaf, torch.Tensor) else leaf == before


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
    compare_with_torch(
        kind, hyper, torch.tensor(LR[kind], dtype=F64), LR[kind], metapl_hyper=tensors
    )


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
    (
        "adam",
        {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6, "eps_root": 1e-4, "amsgrad": True},
    ),
    ("adamw", {"weight_decay": 0.3, "betas": (0.5, 0.9)}),
    ("rmsprop", {"alpha": 0.8, "eps": 1e-3}),
    (
        "rmsprop",
        {
            "alpha": 0.9,
            "eps": 1e-3,
            "weight_decay": 0.1,
            "momentum": 0.5,
            "centered": True,
            "maximize": True,
        },
    ),
    (
        "adagrad",
        {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.3, "eps": 1e-3},
    ),
]


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
    flat, spec = pytree.tree_flatten(inputs)

    def two_steps(*leaves):
        h = pytree.tree_unflatten(list(leaves), spec)
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


# --------------------------------------------------------------------------- trees

GROUP_CASES = [
    ("sgd", {"momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1}),
    ("sgd", {"momentum": 0.8, "weight_decay": 0.1, "nesterov": True, "maximize": True}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw", {"betas": (0.5, 0.9), "weight_decay": 0.3}),
    (
        "rmsprop",
        {"alpha": 0.9, "eps": 1e-4, "momentum": 0.5, "weight_decay": 0.1, "centered": True},
    ),
    (
        "adagrad",
        {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.3, "eps": 1e-6},
    ),
]


def split_hyper(kind, hyper):
    """``(numbers, flags)``: the numeric hyperparameters, lr included, and the bool flags."""
    numbers = {"lr": LR[kind], **{k: v for k, v in hyper.items() if not isinstance(v, bool)}}
    return numbers, {k: v for k, v in hyper.items() if isinstance(v, bool)}


def per_parameter_trees(numbers):
    """Each number as a per-parameter tree (``betas`` as a pair of trees)."""
    trees = {}
    for i, (k, v) in enumerate(numbers.items()):
        if k == "betas":
            trees[k] = tuple(per_parameter(b, seed=10 * i + j) for j, b in enumerate(v))
        else:
            trees[k] = per_parameter(v, seed=i)
    return trees


@pytest.mark.parametrize(("kind", "hyper"), GROUP_CASES, ids=case_ids(GROUP_CASES))
def test_per_parameter_trees_match_torch_parameter_groups(kind, hyper):
    """Every numeric hyperparameter a per-parameter tree (one value per entry of ``w``, one
    0-d value for ``b``; a per-tensor weight_decay among them) = torch.optim with one
    parameter group per scalar entry, each with its own values (the optimizers act entry by
    entry), step for step."""
    numbers, flags = split_hyper(kind, hyper)
    trees = per_parameter_trees(numbers)
    params = make_params()
    opt = getattr(optim, kind)(**trees, **flags)
    state = opt.init(params)

    def entry(tree, k, j):
        return tree[k].expand(params[k].shape).reshape(-1)[j].item()

    leaves, groups = {}, []
    for k, p in params.items():
        leaves[k] = [x.clone() for x in p.reshape(-1)]
        for j, leaf in enumerate(leaves[k]):
            group = {n: entry(t, k, j) for n, t in trees.items() if n != "betas"}
            if "betas" in trees:
                group["betas"] = tuple(entry(t, k, j) for t in trees["betas"])
            groups.append({"params": [leaf], **group})
    ref = TORCH[kind](groups, **numbers, **flags)  # numbers: defaults that pass torch's checks
    if kind == "adagrad":  # torch fills every sum from the constructor's value, not the group's
        for group in groups:
            ref.state[group["params"][0]]["sum"].fill_(group["initial_accumulator_value"])
    for grads in make_grads(10):
        params, state = opt.step(params, grads, state)
        for k, entries in leaves.items():
            for leaf, g in zip(entries, grads[k].reshape(-1), strict=True):
                leaf.grad = g.clone()
        ref.step()
        assert_close(
            params, {k: torch.stack(v).reshape(params[k].shape) for k, v in leaves.items()}
        )


def nest(flat):
    """``{"w", "b"}`` -> ``{"net": [{"weight": w}, (b,)]}``: a dict, a list and a tuple."""
    return {"net": [{"weight": flat["w"]}, (flat["b"],)]}


def unnest(tree):
    return {"w": tree["net"][0]["weight"], "b": tree["net"][1][0]}


def nest_hyper(trees):
    return {k: tuple(map(nest, v)) if k == "betas" else nest(v) for k, v in trees.items()}


@pytest.mark.parametrize(("kind", "hyper"), GROUP_CASES, ids=case_ids(GROUP_CASES))
def test_nested_trees_give_the_flat_dict_numbers(kind, hyper):
    """Params, grads, state and per-parameter hyperparameters as nested dict / list / tuple
    trees: the same numbers as the flat dict, state slots in the params' structure, and
    ``decay_mask`` sees each leaf's dotted path (a flat dict's key). A flat dict's key order
    does not matter."""
    numbers, flags = split_hyper(kind, hyper)
    trees = per_parameter_trees(numbers)
    seen = {"flat": [], "nested": []}

    def mask(which):
        return lambda name, p: seen[which].append(name) or name in ("w", "net.0.weight")

    flat_opt = getattr(optim, kind)(**trees, **flags, decay_mask=mask("flat"))
    nested_opt = getattr(optim, kind)(**nest_hyper(trees), **flags, decay_mask=mask("nested"))
    flat, nested = make_params(), nest(make_params())
    flat_state, nested_state = flat_opt.init(flat), nested_opt.init(nested)
    for grads in make_grads(4):
        flat, flat_state = flat_opt.step(flat, dict(reversed(grads.items())), flat_state)
        nested, nested_state = nested_opt.step(nested, nest(grads), nested_state)
        assert pytree.tree_structure(nested) == pytree.tree_structure(nest(make_params()))
        assert_identical(unnest(nested), flat)
        assert nested_state.keys() == flat_state.keys()
        for slot in state_slots(flat_state):
            assert_identical(nested_state[slot], nest(flat_state[slot]))
        assert_identical(nested_state["step"], flat_state["step"])
    assert seen["flat"][:2] == ["w", "b"]
    assert seen["nested"][:2] == ["net.0.weight", "net.1.0"]
    # The mask made a difference: b is not decayed.
    unmasked = getattr(optim, kind)(**trees, **flags)
    start, grads = make_params(), make_grads(1)[0]
    plain, _ = unmasked.step(start, grads, unmasked.init(start))
    masked, _ = flat_opt.step(start, grads, flat_opt.init(start))
    assert torch.equal(plain["w"], masked["w"]) and not torch.equal(plain["b"], masked["b"])


def test_nested_inputs_never_mutated():
    trees = nest_hyper(per_parameter_trees({"lr": 0.01, "alpha": 0.9, "momentum": 0.5}))
    opt = optim.rmsprop(**trees, centered=True, weight_decay=0.1)
    params, (g1, g2) = nest(make_params()), [nest(g) for g in make_grads(2)]
    _, state = opt.step(params, g1, opt.init(params))
    inputs = {"params": params, "grads": g2, "state": state, "hyper": trees}
    before = snapshot(inputs)
    opt.step(params, g2, state)
    assert_identical(inputs, before)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kind", "name", "base"),
    [
        ("sgd", "momentum", {}),
        ("sgd", "dampening", {"momentum": 0.9}),
        ("sgd", "weight_decay", {}),
        ("adam", "eps_root", {}),
        ("rmsprop", "momentum", {}),
        ("adagrad", "lr_decay", {}),
    ],
)
def test_a_tensor_zero_runs_the_feature_code_with_the_same_numbers(kind, name, base):
    """Type decides, not value: a 0-d tensor of 0 runs the feature (its slot exists, gradients
    reach it) with the numbers of the feature off."""
    value = torch.tensor(0.0, dtype=F64, requires_grad=True)
    off, on = (
        getattr(optim, kind)(LR[kind], **base),
        getattr(optim, kind)(LR[kind], **base, **{name: value}),
    )
    p_off = p_on = make_params()
    st_off, st_on = off.init(p_off), on.init(p_on)
    for grads in make_grads(3):
        p_off, st_off = off.step(p_off, grads, st_off)
        p_on, st_on = on.step(p_on, grads, st_on)
    assert_close(p_on, p_off, rtol=1e-14, atol=1e-15)
    if name == "momentum":
        assert "momentum" in st_on and "momentum" not in st_off
    (d_value,) = torch.autograd.grad(p_on["w"].sum(), value)
    assert d_value != 0


@pytest.mark.parametrize("kind", ["adam", "adamw"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_eps_root_keeps_second_derivatives_at_a_zero_gradient(kind, amsgrad):
    """A zero gradient entry at the first step has v = 0. With eps = 0 its update is 0 / 0:
    NaN (as torch.optim's with eps=0), and so is its derivative. eps_root > 0, added inside the
    square root, keeps the update and its first and second derivatives finite and correct
    (gradgradcheck), also with eps = 0. (With eps > 0 and eps_root = 0 the derivatives at
    v = 0 are finite too, through the zero-safe square root.)"""
    p = torch.tensor([0.3, -0.2, 0.1], dtype=F64, requires_grad=True)
    g = torch.tensor([0.5, 0.0, -0.7], dtype=F64, requires_grad=True)

    def one_step(eps, eps_root):
        opt = getattr(optim, kind)(0.01, eps=eps, eps_root=eps_root, amsgrad=amsgrad)
        return lambda p, g: opt.step({"p": p}, {"p": g}, opt.init({"p": p}))[0]["p"]

    bare = one_step(0.0, 0.0)(p, g)
    assert bare[1].isnan() and bare[[0, 2]].isfinite().all()
    leaf = p.detach().clone()
    leaf.grad = g.detach().clone()
    TORCH[kind]([leaf], lr=0.01, eps=0.0, amsgrad=amsgrad).step()
    assert leaf[1].isnan()
    (d_bare,) = torch.autograd.grad(bare[1], g)
    assert not d_bare[1].isfinite()
    for eps in (0.0, 1e-8):
        step = one_step(eps, 1e-4)
        new = step(p, g)
        assert new.isfinite().all()
        (d_g,) = torch.autograd.grad(new[1], g, create_graph=True)
        (dd_g,) = torch.autograd.grad(d_g[1], g)
        assert d_g.isfinite().all() and dd_g.isfinite().all()
        assert torch.autograd.gradgradcheck(step, (p, g))


def test_hyperparameter_errors_name_the_fix():
    params, grads = make_params(), make_grads(1)[0]
    makers = {
        "lr": lambda h: optim.sgd(h),
        "momentum": lambda h: optim.sgd(0.1, momentum=h),
        "dampening": lambda h: optim.sgd(0.1, momentum=0.9, dampening=h),
        "weight_decay": lambda h: optim.adamw(0.1, weight_decay=h),
        "betas[0]": lambda h: optim.adam(0.1, betas=(h, 0.999)),
        "betas[1]": lambda h: optim.adam(0.1, betas=(0.9, h)),
        "eps": lambda h: optim.rmsprop(0.1, eps=h),
        "eps_root": lambda h: optim.adam(0.1, eps_root=h),
        "alpha": lambda h: optim.rmsprop(0.1, alpha=h),
        "lr_decay": lambda h: optim.adagrad(0.1, lr_decay=h),
        "initial_accumulator_value": lambda h: optim.adagrad(initial_accumulator_value=h),
    }
    for name, make in makers.items():
        esc = name.replace("[", r"\[").replace("]", r"\]")
        # a leaf that would broadcast ([1] for a [3, 4] weight) is refused, naming the leaf
        for bad in (torch.ones(1), torch.ones(4)):
            with pytest.raises(
                ValueError,
                match=rf"{esc}\['w'\] has shape \({bad.numel()},\) "
                r"but the parameter 'w' has shape \(3, 4\)",
            ):
                make({"w": bad, "b": torch.tensor(0.1)}).init(params)
        with pytest.raises(ValueError, match=rf"a tensor {esc} must be 0-d, got shape \(2,\)"):
            make(torch.ones(2))
        with pytest.raises(TypeError, match=rf"per-parameter {esc} must be a tree of tensors"):
            make({"w": 0.1, "b": 0.1})
        with pytest.raises(
            ValueError,
            match=rf"per-parameter {esc} must have the same keys as "
            r"the parameters; missing \['b'\]",
        ):
            make({"w": torch.tensor(0.1)}).init(params)
        with pytest.raises(ValueError, match=rf"^{esc} must be (>=|in)"):
            make(-0.5)
        with pytest.raises(TypeError, match=rf"{esc} must be a float, a 0-d tensor"):
            make("0.1")
    # also at step: the engine may pass a state it did not get from this optimizer's init
    opt = optim.sgd({"w": torch.ones(1), "b": torch.tensor(0.1)})
    with pytest.raises(ValueError, match=r"lr\['w'\] has shape \(1,\)"):
        opt.step(params, grads, optim.sgd(0.1).init(params))
    with pytest.raises(
        ValueError,
        match=r"lr\['net.0.weight'\] has shape \(1,\) but the "
        r"parameter 'net.0.weight' has shape \(3, 4\)",
    ):
        optim.rmsprop(nest({"w": torch.ones(1), "b": torch.tensor(0.1)})).init(nest(params))
    with pytest.raises(ValueError, match=r"a tensor lr \(from the schedule\) must be 0-d"):
        optim.sgd(lambda step: torch.ones(3)).step(params, grads, optim.sgd(0.1).init(params))
    with pytest.raises(
        ValueError,
        match=r"lr must be >= 0, got -0.1 \(for gradient ascent "
        "pass maximize=True\\)",
    ):
        optim.adam(-0.1)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        optim.rmsprop(alpha=1.5)
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\), got 1.0"):
        optim.adamw(0.1, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="betas must be a pair"):
        optim.adam(0.1, betas=0.9)
    for dampening in (0.1, torch.tensor(0.0)):
        with pytest.raises(ValueError, match="nesterov=True needs momentum > 0 and dampening=0"):
            optim.sgd(0.1, momentum=0.9, nesterov=True, dampening=dampening)
    with pytest.raises(ValueError, match=r"state has no slot \['momentum'\]"):
        optim.sgd(0.1, momentum=0.9).step(params, grads, optim.sgd(0.1).init(params))
    opt = optim.adagrad()
    with pytest.raises(
        ValueError,
        match=r"state\['sum'\] must have the same keys as the "
        r"parameters; missing \['b'\]",
    ):
        opt.step(params, grads, {**opt.init(params), "sum": {"w": params["w"]}})


# --------------------------------------------------------------------------- transforms


def test_step_compiles_fullgraph_with_trees_schedules_and_masks():
    """A nested tree, a schedule, a per-parameter tree, a tensor hyperparameter and a decay
    mask inside torch.compile(fullgraph=True): the eager numbers."""
    opt = optim.rmsprop(
        optim.warmup_cosine(0.01, total_steps=10, warmup_steps=2),
        alpha=nest(per_parameter(0.9)),
        momentum=torch.tensor(0.5, dtype=F64),
        weight_decay=0.1,
        centered=True,
        decay_mask=optim.matrices_only,
    )
    params, grads = nest(make_params()), [nest(g) for g in make_grads(3)]
    compiled = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    eager_p, eager_st = compiled_p, compiled_st = params, opt.init(params)
    for g in grads:
        eager_p, eager_st = opt.step(eager_p, g, eager_st)
        compiled_p, compiled_st = compiled(compiled_p, g, compiled_st)
    assert_close(compiled_p, eager_p, rtol=1e-14, atol=1e-15)
    assert_close(compiled_st, eager_st, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("kind", ["rmsprop", "adagrad"])
def test_vmap_over_hyperparameters_equals_a_loop(kind):
    """torch.func.vmap over a batch of learning rates and per-parameter eps trees, and
    torch.func.grad through two steps in them, equal a Python loop with autograd."""
    params, grads = make_params(), make_grads(2)
    lrs = torch.tensor([0.01, 0.03, 0.1], dtype=F64)
    eps = {"w": torch.rand(3, 3, 4, dtype=F64) * 1e-3, "b": torch.rand(3, dtype=F64) * 1e-3}

    def loss(lr, eps_tree):
        opt = getattr(optim, kind)(lr, eps=eps_tree)
        p, st = params, opt.init(params)
        for g in grads:
            p, st = opt.step(p, g, st)
        return sum((v * v).sum() for v in p.values())

    batched = torch.func.vmap(torch.func.grad_and_value(loss, argnums=(0, 1)))(lrs, eps)
    for i in range(3):
        lr = lrs[i].clone().requires_grad_()
        eps_i = {k: v[i].clone().requires_grad_() for k, v in eps.items()}
        value = loss(lr, eps_i)
        d_lr, d_w, d_b = torch.autograd.grad(value, [lr, eps_i["w"], eps_i["b"]])
        (b_lr, b_eps), b_value = batched
        assert_close(b_value[i], value, rtol=1e-14, atol=0)
        assert_close([b_lr[i], b_eps["w"][i], b_eps["b"][i]], [d_lr, d_w, d_b], rtol=1e-12, atol=0)
