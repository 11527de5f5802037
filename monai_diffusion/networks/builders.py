"""Config -> networks and schedulers. Plain constructor calls with keyword arguments, nothing looked up by name.

Each network and scheduler is first a :class:`Definition` (its class and constructor arguments, from the config):
the builders construct it, and ``export`` writes the same definition into a MONAI bundle's config (``_target_`` and
its arguments), so the bundle builds the very network the run trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.nets import ControlNet, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from monai_diffusion.config.schema import AutoencoderConfig, ControlNetConfig, LDMConfig, SchedulerConfig, UNetConfig
from monai_diffusion.networks.autoencoderkl import AutoencoderKL

# Config keys that fix the autoencoder's tensor shapes (what build_autoencoder reads, training options aside): a
# checkpoint trained with other values cannot be resumed or reused.
AUTOENCODER_SHAPE_KEYS = [
    "autoencoder.architecture",
    "autoencoder.num_channels",
    "autoencoder.downsample_factors",
    "autoencoder.latent_channels",
    "autoencoder.num_res_blocks",
    "autoencoder.attention_levels",
    "autoencoder.norm_num_groups",
    "autoencoder.with_encoder_nonlocal_attn",
    "autoencoder.with_decoder_nonlocal_attn",
    "autoencoder.use_convtranspose",
    "autoencoder.include_fc",
    "autoencoder.use_combined_linear",
    "autoencoder.in_channels",
    "autoencoder.residual_resampling",
]
# Keys a resumed LDM run must share with its checkpoint: the autoencoder and latent shape, the UNet, and the
# diffusion process the UNet has learnt so far.
LDM_SHAPE_KEYS = AUTOENCODER_SHAPE_KEYS + [
    "data.voxel_size",
    "ldm.unet.num_channels",
    "ldm.unet.attention_levels",
    "ldm.unet.num_res_blocks",
    "ldm.unet.num_head_channels",
    "ldm.unet.norm_num_groups",
    "ldm.unet.include_fc",
    "ldm.unet.use_combined_linear",
    "ldm.unet.resblock_updown",
    "ldm.unet.architecture",
    "ldm.unet.include_spacing_input",
    "ldm.unet.num_class_embeds",
    "ldm.scheduler.type",
    "ldm.scheduler.num_train_timesteps",
    "ldm.scheduler.schedule",
    "ldm.scheduler.beta_start",
    "ldm.scheduler.beta_end",
    "ldm.scheduler.prediction_type",
    # What the UNet is conditioned on (with the vocabularies and statistics the checkpoint keeps).
    "data.conditions",
    "ldm.conditioning.categorical_via",
    "ldm.unet.modality",
    "ldm.unet.modality_key",
]
# A ControlNet mirrors its LDM's UNet and adds its own conditioning embedding for the label maps.
CONTROLNET_SHAPE_KEYS = LDM_SHAPE_KEYS + [
    "controlnet.num_labels",
    "controlnet.conditioning_embedding_num_channels",
]


@dataclass(frozen=True)
class Definition:
    """A network (or scheduler) as its class and keyword arguments.

    Attributes:
        target: the class.
        arguments: its constructor's keyword arguments (numbers, strings, booleans, None and tuples of them).
    """

    target: type
    arguments: dict[str, Any]

    def build(self):
        return self.target(**self.arguments)

    def bundle_config(self) -> dict[str, Any]:
        """The definition as a MONAI bundle config component: ``{"_target_": "module.Class", **arguments}`` with
        tuples as JSON lists (MONAI's networks take any sequence)."""

        def plain(value):
            return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value

        return {"_target_": f"{self.target.__module__}.{self.target.__qualname__}",
                **{key: plain(value) for key, value in self.arguments.items()}}


def autoencoder_definition(
    ae: AutoencoderConfig, spatial_dims: int = 3, use_checkpoint: bool | None = None, chunk_elements: int | None = None
) -> Definition:
    """The autoencoder described by the ``autoencoder`` section, unbuilt (:func:`build_autoencoder`'s arguments): ours,
    or MAISI's (``autoencoder.architecture``)."""
    num_levels = len(ae.num_channels)
    if ae.architecture == "maisi":
        return _maisi_autoencoder_definition(
            ae, spatial_dims, ae.training.use_gradient_checkpointing if use_checkpoint is None else use_checkpoint)
    return Definition(AutoencoderKL, dict(
        spatial_dims=spatial_dims,
        in_channels=ae.in_channels,
        out_channels=ae.in_channels,
        channels=tuple(ae.num_channels),
        num_res_blocks=ae.num_res_blocks if isinstance(ae.num_res_blocks, int) else tuple(ae.num_res_blocks),
        attention_levels=tuple(ae.attention_levels) if ae.attention_levels is not None else (False,) * num_levels,
        latent_channels=ae.latent_channels,
        norm_num_groups=ae.norm_num_groups,
        with_encoder_nonlocal_attn=ae.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=ae.with_decoder_nonlocal_attn,
        use_checkpoint=ae.training.use_gradient_checkpointing if use_checkpoint is None else use_checkpoint,
        use_convtranspose=ae.use_convtranspose,
        include_fc=ae.include_fc,
        use_combined_linear=ae.use_combined_linear,
        use_flash_attention=ae.use_flash_attention,
        downsample_factors=ae.downsample_factors,
        residual_resampling=ae.residual_resampling,
        chunk_elements=chunk_elements,
    ))


def _maisi_autoencoder_definition(ae: AutoencoderConfig, spatial_dims: int, use_checkpoint: bool) -> Definition:
    """MONAI's AutoencoderKlMaisi with MAISI's argument names (NV-Generate-CTMR's ``autoencoder_def``)."""
    num_levels = len(ae.num_channels)
    return Definition(AutoencoderKlMaisi, dict(
        spatial_dims=spatial_dims,
        in_channels=ae.in_channels,
        out_channels=ae.in_channels,
        latent_channels=ae.latent_channels,
        num_channels=tuple(ae.num_channels),
        num_res_blocks=(ae.num_res_blocks,) * num_levels if isinstance(ae.num_res_blocks, int)
        else tuple(ae.num_res_blocks),
        norm_num_groups=ae.norm_num_groups,
        norm_eps=1e-6,
        attention_levels=tuple(ae.attention_levels) if ae.attention_levels is not None else (False,) * num_levels,
        with_encoder_nonlocal_attn=ae.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=ae.with_decoder_nonlocal_attn,
        include_fc=ae.include_fc,
        use_combined_linear=ae.use_combined_linear,
        use_flash_attention=ae.use_flash_attention,
        use_checkpointing=use_checkpoint,
        use_convtranspose=ae.use_convtranspose,
        num_splits=ae.num_splits,
        dim_split=ae.dim_split,
        norm_float16=ae.norm_float16,
        save_mem=ae.save_mem,
    ))


def build_autoencoder(
    ae: AutoencoderConfig, spatial_dims: int = 3, use_checkpoint: bool | None = None, chunk_elements: int | None = None
) -> AutoencoderKL | AutoencoderKlMaisi:
    """The autoencoder described by the ``autoencoder`` section: ours, or MAISI's (``autoencoder.architecture``).

    Args:
        ae: the ``autoencoder`` config section.
        spatial_dims: 3 for volumes (``len(data.voxel_size)``).
        use_checkpoint: the memory-saving training path (MAISI's: its ``use_checkpointing``); None takes
            ``ae.training.use_gradient_checkpointing``.
        chunk_elements: slab size of the memory-saving path (None: the network's default per device); the
            benchmark varies it. Not read by MAISI's network (its slabs are ``num_splits``).
    """
    autoencoder = autoencoder_definition(ae, spatial_dims, use_checkpoint, chunk_elements).build()
    if ae.initial_sigma is not None:
        # The log-variance projection's bias sets where sigma starts: log(sigma^2) = 2 log(sigma).
        torch.nn.init.constant_(autoencoder.quant_conv_log_sigma.conv.bias, 2 * math.log(ae.initial_sigma))
    return autoencoder


def build_discriminator(ae: AutoencoderConfig, spatial_dims: int = 3) -> PatchDiscriminator:
    """MONAI's PatchDiscriminator sized by ``autoencoder.training.disc_*``."""
    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        in_channels=ae.in_channels,
        channels=ae.training.disc_channels,
        num_layers_d=ae.training.disc_num_layers,
        norm="INSTANCE",  # batch statistics of 1-volume batches are meaningless; instance norm is not
    )


