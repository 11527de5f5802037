"""The parts of a training loop both recipes share, as small functions they call in order.

Starting a run (devices, seeds, precision), what to resume and where the run folder is, the step budget (how many
micro-batches an epoch trains, which one ends an optimizer step, when the run stops), the scalars every optimizer
step logs, the checkpoints written at the end of an epoch, and stopping at a step boundary on SIGINT / SIGTERM.
What a checkpoint holds stays the recipe's choice: it passes its own ``save(name, epoch, batches_in_epoch)``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_diffusion.config.loading import save_config
from monai_diffusion.config.schema import AutoencoderTrainingConfig, Config, LDMTrainingConfig
from monai_diffusion.engine.checkpoint import (
    capture_rng_state,
    prune_checkpoints,
    remove_temp_files,
    resolve_resume,
    restore_rng_state,
    weights_digest,
)
from monai_diffusion.engine.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    broadcast_object,
    init_distributed,
)
from monai_diffusion.engine.logging import get_logger, peak_memory_mb
from monai_diffusion.engine.optim import StepResult
from monai_diffusion.engine.precision import Precision, resolve_precision

__all__ = [
    "FAST_DEV_RUN_BATCHES",
    "TEST_SIGNAL_ENV",
    "StepBudget",
    "StopSignals",
    "TrainingStopped",
    "discard_failed_start",
    "epoch_batches",
    "find_resume",
    "open_run_dir",
    "rank_states",
    "restore_rank_rng",
    "run_training",
    "save_epoch_end",
    "save_stopped",
    "start_run",
    "step_budget",
    "step_scalars",
]

logger = logging.getLogger("monai_diffusion")

# fast_dev_run trains this many micro-batches.
FAST_DEV_RUN_BATCHES = 2
SaveFn = Callable[[str, int, int], None]


def start_run(config: Config) -> tuple[DistInfo, Precision]:
    """Set up console logging, join the process group (under torchrun), seed this rank's generators (Python's,
    NumPy's and torch's, with ``seed + rank``), set cuDNN and resolve the precision (logged)."""
    get_logger()
    dist = init_distributed(config.device.device)
    seed = config.seed + dist.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy takes seeds in [0, 2**32)
    torch.manual_seed(seed)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = config.device.cudnn_benchmark
    return dist, resolve_precision(config.device.mixed_precision, dist.device)


# ------------------------------------------------------------------------------------------- run folder


def _run_folders(config: Config, command: str) -> list[Path]:
    """This command's run folders: ``<output_dir>/<command>-*`` and the configured ``run_name`` (with the ``-2``,
    ``-3``... a taken name gets)."""
    output_dir = Path(config.output.output_dir)
    folders = sorted(output_dir.glob(f"{command}-*"))
    name = config.output.run_name
    if name:
        folders += sorted(p for p in output_dir.glob(f"{name}*") if re.fullmatch(rf"{re.escape(name)}(-\d+)?", p.name))
    return folders


def find_resume(config: Config, command: str, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names (see :func:`~monai_diffusion.engine.checkpoint.resolve_resume`) among this
    command's runs (``<output_dir>/<command>-*`` and the configured ``run_name``); None to start fresh, always under
    ``fast_dev_run``."""
    if config.fast_dev_run:
        return None
    return resolve_resume(resume, [folder / "checkpoints" / "last.pt" for folder in _run_folders(config, command)])


def _create_run_folder(base: Path) -> Path:
    """Create ``base``, or ``base-2``, ``base-3``... when taken: exclusive creation, so two runs started in the same
    second (or with the same ``run_name``) never share a folder."""
    base.parent.mkdir(parents=True, exist_ok=True)
    folder, number = base, 1
    while True:
        try:
            folder.mkdir()
            break
        except FileExistsError:
            number += 1
            folder = base.with_name(f"{base.name}-{number}")
    if number > 1:
        logger.info("run folder %s is taken: this run writes to %s", base, folder)
    return folder


def new_run_dir(config: Config, command: str, dist: DistInfo) -> Path:
    """A new ``<output_dir>/<run_name or command-date-time>``, created by rank 0 and shared with the other ranks."""
    run_dir = None
    if dist.is_main:
        name = config.output.run_name or f"{command}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = _create_run_folder(Path(config.output.output_dir) / name)
        (run_dir / "checkpoints").mkdir()
    return Path(broadcast_object(str(run_dir)))


def open_run_dir(config: Config, command: str, dist: DistInfo, resume_path: Path | None, state: dict | None) -> Path:
    """The run folder: the resumed checkpoint's, or a new one; the resolved config is saved in it.

    Call it once setup has succeeded (data, networks, checkpoint loaded): a start that fails earlier leaves no
    folder. Temp files a killed save left behind are removed: all of them in a resumed run's folder, and those of
    ended writers on this host in this command's other runs.
    """
    if state is not None:
        run_dir = resume_path.parent.parent
        logger.info("resuming from %s (step %d, epoch %d)", resume_path, state["step"], state["epoch"])
    else:
        run_dir = new_run_dir(config, command, dist)
    if dist.is_main:
        if state is not None:  # this run takes the folder over: no one else writes there
            remove_temp_files(run_dir / "checkpoints", only_gone_writers=False)
        for folder in _run_folders(config, command):
            remove_temp_files(folder / "checkpoints", only_gone_writers=True)
        save_config(config, run_dir / "config.yaml")
    return run_dir


def discard_failed_start(run_dir: Path, dist: DistInfo) -> None:
    """Remove a new run's folder when the run ends before its first optimizer step (an error, or a second
    Ctrl-C): a failed start leaves nothing behind."""
    if dist.is_main and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("removed %s: the run ended before its first optimizer step", run_dir)


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


