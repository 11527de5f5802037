"""What an exported MONAI bundle runs (``monai-diffusion export``): the weights loader and the sampler its
``configs/inference.json`` instantiates.

The bundle's config builds each network by ``_target_`` with the constructor arguments the run's builders used
(:class:`~monai_diffusion.networks.builders.Definition`), loads its weights with :func:`load_weights` and hands them
to :class:`LatentDiffusionSampler`, which draws every sample exactly as ``monai-diffusion sample`` does: the same
seeded noise (``seed * SEED_STRIDE + index``), denoising loop, guidance, ControlNet input, MAISI's UNet's spacing and
modality, decoding, clipping, file names and NIfTI headers, from :mod:`~monai_diffusion.generation`'s own functions.
A bundle therefore needs this package installed (its ``metadata.json`` lists it among the required packages): the
price of volumes that are the same as the run's own samples, voxel for voxel, rather than a re-implementation that
could drift from them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.schedulers import RFlowScheduler

from monai_diffusion.conditioning import ConditionEncoder, Denoiser, control_size, read_control
from monai_diffusion.config.schema import DataConfig, SamplingConfig
from monai_diffusion.diffusion import check_sampler
from monai_diffusion.engine.logging import get_logger, save_sample
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.generation import (
    MANIFEST,
    SEED_STRIDE,
    checked_conditions,
    generate_volume,
    maisi_rows,
    manifest_names,
    sample_description,
    sample_record,
    write_manifest,
)

__all__ = ["LatentDiffusionSampler", "load_weights"]


def load_weights(network: torch.nn.Module, path: str | os.PathLike, device: torch.device | str) -> torch.nn.Module:
    """``network`` with the state dict saved at ``path`` (every key, strictly), frozen, in eval mode on ``device``."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.to(device).eval().requires_grad_(False)


