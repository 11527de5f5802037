"""``monai-diffusion train-autoencoder``: train the 3D AutoencoderKL (L1 + KL [+ adversarial] [+ perceptual]).

Read top to bottom: setup (config, devices, data, networks, optimizers, resume, run folder), then the
training loop (one optimizer step = ``gradient_accumulation_steps`` micro-batches), validation and
checkpoints at each epoch's end. SIGINT / SIGTERM stop it after the current optimizer step with ``last.pt``
saved. Works unchanged under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric
from tqdm import tqdm

from monai_diffusion.config.arguments import add_config_arguments, add_resume_argument, config_from_args
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import stage_config
from monai_diffusion.data import build_dataloaders
from monai_diffusion.engine.checkpoint import check_shape_keys, load_checkpoint, save_checkpoint
from monai_diffusion.engine.distributed import DistInfo, all_reduce_mean, cleanup_distributed
from monai_diffusion.engine.logging import RunLogger, get_logger, save_png, volume_panel
from monai_diffusion.engine.loop import (
    StopSignals,
    TrainingStopped,
    discard_failed_start,
    epoch_batches,
    find_resume,
    open_run_dir,
    rank_states,
    restore_rank_rng,
    run_training,
    save_epoch_end,
    save_stopped,
    start_run,
    step_budget,
    step_scalars,
)
from monai_diffusion.engine.optim import NonFiniteGuard
from monai_diffusion.latents import reconstruct
from monai_diffusion.losses import adversarial_active
from monai_diffusion.metrics import SSIM_WINDOW
from monai_diffusion.networks.builders import AUTOENCODER_SHAPE_KEYS
from monai_diffusion.steps import (
    autoencoder_epoch_end,
    autoencoder_micro_step,
    autoencoder_update,
    build_autoencoder_training,
    training_model,
)


def train(config: Config, resume: str | None = None) -> Path:
    """Train the autoencoder described by ``config``; returns the run folder.

    Raises:
        TrainingStopped: SIGINT / SIGTERM stopped the run at a step boundary (``last.pt`` saved).
    """
    # The run folder keeps the whole config; the stage works with its own volume size and precision.
    run_config, config = config, stage_config(config, "autoencoder")
    dist, precision = start_run(config)
    log = get_logger()
    device = dist.device
    t = config.autoencoder.training

    # ---- resume
    resume_path = find_resume(config, "autoencoder", resume)
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        check_shape_keys(state["config"], config.model_dump(mode="json"), AUTOENCODER_SHAPE_KEYS, resume_path)

    # ---- data
    train_loader, val_loader, train_sampler = build_dataloaders(
        config, dist.rank, dist.world_size, patch_size=t.patch_size, foreground_ratio=t.patch_foreground_ratio,
        foreground_threshold=t.patch_foreground_threshold)
    budget = step_budget(len(train_loader), t, config.fast_dev_run, dist.world_size)

    # ---- networks, losses, optimizers: the step benchmark and plan measure
    parts = build_autoencoder_training(config, device, precision, budget.max_steps, max_epochs=budget.max_epochs,
                                       world_size=dist.world_size)
    autoencoder, discriminator = parts.autoencoder, parts.discriminator

    step, start_epoch, skip_batches, best_val = 0, 0, 0, float("inf")
    if state is not None:
        autoencoder.load_state_dict(state["autoencoder"])
        parts.optimizer_g.load_state_dict(state["optimizer_g"])
        parts.lr_scheduler_g.load_state_dict(state["lr_scheduler_g"])
        parts.scaler_g.load_state_dict(state["scaler_g"])
        if discriminator is not None and state.get("discriminator") is not None:
            discriminator.load_state_dict(state["discriminator"])
            parts.optimizer_d.load_state_dict(state["optimizer_d"])
            parts.lr_scheduler_d.load_state_dict(state["lr_scheduler_d"])
            parts.scaler_d.load_state_dict(state["scaler_d"])
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        best_val = state.get("best_val_l1", best_val)
        restore_rank_rng(state["rng"], dist)

    # DDP under torchrun, compiled with device.compile; checkpoints keep the bare networks.
    model = training_model(autoencoder, config.device, dist)
    disc_model = training_model(discriminator, config.device, dist) if discriminator is not None else None
    # ---- the run folder, once setup has succeeded: a failed start leaves nothing behind
    run_dir = open_run_dir(run_config, "autoencoder", dist, resume_path, state)
    writer = RunLogger(run_dir / "tensorboard", enabled=dist.is_main)
    guard = NonFiniteGuard(t.max_nonfinite_steps)

    def save(name: str, epoch: int, batches_in_epoch: int) -> None:  # every rank calls it
        ranks = rank_states(autoencoder, discriminator)
        if not dist.is_main:
            return
        save_checkpoint(
            run_dir / "checkpoints" / name,
            {
                "kind": "autoencoder",
                "autoencoder": autoencoder.state_dict(),
                "discriminator": discriminator.state_dict() if discriminator is not None else None,
                "optimizer_g": parts.optimizer_g.state_dict(),
                "optimizer_d": parts.optimizer_d.state_dict() if discriminator is not None else None,
                "scaler_g": parts.scaler_g.state_dict(),
                "scaler_d": parts.scaler_d.state_dict() if discriminator is not None else None,
                "lr_scheduler_g": parts.lr_scheduler_g.state_dict(),
                "lr_scheduler_d": parts.lr_scheduler_d.state_dict() if discriminator is not None else None,
                "step": step,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "best_val_l1": best_val,
                **ranks,
                "config": config.model_dump(mode="json"),
            },
        )

    # ---- training loop
    epoch, done_in_epoch = start_epoch, skip_batches
    stop = StopSignals().install()  # from here on SIGINT / SIGTERM stop at the next step boundary
    try:
        for epoch in range(start_epoch, budget.max_epochs):
            if step >= budget.max_steps:
                break
            if train_sampler is not None:
                train_sampler.set_epoch(epoch)
            model.train()
            totals: dict[str, float] = {}
            bar = tqdm(total=budget.micro_batches, desc=f"epoch {epoch + 1}/{budget.max_epochs}",
                       disable=not dist.is_main, initial=skip_batches, dynamic_ncols=True)
            step_start = time.perf_counter()
            done_in_epoch = skip_batches
            for index, batch in epoch_batches(train_loader, budget, skip_batches, epoch):
                # A plain tensor: MetaTensor's metadata is not needed here, costs time per op and stops torch.compile.
                images = batch["image"].as_subclass(torch.Tensor).to(device, non_blocking=True)
                last_micro = budget.ends_step(index)
                adversarial = discriminator is not None and adversarial_active(step, t)
                loss_g, losses = autoencoder_micro_step(parts, images, adversarial, last_micro, model, disc_model)
                # One device-to-host copy per micro-batch for the NaN check and every logged value.
                loss_value, *values = torch.stack([loss_g.detach(), *(v.detach() for v in losses.values())]).tolist()
                # All ranks judge the same (averaged) loss, so they stop together.
                guard.check(all_reduce_mean(loss_value) if dist.world_size > 1 else loss_value, step)
                values = dict(zip(losses, values))
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value
                bar.update(1)
                if not last_micro:
                    continue

                result = autoencoder_update(parts, adversarial)
                guard.check_update(result, step + 1)
                step += 1
                done_in_epoch = index + 1
                count = index + 1 - skip_batches
                bar.set_postfix({k: f"{v / count:.4f}" for k, v in totals.items()} | {"step": step})
                if step % config.output.log_every_n_steps == 0 or step == budget.max_steps:
                    scalars = {f"train/{k}": v for k, v in values.items()}
                    writer.scalars(scalars | step_scalars(result, parts.lr_scheduler_g, parts.scaler_g,
                                                          step_start, device), step)
                step_start = time.perf_counter()
                if step >= budget.max_steps:
                    break
                # A stop signal: save this step's state and end (the epoch's last step stops after the epoch).
                if done_in_epoch < budget.micro_batches and (signum := stop.agreed()):
                    bar.close()
                    raise save_stopped(save, run_dir, budget, step, epoch, done_in_epoch, signum)
            bar.close()
            skip_batches = 0
            if done_in_epoch == budget.micro_batches:
                autoencoder_epoch_end(parts)

            if (epoch + 1) % t.val_every_n_epochs == 0 or epoch + 1 == budget.max_epochs or step >= budget.max_steps:
                metrics = validate(autoencoder, val_loader, precision, config, run_dir, step, writer, dist)
                if metrics:  # the same on every rank (reduced), so every rank saves best.pt together
                    if dist.is_main:
                        log.info("epoch %d step %d validation %s", epoch + 1,
                                 step, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                    if metrics["val/l1"] < best_val:
                        best_val = metrics["val/l1"]
                        save("best.pt", epoch + 1, 0)
            save_epoch_end(save, run_dir, budget, step, epoch, done_in_epoch, t.keep_last_checkpoints, dist)
            if step < budget.max_steps and epoch + 1 < budget.max_epochs and (signum := stop.agreed()):
                raise TrainingStopped(signum, step, run_dir / "checkpoints" / "last.pt")
    except BaseException:
        writer.close()
        if state is None and step == 0:
            discard_failed_start(run_dir, dist)
        raise
    finally:
        stop.release()
        writer.close()
        cleanup_distributed(model, disc_model)
    if dist.is_main:
        log.info("done: %d optimizer steps; run folder %s", step, run_dir)
    return run_dir


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
    parser = argparse.ArgumentParser(prog="monai-diffusion train-autoencoder", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    return run_training(train, config, args.resume)


if __name__ == "__main__":
    sys.exit(main())
