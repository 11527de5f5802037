"""``monai-diffusion train-ldm``: train the latent diffusion UNet on the latents of a trained autoencoder.

Read top to bottom: setup (config, devices, resume, the frozen autoencoder, the latent cache, the latent scale
factor, the UNet, scheduler, optimizer and EMA), then the training loop (one optimizer step =
``gradient_accumulation_steps`` micro-batches), validation samples and checkpoints at each epoch's end. Works
unchanged under ``torchrun --nproc_per_node=N``.

Each training volume is encoded once into the latent cache (posterior mean and sigma); every use draws a fresh
latent ``mu + sigma * eps``, multiplies it by the scale factor (1 / std of the latents, computed once and kept
in the checkpoint) and trains the UNet to undo noise added by the scheduler.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from monai_diffusion.config.arguments import add_config_arguments, add_resume_argument, config_from_args
from monai_diffusion.config.loading import save_config
from monai_diffusion.config.schema import Config
from monai_diffusion.data import build_dataloaders, build_transforms, list_volumes, screen_volumes
from monai_diffusion.data.datasets import FAST_DEV_TRAIN_ITEMS, cache_root
from monai_diffusion.data.transforms import deterministic_settings
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
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    wrap_ddp,
)
from monai_diffusion.engine.ema import build_ema
from monai_diffusion.engine.logging import RunLogger, get_logger, peak_memory_mb
from monai_diffusion.engine.optim import NonFiniteGuard, build_lr_scheduler, build_optimizer, optimizer_step
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.latents import (
    CACHE_ROOT,
    LatentDataset,
    build_latent_cache,
    cache_key,
    compute_scale_factor,
    encode_volume,
    load_autoencoder,
    load_cache_entry,
    plain_affine,
    resolve_autoencoder_checkpoint,
)
from monai_diffusion.networks.builders import build_scheduler, build_unet
from monai_diffusion.sample import check_sampler, generate_volume, save_sample
from monai_diffusion.train_autoencoder import FAST_DEV_RUN_BATCHES, SHAPE_KEYS, new_run_dir

# Keys a resumed LDM run must share with its checkpoint: the autoencoder and latent shape, the UNet, and the
# diffusion process the UNet has learnt so far.
LDM_SHAPE_KEYS = SHAPE_KEYS + [
    "data.voxel_size",
    "ldm.unet.num_channels",
    "ldm.unet.attention_levels",
    "ldm.unet.num_res_blocks",
    "ldm.unet.num_head_channels",
    "ldm.unet.norm_num_groups",
    "ldm.scheduler.type",
    "ldm.scheduler.num_train_timesteps",
    "ldm.scheduler.schedule",
    "ldm.scheduler.beta_start",
    "ldm.scheduler.beta_end",
    "ldm.scheduler.prediction_type",
]
# fast_dev_run samples its validation volume with this many denoising steps.
FAST_DEV_RUN_INFERENCE_STEPS = 2


def check_latent_fits_unet(latent_spatial: tuple[int, ...], num_levels: int) -> None:
    """The UNet halves the latent at every level but the last: each axis must divide by 2**(levels-1)."""
    need = 2 ** (num_levels - 1)
    bad = [axis for axis, size in enumerate(latent_spatial) if size % need]
    if bad:
        raise ValueError(
            f"ldm.unet.num_channels: the latent is {list(latent_spatial)} and a {num_levels}-level UNet needs every "
            f"axis divisible by {need}; axes {bad} are not. Use fewer UNet levels, a larger data.voxel_size or "
            f"smaller autoencoder.downsample_factors"
        )


def training_items(config: Config) -> list[dict]:
    """The screened training volumes (the validation split is not used: validation here is sampling)."""
    data = config.data
    items, _ = list_volumes(data, config.seed)
    if config.fast_dev_run:
        items = items[:FAST_DEV_TRAIN_ITEMS]
    items = screen_volumes(
        items,
        expected_channels=config.autoencoder.in_channels,
        on_bad_file=data.on_bad_file,
        spatial_dims=len(data.voxel_size),
        spacing=data.spacing,
        cache_file=None if config.fast_dev_run else cache_root(config) / "screening.json",
    )
    if not items:
        raise ValueError(f"No training volume to train on (data.source={data.source!r})")
    return items


def diffusion_loss(model, scheduler, kind: str, z: torch.Tensor, precision) -> torch.Tensor:
    """Noise ``z`` at random timesteps and regress the scheduler's training target (MSE).

    DDPM/DDIM: uniform integer timesteps; target noise (epsilon), ``get_velocity`` (v_prediction) or ``z``
    (sample). Rectified flow (MONAI's RFlowScheduler, MAISI convention): timesteps from
    ``sample_timesteps``, ``add_noise`` gives ``(1 - t/T) z + (t/T) noise`` and the target velocity is
    ``z - noise`` (``step`` moves a sample by ``v * dt`` from noise towards data).
    """
    noise = torch.randn_like(z)
    if kind == "rflow":
        timesteps = scheduler.sample_timesteps(z)
        target = z - noise
    else:
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), device=z.device).long()
        prediction = scheduler.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = scheduler.get_velocity(z, noise, timesteps)
        else:  # "sample"
            target = z
    noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
    with precision.autocast():
        prediction = model(noisy, timesteps=timesteps)
    return F.mse_loss(prediction.float(), target.float())


def train(config: Config, resume: str | None = None) -> Path:
    """Train the latent diffusion model described by ``config``; returns the run folder."""
    dist = init_distributed(config.device.device)
    log = get_logger()
    device = dist.device
    torch.manual_seed(config.seed + dist.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.device.cudnn_benchmark
    precision = resolve_precision(config.device.mixed_precision, device)
    t = config.ldm.training
    spatial_dims = len(config.data.voxel_size)
    kind = config.ldm.scheduler.type
    check_sampler(config.ldm.sampling.scheduler or kind, kind)

    # ---- resume or start a run folder
    output_dir = Path(config.output.output_dir)
    resume_path = None if config.fast_dev_run else resolve_resume(
        resume, sorted(output_dir.glob("ldm-*/checkpoints/last.pt")) + sorted(
            output_dir.glob(f"{config.output.run_name}/checkpoints/last.pt") if config.output.run_name else []
        )
    )
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        if state.get("kind") != "ldm":
            raise ValueError(f"{resume_path}: not an LDM checkpoint (kind={state.get('kind')!r})")
        check_shape_keys(state["config"], config.model_dump(mode="json"), LDM_SHAPE_KEYS)

    # ---- the frozen autoencoder (a resumed run keeps the one it started with, and checks it is unchanged)
    if state is not None and config.ldm.autoencoder_checkpoint is None:
        ae_path = Path(state["autoencoder_checkpoint"])
    else:
        ae_path = resolve_autoencoder_checkpoint(config)
    autoencoder, ae_hash = load_autoencoder(ae_path, config, device)
    if state is not None and ae_hash != state["autoencoder_hash"]:
        raise ValueError(
            f"Autoencoder {ae_path} has weights {ae_hash}, but {resume_path} was trained on latents of "
            f"{state['autoencoder_hash']} ({state['autoencoder_checkpoint']}); resume with that autoencoder "
            f"or start a new LDM run"
        )
    latent_shape = (config.autoencoder.latent_channels, *autoencoder.latent_shape(config.data.voxel_size))
    check_latent_fits_unet(latent_shape[1:], len(config.ldm.unet.num_channels))
    log.info("autoencoder %s (weights %s); latent shape %s", ae_path, ae_hash, list(latent_shape))

    # ---- the run folder (only once the autoencoder is known to fit: a failed start leaves no empty run)
    if state is not None:
        run_dir = resume_path.parent.parent
        log.info("resuming from %s (step %d, epoch %d)", resume_path, state["step"], state["epoch"])
    else:
        run_dir = new_run_dir(config, "ldm", dist)
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        save_config(config, run_dir / "config.yaml")

    # ---- latents: the cache (or on-the-fly encoding), the scale factor and the data's affine
    items = training_items(config)
    deterministic = build_transforms(config.data, train=False, expected_channels=config.autoencoder.in_channels)
    if t.cache_latents:
        if dist.is_main and (config.data.augment.flip_prob > 0 or config.data.augment.affine_prob > 0):
            log.warning("ldm.training.cache_latents: data.augment is not applied to cached latents")
        settings = deterministic_settings(config.data, config.autoencoder.in_channels)
        key = cache_key(ae_hash, settings, precision.name)
        cache = build_latent_cache(
            autoencoder, items, deterministic, output_dir / CACHE_ROOT / key, device, precision, dist,
            describe={"autoencoder_checkpoint": str(ae_path), "autoencoder_hash": ae_hash,
                      "transforms": settings, "precision": precision.name},
        )
        dataset = LatentDataset(cache.files)
        train_sampler = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=config.seed
        )
        # Own generator: iterating never draws from the global RNG, so a resumed run replays it exactly.
        train_loader = DataLoader(
            dataset, batch_size=t.batch_size, sampler=train_sampler, num_workers=config.data.num_workers,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed),
        )
    else:
        cache = None
        train_loader, _, train_sampler = build_dataloaders(config, dist.rank, dist.world_size, t.batch_size)

    def first_posteriors():
        for index in range(min(t.scale_factor_volumes, len(items))):
            if cache is not None:
                entry = load_cache_entry(cache.files[index])
                yield entry["mu"], entry["sigma"]
            else:
                yield encode_volume(autoencoder, deterministic(dict(items[index]))["image"], device, precision)

    if state is not None:
        scale_factor = float(state["scale_factor"])
        affine = torch.as_tensor(state["affine"], dtype=torch.float64)
        log.info("latent scale factor %.6g (from the checkpoint)", scale_factor)
    else:
        scale_factor = compute_scale_factor(first_posteriors(), seed=config.seed) if dist.is_main else None
        scale_factor = float(broadcast_object(scale_factor))
        if cache is not None:
            affine = load_cache_entry(cache.files[0])["affine"]
        else:
            affine = deterministic(dict(items[0]))["image"].affine
        affine = plain_affine(affine)
        log.info("latent scale factor %.6g (1/std over %d training volume(s))", scale_factor,
                 min(t.scale_factor_volumes, len(items)))

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

    # ---- UNet, scheduler, optimizer, EMA
    unet = build_unet(config.ldm, latent_shape[0], spatial_dims).to(device)
    scheduler = build_scheduler(config.ldm.scheduler, kind, spatial_dims, math.prod(latent_shape[1:]))
    optimizer = build_optimizer(unet.parameters(), t.lr, t.weight_decay)
    lr_scheduler = build_lr_scheduler(optimizer, t.warmup_steps, t.lr_schedule, max_steps)
    scaler = precision.make_scaler()
    ema = build_ema(unet, t.ema_decay) if t.ema_decay is not None else None

    step, start_epoch, skip_batches = 0, 0, 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        elif ema is not None:
            log.warning("the checkpoint has no EMA weights: the EMA starts from the current weights")
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        restore_rng_state(state["rng"])

    model = wrap_ddp(unet, dist)
    writer = RunLogger(run_dir / "tensorboard", enabled=dist.is_main)
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    if state is None:
        writer.scalars({"latent/scale_factor": scale_factor}, 0)

    def save(name: str, epoch: int, batches_in_epoch: int) -> None:
        if not dist.is_main:
            return
        save_checkpoint(
            ckpt_dir / name,
            {
                "kind": "ldm",
                "unet": unet.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "rng": capture_rng_state(),
                "config": config.model_dump(mode="json"),
                "scale_factor": scale_factor,
                "autoencoder_checkpoint": str(ae_path),
                "autoencoder_hash": ae_hash,
                "latent_shape": list(latent_shape),
                "affine": affine,
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
            total, count = 0.0, 0
            bar = tqdm(total=micro_batches, desc=f"epoch {epoch + 1}/{max_epochs}", disable=not dist.is_main,
                       initial=skip_batches, dynamic_ncols=True)
            step_start = time.perf_counter()
            done_in_epoch = skip_batches
            for index, batch in enumerate(train_loader):
                if index >= micro_batches or step >= max_steps:
                    break
                if index < skip_batches:  # resumed mid-epoch: these micro-batches were already trained on
                    continue
                if cache is not None:
                    mu, sigma = batch["mu"].to(device, non_blocking=True), batch["sigma"].to(device, non_blocking=True)
                else:
                    with torch.no_grad(), precision.autocast():
                        images = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor)
                        mu, sigma = autoencoder.encode(images.to(device, non_blocking=True))
                    mu, sigma = mu.float(), sigma.float()
                # A fresh latent from the posterior every time, scaled to unit variance.
                z = (mu + sigma * torch.randn_like(sigma)) * scale_factor
                last_micro = (index + 1) % accumulation == 0 or index + 1 == micro_batches
                # Gradients are all-reduced only on the micro-batch that ends an optimizer step.
                sync = contextlib.nullcontext() if last_micro or dist.world_size == 1 else model.no_sync()
                with sync:
                    loss = diffusion_loss(model, scheduler, kind, z, precision)
                    loss_value = loss.item()  # one device-to-host copy per micro-batch
                    # All ranks judge the same (averaged) loss, so they stop together.
                    guard.check(all_reduce_mean(loss_value) if dist.world_size > 1 else loss_value, step)
                    # Dividing by the accumulation count makes k micro-batches of b match one batch of k*b.
                    scaler.scale(loss / accumulation).backward()
                total += loss_value
                count += 1
                bar.update(1)
                if not last_micro:
                    continue

                result = optimizer_step(optimizer, scaler, unet.parameters(), t.grad_clip, lr_scheduler)
                if ema is not None and result.stepped:
                    ema.update_parameters(unet)
                step += 1
                done_in_epoch = index + 1
                bar.set_postfix({"loss": f"{total / count:.4f}", "step": step})
                if step % config.output.log_every_n_steps == 0 or step == max_steps:
                    writer.scalars(
                        {
                            "train/loss": loss_value,
                            "train/lr": lr_scheduler.get_last_lr()[0],
                            "train/grad_norm": result.grad_norm,
                            "train/grad_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
                            "train/step_time_s": time.perf_counter() - step_start,
                            "train/peak_memory_mb": peak_memory_mb(device),
                            "train/skipped_step": float(not result.stepped),
                        },
                        step,
                    )
                step_start = time.perf_counter()
            bar.close()
            skip_batches = 0
            if dist.is_main and count:
                log.info("epoch %d step %d train loss %.4f", epoch + 1, step, total / count)

            if (epoch + 1) % t.val_every_n_epochs == 0 or epoch + 1 == max_epochs or step >= max_steps:
                if dist.is_main:
                    validate(ema.module if ema is not None else unet, autoencoder, config, scale_factor,
                             latent_shape, affine, precision, run_dir, step, writer, device)
                barrier()  # the other ranks wait here while rank 0 samples
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
def validate(unet, autoencoder, config: Config, scale_factor: float, latent_shape: tuple[int, ...], affine,
             precision, run_dir: Path, step: int, writer: RunLogger, device: torch.device) -> Path:
    """Sample one volume (EMA weights when kept) and write ``<run>/samples/sample-step<N>.{nii.gz,png}``.

    The noise comes from a generator seeded with ``config.seed``: every validation starts from the same noise
    (progress is visible), and the training RNG is untouched (a resumed run replays training exactly).
    """
    was_training = unet.training
    sampling = config.ldm.sampling
    kind = sampling.scheduler or config.ldm.scheduler.type
    scheduler = build_scheduler(config.ldm.scheduler, kind, len(latent_shape) - 1, math.prod(latent_shape[1:]))
    steps = min(sampling.num_inference_steps, FAST_DEV_RUN_INFERENCE_STEPS) if config.fast_dev_run \
        else sampling.num_inference_steps
    intensity = config.data.intensity
    value_range = (intensity.b_min, intensity.b_max) if intensity.mode != "none" else None
    generator = torch.Generator(device=device).manual_seed(config.seed)
    volume = generate_volume(unet, autoencoder, scheduler, kind, latent_shape, scale_factor, sampling, steps,
                             value_range, device, generator, precision)
    nifti, panel = save_sample(volume[0], affine, run_dir / "samples", f"sample-step{step:08d}", value_range,
                               title=f"step {step}")
    if panel is not None:
        writer.image("val/sample", panel, step)
    writer.scalars({"val/sample_mean": volume.mean().item(), "val/sample_std": volume.std().item()}, step)
    unet.train(was_training)
    return nifti


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_resume_argument(parser, "ldm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion train-ldm", description=__doc__.splitlines()[0])
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
