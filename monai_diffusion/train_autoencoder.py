"""``monai-diffusion train-autoencoder``: train the 3D AutoencoderKL (L1 + KL [+ adversarial] [+ perceptual]).

Read top to bottom: setup (config, devices, data, networks, optimizers, resume, run folder), then the engine's
training loop (one optimizer step = ``gradient_accumulation_steps`` micro-batches), with validation and ``best.pt``
here at each epoch's end. SIGINT / SIGTERM stop it after the current optimizer step with ``last.pt``
saved. Works unchanged under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric

from monai_diffusion import command_description
from monai_diffusion.config.arguments import add_config_arguments, add_resume_argument, config_from_args
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import stage_config
from monai_diffusion.data import build_dataloaders
from monai_diffusion.engine.distributed import DistInfo, all_reduce_mean
from monai_diffusion.engine.logging import RunLogger, get_logger, save_png, volume_panel
from monai_diffusion.engine.loop import (
    open_training_run,
    restore_position,
    resume_checkpoint,
    run_training,
    start_run,
    step_budget,
    train_epochs,
)
from monai_diffusion.latents import reconstruct
from monai_diffusion.metrics import SSIM_WINDOW
from monai_diffusion.networks.builders import AUTOENCODER_SHAPE_KEYS
from monai_diffusion.steps import build_autoencoder_training


def train(config: Config, resume: str | None = None) -> Path:
    """Train the autoencoder described by ``config``; returns the run folder.

    Raises:
        TrainingStopped: SIGINT / SIGTERM stopped the run at a step boundary (``last.pt`` saved).
    """
    # The run folder keeps the whole config; the stage works with its own volume size and precision.
    run_config, config = config, stage_config(config, "autoencoder")
    dist, precision = start_run(config)
    log = get_logger()
    t = config.autoencoder.training
    resume_path, state = resume_checkpoint(config, "autoencoder", resume, AUTOENCODER_SHAPE_KEYS)

    # ---- data
    train_loader, val_loader, train_sampler = build_dataloaders(
        config, dist.rank, dist.world_size, patch_size=t.patch_size, foreground_ratio=t.patch_foreground_ratio,
        foreground_threshold=t.patch_foreground_threshold)
    budget = step_budget(len(train_loader), t, config.fast_dev_run, dist.world_size)

    # ---- networks, losses, optimizers: the step benchmark and plan measure; a resumed run's state
    stage = build_autoencoder_training(config, dist.device, precision, max_steps=budget.max_steps,
                                       max_epochs=budget.max_epochs, world_size=dist.world_size)
    position = restore_position(stage, state, dist)

    # ---- the run folder, once setup has succeeded: a failed start leaves nothing behind
    run = open_training_run(run_config, config, "autoencoder", dist, resume_path=resume_path, state=state)
    with train_epochs(stage, train_loader, sampler=train_sampler, budget=budget, run=run,
                      position=position) as epochs:
        for end in epochs:
            if not end.validate:
                continue
            metrics = validate(stage.autoencoder, val_loader, precision, config, run.dir, end.step, run.writer, dist)
            if metrics:  # the same on every rank (reduced), so every rank saves best.pt together
                if dist.is_main:
                    log.info("epoch %d step %d validation %s", end.epoch + 1, end.step,
                             "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                if metrics["val/l1"] < stage.best_val_l1:
                    stage.best_val_l1 = metrics["val/l1"]
                    end.save("best.pt")
    return run.dir


@torch.no_grad()
def validate(autoencoder, val_loader, precision, config: Config, run_dir: Path, step: int,
             writer: RunLogger, dist: DistInfo) -> dict[str, float]:
    """Reconstruction L1, PSNR and SSIM over the validation set (whole volumes; window by window at the patch size
    when the autoencoder trains on patches), and a PNG panel of input vs reconstruction."""
    tile_size = config.autoencoder.training.patch_size
    autoencoder.eval()
    value_range = config.data.intensity.b_max - config.data.intensity.b_min
    psnr = PSNRMetric(max_val=value_range, reduction="sum")
    ssim = SSIMMetric(spatial_dims=len(config.data.voxel_size), data_range=value_range, win_size=SSIM_WINDOW, reduction="sum")
    # Ranks may hold different numbers of validation volumes: reduce sums and counts, not means.
    sums = {"val/l1": 0.0, "val/psnr": 0.0, "val/ssim": 0.0}
    count, panel = 0, None
    for index, batch in enumerate(val_loader):
        if config.fast_dev_run and index >= 1:
            break
        images = batch["image"].to(dist.device)
        with precision.autocast():
            reconstruction = reconstruct(autoencoder, images, tile_size)
        reconstruction = reconstruction.float()
        sums["val/l1"] += F.l1_loss(reconstruction, images, reduction="none").flatten(1).mean(1).sum().item()
        sums["val/psnr"] += psnr(reconstruction, images).sum().item()
        sums["val/ssim"] += ssim(reconstruction, images).sum().item()
        count += images.shape[0]
        if panel is None:
            panel = volume_panel([("input", images[0].cpu()), ("reconstruction", reconstruction[0].cpu())],
                                 value_range=(config.data.intensity.b_min, config.data.intensity.b_max))
    autoencoder.train()
    total = all_reduce_mean(float(count)) * dist.world_size
    if total == 0:
        return {}
    metrics = {key: all_reduce_mean(value) * dist.world_size / total for key, value in sums.items()}
    if dist.is_main:
        writer.scalars(metrics, step)
        if panel is not None:
            writer.image("val/reconstruction", panel, step)
            save_png(panel, run_dir / "images" / f"reconstruction-step{step:08d}.png")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_resume_argument(parser, "autoencoder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion train-autoencoder", description=command_description(__doc__))
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    return run_training(train, config, args.resume)


if __name__ == "__main__":
    sys.exit(main())
