"""CUDA paths: run on a GPU machine with ``pytest -m gpu`` (deselected by default)."""

import copy
import json

import pytest
import torch
from support import ROOT, TINY_DATA, load_script

import metapl
from metapl import optim
from metapl.data.fake import write_fake_cifar
from metapl.models import wide_resnet28

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _mpl(device, dtype, **kwargs):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.BatchNorm1d(32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )
    student = copy.deepcopy(teacher)
    torch.nn.init.normal_(student[0].weight)
    teacher, student = teacher.to(device, dtype), student.to(device, dtype)
    teacher_opt = optim.sgd(0.1, momentum=0.9)
    student_opt = optim.sgd(0.2, momentum=0.5, nesterov=True)
    return metapl.MPL(
        teacher,
        student,
        teacher_opt,
        student_opt,
        uda=metapl.UDA(1.0, 0.5, 0.3),
        ema_decay=0.9,
        **kwargs,
    )


def _batch(device, dtype):
    g = torch.Generator().manual_seed(1)
    x_u = torch.randn(24, 6, generator=g, dtype=dtype)
    args = (
        torch.randn(8, 6, generator=g, dtype=dtype),
        torch.randint(0, 4, (8,), generator=g),
        x_u,
        x_u + 0.1 * torch.randn(24, 6, generator=g, dtype=dtype),
    )
    return tuple(a.to(device) for a in args)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_cuda_step_equals_cpu_step_in_float64(method):
    cpu, cuda = (
        _mpl("cpu", torch.float64, meta_grad=method),
        _mpl(CUDA, torch.float64, meta_grad=method),
    )
    for _ in range(2):
        cpu.step(*_batch("cpu", torch.float64))
        cuda.step(*_batch(CUDA, torch.float64))
    for k, v in cpu.teacher.state_dict().items():
        torch.testing.assert_close(cuda.teacher.state_dict()[k].cpu(), v, rtol=1e-9, atol=1e-11)


def test_compiled_step_equals_eager_on_cuda():
    eager, compiled = _mpl(CUDA, torch.float32), _mpl(CUDA, torch.float32, compile=True)
    for _ in range(3):
        m_e, m_c = (
            eager.step(*_batch(CUDA, torch.float32)),
            compiled.step(*_batch(CUDA, torch.float32)),
        )
    assert m_e == pytest.approx(m_c, rel=1e-4, abs=1e-6)
    for k, v in eager.student.state_dict().items():
        torch.testing.assert_close(compiled.student.state_dict()[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compile", [False, True])
def test_wideresnet_bf16_autocast_channels_last_step(compile):
    torch.manual_seed(0)
    nets = [wide_resnet28(2, 10).to(CUDA, memory_format=torch.channels_last) for _ in range(2)]
    mpl = metapl.MPL(
        *nets,
        optim.sgd(0.05, momentum=0.9),
        optim.sgd(0.05, momentum=0.9),
        uda=metapl.UDA(8.0, 0.7, 0.6),
        compile=compile,
    )
    x = torch.randn(3, 16, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):
            metrics = mpl.step(x[0], y, x[1], x[2])
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert all(p.dtype == torch.float32 for p in mpl.teacher.parameters())


def test_cifar_example_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    write_fake_cifar(tmp_path / "data", n_train=100, n_test=20)
    script = ROOT / "examples" / "cifar_mpl.py"
    module = load_script(script, "cifar_mpl_gpu")
    argv = [
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "run"),
        *TINY_DATA,
        "--steps",
        "3",
        "--finetune-steps",
        "1",
        "--compile",
        "--channels-last",
        "--json",
    ]
    results = module.main(argv)
    final = next(v for k, v in results.items() if k.startswith("test/student"))
    assert json.dumps(results) and 0 <= final <= 1
    # Resuming on the GPU restores the CPU RNG state saved in the checkpoint (issue 9, point 6).
    assert module.main([*argv, "--resume"]).keys() == results.keys()
