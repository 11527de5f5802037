"""``monai-diffusion train-controlnet``: train a ControlNet that makes a trained, frozen LDM follow label maps.

Read top to bottom: setup (config, devices, resume, the frozen LDM and the autoencoder it was trained on, the label
maps, the latent cache, the ControlNet, its optimizer and EMA, the run folder), then the training loop (one
optimizer step = ``gradient_accumulation_steps`` micro-batches), a validation sample and checkpoints at each epoch's
end. SIGINT / SIGTERM stop it after the current optimizer step with ``last.pt`` saved. Works unchanged under
``torchrun --nproc_per_node=N``.

The data are (image, label map) pairs: ``data.mask_key`` names each datalist entry's label map, a NIfTI file on its
image's voxel grid with labels 0..``controlnet.num_labels``-1. The images are the LDM's: the same latent cache (or
on-the-fly encoding, the label maps then moving with the images through ``data.augment``), its scale factor and
its conditions. MONAI's ControlNet starts as a copy of the UNet's encoder with zeroed output convolutions and learns,
for each noisy latent, residuals that the frozen UNet adds to its skip connections so that its prediction follows
the label map (``controlnet.conditioning_embedding_num_channels`` sets the resolution the map is fed at).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from monai_diffusion.conditioning import Denoiser, control_size, read_control
from monai_diffusion.config.arguments import add_config_arguments, add_resume_argument, config_from_args
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import stage_config
from monai_diffusion.data.sources import check_label_maps
from monai_diffusion.engine.checkpoint import check_shape_keys, load_checkpoint, save_checkpoint
from monai_diffusion.engine.distributed import all_reduce_mean, barrier, cleanup_distributed
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
from monai_diffusion.generation import generate_volume, load_ldm, load_ldm_checkpoint, newest_ldm_checkpoint
from monai_diffusion.latents import latent_loader, training_items
from monai_diffusion.networks.builders import CONTROLNET_SHAPE_KEYS, LDM_SHAPE_KEYS, build_scheduler
from monai_diffusion.steps import (
    build_controlnet_training,
    controlnet_control,
    controlnet_epoch_end,
    controlnet_micro_step,
    controlnet_update,
    ldm_latents,
    training_model,
)

# fast_dev_run samples its validation volume with this many denoising steps.
FAST_DEV_RUN_INFERENCE_STEPS = 2


def train(config: Config, resume: str | None = None) -> Path:
    """Train the ControlNet described by ``config`` on top of its trained LDM; returns the run folder.

    Raises:
        ValueError: no ``data.mask_key``, a config that does not describe the LDM, or an LDM that changed since a
            resumed run started.
        TrainingStopped: SIGINT / SIGTERM stopped the run at a step boundary (``last.pt`` saved).
    """
    # The run folder keeps the whole config; the stage works with its own precision.
    run_config, config = config, stage_config(config, "controlnet")
    dist, precision = start_run(config)
    log = get_logger()
    device = dist.device
    t = config.controlnet.training
    mask_key = config.data.mask_key
    if mask_key is None:
        raise ValueError("data.mask_key: train-controlnet learns from label maps; name the datalist field that holds "
                         "each volume's label map (e.g. label)")

    # ---- resume
    resume_path = find_resume(config, "controlnet", resume)
    state = load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        if state.get("kind") != "controlnet":
            raise ValueError(f"{resume_path}: not a ControlNet checkpoint (kind={state.get('kind')!r})")
        check_shape_keys(state["config"], config.model_dump(mode="json"), CONTROLNET_SHAPE_KEYS, resume_path)

    # ---- the frozen LDM (a resumed run keeps the one it started with, and checks it is unchanged), its autoencoder
    if state is not None and config.controlnet.ldm_checkpoint is None:
        ldm_path = Path(state["ldm_checkpoint"])
    else:
        ldm_path = Path(config.controlnet.ldm_checkpoint or newest_ldm_checkpoint(Path(config.output.output_dir)))
    ldm_state = load_ldm_checkpoint(ldm_path)
    ldm_path = Path(ldm_state["path"])
    check_shape_keys(ldm_state["config"], config.model_dump(mode="json"), LDM_SHAPE_KEYS, ldm_path,
                     remedy="The config must describe the LDM the ControlNet steers (use that run's config.yaml).")
    ldm = load_ldm(ldm_state, config, device)
    if state is not None and ldm.weights_hash != state["ldm_hash"]:
        raise ValueError(
            f"LDM {ldm_path} has weights {ldm.weights_hash}, but {resume_path} was trained to steer "
            f"{state['ldm_hash']} ({state['ldm_checkpoint']}); resume with that LDM or start a new ControlNet run"
        )
    encoder, latent_shape = ldm.encoder, ldm.latent_shape
    log.info("LDM %s (step %d, %s weights %s); latent shape %s", ldm_path, ldm_state["step"], ldm.weights,
             ldm.weights_hash, list(latent_shape))

    # ---- the (image, label map) pairs, their conditions and latents
    items = training_items(config)
    check_label_maps(items, mask_key, config.controlnet.num_labels)
    fields = [{name: item[name] for name in encoder.names} if encoder is not None else {} for item in items]
    size = control_size(latent_shape[1:], config.controlnet.conditioning_embedding_num_channels)
    if t.cache_latents:
        # The label maps as the ControlNet sees them, computed once (the cached latents are not augmented either).
        for item, field in zip(items, fields):
            field["control"] = read_control(Path(item[mask_key]), config.data, config.controlnet.num_labels, size)[0]
    ae_path, ae_hash = Path(ldm_state["autoencoder_checkpoint"]), ldm_state["autoencoder_hash"]
    train_loader, train_sampler, _ = latent_loader(config, t, ldm.autoencoder, items, ae_path, ae_hash, precision,
                                                   dist, fields, mask_key=mask_key)
    budget = step_budget(len(train_loader), t, config.fast_dev_run, dist.world_size)

    # ---- ControlNet, optimizer, EMA: the step benchmark and plan measure
    parts = build_controlnet_training(config, ldm.trained, ldm.unet, latent_shape, device, precision,
                                      budget.max_steps, max_epochs=budget.max_epochs, world_size=dist.world_size,
                                      conditioning=encoder.unet_arguments() if encoder is not None else None)
    controlnet, ema = parts.controlnet, parts.ema

    step, start_epoch, skip_batches = 0, 0, 0
    if state is not None:
        controlnet.load_state_dict(state["controlnet"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
        parts.scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        restore_rank_rng(state["rng"], dist)

    model = training_model(controlnet, config.device, dist)  # DDP under torchrun, compiled with device.compile
    # ---- the run folder, once setup has succeeded: a failed start leaves nothing behind
    run_dir = open_run_dir(run_config, "controlnet", dist, resume_path, state)
    writer = RunLogger(run_dir / "tensorboard", enabled=dist.is_main)
    guard = NonFiniteGuard(t.max_nonfinite_steps)

    def save(name: str, epoch: int, batches_in_epoch: int) -> None:  # every rank calls it
        ranks = rank_states(controlnet)
        if not dist.is_main:
            return
        save_checkpoint(
            run_dir / "checkpoints" / name,
            {
                "kind": "controlnet",
                "controlnet": controlnet.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": parts.optimizer.state_dict(),
                "scaler": parts.scaler.state_dict(),
                "lr_scheduler": parts.lr_scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                **ranks,
                "config": config.model_dump(mode="json"),
                "ldm_checkpoint": str(ldm_path),
                "ldm_hash": ldm.weights_hash,
                "latent_shape": list(latent_shape),
            },
        )

    # ---- training loop
    epoch, done_in_epoch = start_epoch, skip_batches
    stop = StopSignals().install()  # from here on SIGINT / SIGTERM stop at the next step boundary
    try:
        for epoch in range(start_epoch, budget.max_epochs):
            if step >= budget.max_steps:
                break
            train_sampler.set_epoch(epoch)
            model.train()
            total, count = 0.0, 0
            bar = tqdm(total=budget.micro_batches, desc=f"epoch {epoch + 1}/{budget.max_epochs}",
                       disable=not dist.is_main, initial=skip_batches, dynamic_ncols=True)
            step_start = time.perf_counter()
            done_in_epoch = skip_batches
            for index, batch in epoch_batches(train_loader, budget, skip_batches, epoch):
                z = ldm_latents(batch, ldm.autoencoder, ldm.scale_factor, precision, device)
                control = controlnet_control(parts, batch, device, mask_key)
                condition = encoder.encode_batch(batch) if encoder is not None else None
                last_micro = budget.ends_step(index)
                loss = controlnet_micro_step(parts, z, control, last_micro, model, condition)
                loss_value = loss.item()  # one device-to-host copy per micro-batch
                # All ranks judge the same (averaged) loss, so they stop together.
                guard.check(all_reduce_mean(loss_value) if dist.world_size > 1 else loss_value, step)
                total += loss_value
                count += 1
                bar.update(1)
                if not last_micro:
                    continue

                result = controlnet_update(parts)
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
                controlnet_epoch_end(parts)
            if dist.is_main and count:
                log.info("epoch %d step %d train loss %.4f", epoch + 1, step, total / count)

            if (epoch + 1) % t.val_every_n_epochs == 0 or epoch + 1 == budget.max_epochs or step >= budget.max_steps:
                if dist.is_main:
                    validate(ema.module if ema is not None else controlnet, ldm, config, items[0], fields[0],
                             precision, run_dir, step, writer, device)
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
def validate(controlnet, ldm, config: Config, item: dict, field: dict, precision, run_dir: Path, step: int,
             writer: RunLogger, device: torch.device) -> Path:
    """Sample one volume that follows the first training volume's label map (and its conditions), and write
    ``<run>/samples/sample-step<N>.{nii.gz,png}`` in the map's space.

    The noise comes from a generator seeded with ``config.seed`` (every validation starts from the same noise) and
    the training RNG is untouched (a resumed run replays training exactly).
    """
    was_training = controlnet.training
    controlnet.eval()
    sampling, trained = config.ldm.sampling, ldm.trained
    kind = sampling.scheduler or trained.ldm.scheduler.type
    latent_shape = ldm.latent_shape
    scheduler = build_scheduler(trained.ldm.scheduler, kind, len(latent_shape) - 1, math.prod(latent_shape[1:]))
    steps = min(sampling.num_inference_steps, FAST_DEV_RUN_INFERENCE_STEPS) if config.fast_dev_run \
        else sampling.num_inference_steps
    size = control_size(latent_shape[1:], config.controlnet.conditioning_embedding_num_channels)
    control, affine = read_control(Path(item[config.data.mask_key]), config.data, config.controlnet.num_labels, size)
    condition = ldm.encoder.encode([field]).to(device) if ldm.encoder is not None else None
    denoiser = Denoiser(ldm.unet, condition, sampling.guidance_scale if condition is not None else 1.0, controlnet,
                        control[None].to(device), config.controlnet.conditioning_scale)
    intensity = trained.data.intensity
    value_range = (intensity.b_min, intensity.b_max) if intensity.mode != "none" else None
    generator = torch.Generator(device=device).manual_seed(config.seed)
    volume = generate_volume(denoiser, ldm.autoencoder, scheduler, kind, latent_shape, ldm.scale_factor, sampling,
                             steps, value_range, device, generator, precision)
    nifti, panel = save_sample(volume[0], affine, run_dir / "samples", f"sample-step{step:08d}", value_range,
                               title=f"step {step} mask {Path(item[config.data.mask_key]).name}")
    if panel is not None:
        writer.image("val/sample", panel, step)
    controlnet.train(was_training)
    return nifti


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_resume_argument(parser, "controlnet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion train-controlnet", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    return run_training(train, config, args.resume)


if __name__ == "__main__":
    sys.exit(main())
