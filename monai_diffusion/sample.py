"""``monai-diffusion sample``: generate volumes with a trained latent diffusion model (NIfTI + PNG panel).

Read top to bottom: find and load the LDM checkpoint (UNet or its EMA weights, scale factor, latent shape,
affine of the training data) and the autoencoder it was trained on, then for each sample: draw noise from a
seeded generator, denoise it with DDPM / DDIM / rectified flow, decode (whole volume or tiled), clip to the
training intensity range and write ``sample-NNN.nii.gz`` and ``sample-NNN.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from monai_diffusion.config.arguments import add_config_arguments, config_from_args
from monai_diffusion.config.loading import config_from_dict
from monai_diffusion.config.schema import Config
from monai_diffusion.diffusion import (
    check_sampler,
    ema_weights,
    generate_volume,
    load_ldm_checkpoint,
    newest_ldm_checkpoint,
)
from monai_diffusion.engine.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from monai_diffusion.engine.logging import get_logger, save_sample
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.latents import load_autoencoder, resolve_autoencoder_checkpoint
from monai_diffusion.networks.builders import build_scheduler, build_unet

# Samples of one seed are drawn from generators seeded ``seed * SEED_STRIDE + index``: sample i is the same
# whatever --num-samples is, and nearby seeds do not share samples.
SEED_STRIDE = 100_003


# -------------------------------------------------------------------------------------------------- sample


def sample(
    config: Config,
    num_samples: int | None = None,
    steps: int | None = None,
    scheduler_kind: str | None = None,
    seed: int | None = None,
    out: Path | None = None,
    checkpoint: Path | None = None,
) -> list[Path]:
    """Generate ``num_samples`` volumes; returns the NIfTI paths this process wrote.

    The networks, scheduler settings and intensity range come from the checkpoint's own config (what the model
    was trained with); ``config`` supplies the sampling options (``ldm.sampling``), device, precision and where
    to look for checkpoints. Arguments left None take their ``ldm.sampling`` / ``seed`` defaults. Under
    ``torchrun`` each process generates every ``world_size``-th sample (sample i is the same either way).
    """
    dist = init_distributed(config.device.device)
    try:
        return _generate(config, dist, num_samples, steps, scheduler_kind, seed, out, checkpoint)
    finally:
        cleanup_distributed()


def _generate(config: Config, dist: DistInfo, num_samples, steps, scheduler_kind, seed, out, checkpoint) -> list[Path]:
    log = get_logger()
    device = dist.device
    precision = resolve_precision(config.device.mixed_precision, device)
    sampling = config.ldm.sampling
    num_samples = num_samples or sampling.num_samples
    steps = steps or sampling.num_inference_steps
    seed = config.seed if seed is None else seed

    path = Path(checkpoint) if checkpoint is not None else newest_ldm_checkpoint(Path(config.output.output_dir))
    state = load_ldm_checkpoint(path)
    path = Path(state["path"])
    trained = config_from_dict(state["config"], source=f"{path} (stored config)")
    kind = scheduler_kind or sampling.scheduler or trained.ldm.scheduler.type
    check_sampler(kind, trained.ldm.scheduler.type)

    # The autoencoder the LDM was trained on: its recorded path (or the config's, if it moved), same weights.
    ae_path = Path(state["autoencoder_checkpoint"])
    if not ae_path.is_file() and config.ldm.autoencoder_checkpoint is not None:
        ae_path = resolve_autoencoder_checkpoint(config)
    if not ae_path.is_file():
        raise FileNotFoundError(
            f"The autoencoder this LDM was trained with is gone: {state['autoencoder_checkpoint']}; set "
            f"ldm.autoencoder_checkpoint to its new location"
        )
    autoencoder, ae_hash = load_autoencoder(ae_path, trained, device)
    if ae_hash != state["autoencoder_hash"]:
        raise ValueError(
            f"Autoencoder {ae_path} has weights {ae_hash}, but the LDM {path} was trained on latents of "
            f"{state['autoencoder_hash']}; point ldm.autoencoder_checkpoint at the autoencoder it was trained with"
        )

    latent_shape = tuple(int(s) for s in state["latent_shape"])
    spatial_dims = len(latent_shape) - 1
    unet = build_unet(trained.ldm, latent_shape[0], spatial_dims)
    weights = "EMA"
    if state.get("ema") is not None:
        unet.load_state_dict(ema_weights(state["ema"]))
    else:
        unet.load_state_dict(state["unet"])
        weights = "raw (no EMA saved)"
    unet.to(device).eval().requires_grad_(False)
    scheduler = build_scheduler(trained.ldm.scheduler, kind, spatial_dims, math.prod(latent_shape[1:]))
    scale_factor = float(state["scale_factor"])
    intensity = trained.data.intensity
    value_range = (intensity.b_min, intensity.b_max) if intensity.mode != "none" else None
    affine = torch.as_tensor(state["affine"], dtype=torch.float64)

    out = Path(out) if out is not None else path.parent.parent / "generated"
    log.info(
        "sampling %d volume(s) from %s (step %d, %s weights) with %s, %d steps, seed %d, scale factor %.6g%s -> %s",
        num_samples, path, state["step"], weights, kind, steps, seed, scale_factor,
        ", tiled decode" if sampling.tiled_decode else "", out,
    )
    written = []
    mine = range(dist.rank, num_samples, dist.world_size)
    for index in tqdm(mine, desc="samples", dynamic_ncols=True, disable=len(mine) < 2 or not dist.is_main):
        generator = torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + index)
        volume = generate_volume(
            unet, autoencoder, scheduler, kind, latent_shape, scale_factor, sampling, steps, value_range,
            device, generator, precision, progress=True,
        )
        nifti, _ = save_sample(volume[0], affine, out, f"sample-{index:03d}", value_range, title=f"seed {seed} #{index}")
        written.append(nifti)
        log.info("wrote %s", nifti)
    barrier()
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--num-samples", "-n", type=int, default=None, help="volumes to generate (default: ldm.sampling.num_samples)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: ldm.sampling.num_inference_steps)")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim", "rflow"], default=None,
                        help="sampler (default: ldm.sampling.scheduler, else the training scheduler)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <LDM run>/generated)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="LDM checkpoint or run folder (default: newest <output_dir>/ldm-*/checkpoints/last.pt)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion sample", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("num_samples", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    config = config_from_args(args)
    try:
        sample(config, args.num_samples, args.steps, args.scheduler, args.seed, args.out, args.checkpoint)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        get_logger().error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
