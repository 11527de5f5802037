"""``monai-diffusion train-ldm``: train the latent diffusion UNet on the latents of a trained autoencoder.

Read top to bottom: setup (config, devices, resume, the frozen autoencoder, the latent cache, the latent scale
factor, the UNet, scheduler, optimizer and EMA, the run folder), then the engine's training loop (one optimizer
step = ``gradient_accumulation_steps`` micro-batches), with a validation sample here at each epoch's end. SIGINT /
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

import logging
import sys
from pathlib import Path

from monai_diffusion.conditioning import ConditionEncoder, Denoiser
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import downsampling
from monai_diffusion.data import build_transforms
from monai_diffusion.engine import loop
from monai_diffusion.engine.distributed import broadcast_object
from monai_diffusion.generation import validation_sample
from monai_diffusion.latents import (
    SPACING_KEY,
    LatentRecord,
    compute_scale_factor,
    encode_volume,
    latent_loader,
    load_autoencoder,
    load_cache_entry,
    plain_affine,
    resolve_autoencoder_checkpoint,
    training_items,
    voxel_spacing,
)
from monai_diffusion.networks.builders import LDM_SHAPE_KEYS
from monai_diffusion.steps import build_ldm_training

logger = logging.getLogger("monai_diffusion")

def train(run_config: Config, resume: str | None = None) -> Path:
    """Train the latent diffusion model that ``run_config`` describes; returns the run folder.

    Raises:
        ValueError: a resumed run's autoencoder has other weights now.
        TrainingStopped: SIGINT / SIGTERM stopped the run at a step boundary (``last.pt`` saved).
    """
    config, dist, precision = loop.start_stage(run_config, "ldm")  # the stage's own precision
    device = dist.device
    t = config.ldm.training
    resume_path, state = loop.resume_checkpoint(config, "ldm", resume, LDM_SHAPE_KEYS)
    resumed = LatentRecord.from_checkpoint(state) if state is not None else None

    # ---- the frozen autoencoder (a resumed run keeps the one it started with, and checks it is unchanged)
    if resumed is not None and config.ldm.autoencoder_checkpoint is None:
        ae_path = resumed.autoencoder_checkpoint
    else:
        ae_path = resolve_autoencoder_checkpoint(config)
    autoencoder, ae_hash = load_autoencoder(ae_path, config, device)
    if resumed is not None and ae_hash != resumed.autoencoder_hash:
        raise ValueError(
            f"Autoencoder {ae_path} has weights {ae_hash}, but {resume_path} was trained on latents of "
            f"{resumed.autoencoder_hash} ({resumed.autoencoder_checkpoint}); resume with that autoencoder "
            f"or start a new LDM run"
        )
    # The config rules have checked that this latent fits the UNet's levels.
    latent_shape = (config.autoencoder.latent_channels, *downsampling(config).latent_shape(config.data.voxel_size))
    logger.info("autoencoder %s (weights %s); latent shape %s", ae_path, ae_hash, list(latent_shape))

    # ---- conditions: fitted on the training split once, then the checkpoint's (a resumed run keeps its statistics)
    items = training_items(config)
    encoder = ConditionEncoder.from_state(resumed.conditioning) if resumed is not None \
        else ConditionEncoder.fit(config, items)
    if encoder is not None:
        logger.info("conditions %s", encoder.state()["conditions"])
        if encoder.maisi is not None:
            logger.info("MAISI's UNet inputs: spacing %s, modality %s", encoder.takes_spacing,
                        f"from '{encoder.maisi['modality_key']}' (default {encoder.maisi['modality']})"
                        if encoder.maisi["modality_key"] else encoder.maisi["modality"])
    fields = [encoder.item_fields(item) for item in items] if encoder is not None else None

    # ---- latents: the cache (or on-the-fly encoding), the scale factor and the data's affine
    deterministic = build_transforms(config.data, train=False, expected_channels=config.autoencoder.in_channels)
    train_loader, train_sampler, cache = latent_loader(config, t, autoencoder, items, autoencoder_path=ae_path,
                                                       autoencoder_hash=ae_hash, precision=precision,
                                                       dist=dist, fields=fields,
                                                       spacing=encoder is not None and encoder.takes_spacing)

    def first_posteriors():
        for index in range(min(t.scale_factor_volumes, len(items))):
            if cache is not None:
                entry = load_cache_entry(cache.files[index])
                yield entry["mu"], entry["sigma"]
            else:
                yield encode_volume(autoencoder, deterministic(dict(items[index]))["image"], device, precision)

    if resumed is not None:
        scale_factor, affine = resumed.scale_factor, resumed.affine
        logger.info("latent scale factor %.6g (from the checkpoint)", scale_factor)
    else:  # the factor given, or 1/std of the first training latents
        how = "ldm.training.scale_factor"
        scale_factor = t.scale_factor
        if scale_factor is None:
            scale_factor = compute_scale_factor(first_posteriors(), seed=config.seed) if dist.is_main else None
            scale_factor = float(broadcast_object(scale_factor))
            how = f"1/std over {min(t.scale_factor_volumes, len(items))} training volume(s)"
        if cache is not None:
            affine = load_cache_entry(cache.files[0])["affine"]
        else:
            affine = deterministic(dict(items[0]))["image"].affine
        affine = plain_affine(affine)
        logger.info("latent scale factor %.6g (%s)", scale_factor, how)
    record = LatentRecord(autoencoder_checkpoint=ae_path, autoencoder_hash=ae_hash, scale_factor=scale_factor,
                          latent_shape=latent_shape, affine=affine,
                          conditioning=encoder.state() if encoder is not None else None)
    budget = loop.step_budget(len(train_loader), t, config.fast_dev_run, dist.world_size)

    # ---- UNet, scheduler, optimizer, EMA: the step benchmark and plan measure; a resumed run's state
    stage = build_ldm_training(config, latent_shape, device, precision, max_steps=budget.max_steps,
                               max_epochs=budget.max_epochs, world_size=dist.world_size, autoencoder=autoencoder,
                               scale_factor=scale_factor, encoder=encoder, record=record)
    position = loop.restore_position(stage, state, dist)

    # ---- the run folder, once setup has succeeded: a failed start leaves nothing behind
    run = loop.open_training_run(run_config, config, "ldm", dist, resume_path=resume_path, state=state)
    if state is None:
        run.writer.scalars({"latent/scale_factor": scale_factor}, 0)
    with loop.train_epochs(stage, train_loader, sampler=train_sampler, budget=budget, run=run,
                           position=position) as epochs:
        for end in epochs:
            if end.validate:  # the EMA weights when kept; a conditional UNet with the first volume's conditions
                unet = stage.ema.module if stage.ema is not None else stage.unet
                denoiser, title = unet, f"step {end.step}"
                if encoder is not None:  # (and spacing: the record's affine is the first volume's)
                    row = fields[0] | {SPACING_KEY: voxel_spacing(affine).tolist()}
                    denoiser = Denoiser(unet, encoder.encode([row]).to(device), config.ldm.sampling.guidance_scale)
                    title += f" {encoder.describe(row)}"
                validation_sample(denoiser, unet, autoencoder, config=config, trained=config, record=record,
                                  affine=affine, precision=precision, run=run, step=end.step, title=title)
    return run.dir


def main(argv: list[str] | None = None) -> int:
    return loop.training_main(train, "ldm", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