def _unet_arguments(unet: UNetConfig) -> dict:
    """The arguments MONAI's DiffusionModelUNet and ControlNet share with MAISI's, from the ``ldm.unet`` section
    (MAISI's classes call the channels ``num_channels``, MONAI's ``channels``)."""
    maisi = unet.architecture == "maisi"
    return {
        "num_channels" if maisi else "channels": tuple(unet.num_channels),
        "attention_levels": tuple(unet.attention_levels),
        "num_res_blocks": unet.num_res_blocks if isinstance(unet.num_res_blocks, int) else tuple(unet.num_res_blocks),
        "num_head_channels": unet.num_head_channels if isinstance(unet.num_head_channels, int)
        else tuple(unet.num_head_channels),
        "norm_num_groups": unet.norm_num_groups,
        "resblock_updown": unet.resblock_updown,
        "include_fc": unet.include_fc,
        "use_combined_linear": unet.use_combined_linear,
        # MAISI's UNet refuses SDPA ("flash") attention without CUDA; the weights are the same either way.
        "use_flash_attention": torch.cuda.is_available() if maisi else True,
    }


def _conditioning_arguments(unet: UNetConfig, conditioning: dict | None) -> dict:
    """The conditioning arguments: the covariates' (``ConditionEncoder.unet_arguments()``), and for MAISI's networks
    its modality embedding (``ldm.unet.num_class_embeds``; the rules keep covariates out of it)."""
    arguments = dict(conditioning or {})
    if unet.architecture == "maisi":
        arguments["num_class_embeds"] = unet.num_class_embeds
    return arguments


