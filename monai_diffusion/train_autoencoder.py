"""``monai-diffusion train-autoencoder``: train the 3D AutoencoderKL (L1 + KL [+ adversarial] [+ perceptual]).

Read top to bottom: setup (config, devices, run folder, data, networks, optimizers, resume), then the
training loop (one optimizer step = ``gradient_accumulation_steps`` micro-batches), validation and
checkpoints at each epoch's end. Works unchanged under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric
from tqdm import tqdm

from monai_diffusion.config.arguments import add_config_arguments, add_resume_argument, config_from_args
from monai_diffusion.config.loading import save_config
from monai_diffusion.config.schema import Config
from monai_diffusion.data import build_dataloaders
from monai_diffusion.engine.checkpoint import (
    capture_rng_state,
    check_shape_keys,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from monai_diffusion.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    unwrap,
    wrap_ddp,
)
from monai_diffusion.engine.logging import RunLogger, get_logger, peak_memory_mb, save_png, volume_panel
from monai_diffusion.engine.optim import NonFiniteGuard, build_lr_scheduler, build_optimizer, optimizer_step
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.losses import (
    StructuralLoss,
    adversarial_active,
    build_adversarial_loss,
    build_perceptual_loss,
    kl_loss,
)
from monai_diffusion.metrics import SSIM_WINDOW
from monai_diffusion.networks.builders import build_autoencoder, build_discriminator

# Keys that fix the network's shape: a checkpoint trained with other values cannot be resumed or reused.
SHAPE_KEYS = [
    "autoencoder.num_channels",
    "autoencoder.downsample_factors",
    "autoencoder.latent_channels",
    "autoencoder.num_res_blocks",
    "autoencoder.attention_levels",
    "autoencoder.norm_num_groups",
    "autoencoder.with_encoder_nonlocal_attn",
    "autoencoder.with_decoder_nonlocal_attn",
    "autoencoder.use_convtranspose",
    "autoencoder.in_channels",
]
FAST_DEV_RUN_BATCHES = 2


def new_run_dir(config: Config, command: str, dist: DistInfo) -> Path:
    """``<output_dir>/<run_name or command-date-time>``, named by rank 0 and shared with the other ranks."""
    name = config.output.run_name or f"{command}-{datetime.now():%Y%m%d-%H%M%S}"
    name = broadcast_object(name)
    run_dir = Path(config.output.output_dir) / name
    if dist.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No gradients into ``module`` (the discriminator while the generator learns to fool it)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def train(config: Config, resume: str | None = None) -> Path:
    """Train the autoencoder described by ``config``; returns the run folder."""
    dist = init_distributed(config.device.device)
    log = get_logger()
    device = dist.device
    torch.manual_seed(config.seed + dist.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.device.cudnn_benchmark
    precision = resolve_precision(config.device.mixed_precision, device)
    t = config.autoencoder.training
    spatial_dims = len(config.data.voxel_size)

    # ---- resume or start a run folder
    output_dir = Path(config.output.output_dir)
    resume_path = None if config.fast_dev_run else resolve_resume(
        resume, sorted(output_dir.glob("autoencoder-*/checkpoints/last.pt")) + sorted(
            output_dir.glob(f"{config.output.run_name}/checkpoints/last.pt") if config.output.run_name else []
        )
    )
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        check_shape_keys(state["config"], config.model_dump(mode="json"), SHAPE_KEYS)
        run_dir = resume_path.parent.parent
        log.info("resuming from %s (step %d, epoch %d)", resume_path, state["step"], state["epoch"])
    else:
        run_dir = new_run_dir(config, "autoencoder", dist)
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        save_config(config, run_dir / "config.yaml")

    # ---- data
    train_loader, val_loader, train_sampler = build_dataloaders(config, dist.rank, dist.world_size)
    micro_batches = min(len(train_loader), FAST_DEV_RUN_BATCHES) if config.fast_dev_run else len(train_loader)
    accumulation = t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(micro_batches / accumulation)
    max_epochs = 1 if config.fast_dev_run else t.max_epochs
    max_steps = t.max_steps if t.max_steps is not None else steps_per_epoch * max_epochs
    if config.fast_dev_run:
        max_steps = min(max_steps, steps_per_epoch)
    max_epochs = max_epochs or math.ceil(max_steps / steps_per_epoch)
    log.info(
        "effective batch size %d (batch %d x accumulation %d x %d process(es)); %d optimizer steps per epoch",
        t.batch_size * accumulation * dist.world_size, t.batch_size, accumulation, dist.world_size, steps_per_epoch,
    )

    # ---- networks, losses, optimizers
    autoencoder = build_autoencoder(config.autoencoder, spatial_dims).to(device)
    discriminator = build_discriminator(config.autoencoder, spatial_dims).to(device) if t.adv_weight > 0 else None
    perceptual = build_perceptual_loss(t, spatial_dims).to(device).eval() if t.use_perceptual_loss else None
    value_range = config.data.intensity.b_max - config.data.intensity.b_min
    structural = StructuralLoss(t.ssim_type, spatial_dims, value_range) if t.ssim_weight > 0 else None
    adversarial_loss = build_adversarial_loss()
    opt_g = build_optimizer(autoencoder.parameters(), t.lr, t.weight_decay)
    sched_g = build_lr_scheduler(opt_g, t.warmup_steps, t.lr_schedule, max_steps)
    scaler_g = precision.make_scaler()
    opt_d = sched_d = scaler_d = None
    if discriminator is not None:
        opt_d = build_optimizer(discriminator.parameters(), t.disc_lr, t.weight_decay)
        sched_d = build_lr_scheduler(opt_d, t.warmup_steps, t.lr_schedule, max_steps)
        scaler_d = precision.make_scaler()

    step, start_epoch, skip_batches, best_val = 0, 0, 0, float("inf")
    if state is not None:
        autoencoder.load_state_dict(state["autoencoder"])
        opt_g.load_state_dict(state["optimizer_g"])
        sched_g.load_state_dict(state["lr_scheduler_g"])
        scaler_g.load_state_dict(state["scaler_g"])
        if discriminator is not None and state.get("discriminator") is not None:
            discriminator.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["optimizer_d"])
            sched_d.load_state_dict(state["lr_scheduler_d"])
            scaler_d.load_state_dict(state["scaler_d"])
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        best_val = state.get("best_val_l1", best_val)
        restore_rng_state(state["rng"])

    model = wrap_ddp(autoencoder, dist)
    disc_model = wrap_ddp(discriminator, dist) if discriminator is not None else None
    writer = RunLogger(run_dir / "tensorboard", enabled=dist.is_main)
    guard = NonFiniteGuard(t.max_nonfinite_steps)

    def save(name: str, epoch: int, batches_in_epoch: int) -> None:
        if not dist.is_main:
            return
        save_checkpoint(
            ckpt_dir / name,
            {
                "kind": "autoencoder",
                "autoencoder": autoencoder.state_dict(),
                "discriminator": discriminator.state_dict() if discriminator is not None else None,
                "optimizer_g": opt_g.state_dict(),
                "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
                "scaler_g": scaler_g.state_dict(),
                "scaler_d": scaler_d.state_dict() if scaler_d is not None else None,
                "lr_scheduler_g": sched_g.state_dict(),
                "lr_scheduler_d": sched_d.state_dict() if sched_d is not None else None,
                "step": step,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "best_val_l1": best_val,
                "rng": capture_rng_state(),
                "config": config.model_dump(mode="json"),
            },
        )

    # ---- training loop
    epoch, done_in_epoch = start_epoch, skip_batches
    try:
        for epoch in range(start_epoch, max_epochs):
            if step >= max_steps:
                break
            if train_sampler is not None:
                train_sampler.set_epoch(epoch)
            model.train()
            totals: dict[str, float] = {}
            bar = tqdm(total=micro_batches, desc=f"epoch {epoch + 1}/{max_epochs}", disable=not dist.is_main,
                       initial=skip_batches, dynamic_ncols=True)
            step_start = time.perf_counter()
            done_in_epoch = skip_batches
            for index, batch in enumerate(train_loader):
                if index >= micro_batches or step >= max_steps:
                    break
                if index < skip_batches:  # resumed mid-epoch: these micro-batches were already trained on
                    continue
                images = batch["image"].to(device, non_blocking=True)
                last_micro = (index + 1) % accumulation == 0 or index + 1 == micro_batches
                adversarial = disc_model is not None and adversarial_active(step, t)
                # Gradients are all-reduced only on the micro-batch that ends an optimizer step.
                sync = contextlib.nullcontext() if last_micro or dist.world_size == 1 else model.no_sync()
                with sync:
                    with precision.autocast():
                        reconstruction, z_mu, z_sigma = model(images)
                    losses = {
                        "recon_l1": F.l1_loss(reconstruction.float(), images.float()),
                        "kl": kl_loss(z_mu, z_sigma),
                    }
                    loss_g = losses["recon_l1"] + t.kl_weight * losses["kl"]
                    if structural is not None:
                        losses[t.ssim_type] = structural(reconstruction, images)
                        loss_g = loss_g + t.ssim_weight * losses[t.ssim_type]
                    if perceptual is not None:
                        losses["perceptual"] = perceptual(reconstruction.float(), images.float())
                        loss_g = loss_g + t.perceptual_weight * losses["perceptual"]
                    if adversarial:
                        with frozen(discriminator), precision.autocast():
                            logits_fake = discriminator(reconstruction)[-1]
                        losses["gen_adv"] = adversarial_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
                        loss_g = loss_g + t.adv_weight * losses["gen_adv"]
                    # Dividing by the accumulation count makes k micro-batches of b match one batch of k*b.
                    scaler_g.scale(loss_g / accumulation).backward()
                if adversarial:
                    sync_d = contextlib.nullcontext() if last_micro or dist.world_size == 1 else disc_model.no_sync()
                    with sync_d:
                        with precision.autocast():
                            logits_fake = disc_model(reconstruction.detach())[-1]
                            logits_real = disc_model(images)[-1]
                        loss_d = 0.5 * (
                            adversarial_loss(logits_fake.float(), target_is_real=False, for_discriminator=True)
                            + adversarial_loss(logits_real.float(), target_is_real=True, for_discriminator=True)
                        )
                        losses["disc"] = loss_d
                        scaler_d.scale(t.adv_weight * loss_d / accumulation).backward()
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

                result = optimizer_step(opt_g, scaler_g, autoencoder.parameters(), t.grad_clip, sched_g)
                if adversarial:
                    optimizer_step(opt_d, scaler_d, discriminator.parameters(), t.grad_clip, sched_d)
                step += 1
                done_in_epoch = index + 1
                count = index + 1 - skip_batches
                bar.set_postfix({k: f"{v / count:.4f}" for k, v in totals.items()} | {"step": step})
                if step % config.output.log_every_n_steps == 0 or step == max_steps:
                    scalars = {f"train/{k}": v for k, v in values.items()}
                    scalars |= {
                        "train/lr": sched_g.get_last_lr()[0],
                        "train/grad_norm": result.grad_norm,
                        "train/grad_scale": scaler_g.get_scale() if scaler_g.is_enabled() else 1.0,
                        "train/step_time_s": (time.perf_counter() - step_start),
                        "train/peak_memory_mb": peak_memory_mb(device),
                        "train/skipped_step": float(not result.stepped),
                    }
                    writer.scalars(scalars, step)
                step_start = time.perf_counter()
            bar.close()
            skip_batches = 0

            if (epoch + 1) % t.val_every_n_epochs == 0 or epoch + 1 == max_epochs or step >= max_steps:
                metrics = validate(autoencoder, val_loader, precision, config, run_dir, step, writer, dist)
                if dist.is_main and metrics:
                    log.info("epoch %d step %d validation %s", epoch + 1,
                             step, "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                    if metrics["val/l1"] < best_val:
                        best_val = metrics["val/l1"]
                        save("best.pt", epoch + 1, 0)
            # A run that stops mid-epoch (max_steps) records where, so a resume continues at the next batch.
            finished = done_in_epoch >= micro_batches
            where = (epoch + 1, 0) if finished else (epoch, done_in_epoch)
            save(f"step-{step:08d}.pt", *where)
            save("last.pt", *where)
            if dist.is_main:
                prune_checkpoints(ckpt_dir, "step-*.pt", t.keep_last_checkpoints)
    except KeyboardInterrupt:
        log.warning("interrupted: saving %s", ckpt_dir / "last.pt")
        save("last.pt", epoch, done_in_epoch)
        raise
    finally:
        writer.close()
        cleanup_distributed()
    if dist.is_main:
        log.info("done: %d optimizer steps; run folder %s", step, run_dir)
    return run_dir


@torch.no_grad()
def validate(autoencoder, val_loader, precision, config: Config, run_dir: Path, step: int,
             writer: RunLogger, dist: DistInfo) -> dict[str, float]:
    """Reconstruction L1, PSNR and SSIM over the validation set, and a PNG panel of input vs reconstruction."""
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
            reconstruction = autoencoder.reconstruct(images)
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
    try:
        train(config, resume=args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        get_logger().error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
