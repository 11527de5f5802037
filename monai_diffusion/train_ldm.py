"""``monai-diffusion train-ldm``: train the latent diffusion UNet on the latents of a trained autoencoder.

Read top to bottom: setup (config, devices, resume, the frozen autoencoder, the latent cache, the latent scale
factor, the UNet, scheduler, optimizer and EMA, the run folder), then the training loop (one optimizer step =
``gradient_accumulation_steps`` micro-batches), validation samples and checkpoints at each epoch's end. SIGINT /
SIGTERM stop it after the current optimizer step with ``last.pt`` saved. Works unchanged under
``torchrun --nproc_per_node=N``.

Each training volume is encoded once into the latent cache (posterior mean and sigma); every use draws a fresh
latent ``mu + sigma * eps``, multiplies it by the scale factor (1 / std of the latents, computed once and kept
in the checkpoint) and trains the UNet to undo noise added by the scheduler.

With ``data.conditions`` the UNet also takes each volume's covariates (:mod:`monai_diffusion.conditioning`): their
statistics and vocabularies are fitted on the training split once and kept in the checkpoint, and each sample's
conditions are dropped with ``ldm.conditioning.dropout`` so the one UNet learns the unconditional model that
classifier-free guidance needs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from monai_diffusion.conditioning import ConditionEncoder, Denoiser
from monai_diffusion.config.arguments import add_config_arguments, add_resume_argument, config_from_args
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import stage_config
from monai_diffusion.data import build_transforms
from monai_diffusion.generation import generate_volume
from monai_diffusion.engine.checkpoint import check_shape_keys, load_checkpoint, save_checkpoint
from monai_diffusion.engine.distributed import all_reduce_mean, barrier, broadcast_object, cleanup_distributed
from monai_diffusion.engine.logging import RunLogger, get_logger, save_sample
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
from monai_diffusion.latents import (
    compute_scale_factor,
    encode_volume,
    latent_loader,
    load_autoencoder,
    load_cache_entry,
    plain_affine,
    resolve_autoencoder_checkpoint,
    training_items,
)
from monai_diffusion.networks.builders import LDM_SHAPE_KEYS, build_scheduler
from monai_diffusion.steps import build_ldm_training, ldm_epoch_end, ldm_latents, ldm_micro_step, ldm_update, training_model

# fast_dev_run samples its validation volume with this many denoising steps.
FAST_DEV_RUN_INFERENCE_STEPS = 2


def train(config: Config, resume: str | None = None) -> Path:
    """Train the latent diffusion model described by ``config``; returns the run folder.

    Raises:
        TrainingStopped: SIGINT / SIGTERM stopped the run at a step boundary (``last.pt`` saved).
    """
    # The run folder keeps the whole config; the stage works with its own precision.
    run_config, config = config, stage_config(config, "ldm")
    dist, precision = start_run(config)
    log = get_logger()
    device = dist.device
    t = config.ldm.training

    # ---- resume
    resume_path = find_resume(config, "ldm", resume)
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        if state.get("kind") != "ldm":
            raise ValueError(f"{resume_path}: not an LDM checkpoint (kind={state.get('kind')!r})")
        check_shape_keys(state["config"], config.model_dump(mode="json"), LDM_SHAPE_KEYS, resume_path)

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
    # The config rules have checked that this latent fits the UNet's levels.
    latent_shape = (config.autoencoder.latent_channels, *autoencoder.latent_shape(config.data.voxel_size))
    log.info("autoencoder %s (weights %s); latent shape %s", ae_path, ae_hash, list(latent_shape))

    # ---- conditions: fitted on the training split once, then the checkpoint's (a resumed run keeps its statistics)
    items = training_items(config)
    encoder = ConditionEncoder.from_state(state.get("conditioning")) if state is not None \
        else ConditionEncoder.fit(config, items)
    if encoder is not None:
        log.info("conditions %s", encoder.state()["conditions"])
    fields = [{name: item[name] for name in encoder.names} for item in items] if encoder is not None else None

    # ---- latents: the cache (or on-the-fly encoding), the scale factor and the data's affine
    deterministic = build_transforms(config.data, train=False, expected_channels=config.autoencoder.in_channels)
    train_loader, train_sampler, cache = latent_loader(config, t, autoencoder, items, ae_path, ae_hash, precision,
                                                       dist, fields)

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

    budget = step_budget(len(train_loader), t, config.fast_dev_run, dist.world_size)

    # ---- UNet, scheduler, optimizer, EMA: the step benchmark and plan measure
    parts = build_ldm_training(config, latent_shape, device, precision, budget.max_steps,
                               max_epochs=budget.max_epochs, world_size=dist.world_size,
                               conditioning=encoder.unet_arguments() if encoder is not None else None)
    unet, ema = parts.unet, parts.ema

    step, start_epoch, skip_batches = 0, 0, 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
        parts.scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        elif ema is not None:
            log.warning("the checkpoint has no EMA weights: the EMA starts from the current weights")
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        restore_rank_rng(state["rng"], dist)

    model = training_model(unet, config.device, dist)  # DDP under torchrun, compiled with device.compile
    # ---- the run folder, once setup has succeeded: a failed start leaves nothing behind
    run_dir = open_run_dir(run_config, "ldm", dist, resume_path, state)
    writer = RunLogger(run_dir / "tensorboard", enabled=dist.is_main)
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    if state is None:
        writer.scalars({"latent/scale_factor": scale_factor}, 0)

    def save(name: str, epoch: int, batches_in_epoch: int) -> None:  # every rank calls it
        ranks = rank_states(unet)
        if not dist.is_main:
            return
        save_checkpoint(
            run_dir / "checkpoints" / name,
            {
                "kind": "ldm",
                "unet": unet.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": parts.optimizer.state_dict(),
                "scaler": parts.scaler.state_dict(),
                "lr_scheduler": parts.lr_scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                **ranks,
                "config": config.model_dump(mode="json"),
                "scale_factor": scale_factor,
                "autoencoder_checkpoint": str(ae_path),
                "autoencoder_hash": ae_hash,
                "latent_shape": list(latent_shape),
                "affine": affine,
                **({"conditioning": encoder.state()} if encoder is not None else {}),
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
            total, count = 0.0, 0
            bar = tqdm(total=budget.micro_batches, desc=f"epoch {epoch + 1}/{budget.max_epochs}",
                       disable=not dist.is_main, initial=skip_batches, dynamic_ncols=True)
            step_start = time.perf_counter()
            done_in_epoch = skip_batches
            for index, batch in epoch_batches(train_loader, budget, skip_batches, epoch):
                z = ldm_latents(batch, autoencoder, scale_factor, precision, device)
                last_micro = budget.ends_step(index)
                condition = encoder.encode_batch(batch) if encoder is not None else None
                loss = ldm_micro_step(parts, z, last_micro, model, condition)
                loss_value = loss.item()  # one device-to-host copy per micro-batch
                # All ranks judge the same (averaged) loss, so they stop together.
                guard.check(all_reduce_mean(loss_value) if dist.world_size > 1 else loss_value, step)
                total += loss_value
                count += 1
                bar.update(1)
                if not last_micro:
                    continue

                result = ldm_update(parts)
                guard.check_update(result, step + 1)
                step += 1
                done_in_epoch = index + 1
                bar.set_postfix({"loss": f"{total / count:.4f}", "step": step})
                if step % config.output.log_every_n_steps == 0 or step == budget.max_steps:
                    writer.scalars({"train/loss": loss_value} | step_scalars(
                        result, parts.lr_scheduler, parts.scaler, step_start, device), step)
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
                ldm_epoch_end(parts)
            if dist.is_main and count:
                log.info("epoch %d step %d train loss %.4f", epoch + 1, step, total / count)

            if (epoch + 1) % t.val_every_n_epochs == 0 or epoch + 1 == budget.max_epochs or step >= budget.max_steps:
                if dist.is_main:
                    validate(ema.module if ema is not None else unet, autoencoder, config, scale_factor,
                             latent_shape, affine, precision, run_dir, step, writer, device, encoder, fields)
                barrier()  # the other ranks wait here while rank 0 samples
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
        cleanup_distributed(model)
    if dist.is_main:
        log.info("done: %d optimizer steps; run folder %s", step, run_dir)
    return run_dir


@torch.no_grad()
def validate(unet, autoencoder, config: Config, scale_factor: float, latent_shape: tuple[int, ...], affine,
             precision, run_dir: Path, step: int, writer: RunLogger, device: torch.device,
             encoder: ConditionEncoder | None = None, fields: list[dict] | None = None) -> Path:
    """Sample one volume (EMA weights when kept) and write ``<run>/samples/sample-step<N>.{nii.gz,png}``.

    The noise comes from a generator seeded with ``config.seed``: every validation starts from the same noise
    (progress is visible), and the training RNG is untouched (a resumed run replays training exactly). A conditional
    UNet samples with the first training volume's conditions at ``ldm.sampling.guidance_scale``.
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
    title, denoiser = f"step {step}", unet
    if encoder is not None:
        denoiser = Denoiser(unet, encoder.encode(fields[:1]).to(device), sampling.guidance_scale)
        title += f" {encoder.describe(fields[0])}"
    volume = generate_volume(denoiser, autoencoder, scheduler, kind, latent_shape, scale_factor, sampling, steps,
                             value_range, device, generator, precision)
    nifti, panel = save_sample(volume[0], affine, run_dir / "samples", f"sample-step{step:08d}", value_range,
                               title=title)
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
    return run_training(train, config, args.resume)


if __name__ == "__main__":
    sys.exit(main())
