"""The engine on a real GPU: fp16/bf16 autocast and scalers, device setup, NCCL collectives.

Skipped where CUDA is unavailable (CI); run on a GPU machine with the rest of tests/engine.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monai_diffusion.engine import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    capture_rng_state,
    init_distributed,
    load_checkpoint,
    optimizer_step,
    peak_memory_mb,
    resolve_precision,
    restore_rng_state,
    save_checkpoint,
    unwrap,
    volume_panel,
    wrap_ddp,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)


def test_precision_on_cuda():
    fp16 = resolve_precision(True, CUDA)
    assert (fp16.name, fp16.device_type) == ("fp16", "cuda")
    layer = torch.nn.Linear(8, 8).to(CUDA)
    x = torch.randn(2, 8, device=CUDA)
    with fp16.autocast():
        assert layer(x).dtype == torch.float16
    assert fp16.make_scaler().is_enabled()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        bf16 = resolve_precision("bf16", CUDA)
        with bf16.autocast():
            assert layer(x).dtype == torch.bfloat16
        assert not bf16.make_scaler().is_enabled()


def test_fp16_scaler_skips_nan_step_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(CUDA)
    opt = build_optimizer(model.parameters(), lr=0.1, weight_decay=0.0)
    sched = build_lr_scheduler(opt, 2, "constant", None)
    precision = resolve_precision("fp16", CUDA)
    scaler = precision.make_scaler()
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()

    with precision.autocast():
        loss = model(torch.ones(2, 4, device=CUDA)).sum() * float("nan")
    scaler.scale(loss).backward()
    result = optimizer_step(opt, scaler, model.parameters(), 1.0, lr_scheduler=sched)
    assert not result.stepped and not math.isfinite(result.grad_norm)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert sched.last_epoch == 0 and scaler.get_scale() < scale

    for _ in range(30):  # the scale backs off until fp16 gradients fit, then steps go through
        with precision.autocast():
            loss = model(torch.ones(2, 4, device=CUDA)).float().pow(2).mean()
        scaler.scale(loss).backward()
        result = optimizer_step(opt, scaler, model.parameters(), 1.0, lr_scheduler=sched)
        if result.stepped:
            break
    assert result.stepped and math.isfinite(result.grad_norm) and sched.last_epoch == 1


def test_single_process_cuda_device(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for setting in ("cuda", "auto"):
        info = init_distributed(setting)
        assert info.device == CUDA and info.world_size == 1
    assert torch.cuda.current_device() == 0


def test_memory_checkpoint_rng_ema_panel_on_cuda(tmp_path):
    torch.cuda.reset_peak_memory_stats(CUDA)
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device=CUDA)  # 64 MiB
    assert peak_memory_mb(CUDA) >= 64
    del big

    model = torch.nn.Linear(3, 3).to(CUDA)
    ema = build_ema(model, 0.9)
    ema.update_parameters(model)
    assert next(ema.parameters()).device.type == "cuda"

    torch.cuda.manual_seed_all(5)
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "ema": ema.state_dict(), "rng": capture_rng_state()})
    expected = torch.rand(3, device=CUDA)
    torch.cuda.manual_seed_all(6)
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["model"]["weight"].device.type == "cpu"  # map_location="cpu" by default
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3, device=CUDA), expected)

    panel = volume_panel([("gpu", torch.rand(1, 1, 8, 10, 12, device=CUDA))])
    assert panel.dtype.name == "uint8" and panel.ndim == 3


def _nccl_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    # One GPU cannot host two NCCL ranks, so a 1-rank NCCL group checks the CUDA code paths.
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        assert all_reduce_mean(torch.tensor(3.0)) == 3.0  # a CPU tensor is moved to the GPU for NCCL
        assert all_reduce_mean(2.0) == 2.0
        assert broadcast_object({"a": 1}) == {"a": 1}
        barrier()
        model = torch.nn.Linear(3, 1).to("cuda:0")
        ddp = wrap_ddp(model, DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cuda", 0)))
        assert unwrap(ddp) is model and ddp.device_ids == [0]
        ddp(torch.ones(2, 3, device="cuda:0")).sum().backward()
        assert model.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_nccl_helpers_one_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nccl_worker, args=(port,), nprocs=1, join=True)