def unet_definition(ldm: LDMConfig, latent_channels: int, spatial_dims: int = 3,
                    conditioning: dict | None = None) -> Definition:
    """The diffusion UNet of :func:`build_unet`, unbuilt."""
    arguments = dict(spatial_dims=spatial_dims, in_channels=latent_channels, out_channels=latent_channels,
                     **_unet_arguments(ldm.unet), **_conditioning_arguments(ldm.unet, conditioning))
    if ldm.unet.architecture == "maisi":
        return Definition(DiffusionModelUNetMaisi, arguments | dict(
            include_spacing_input=ldm.unet.include_spacing_input, include_top_region_index_input=False,
            include_bottom_region_index_input=False))
    return Definition(DiffusionModelUNet, arguments)


def build_unet(ldm: LDMConfig, latent_channels: int, spatial_dims: int = 3,
               conditioning: dict | None = None) -> DiffusionModelUNet | DiffusionModelUNetMaisi:
    """The diffusion UNet over latents with ``latent_channels`` channels: MONAI's, or MAISI's with its spacing input
    and modality embedding (``ldm.unet.architecture``; MAISI's argument names, NV-Generate-CTMR's
    ``diffusion_unet_def``).

    Args:
        ldm: the ``ldm`` section.
        latent_channels: channels of the latent (in and out).
        spatial_dims: 3 for volumes.
        conditioning: MONAI's ``with_conditioning``, ``cross_attention_dim`` and ``num_class_embeds`` for a
            conditional UNet (``ConditionEncoder.unet_arguments()``); None: unconditional.
    """
    return unet_definition(ldm, latent_channels, spatial_dims, conditioning).build()


