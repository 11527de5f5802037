"""``monai-diffusion train-autoencoder``: train the 3D AutoencoderKL (L1 + KL [+ adversarial] [+ perceptual]).

Read top to bottom: setup (config, devices, data, networks, optimizers, resume, run folder), then the engine's
training loop (one optimizer step = ``gradient_accumulation_steps`` micro-batches), with validation and ``best.pt``
here at each epoch's end. SIGINT / SIGTERM stop it after the current optimizer step with ``last.pt``
saved. Works unchanged under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from monai_diffusion.config.schema import Config
from monai_diffusion.data import build_dataloaders
from monai_diffusion.engine import loop
from monai_diffusion.generation import validation_reconstructions
from monai_diffusion.networks.builders import AUTOENCODER_SHAPE_KEYS
from monai_diffusion.steps import build_autoencoder_training

logger = logging.getLogger("monai_diffusion")

def train(run_config: Config, resume: str | None = None) -> Path:
    """Train the autoencoder that ``run_config`` describes; returns the run folder.

    Raises:
        TrainingStopped: SIGINT / SIGTERM stopped the run at a step boundary (``last.pt`` saved).
    """
    config, dist, precision = loop.start_stage(run_config, "autoencoder")  # its own volume size and precision
    t = config.autoencoder.training
    resume_path, state = loop.resume_checkpoint(config, "autoencoder", resume, AUTOENCODER_SHAPE_KEYS)

    # ---- data
    train_loader, val_loader, train_sampler = build_dataloaders(
        config, dist.rank, dist.world_size, patch_size=t.patch_size, foreground_ratio=t.patch_foreground_ratio,
        foreground_threshold=t.patch_foreground_threshold)
    budget = loop.step_budget(len(train_loader), t, config.fast_dev_run, dist.world_size)

    # ---- networks, losses, optimizers: the step benchmark and plan measure; a resumed run's state
    stage = build_autoencoder_training(config, dist.device, precision, max_steps=budget.max_steps,
                                       max_epochs=budget.max_epochs, world_size=dist.world_size)
    position = loop.restore_position(stage, state, dist)

    # ---- the run folder, once setup has succeeded: a failed start leaves nothing behind
    run = loop.open_training_run(run_config, config, "autoencoder", dist, resume_path=resume_path, state=state)
    with loop.train_epochs(stage, train_loader, sampler=train_sampler, budget=budget, run=run,
                           position=position) as epochs:
        for end in epochs:
            if not end.validate:
                continue
            metrics = validation_reconstructions(stage.autoencoder, val_loader, config=config, precision=precision,
                                                 run=run, step=end.step)
            if metrics:  # the same on every rank (reduced), so every rank saves best.pt together
                if dist.is_main:
                    logger.info("epoch %d step %d validation %s", end.epoch + 1, end.step,
                             "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                if metrics["val/l1"] < stage.best_val_l1:
                    stage.best_val_l1 = metrics["val/l1"]
                    end.save("best.pt")
    return run.dir


def main(argv: list[str] | None = None) -> int:
    return loop.training_main(train, "autoencoder", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
