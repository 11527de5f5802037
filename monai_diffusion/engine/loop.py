"""The parts of a training loop both recipes share, as small functions they call in order.

Starting a run (devices, seed, precision), what to resume and where the run folder is, the step budget (how many
micro-batches an epoch trains, which one ends an optimizer step, when the run stops), the scalars every optimizer
step logs, and the checkpoints written at the end of an epoch or on Ctrl-C. What a checkpoint holds stays the
recipe's choice: it passes its own ``save(name, epoch, batches_in_epoch)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from monai_diffusion.config.loading import save_config
from monai_diffusion.config.schema import AutoencoderTrainingConfig, Config, LDMTrainingConfig
from monai_diffusion.engine.checkpoint import prune_checkpoints, resolve_resume
from monai_diffusion.engine.distributed import DistInfo, broadcast_object, init_distributed
from monai_diffusion.engine.logging import get_logger, peak_memory_mb
from monai_diffusion.engine.optim import StepResult
from monai_diffusion.engine.precision import Precision, resolve_precision

__all__ = [
    "FAST_DEV_RUN_BATCHES",
    "StepBudget",
    "epoch_batches",
    "find_resume",
    "open_run_dir",
    "save_epoch_end",
    "save_interrupted",
    "start_run",
    "step_budget",
    "step_scalars",
]

logger = logging.getLogger("monai_diffusion")

# fast_dev_run trains this many micro-batches.
FAST_DEV_RUN_BATCHES = 2
SaveFn = Callable[[str, int, int], None]


def start_run(config: Config) -> tuple[DistInfo, Precision]:
    """Set up console logging, join the process group (under torchrun), seed this rank, set cuDNN and resolve the
    precision (logged)."""
    get_logger()
    dist = init_distributed(config.device.device)
    torch.manual_seed(config.seed + dist.rank)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = config.device.cudnn_benchmark
    return dist, resolve_precision(config.device.mixed_precision, dist.device)


# ------------------------------------------------------------------------------------------- run folder


def find_resume(config: Config, command: str, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names (see :func:`~monai_diffusion.engine.checkpoint.resolve_resume`) among this
    command's runs (``<output_dir>/<command>-*`` and the configured ``run_name``); None to start fresh, always under
    ``fast_dev_run``."""
    if config.fast_dev_run:
        return None
    output_dir = Path(config.output.output_dir)
    candidates = sorted(output_dir.glob(f"{command}-*/checkpoints/last.pt"))
    if config.output.run_name:
        candidates += sorted(output_dir.glob(f"{config.output.run_name}/checkpoints/last.pt"))
    return resolve_resume(resume, candidates)


def new_run_dir(config: Config, command: str, dist: DistInfo) -> Path:
    """``<output_dir>/<run_name or command-date-time>``, named by rank 0 and shared with the other ranks."""
    name = config.output.run_name or f"{command}-{datetime.now():%Y%m%d-%H%M%S}"
    name = broadcast_object(name)
    run_dir = Path(config.output.output_dir) / name
    if dist.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def open_run_dir(config: Config, command: str, dist: DistInfo, resume_path: Path | None, state: dict | None) -> Path:
    """The run folder: the resumed checkpoint's, or a new one; the resolved config is saved in it."""
    if state is not None:
        run_dir = resume_path.parent.parent
        logger.info("resuming from %s (step %d, epoch %d)", resume_path, state["step"], state["epoch"])
    else:
        run_dir = new_run_dir(config, command, dist)
    if dist.is_main:
        save_config(config, run_dir / "config.yaml")
    return run_dir


# ------------------------------------------------------------------------------------------- step budget


