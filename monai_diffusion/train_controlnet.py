"""``monai-diffusion train-controlnet``: train a ControlNet that makes a trained, frozen LDM follow label maps.

Read top to bottom: setup (config, devices, resume, the frozen LDM and the autoencoder it was trained on, the label
maps, the latent cache, the ControlNet, its optimizer and EMA, the run folder), then the engine's training loop (one
optimizer step = ``gradient_accumulation_steps`` micro-batches), with a validation sample here at each epoch's end.
SIGINT / SIGTERM stop it after the current optimizer step with ``last.pt`` saved. Works unchanged under
``torchrun --nproc_per_node=N``.

The data are (image, label map) pairs: ``data.mask_key`` names each datalist entry's label map, a NIfTI file on its
image's voxel grid with labels 0..``controlnet.num_labels``-1. The images are the LDM's: the same latent cache (or
on-the-fly encoding, the label maps then moving with the images through ``data.augment``), its scale factor and
its conditions. MONAI's ControlNet starts as a copy of the UNet's encoder with zeroed output convolutions and learns,
for each noisy latent, residuals that the frozen UNet adds to its skip connections so that its prediction follows
the label map (``controlnet.conditioning_embedding_num_channels`` sets the resolution the map is fed at).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from monai_diffusion.conditioning import Denoiser, control_size, read_control
from monai_diffusion.config.schema import Config
from monai_diffusion.data.sources import check_label_maps
from monai_diffusion.engine import loop
from monai_diffusion.generation import load_ldm, load_ldm_checkpoint, newest_ldm_checkpoint, validation_sample
from monai_diffusion.latents import SPACING_KEY, latent_loader, training_items, voxel_spacing
from monai_diffusion.networks.builders import CONTROLNET_SHAPE_KEYS, LDM_SHAPE_KEYS
from monai_diffusion.steps import ControlRecord, build_controlnet_training

logger = logging.getLogger("monai_diffusion")

def train(run_config: Config, resume: str | None = None) -> Path:
    """Train the ControlNet that ``run_config`` describes on top of its trained LDM; returns the run folder.

    Raises:
        ValueError: no ``data.mask_key``, a config that does not describe the LDM, or an LDM that changed since a
            resumed run started.
        TrainingStopped: SIGINT / SIGTERM stopped the run at a step boundary (``last.pt`` saved).
    """
    config, dist, precision = loop.start_stage(run_config, "controlnet")  # the stage's own precision
    device = dist.device
    t = config.controlnet.training
    mask_key = config.data.mask_key
    if mask_key is None:
        raise ValueError("data.mask_key: train-controlnet learns from label maps; name the datalist field that holds "
                         "each volume's label map (e.g. label)")
    resume_path, state = loop.resume_checkpoint(config, "controlnet", resume, CONTROLNET_SHAPE_KEYS)
    resumed = ControlRecord.from_checkpoint(state) if state is not None else None

    # ---- the frozen LDM (a resumed run keeps the one it started with, and checks it is unchanged), its autoencoder
    if resumed is not None and config.controlnet.ldm_checkpoint is None:
        ldm_path = resumed.ldm_checkpoint
    else:
        ldm_path = Path(config.controlnet.ldm_checkpoint or newest_ldm_checkpoint(Path(config.output.output_dir)))
    ldm = load_ldm(load_ldm_checkpoint(ldm_path), config, device, shape_keys=LDM_SHAPE_KEYS,
                   remedy="The config must describe the LDM the ControlNet steers (use that run's config.yaml).")
    if resumed is not None and ldm.weights_hash != resumed.ldm_hash:
        raise ValueError(
            f"LDM {ldm.path} has weights {ldm.weights_hash}, but {resume_path} was trained to steer "
            f"{resumed.ldm_hash} ({resumed.ldm_checkpoint}); resume with that LDM or start a new ControlNet run"
        )
    encoder, latent_shape = ldm.encoder, ldm.latent_shape
    logger.info("LDM %s (step %d, %s weights %s); latent shape %s", ldm.path, ldm.step, ldm.weights, ldm.weights_hash,
             list(latent_shape))

    # ---- the (image, label map) pairs, their conditions and latents
    items = training_items(config)
    check_label_maps(items, mask_key, config.controlnet.num_labels)
    fields = [encoder.item_fields(item) if encoder is not None else {} for item in items]
    size = control_size(latent_shape[1:], config.controlnet.conditioning_embedding_num_channels)
    if t.cache_latents:
        # The label maps as the ControlNet sees them, computed once (the cached latents are not augmented either).
        for item, field in zip(items, fields):
            field["control"] = read_control(Path(item[mask_key]), config.data, config.controlnet.num_labels, size)[0]
    ae_path, ae_hash = ldm.record.autoencoder_checkpoint, ldm.record.autoencoder_hash
    train_loader, train_sampler, _ = latent_loader(config, t, ldm.autoencoder, items, autoencoder_path=ae_path,
                                                   autoencoder_hash=ae_hash, precision=precision,
                                                   dist=dist, fields=fields, mask_key=mask_key,
                                                   spacing=encoder is not None and encoder.takes_spacing)
    budget = loop.step_budget(len(train_loader), t, config.fast_dev_run, dist.world_size)

    # ---- ControlNet, optimizer, EMA: the step benchmark and plan measure; a resumed run's state
    stage = build_controlnet_training(
        config, ldm.trained, ldm.unet, latent_shape, device=device, precision=precision, max_steps=budget.max_steps,
        max_epochs=budget.max_epochs, world_size=dist.world_size, autoencoder=ldm.autoencoder,
        scale_factor=ldm.scale_factor, encoder=encoder, mask_key=mask_key,
        record=ControlRecord(ldm_checkpoint=ldm.path, ldm_hash=ldm.weights_hash, latent_shape=latent_shape))
    position = loop.restore_position(stage, state, dist)

    # ---- the run folder, once setup has succeeded: a failed start leaves nothing behind
    run = loop.open_training_run(run_config, config, "controlnet", dist, resume_path=resume_path, state=state)
    with loop.train_epochs(stage, train_loader, sampler=train_sampler, budget=budget, run=run,
                           position=position) as epochs:
        for end in epochs:
            if end.validate:  # a sample that follows the first training volume's label map, in the map's space
                controlnet = stage.ema.module if stage.ema is not None else stage.controlnet
                mask = Path(items[0][mask_key])
                control, affine = read_control(mask, config.data, config.controlnet.num_labels, size)
                row = fields[0] | {SPACING_KEY: voxel_spacing(affine).tolist()}  # the map's spacing, for MAISI's UNet
                condition = encoder.encode([row]).to(device) if encoder is not None else None
                denoiser = Denoiser(ldm.unet, condition,
                                    config.ldm.sampling.guidance_scale if condition is not None else 1.0, controlnet,
                                    control=control[None].to(device),
                                    control_scale=config.controlnet.conditioning_scale)
                validation_sample(denoiser, controlnet, ldm.autoencoder, config=config, trained=ldm.trained,
                                  record=ldm.record, affine=affine, precision=precision, run=run, step=end.step,
                                  title=f"step {end.step} mask {mask.name}")
    return run.dir


def main(argv: list[str] | None = None) -> int:
    return loop.training_main(train, "controlnet", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
