"""The one training loop of the three training commands, and the pieces around it.

Starting a run (devices, seeds, precision), what to resume and where the run folder is, the step budget (how many
micro-batches an epoch trains, which one ends an optimizer step, when the run stops), then :func:`train_epochs`:
the epochs and optimizer steps of any stage (``steps.AutoencoderTraining``, ``LDMTraining``,
``ControlNetTraining``, which answer ``micro_step``, ``update``, ``epoch_end`` and ``state_dict``), with the
progress bar, the non-finite guard, the scalars every optimizer step logs, the checkpoints written at the end of an
epoch, stopping at a step boundary on SIGINT / SIGTERM, and removing the folder of a run that failed to start. It
yields at each epoch's end, so a command keeps its validation and ``best.pt`` rule in its own body.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from monai_diffusion import command_description
from monai_diffusion.config.arguments import add_config_arguments, add_resume_argument, config_from_args
from monai_diffusion.config.loading import save_config
from monai_diffusion.config.schema import AutoencoderTrainingConfig, Config, LDMTrainingConfig
from monai_diffusion.config.stages import stage_config
from monai_diffusion.engine.checkpoint import (
    capture_rng_state,
    check_shape_keys,
    load_checkpoint,
    prune_checkpoints,
    remove_temp_files,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    weights_digest,
)
from monai_diffusion.engine.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from monai_diffusion.engine.logging import RunLogger, get_logger, open_run_logger, peak_memory_mb
from monai_diffusion.engine.optim import NonFiniteGuard, StepResult
from monai_diffusion.engine.precision import Precision, resolve_precision

__all__ = [
    "FAST_DEV_RUN_BATCHES",
    "EpochEnd",
    "Position",
    "StepBudget",
    "StopSignals",
    "TrainingRun",
    "TrainingStopped",
    "discard_failed_start",
    "epoch_batches",
    "find_resume",
    "open_run_dir",
    "open_training_run",
    "rank_states",
    "restore_position",
    "restore_rank_rng",
    "resume_checkpoint",
    "run_training",
    "start_run",
    "start_stage",
    "step_budget",
    "step_scalars",
    "train_epochs",
    "train_step",
    "training_main",
]

logger = logging.getLogger("monai_diffusion")

# fast_dev_run trains this many micro-batches.
FAST_DEV_RUN_BATCHES = 2
SaveFn = Callable[[str, int, int], None]
# How an error names a checkpoint of each command.
KIND_NAMES = {"autoencoder": "an autoencoder", "ldm": "an LDM", "controlnet": "a ControlNet"}


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


def start_stage(run_config: Config, stage: str) -> tuple[Config, DistInfo, Precision]:
    """:func:`start_run` for a training command: returns the stage's own config (``stage_config``: its volume
    size, precision, ...), which the stage trains with and its checkpoints keep, with the process's place in the run
    and its precision. The run folder keeps ``run_config`` whole."""
    config = stage_config(run_config, stage)
    return (config, *start_run(config))


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


def open_run_dir(config: Config, command: str, dist: DistInfo, resume_path: Path | None, *, state: dict | None) -> Path:
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
    for index, batch in enumerate(loader):
        if index >= budget.micro_batches:
            return
        if index >= skip:
            yield index, batch


def step_scalars(result: StepResult, lr_scheduler, scaler: torch.amp.GradScaler, step_start: float,
                 *, device: torch.device) -> dict[str, float]:
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


def save_epoch_end(save: SaveFn, run_dir: Path, budget: StepBudget, step: int, *, epoch: int, done_in_epoch: int,
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


def save_stopped(save: SaveFn, run_dir: Path, budget: StepBudget, step: int, *, epoch: int, done_in_epoch: int,
                 signum: int) -> TrainingStopped:
    """Save ``last.pt`` at the step boundary where a stop signal was agreed; returns the exception to raise."""
    checkpoint = run_dir / "checkpoints" / "last.pt"
    logger.info("saving %s at step %d", checkpoint, step)
    save("last.pt", *budget.position(epoch, done_in_epoch))
    return TrainingStopped(signum, step, checkpoint)


def training_main(train: Callable[..., Path], command: str, doc: str, argv: list[str] | None = None) -> int:
    """The ``main`` of a training command: ``--config``, ``--set`` and ``--resume``, then :func:`run_training`.

    Args:
        train: the command's ``train(config, resume=...)``.
        command: ``autoencoder``, ``ldm`` or ``controlnet`` (``monai-diffusion train-<command>``).
        doc: the command module's docstring (its first line is the ``--help`` description).
        argv: the arguments (None: the process's).
    """
    parser = argparse.ArgumentParser(prog=f"monai-diffusion train-{command}", description=command_description(doc))
    add_config_arguments(parser)
    add_resume_argument(parser, command)
    args = parser.parse_args(argv)
    # Only the autoencoder's training needs its discriminator to fit the volume (config.rules, to_run).
    return run_training(train, config_from_args(args, to_run=command == "autoencoder"), args.resume)


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


# ------------------------------------------------------------------------------------------- the one loop


@dataclass(frozen=True)
class Position:
    """Where a run stands: optimizer steps taken, the epoch it is in and the micro-batches done in that epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def resume_checkpoint(config: Config, command: str, resume: str | None,
                      shape_keys: Sequence[str]) -> tuple[Path | None, dict | None]:
    """The checkpoint ``--resume`` names among this command's runs (:func:`find_resume`) and its contents, or
    ``(None, None)`` to start fresh.

    Raises:
        ValueError: it is not a checkpoint of ``command``, or a shape-defining key (``shape_keys``) differs from
            ``config``'s (both values listed).
    """
    path = find_resume(config, command, resume)
    if path is None:
        return None, None
    state = load_checkpoint(path)
    if state.get("kind") != command:
        raise ValueError(f"{path}: not {KIND_NAMES[command]} checkpoint (kind={state.get('kind')!r})")
    check_shape_keys(state["config"], config.model_dump(mode="json"), shape_keys, path)
    return path, state


def restore_position(stage, state: dict | None, dist: DistInfo) -> Position:
    """A resumed run's stage (``stage.load_state_dict``: networks, optimizers, scalers, schedules, EMA) and this
    rank's RNG from ``state``; returns where it stopped. A fresh run (``state`` None) starts at the beginning, its
    network from ``<stage>.training.init_checkpoint`` when set (``stage.load_init``); a resumed run continues its
    checkpoint's weights and does not read that file (it says so)."""
    if state is None:
        stage.load_init()
        return Position()
    if stage.training.init_checkpoint is not None and dist.is_main:
        logger.info("%s.training.init_checkpoint (%s) is not read: the run resumes with its checkpoint's weights",
                    stage.section, stage.training.init_checkpoint)
    stage.load_state_dict(state)
    restore_rank_rng(state["rng"], dist)
    return Position(state["step"], state["epoch"], state["batches_in_epoch"])


@dataclass(frozen=True)
class TrainingRun:
    """A training run's folder and what writes into it (:func:`open_training_run`).

    Attributes:
        dir: the run folder.
        command: ``autoencoder``, ``ldm`` or ``controlnet``: the folder's prefix and its checkpoints' ``kind``.
        config: the stage's config, kept in each checkpoint.
        dist: this process's place in the run.
        writer: scalars, images and tags for TensorBoard and / or MLflow (``output.loggers``; rank 0 writes).
        resumed: whether the run continues a checkpoint (a new run's folder goes when it ends before its first
            optimizer step).
    """

    dir: Path
    command: str
    config: Config
    dist: DistInfo
    writer: RunLogger
    resumed: bool


def open_training_run(run_config: Config, config: Config, command: str, dist: DistInfo, *,
                      resume_path: Path | None, state: dict | None) -> TrainingRun:
    """The run folder (:func:`open_run_dir`: the resumed checkpoint's or a new one, ``run_config`` saved in it) and
    its writer (TensorBoard and / or MLflow, ``output.loggers``; MLflow gets ``run_config`` as parameters). Call it
    once setup has succeeded: a start that fails earlier, or here, leaves no new folder."""
    run_dir = open_run_dir(run_config, command, dist, resume_path, state=state)
    try:
        writer = open_run_logger(run_config.output, run_dir, command=command,
                                 config=run_config.model_dump(mode="json"), enabled=dist.is_main,
                                 resumed=state is not None)
    except BaseException:
        if state is None:
            discard_failed_start(run_dir, dist)
        raise
    return TrainingRun(dir=run_dir, command=command, config=config, dist=dist, writer=writer,
                       resumed=state is not None)


def train_step(stage, batches: Sequence, *, step: int,
               after_micro_batch: Callable[[torch.Tensor, dict[str, torch.Tensor]], None] | None = None) -> StepResult:
    """One optimizer step of ``stage``: ``stage.micro_step`` on each batch (DDP all-reduces the gradients with the
    last one only), then ``stage.update``. ``after_micro_batch(total, terms)`` sees each micro-batch's losses.
    The training loop and the memory probe (``plan``, ``benchmark``) both run this function."""
    for index, batch in enumerate(batches):
        total, terms = stage.micro_step(batch, step=step, sync=index == len(batches) - 1)
        if after_micro_batch is not None:
            after_micro_batch(total, terms)
    return stage.update(step)


@dataclass(frozen=True)
class EpochEnd:
    """What :func:`train_epochs` yields at the end of each epoch.

    Attributes:
        epoch: the epoch that ended (from 0).
        step: the optimizer steps taken so far.
        validate: whether validation is due (every ``val_every_n_epochs`` epochs, and at the run's end).
        save: ``save(name)`` writes checkpoint ``name`` (``best.pt``) of the state now, from which a resume starts
            the next epoch; every rank calls it (it gathers the ranks' RNG states).
    """

    epoch: int
    step: int
    validate: bool
    save: Callable[[str], None]


def train_epochs(stage, loader: Iterable, *, sampler, budget: StepBudget, run: TrainingRun,
                 position: Position) -> contextlib.closing[Iterator[EpochEnd]]:
    """The training loop of ``stage`` over ``loader``, from ``position``; use it as
    ``with train_epochs(...) as epochs: for end in epochs: ...``.

    Each epoch: the sampler's epoch, the progress bar, :func:`train_step` over the micro-batches of each optimizer
    step (a resumed run passes the ones it trained on), the non-finite guard (``max_nonfinite_steps``), the loss
    terms and :func:`step_scalars` every ``log_every_n_steps`` steps, then ``stage.epoch_end`` after a whole
    epoch, an :class:`EpochEnd` for the command (validation, ``best.pt``), and ``step-<N>.pt`` / ``last.pt``.
    SIGINT / SIGTERM stop it at the next optimizer-step boundary with ``last.pt`` saved. The stage's networks run
    wrapped (``stage.wrap``: DDP under torchrun, compiled with ``device.compile``); when the loop ends the process
    group's hold on them is released, and a new run that ends before its first optimizer step leaves no folder.

    Raises (while iterating):
        TrainingStopped: a stop signal ended the run at a step boundary (``last.pt`` saved).
        RuntimeError: too many non-finite losses or skipped updates (``NonFiniteGuard``).
    """
    return contextlib.closing(_epochs(stage, loader, sampler, budget, run=run, position=position))


def _step_groups(batches: Iterable[tuple[int, Any]], budget: StepBudget) -> Iterator[list[tuple[int, Any]]]:
    """The ``(index, batch)`` micro-batches of each optimizer step, in order (an epoch's last step may take fewer)."""
    group = []
    for index, batch in batches:
        group.append((index, batch))
        if budget.ends_step(index):
            yield group
            group = []


def _epochs(stage, loader: Iterable, sampler, budget: StepBudget, *, run: TrainingRun,
            position: Position) -> Iterator[EpochEnd]:
    t, dist, writer = stage.training, run.dist, run.writer
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    step, skip = position.step, position.batches_in_epoch

    def save(name: str, epoch: int, batches_in_epoch: int) -> None:  # every rank calls it
        ranks = rank_states(*stage.networks())
        if dist.is_main:
            save_checkpoint(run.dir / "checkpoints" / name, {
                "kind": run.command, **stage.state_dict(), "step": step, "epoch": epoch,
                "batches_in_epoch": batches_in_epoch, **ranks, "config": run.config.model_dump(mode="json"),
            })

    models: list[torch.nn.Module] = []
    stop = StopSignals().install()  # from here on SIGINT / SIGTERM stop at the next step boundary
    try:
        models = stage.wrap(run.config.device, dist)
        for epoch in range(position.epoch, budget.max_epochs):
            if step >= budget.max_steps:
                break
            if sampler is not None:
                sampler.set_epoch(epoch)
            stage.train()
            totals: dict[str, float] = {}
            last: dict[str, float] = {}
            bar = tqdm(total=budget.micro_batches, desc=f"epoch {epoch + 1}/{budget.max_epochs}",
                       disable=not dist.is_main, initial=skip, dynamic_ncols=True)

            def after_micro_batch(total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
                # One device-to-host copy per micro-batch for the non-finite check and every logged value.
                value, *values = torch.stack([total.detach(), *(v.detach() for v in terms.values())]).tolist()
                # All ranks judge the same (averaged) loss, so they stop together.
                guard.check(all_reduce_mean(value) if dist.world_size > 1 else value, step)
                last.clear()
                last.update(zip(terms, values))
                for key, term in last.items():
                    totals[key] = totals.get(key, 0.0) + term
                bar.update(1)

            step_start = time.perf_counter()
            done_in_epoch = skip
            for group in _step_groups(epoch_batches(loader, budget, skip, epoch), budget):
                result = train_step(stage, [batch for _, batch in group], step=step,
                                    after_micro_batch=after_micro_batch)
                guard.check_update(result, step + 1)
                step += 1
                done_in_epoch = group[-1][0] + 1
                bar.set_postfix({k: f"{v / (done_in_epoch - skip):.4f}" for k, v in totals.items()} | {"step": step})
                if step % run.config.output.log_every_n_steps == 0 or step == budget.max_steps:
                    writer.scalars({f"train/{k}": v for k, v in last.items()} | step_scalars(
                        result, stage.lr_scheduler, stage.scaler, step_start, device=dist.device), step)
                step_start = time.perf_counter()
                if step >= budget.max_steps:
                    break
                # A stop signal: save this step's state and end (the epoch's last step stops after the epoch).
                if done_in_epoch < budget.micro_batches and (signum := stop.agreed()):
                    bar.close()
                    raise save_stopped(save, run.dir, budget, step, epoch=epoch, done_in_epoch=done_in_epoch,
                                       signum=signum)
            bar.close()
            trained, skip = done_in_epoch - skip, 0
            if done_in_epoch == budget.micro_batches:
                stage.epoch_end()
            if dist.is_main and trained:
                logger.info("epoch %d step %d train %s", epoch + 1, step,
                            " ".join(f"{k} {v / trained:.4f}" for k, v in totals.items()))

            due = (epoch + 1) % t.val_every_n_epochs == 0 or epoch + 1 == budget.max_epochs or step >= budget.max_steps
            yield EpochEnd(epoch=epoch, step=step, validate=due,
                           save=functools.partial(save, epoch=epoch + 1, batches_in_epoch=0))
            save_epoch_end(save, run.dir, budget, step, epoch=epoch, done_in_epoch=done_in_epoch,
                           keep=t.keep_last_checkpoints, dist=dist)
            if step < budget.max_steps and epoch + 1 < budget.max_epochs and (signum := stop.agreed()):
                raise TrainingStopped(signum, step, run.dir / "checkpoints" / "last.pt")
        # Where the final state is (and the best validation's, where the command keeps one), for the tracker.
        checkpoints = run.dir / "checkpoints"
        writer.tags({tag: str((checkpoints / name).resolve()) for tag, name in
                     (("checkpoint", "last.pt"), ("best_checkpoint", "best.pt")) if (checkpoints / name).is_file()})
    except BaseException as exc:
        if isinstance(exc, TrainingStopped):
            writer.tags({"checkpoint": str(exc.checkpoint.resolve())})
        writer.close(status="KILLED" if isinstance(exc, (TrainingStopped, KeyboardInterrupt)) else "FAILED")
        if not run.resumed and step == 0:
            discard_failed_start(run.dir, dist)
        raise
    finally:
        stop.release()
        writer.close()
        cleanup_distributed(*models)
    if dist.is_main:
        logger.info("done: %d optimizer steps; run folder %s", step, run.dir)
