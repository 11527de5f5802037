"""``monai-diffusion validate --config FILE``: check a config and summarise what it will build.

Exit 0 with a summary (key values, per-axis factors, latent shape, parameter counts, compression);
exit 2 with every problem listed. Nothing is loaded from disk but the YAML; networks are built on CPU.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from monai_diffusion import command_description
from monai_diffusion.config.arguments import add_config_arguments, config_from_args
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import downsampling, stage_config
from monai_diffusion.networks.builders import build_autoencoder, build_discriminator, build_unet


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summarise(config: Config) -> str:
    """Human-readable summary of the resolved config and the networks it defines."""
    data, ae, ldm = config.data, config.autoencoder, config.ldm
    spatial_dims = len(data.voxel_size)
    autoencoder = build_autoencoder(ae, spatial_dims)
    factors = downsampling(config)
    latent = factors.latent_shape(data.voxel_size)
    unet = build_unet(ldm, ae.latent_channels, spatial_dims)
    disc_params = count_parameters(build_discriminator(ae, spatial_dims)) if ae.training.adv_weight > 0 else 0
    image_elements = ae.in_channels * math.prod(data.voxel_size)
    latent_elements = ae.latent_channels * math.prod(latent)
    t = ae.training
    ae_stage, ldm_stage = stage_config(config, "autoencoder"), stage_config(config, "ldm")
    levels = " x ".join(str(list(f)) for f in factors.per_axis) or "none"
    lines = [
        "config is valid",
        f"  data          source={data.source}  voxel_size={data.voxel_size}  spacing={data.spacing}  "
        f"cache={data.cache}",
        f"  autoencoder   {ae.architecture}  channels={ae.num_channels}  latent_channels={ae.latent_channels}  "
        f"num_res_blocks={ae.num_res_blocks}  attention_levels={ae.attention_levels}",
        f"  factors       per level (per axis): {levels}",
        f"                total per axis: {list(factors.total)}",
        f"  latent shape  {[ae.latent_channels, *latent]} (channels, then per axis) from image "
        f"{[ae.in_channels, *data.voxel_size]}",
        f"  compression   {image_elements:,} -> {latent_elements:,} elements ({image_elements / latent_elements:.1f}x); "
        f"float32 image {image_elements * 4 / 2**20:.2f} MiB, latent {latent_elements * 4 / 2**20:.3f} MiB",
        f"  parameters    autoencoder {count_parameters(autoencoder):,}  discriminator {disc_params:,}  "
        f"diffusion UNet {count_parameters(unet):,}",
        f"  stages        autoencoder volume {ae_stage.data.voxel_size}"
        + (f" (trains on {t.patch_size} patches)" if t.patch_size is not None else "")
        + f" mixed_precision={ae_stage.device.mixed_precision};  LDM volume {data.voxel_size} "
        f"mixed_precision={ldm_stage.device.mixed_precision}",
        f"  AE training   batch {t.batch_size} x accumulation {t.gradient_accumulation_steps}  lr {t.lr}  "
        f"max_epochs {t.max_epochs}  max_steps {t.max_steps}  checkpointing {t.use_gradient_checkpointing}  "
        f"perceptual {t.use_perceptual_loss}  adversarial weight {t.adv_weight} from step {t.adv_start_step}",
        f"  LDM           scheduler {ldm.scheduler.type} ({ldm.scheduler.num_train_timesteps} steps)  UNet {ldm.unet.architecture} channels "
        f"{ldm.unet.num_channels}  cache_latents {ldm.training.cache_latents}",
        f"  device        {config.device.device}  mixed_precision={config.device.mixed_precision}  "
        f"fast_dev_run={config.fast_dev_run}  seed={config.seed}",
        f"  output        {config.output.output_dir}",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(summarise(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion validate", description=command_description(__doc__))
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