def epoch_batches(loader: Iterable, budget: StepBudget, skip: int, epoch: int) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` for this epoch's micro-batches, from ``skip`` on: a run resumed mid-epoch passes the
    micro-batches it already trained on (they are still drawn, so the data order is the straight run's)."""
    test_signal = _test_signal()
    for index, batch in enumerate(loader):
        if index >= budget.micro_batches:
            return
        if index >= skip:
            if test_signal is not None and epoch * budget.micro_batches + index == test_signal[1]:
                os.kill(os.getpid(), test_signal[0])
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


def rank_states(*networks: torch.nn.Module | None) -> dict[str, list]:
    """Every rank's RNG state and a digest of its weights, for a checkpoint; every rank must call it (collective).

    Ranks draw different noise (seeded ``seed + rank``), so each resumes from its own RNG state. Under DDP the
    weights are the same on every rank; a difference is logged as a warning naming the ranks.

    Returns:
        ``{"rng": [state of rank 0, ...], "weights_sha256": [digest of rank 0, ...]}``.
    """
    digest = weights_digest(*(network.state_dict() for network in networks if network is not None))
    gathered = all_gather_object({"rng": capture_rng_state(), "weights_sha256": digest})
    digests = [entry["weights_sha256"] for entry in gathered]
    if len(set(digests)) > 1:
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        logger.warning("the weights of rank(s) %s differ from rank 0's: the replicas have diverged", differing)
    return {"rng": [entry["rng"] for entry in gathered], "weights_sha256": digests}


def restore_rank_rng(saved: list | dict, dist: DistInfo) -> None:
    """Restore this rank's generators from a checkpoint's ``"rng"`` (one state per rank; an older checkpoint holds
    rank 0's only). A rank the checkpoint has no state for keeps its fresh seed, and a warning says the run will
    not replay an uninterrupted one exactly."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != dist.world_size and dist.is_main:
        logger.warning("the checkpoint holds the RNG state of %d process(es), this run has %d: the continuation "
                       "differs from an uninterrupted run", len(states), dist.world_size)
    if dist.rank < len(states):
        restore_rng_state(states[dist.rank])


# ------------------------------------------------------------------------------------------- stopping

# Test hook: MONAI_DIFFUSION_TEST_SIGNAL="SIGTERM:5" makes the process send itself SIGTERM just before it trains
# micro-batch 5 of the run (counted from 0 over all epochs); "SIGTERM:5:1" does so on rank 1 only. The tests use it
# to interrupt a run at a chosen point; unset, it costs one dictionary look-up per epoch.
TEST_SIGNAL_ENV = "MONAI_DIFFUSION_TEST_SIGNAL"


def _test_signal() -> tuple[int, int] | None:
    """(signal, micro-batch) of the test hook for this rank, or None."""
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value:
        return None
    name, micro_batch, *rank = value.split(":")
    if rank and int(rank[0]) != int(os.environ.get("RANK", "0")):
        return None
    return int(signal.Signals[name]), int(micro_batch)


class TrainingStopped(Exception):
    """The run stopped on SIGINT / SIGTERM at an optimizer-step boundary; ``last.pt`` holds the state after that
    step.

    Attributes:
        signum: the signal (the largest any rank received).
        step: the last optimizer step taken.
        checkpoint: the ``last.pt`` to resume from.
        exit_code: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), as a shell reports a process that signal
            ended: schedulers and scripts read it as "stopped, not failed".
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after optimizer step {step}: {checkpoint} holds that step; "
            f"continue with --resume auto (or --resume {checkpoint.parent.parent})"
        )


class StopSignals:
    """While the training loop runs, SIGINT and SIGTERM ask it to stop at the next optimizer-step boundary.

    :meth:`install` replaces the handlers with ones that only note the signal, and the loop asks :meth:`agreed`
    after each optimizer step, so a step is never cut in half (weights, optimizers, EMA and RNG stay consistent);
    :meth:`release` puts the previous handlers back. A second SIGINT stops at once, without saving
    (``KeyboardInterrupt``). Outside the loop (and off the main thread) the default handlers stay. Under torchrun
    each worker gets the signal from its agent; :meth:`agreed` takes it from any rank, so all ranks stop at the
    same step.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def release(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler: the signal is not its to act on
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            logger.warning("%s: stopping after the current optimizer step%s", signal.Signals(signum).name,
                           " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "")

    def agreed(self) -> int:
        """The stop signal any rank received (0: none). Every rank calls it at the same step boundary."""
        return all_reduce_max(int(self.signum))


def save_stopped(save: SaveFn, run_dir: Path, budget: StepBudget, step: int, epoch: int, done_in_epoch: int,
                 signum: int) -> TrainingStopped:
    """Save ``last.pt`` at the step boundary where a stop signal was agreed; returns the exception to raise."""
    checkpoint = run_dir / "checkpoints" / "last.pt"
    logger.info("saving %s at step %d", checkpoint, step)
    save("last.pt", *budget.position(epoch, done_in_epoch))
    return TrainingStopped(signum, step, checkpoint)


def run_training(train: Callable[..., Path], config: Config, resume: str | None) -> int:
    """Run a training command's ``train(config, resume=...)`` and turn how it ended into the exit status, with one
    line on the console: 0 done; 1 an error; ``128 + signal`` when SIGINT / SIGTERM stopped it (saved at a step
    boundary, or, stopped at once by a second Ctrl-C or during setup, with nothing saved)."""
    log = get_logger()
    try:
        train(config, resume=resume)
    except TrainingStopped as stopped:
        log.warning("%s", stopped)
        return stopped.exit_code
    except KeyboardInterrupt:
        log.warning("interrupted: stopped at once; nothing saved since the last checkpoint")
        return 128 + signal.SIGINT
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    return 0
