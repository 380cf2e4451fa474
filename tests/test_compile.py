"""meta_grad under torch.compile(fullgraph=True): same numbers as eager, no recompiles."""

import pytest
import torch
import torch.nn.functional as F
from reference import (
    one_thread,  # noqa: F401 (autouse fixture)
    rel_err,
)
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call

import metapl
from metapl import optim

# Emitted by torch's own imports during compilation, not by metapl.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

torch.manual_seed(0)
TEACHER = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
STUDENT = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
OPT = optim.sgd(0.1, momentum=0.9)


def mpl_step(student, teacher, x_u, x_l, y_l, method="exact"):
    """A soft-label (or, for first_order, sampled hard-label) MPL teacher gradient, K = 2."""
    t_logits = functional_call(TEACHER, teacher, (x_u,))
    y_hard = t_logits.argmax(-1)  # deterministic "sample", so eager and compiled agree

    def inner_loss(s, t):
        s_logits = functional_call(STUDENT, s, (x_u,))
        if method == "score_function":
            return F.cross_entropy(s_logits, y_hard)
        soft = torch.softmax(functional_call(TEACHER, t, (x_u,)), -1)
        return -(soft * torch.log_softmax(s_logits, -1)).sum(-1).mean()

    def outer_loss(s):
        return F.cross_entropy(functional_call(STUDENT, s, (x_l,)), y_l)

    def log_prob(t):
        log_p = torch.log_softmax(functional_call(TEACHER, t, (x_u,)), -1)
        return log_p.gather(1, y_hard[:, None]).sum()

    kwargs = {"log_prob": log_prob} if method == "score_function" else {}
    return metapl.meta_grad(
        inner_loss, outer_loss, student, teacher, OPT, steps=2, method=method, **kwargs
    )


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=gen), torch.randn(8, 4, generator=gen), torch.arange(8) % 3


def check_compiled_matches_eager(method):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(mpl_step, backend=counter, fullgraph=True)
    student = {k: v.detach() for k, v in STUDENT.named_parameters()}
    teacher = {k: v.detach() for k, v in TEACHER.named_parameters()}
    for seed in (0, 1):  # the second call has new data of the same shapes
        got = compiled(student, teacher, *batch(seed), method=method)
        expected = mpl_step(student, teacher, *batch(seed), method=method)
        assert rel_err(got.teacher_grads, expected.teacher_grads) < 1e-5
        assert rel_err(got.student_params, expected.student_params) < 1e-6
        assert rel_err(got.opt_state["momentum"], expected.opt_state["momentum"]) < 1e-6
        assert got.outer_loss.item() == pytest.approx(expected.outer_loss.item(), rel=1e-6)
        assert max(g.abs().max() for g in expected.teacher_grads.values()) > 1e-4
    assert counter.frame_count == 1  # one graph, compiled once: no graph break, no recompile


def test_exact_compiles_fullgraph_without_recompiles():
    check_compiled_matches_eager("exact")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finite_difference", "score_function"])
def test_other_methods_compile_fullgraph(method):
    check_compiled_matches_eager(method)
