"""Data parallel MPL on CPU with gloo: 2 processes == 1 process on the same global batch."""

import functools
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metapl
from metapl import distributed, optim

STEPS, B_L, B_U = 3, 8, 16

CONFIGS = {
    "exact": dict(meta_grad="exact", uda=metapl.UDA(1.0, 0.5, 0.4)),
    # K = 2: the second step's H_ss a (forward mode) is averaged across processes too
    "exact_forward_lookahead_2": dict(meta_grad="exact", curvature="forward", lookahead_steps=2),
    "finite_difference": dict(meta_grad="finite_difference"),
    "first_order": dict(meta_grad="first_order", h_baseline_decay=0.9),
    "none": dict(meta_grad=None),
}


def _batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x_u = torch.randn(B_U, 4, generator=g, dtype=torch.float64)
        yield (
            torch.randn(B_L, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B_L,), generator=g),
            x_u,
            x_u + 0.1 * torch.randn(B_U, 4, generator=g, dtype=torch.float64),
        )


def _argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _train(config: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)

    def mlp():
        return torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
        ).double()

    mpl = metapl.MPL(
        mlp(),
        mlp(),
        optim.sgd(0.2, momentum=0.9),
        optim.adam(0.05),
        **CONFIGS[config],
        reduce=distributed.reduce_mean(),
    )
    # Processes draw different random streams than one process does; label every example by
    # its argmax instead of sampling so that only the averaging is under test.
    with mock.patch.object(metapl.mpl.step, "sample_categorical", _argmax_labels):
        for x_l, y_l, x_u, x_us in _batches():
            part = lambda x: x.chunk(world)[rank]  # noqa: E731
            metrics = mpl.step(part(x_l), part(y_l), part(x_u), part(x_us), sync=False)
    # Metrics are of the whole batch too (the logit-gradient RMS averages per-shard means).
    logged = {f"m.{k}": v for k, v in metrics.items() if k.startswith(("mpl/", "student/"))}
    return {
        **mpl.teacher.state_dict(),
        **{f"s.{k}": v for k, v in mpl.student.state_dict().items()},
        **logged,
    }


def _finetune(rank: int, world: int) -> dict[str, torch.Tensor]:
    """The finetune phase on a BatchNorm model: after one step the running mean of N processes
    (averaged across them) equals one process's on the whole batch. (Later steps differ: each
    process normalises with its own batch statistics, as DDP without SyncBatchNorm.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    x_l, y_l, *_ = next(_batches())
    batches = [(x_l.chunk(world)[rank], y_l.chunk(world)[rank])]
    metapl.finetune(model, batches, optim.sgd(0.1), reduce=distributed.reduce_mean())
    return {k: v for k, v in model.state_dict().items() if k.endswith("running_mean")}


def _gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    names = (p / "comm" for p in tasks.iterdir()) if tasks.is_dir() else ()
    return [n for n in (p.read_text().strip() for p in names) if "gloo" in n]


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {config: _train(config, rank, world) for config in CONFIGS}
        results["finetune"] = _finetune(rank, world)
        if rank == 0:
            torch.save(results, out)
    except BaseException:
        distributed.shutdown(clean=False)
        raise
    distributed.shutdown()  # a barrier, then destroy_process_group
    # The group is gone with its threads: none may be left to race the interpreter's exit
    # (they did when torch.func, first used after init, held the group: a SIGABRT at exit
    # about 1 run in 20).
    assert not _gloo_threads(), f"rank {rank}: {_gloo_threads()} outlived destroy_process_group"


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp / "rank0.pt")), nprocs=2)
    return torch.load(tmp / "rank0.pt")


@pytest.mark.parametrize("config", [*CONFIGS, "finetune"])
def test_two_processes_equal_one(two_process_results, config):
    train = _finetune if config == "finetune" else functools.partial(_train, config)
    single, double = train(rank=0, world=1), two_process_results[config]
    assert single.keys() == double.keys()
    for k in single:
        torch.testing.assert_close(double[k], single[k], rtol=1e-10, atol=1e-12, msg=k)
