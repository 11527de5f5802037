"""Single-process or torchrun/DDP training through one set of calls.

Every helper is a no-op (or identity) without a process group, so a recipe is written once:
``init_distributed`` -> build model on ``dist_info.device`` -> ``wrap_ddp`` -> train ->
``cleanup_distributed``. Launch multi-GPU runs with ``torchrun --nproc_per_node N ...``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from monai_diffusion.engine.logging import set_log_rank

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "is_distributed",
    "barrier",
    "all_reduce_mean",
    "all_reduce_max",
    "all_gather_object",
    "broadcast_object",
    "wrap_ddp",
    "gradient_sync",
    "unwrap",
]


@dataclass
class DistInfo:
    """Where this process sits in the run.

    Attributes:
        rank: global rank (0 when single process).
        local_rank: rank on this machine; the GPU index on CUDA.
        world_size: number of processes.
        device: the device this process trains on.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, validates and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_setting: str, timeout: datetime.timedelta | None = None) -> DistInfo:
    """Pick the device and, under torchrun with ``WORLD_SIZE > 1``, join the process group.

    Reads torchrun's ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``
    through ``env://``). On CUDA each process uses ``cuda:LOCAL_RANK`` (made current with
    ``torch.cuda.set_device``) and NCCL; on CPU, gloo. With more than one process, console INFO
    lines come from rank 0 only (:func:`~monai_diffusion.engine.logging.set_log_rank`).

    Args:
        device_setting: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        timeout: collective timeout (None: torch's default, 10 min for NCCL). Raise it when one
            rank may wait long at a barrier, e.g. while rank 0 builds a data cache.

    Returns:
        :class:`DistInfo` for this process.

    Raises:
        ValueError: unknown setting, ``"cuda"`` without CUDA, or ``LOCAL_RANK`` beyond the GPUs.
    """
    if device_setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device.device: expected 'auto', 'cpu' or 'cuda', got {device_setting!r}")
    cuda_available = torch.cuda.is_available()
    if device_setting == "cuda" and not cuda_available:
        raise ValueError(
            "device.device is 'cuda' but CUDA is not available "
            f"(PyTorch {torch.__version__}, built for CUDA {torch.version.cuda}); use 'auto' or 'cpu'"
        )
    use_cuda = device_setting == "cuda" or (device_setting == "auto" and cuda_available)

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)

    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "lower --nproc_per_node or check CUDA_VISIBLE_DEVICES"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": "nccl" if use_cuda else "gloo", "rank": rank, "world_size": world_size}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if use_cuda:
            # Binds the communicator to this GPU, so barriers/collectives never guess the device.
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    if world_size > 1:
        set_log_rank(rank, world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_distributed() -> bool:
    """True when a process group is initialised (more than one process)."""
    return dist.is_available() and dist.is_initialized()


def cleanup_distributed(*models: nn.Module | None) -> None:
    """Leave the process group, if any (call at the end of a run, also after an error).

    Args:
        *models: the run's DDP-wrapped models (compiled or not; others are ignored). Their gradient reducers are
            released first, while the process group is still registered. A reducer released after
            ``destroy_process_group`` holds the group's last reference and destroys it with the GIL held; the group
            joins its gloo worker threads, and one of them may be waiting for the GIL to free the tensors of the
            last collective: a deadlock at exit (about one CPU run in five hung that way).
    """
    for model in models:
        ddp = _ddp_module(model)
        if ddp is not None:
            # The logger holds the reducer too; dropping both frees it here, with the group still alive.
            for attribute in ("logger", "reducer"):
                if hasattr(ddp, attribute):
                    delattr(ddp, attribute)
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; no-op without a process group."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor | float) -> float:
    """Mean of a scalar over all ranks (for logging losses/metrics, or a shared NaN decision).

    Args:
        value: a number or one-element tensor (detached; gradients do not flow).

    Returns:
        The mean over ranks as a Python float (the value itself without a process group).
    """
    tensor = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if not is_distributed():
        return float(tensor)
    tensor = tensor.to(_collective_device()).clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


def all_reduce_max(value: int) -> int:
    """The largest of an integer over all ranks (e.g. whether any rank received a stop signal).

    Args:
        value: this rank's integer.

    Returns:
        The maximum over ranks (``value`` itself without a process group).
    """
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order, on every rank (e.g. each rank's RNG state for a checkpoint).

    Args:
        obj: this rank's object.

    Returns:
        ``[object of rank 0, object of rank 1, ...]`` (``[obj]`` without a process group).
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank (e.g. a run folder name).

    Args:
        obj: the object on ``src``; ignored on other ranks.
        src: the sending rank.

    Returns:
        ``src``'s object on every rank (``obj`` itself without a process group).
    """
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(model: nn.Module, dist_info: DistInfo, **ddp_kwargs: Any) -> nn.Module:
    """Wrap a model in ``DistributedDataParallel`` when there is more than one process.

    The model must already be on ``dist_info.device``. DDP averages gradients across ranks in
    ``backward``; with gradient accumulation, run the non-final micro-batches under
    ``model.no_sync()`` to skip needless all-reduces.

    Args:
        model: the model to train.
        dist_info: from :func:`init_distributed`.
        **ddp_kwargs: passed to DDP, e.g. ``find_unused_parameters=True``.

    Returns:
        The DDP-wrapped model, or ``model`` itself when ``world_size == 1``.
    """
    if dist_info.world_size == 1:
        return model
    if dist_info.device.type == "cuda":
        return DistributedDataParallel(
            model, device_ids=[dist_info.local_rank], output_device=dist_info.local_rank, **ddp_kwargs
        )
    return DistributedDataParallel(model, **ddp_kwargs)


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's backward: DDP all-reduces gradients only when ``sync`` (the micro-batch that
    ends an optimizer step); the others accumulate locally under ``no_sync``. A no-op for an unwrapped model.

    Args:
        model: the model the forward runs through (DDP-wrapped or not, possibly compiled over DDP).
        sync: whether this backward ends an optimizer step.
    """
    ddp = _ddp_module(model)
    if sync or ddp is None:
        return contextlib.nullcontext()
    return ddp.no_sync()


def _ddp_module(model: nn.Module | None) -> DistributedDataParallel | None:
    """The DDP module a training model runs through (torch.compile's wrapper holds it as ``_orig_mod``), or None."""
    ddp = model._orig_mod if isinstance(getattr(model, "_orig_mod", None), nn.Module) else model
    return ddp if isinstance(ddp, DistributedDataParallel) else None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP and/or ``torch.compile`` wrappers (for saving, EMA, sampling).

    Args:
        model: a model, possibly wrapped.

    Returns:
        The innermost module (``model`` itself when not wrapped).
    """
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