class LatentDiffusionSampler:
    """Generates volumes with a trained LDM as ``monai-diffusion sample`` does, from networks a bundle built.

    Args:
        network: the diffusion UNet (its weights loaded: the run's EMA weights where it kept them).
        autoencoder: the autoencoder whose latents the UNet learnt.
        scheduler: the noise scheduler to sample with (its family must be the one the UNet was trained with).
        trained_scheduler: the scheduler type the UNet was trained with (``ldm.scheduler.type``).
        latent_shape: (channels, then per axis) of one latent.
        scale_factor: the latent scale factor the LDM was trained with.
        affine: the training data's voxel-to-world matrix (4x4) the samples are written with.
        value_range: (min, max) the samples are clipped to (the training intensity range), or None.
        device: where to sample.
        precision: ``device.mixed_precision`` of the LDM stage (False: fp32).
        condition_encoder: the LDM's conditions (None: unconditional).
        condition_dropout: ``ldm.conditioning.dropout`` it was trained with (guidance other than 1 needs it > 0).
        controlnet: a ControlNet trained on this LDM (None: none), with ``mask_data`` (the ``data`` settings a label
            map is reoriented, resampled and cropped with: ``orientation``, ``spacing``, ``voxel_size``),
            ``num_labels`` and ``control_channels`` (``controlnet.conditioning_embedding_num_channels``).
        tiled_decode, tile_size, tile_overlap: ``ldm.sampling``'s decoding settings.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        autoencoder: torch.nn.Module,
        scheduler,
        *,
        trained_scheduler: str,
        latent_shape: Sequence[int],
        scale_factor: float,
        affine: Sequence[Sequence[float]],
        value_range: Sequence[float] | None,
        device: torch.device | str,
        precision: bool | str = False,
        condition_encoder: ConditionEncoder | None = None,
        condition_dropout: float = 0.0,
        controlnet: torch.nn.Module | None = None,
        mask_data: Mapping | None = None,
        num_labels: int | None = None,
        control_channels: Sequence[int] | None = None,
        tiled_decode: bool = False,
        tile_size: Sequence[int] | None = None,
        tile_overlap: float = 0.25,
    ) -> None:
        self.kind = "rflow" if isinstance(scheduler, RFlowScheduler) else "ddpm"  # DDPM and DDIM sample alike
        check_sampler(self.kind, trained_scheduler)
        if controlnet is not None and (mask_data is None or num_labels is None or control_channels is None):
            raise ValueError("a ControlNet needs mask_data, num_labels and control_channels")
        self.network, self.autoencoder, self.scheduler = network, autoencoder, scheduler
        self.latent_shape = tuple(int(size) for size in latent_shape)
        self.scale_factor = float(scale_factor)
        self.affine = torch.as_tensor(affine, dtype=torch.float64)
        self.value_range = tuple(value_range) if value_range is not None else None
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.encoder = ConditionEncoder.from_state(condition_encoder.state()) if condition_encoder is not None \
            else None  # the conditions as tuples of dicts, however the config spelt them
        self.condition_dropout = float(condition_dropout)
        self.controlnet, self.num_labels = controlnet, num_labels
        self.mask_data = DataConfig.model_validate(dict(mask_data)) if mask_data is not None else None
        self.control_channels = list(control_channels) if control_channels is not None else None
        self.sampling = SamplingConfig(tiled_decode=tiled_decode, tile_size=list(tile_size) if tile_size else None,
                                       tile_overlap=tile_overlap)

    def generate(
        self,
        *,
        seed: int,
        num_samples: int,
        num_inference_steps: int,
        output_dir: str | os.PathLike,
        conditions: Mapping | Sequence[Mapping] | None = None,
        guidance_scale: float = 1.0,
        mask: str | os.PathLike | None = None,
        control_scale: float = 1.0,
        spacing: Sequence[float] | None = None,
        modality: str | None = None,
    ) -> list[Path]:
        """Write ``num_samples`` volumes (``sample-NNN.nii.gz`` and ``.png``) to ``output_dir``; returns the NIfTI
        files. Sample i of ``seed`` is ``monai-diffusion sample``'s sample i of that seed.

        Args:
            conditions: one ``{name: value}`` for every sample, or one per sample (then their count is the number
                of samples); None: unconditional samples (a conditional LDM's null condition).
            guidance_scale: classifier-free guidance of conditioned samples.
            mask: a label map the samples follow (a bundle with a ControlNet); the samples take its affine.
            control_scale: the weight of the ControlNet's residuals.
            spacing: MAISI's UNet: the voxel spacing in mm to generate at, also the samples' affine (``sample
                --spacing``; None: the training data's, or the label map's).
            modality: MAISI's UNet: the samples' modality, a name of MAISI's vocabulary (``sample --modality``;
                None: the run's).

        Raises:
            ValueError: conditions the LDM was not trained with (as ``sample`` refuses them), a mask without a
                ControlNet or a ControlNet without a mask, a spacing or modality the UNet does not take or cannot
                take.
        """
        log = get_logger()
        # Numbers as sample's options give them, whatever the bundle's command line parsed ("2" is an int there).
        seed, num_samples, num_inference_steps = int(seed), int(num_samples), int(num_inference_steps)
        guidance_scale, control_scale = float(guidance_scale), float(control_scale)
        if (mask is None) != (self.controlnet is None):
            raise ValueError("this bundle's ControlNet samples with a label map: set mask" if mask is None else
                             "mask: this bundle has no ControlNet (export it with --controlnet)")
        rows, where = None, None
        if isinstance(conditions, Mapping):
            rows, where = [dict(conditions)] * num_samples, ["conditions"] * num_samples
        elif conditions is not None:
            rows = [dict(row) for row in conditions]
            where = [f"conditions[{index}]" for index in range(len(rows))]
        rows, guidance = checked_conditions(
            self.encoder, rows, where, guidance_scale if rows is not None else None,
            num_samples=None, default_guidance=guidance_scale, dropout=self.condition_dropout,
            model="the bundle's LDM")
        num_samples = len(rows) if rows is not None else num_samples
        control, affine = None, self.affine
        if self.controlnet is not None:
            size = control_size(self.latent_shape[1:], self.control_channels)
            control, affine = read_control(Path(mask), self.mask_data, self.num_labels, size)
            control = control[None].to(self.device)
        covariates = rows is not None  # else their null condition (a conditional LDM's unconditional model)
        rows, affine = maisi_rows(self.encoder, rows, num_samples, spacing=spacing, modality=modality, affine=affine,
                                  model="the bundle's LDM", options=("spacing", "modality"))
        out = Path(output_dir)
        log.info("sampling %d volume(s) with %s, %d steps, seed %d -> %s", num_samples,
                 type(self.scheduler).__name__, num_inference_steps, seed, out)
        records = [sample_record(index, seed, rows[index] if rows is not None else None, guidance, mask=mask)
                   for index in range(num_samples)]
        described = rows is not None or mask is not None
        written = []
        for index, record in enumerate(records):
            generator = torch.Generator(device=self.device).manual_seed(seed * SEED_STRIDE + index)
            denoiser, condition = self.network, None
            if self.encoder is not None:
                condition = self.encoder.encode(rows[index:index + 1], covariates=covariates) if rows is not None \
                    else self.encoder.null(1)
            if condition is not None or self.controlnet is not None:
                denoiser = Denoiser(self.network, condition.to(self.device) if condition is not None else None,
                                    guidance, self.controlnet, control=control, control_scale=control_scale)
            volume = generate_volume(
                denoiser, self.autoencoder, scheduler=self.scheduler, kind=self.kind, latent_shape=self.latent_shape,
                scale_factor=self.scale_factor, sampling=self.sampling, num_steps=num_inference_steps,
                value_range=self.value_range, device=self.device, generator=generator, precision=self.precision,
            )
            nifti, _ = save_sample(volume[0], affine, out, record["file"][: -len(".nii.gz")],
                                   value_range=self.value_range, title=f"seed {seed} #{index}",
                                   description=sample_description(record) if described else None)
            written.append(nifti)
            log.info("wrote %s", nifti)
        if described:
            write_manifest(out / MANIFEST, records, manifest_names(self.encoder, rows, covariates=covariates))
        return written