@dataclass(frozen=True)
class StepBudget:
    """How far a run goes, in micro-batches and optimizer steps.

    Attributes:
        micro_batches: micro-batches trained per epoch (this rank's loader length, 2 under fast_dev_run).
        accumulation: micro-batches per optimizer step (``gradient_accumulation_steps``).
        steps_per_epoch: optimizer steps per epoch (the last one may take fewer micro-batches).
        max_steps: the run stops after this many optimizer steps.
        max_epochs: ... or after this many epochs.
    """

    micro_batches: int
    accumulation: int
    steps_per_epoch: int
    max_steps: int
    max_epochs: int

    def ends_step(self, index: int) -> bool:
        """Whether micro-batch ``index`` of an epoch is the last of an optimizer step."""
        return (index + 1) % self.accumulation == 0 or index + 1 == self.micro_batches

    def position(self, epoch: int, done_in_epoch: int) -> tuple[int, int]:
        """(epoch, micro-batches done in it) for a checkpoint: a finished epoch resumes at the next one's start."""
        return (epoch + 1, 0) if done_in_epoch >= self.micro_batches else (epoch, done_in_epoch)


def step_budget(loader_length: int, training: AutoencoderTrainingConfig | LDMTrainingConfig, fast_dev_run: bool,
                world_size: int) -> StepBudget:
    """The budget of a training section (``batch_size``, ``gradient_accumulation_steps``, ``max_epochs``,
    ``max_steps``) over a loader of ``loader_length`` micro-batches; logs the effective batch size."""
    micro_batches = min(loader_length, FAST_DEV_RUN_BATCHES) if fast_dev_run else loader_length
    accumulation = training.gradient_accumulation_steps
    steps_per_epoch = math.ceil(micro_batches / accumulation)
    max_epochs = 1 if fast_dev_run else training.max_epochs
    max_steps = training.max_steps if training.max_steps is not None else steps_per_epoch * max_epochs
    if fast_dev_run:
        max_steps = min(max_steps, steps_per_epoch)
    max_epochs = max_epochs or math.ceil(max_steps / steps_per_epoch)
    logger.info(
        "effective batch size %d (batch %d x accumulation %d x %d process(es)); %d optimizer steps per epoch",
        training.batch_size * accumulation * world_size, training.batch_size, accumulation, world_size,
        steps_per_epoch,
    )
    return StepBudget(micro_batches, accumulation, steps_per_epoch, max_steps, max_epochs)


def epoch_batches(loader: Iterable, budget: StepBudget, skip: int) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` for this epoch's micro-batches, from ``skip`` on: a run resumed mid-epoch passes the
    micro-batches it already trained on (they are still drawn, so the data order is the straight run's)."""
    for index, batch in enumerate(loader):
        if index >= budget.micro_batches:
            return
        if index >= skip:
            yield index, batch


def step_scalars(result: StepResult, lr_scheduler, scaler: torch.amp.GradScaler, step_start: float,
                 device: torch.device) -> dict[str, float]:
    """What every optimizer step logs besides its losses: LR, gradient norm and scale, time, peak memory, skips."""
    return {
        "train/lr": lr_scheduler.get_last_lr()[0],
        "train/grad_norm": result.grad_norm,
        "train/grad_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
        "train/step_time_s": time.perf_counter() - step_start,
        "train/peak_memory_mb": peak_memory_mb(device),
        "train/skipped_step": float(not result.stepped),
    }


# ------------------------------------------------------------------------------------------- checkpoints


def save_epoch_end(save: SaveFn, run_dir: Path, budget: StepBudget, step: int, epoch: int, done_in_epoch: int,
                   keep: int, dist: DistInfo) -> None:
    """``step-<N>.pt`` and ``last.pt`` at the end of an epoch (or where ``max_steps`` stopped it: a resume then
    continues at the next micro-batch), keeping the newest ``keep`` step checkpoints."""
    where = budget.position(epoch, done_in_epoch)
    save(f"step-{step:08d}.pt", *where)
    save("last.pt", *where)
    if dist.is_main:
        prune_checkpoints(run_dir / "checkpoints", "step-*.pt", keep)


def save_interrupted(save: SaveFn, run_dir: Path, epoch: int, done_in_epoch: int) -> None:
    """On Ctrl-C: ``last.pt`` records the micro-batches done so far, so ``--resume`` continues from there."""
    logger.warning("interrupted: saving %s", run_dir / "checkpoints" / "last.pt")
    save("last.pt", epoch, done_in_epoch)