def controlnet_definition(ldm: LDMConfig, controlnet: ControlNetConfig, latent_channels: int, spatial_dims: int = 3,
                          *, conditioning: dict | None = None) -> Definition:
    """The ControlNet of :func:`build_controlnet`, unbuilt."""
    return Definition(ControlNetMaisi if ldm.unet.architecture == "maisi" else ControlNet, dict(
        spatial_dims=spatial_dims,
        in_channels=latent_channels,
        conditioning_embedding_in_channels=controlnet.num_labels - 1,
        conditioning_embedding_num_channels=tuple(controlnet.conditioning_embedding_num_channels),
        **_unet_arguments(ldm.unet),
        **_conditioning_arguments(ldm.unet, conditioning),
    ))


def build_controlnet(ldm: LDMConfig, controlnet: ControlNetConfig, latent_channels: int, spatial_dims: int = 3,
                     *, conditioning: dict | None = None) -> ControlNet | ControlNetMaisi:
    """MONAI's ControlNet (MAISI's ControlNetMaisi for MAISI's UNet) for the UNet of ``ldm`` (same levels, blocks,
    attention and conditioning, so the UNet's weights can start it), taking label maps with
    ``controlnet.num_labels - 1`` channels through a conditioning embedding of
    ``controlnet.conditioning_embedding_num_channels``. MAISI's takes the modality but not the spacing.

    Args:
        ldm: the LDM's ``ldm`` section (the frozen UNet's shape).
        controlnet: the ``controlnet`` section.
        latent_channels, spatial_dims, conditioning: as :func:`build_unet`.
    """
    return controlnet_definition(ldm, controlnet, latent_channels, spatial_dims, conditioning=conditioning).build()


def build_scheduler(
    sched: SchedulerConfig, kind: str | None = None, latent_shape: Sequence[int] | None = None
) -> DDPMScheduler | DDIMScheduler | RFlowScheduler:
    """The noise scheduler: ``kind`` (ddpm|ddim|rflow) or the configured training type (:func:`scheduler_definition`,
    built)."""
    return scheduler_definition(sched, kind, latent_shape).build()


def scheduler_definition(sched: SchedulerConfig, kind: str | None = None,
                         latent_shape: Sequence[int] | None = None) -> Definition:
    """The noise scheduler of :func:`build_scheduler`, unbuilt.

    Args:
        sched: the ``ldm.scheduler`` section (timesteps, beta schedule, prediction type).
        kind: override of ``sched.type`` (sampling with DDIM from a DDPM-trained model).
        latent_shape: (channels, then per axis) of one latent. Rectified flow's timestep transform takes its
            dimensionality and its voxel count (where the resolution-aware timestep shift is neutral unless
            ``sched.base_img_size_numel`` says otherwise); None: 3D, and 32^3 voxels as the neutral point.
    """
    kind = kind or sched.type
    spatial_dims = len(latent_shape) - 1 if latent_shape is not None else 3
    latent_numel = math.prod(latent_shape[1:]) if latent_shape is not None else None
    if kind == "rflow":
        return Definition(RFlowScheduler, dict(
            num_train_timesteps=sched.num_train_timesteps,
            use_discrete_timesteps=sched.use_discrete_timesteps,
            sample_method=sched.sample_method,
            loc=sched.loc,
            scale=sched.scale,
            use_timestep_transform=sched.use_timestep_transform,
            transform_scale=sched.transform_scale,
            base_img_size_numel=sched.base_img_size_numel or latent_numel or 32768,
            spatial_dim=spatial_dims,
        ))
    beta = {"beta_start": sched.beta_start, "beta_end": sched.beta_end} if sched.schedule != "cosine" else {}
    common = dict(
        num_train_timesteps=sched.num_train_timesteps,
        schedule=sched.schedule,
        prediction_type=sched.prediction_type,
        clip_sample=sched.clip_sample,
        **beta,
    )
    return Definition(DDIMScheduler if kind == "ddim" else DDPMScheduler, common)
