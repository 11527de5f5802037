"""Distributed helpers: single-process behaviour, and a real 2-process gloo run on CPU."""

from __future__ import annotations

import copy
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch.nn.parallel import DistributedDataParallel

from monai_diffusion.engine.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    unwrap,
    wrap_ddp,
)

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_plain(single_process):
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert info.is_main and not is_distributed()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model and unwrap(model) is model
    assert all_reduce_mean(torch.tensor(2.5)) == 2.5 and all_reduce_mean(3) == 3.0
    obj = {"a": 1}
    assert broadcast_object(obj) is obj
    assert all_reduce_max(15) == 15 and all_gather_object(obj) == [obj]
    barrier()
    cleanup_distributed()


def test_auto_picks_cpu_without_cuda(single_process, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert init_distributed("auto").device == torch.device("cpu")


def test_cuda_without_cuda_is_an_error(single_process, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' but CUDA is not available"):
        init_distributed("cuda")
    with pytest.raises(ValueError, match="device.device"):
        init_distributed("gpu")


def _worker(rank: int, world_size: int, port: int) -> None:
    # What torchrun would set for this process.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu", timeout=datetime.timedelta(seconds=60))
    try:
        assert (info.rank, info.local_rank, info.world_size) == (rank, rank, world_size)
        assert info.device == torch.device("cpu") and info.is_main == (rank == 0)
        assert is_distributed() and dist.get_backend() == "gloo"

        assert all_reduce_mean(float(rank)) == pytest.approx(0.5)
        assert all_reduce_mean(torch.tensor(2.0 * rank)) == pytest.approx(1.0)
        assert broadcast_object({"run": "autoencoder-1"} if rank == 0 else None) == {"run": "autoencoder-1"}
        assert all_reduce_max(15 if rank == 1 else 0) == 15  # a stop signal on one rank reaches all
        assert all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]

        torch.manual_seed(0)  # same initial weights on both ranks
        model = torch.nn.Linear(3, 1)
        initial = copy.deepcopy(model)
        ddp = wrap_ddp(model, info)
        assert isinstance(ddp, DistributedDataParallel) and unwrap(ddp) is model

        inputs = [torch.arange(6.0).reshape(2, 3) * (r + 1) for r in range(world_size)]
        ddp(inputs[rank]).pow(2).sum().backward()

        # DDP's gradient must be the mean of the per-rank gradients.
        local_grads = []
        for x in inputs:
            ref = copy.deepcopy(initial)
            ref(x).pow(2).sum().backward()
            local_grads.append([p.grad for p in ref.parameters()])
        for p, *per_rank in zip(model.parameters(), *local_grads):
            assert torch.allclose(p.grad, sum(per_rank) / world_size, rtol=1e-5)

        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [None] * world_size
        dist.all_gather_object(gathered, weights)
        assert all(torch.equal(gathered[0], w) for w in gathered)  # identical after one step
        assert not torch.equal(weights, torch.cat([p.flatten() for p in initial.parameters()]))
        barrier()

        # The reducer goes before the group: released after it, it would destroy the group with the GIL held
        # while a gloo thread may wait for the GIL to free the last gather's tensors (a deadlock at exit).
        cleanup_distributed(ddp, model, None)
        assert not is_distributed() and not hasattr(ddp, "reducer") and not hasattr(ddp, "logger")
    finally:
        cleanup_distributed()


def test_two_process_gloo():
    world_size = 2
    context = mp.spawn(_worker, args=(world_size, free_port()), nprocs=world_size, join=False)
    deadline = time.monotonic() + 90
    try:
        while not context.join(timeout=1):  # re-raises a worker's exception with its traceback
            if time.monotonic() > deadline:
                pytest.fail("2-process gloo test did not finish in 90 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
