"""Generating volumes with a trained LDM: shared by the sample command, train-ldm's validation samples and evaluation.

:func:`sample` finds and loads an LDM checkpoint (UNet or its EMA weights, scale factor, latent shape, affine of the
training data) and the autoencoder it was trained on, then for each sample draws noise from a seeded generator,
denoises it (:func:`~monai_diffusion.diffusion.sample_latents`), decodes it (whole volume or tiled), clips it to the
training intensity range and writes ``sample-NNN.nii.gz`` and ``sample-NNN.png``. :func:`generate_volume` is one
such volume; :func:`load_ldm_checkpoint`, :func:`newest_ldm_checkpoint` and :func:`ema_weights` read a trained LDM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from monai_diffusion.config.loading import config_from_dict
from monai_diffusion.config.schema import Config, SamplingConfig
from monai_diffusion.config.stages import stage_config
from monai_diffusion.diffusion import check_sampler, sample_latents
from monai_diffusion.engine.checkpoint import check_shape_keys, load_checkpoint
from monai_diffusion.engine.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from monai_diffusion.engine.logging import get_logger, save_sample
from monai_diffusion.engine.precision import Precision, resolve_precision
from monai_diffusion.latents import decode_latents, load_autoencoder, resolve_autoencoder_checkpoint
from monai_diffusion.networks.builders import LDM_SHAPE_KEYS, build_scheduler, build_unet

__all__ = [
    "SEED_STRIDE",
    "ema_weights",
    "generate_volume",
    "load_ldm_checkpoint",
    "newest_ldm_checkpoint",
    "sample",
]

# Samples of one seed are drawn from generators seeded ``seed * SEED_STRIDE + index``: sample i is the same
# whatever --num-samples is, and nearby seeds do not share samples.
SEED_STRIDE = 100_003


@torch.no_grad()
def generate_volume(
    unet: torch.nn.Module,
    autoencoder: torch.nn.Module,
    scheduler,
    kind: str,
    latent_shape: tuple[int, ...],
    scale_factor: float,
    sampling: SamplingConfig,
    num_steps: int,
    value_range: tuple[float, float] | None,
    device: torch.device,
    generator: torch.Generator,
    precision: Precision | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """One generated volume (1, C, *spatial) on the CPU, float32, clipped to ``value_range`` when given."""
    z = sample_latents(unet, scheduler, kind, (1, *latent_shape), num_steps, device, generator, precision, progress)
    image = decode_latents(
        autoencoder,
        z,
        scale_factor,
        tiled=sampling.tiled_decode,
        tile_size=sampling.tile_size,
        overlap=sampling.tile_overlap,
        precision=precision,
        output_device="cpu" if sampling.tiled_decode else None,
    ).cpu()
    if value_range is not None:
        image = image.clamp(*value_range)
    return image


def ema_weights(ema_state: dict) -> dict:
    """The averaged model's weights in an ``AveragedModel.state_dict()`` (``module.`` prefix, ``n_averaged``)."""
    return {key[len("module."):]: value for key, value in ema_state.items() if key.startswith("module.")}


def newest_ldm_checkpoint(output_dir: Path) -> Path:
    """The most recently written ``<output_dir>/ldm-*/checkpoints/last.pt``.

    Raises:
        FileNotFoundError: there is none.
    """
    found = [p for p in Path(output_dir).glob("ldm-*/checkpoints/last.pt") if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"No LDM checkpoint in {output_dir}/ldm-*/checkpoints/last.pt; train one (monai-diffusion train-ldm) "
            f"or pass --checkpoint"
        )
    return max(found, key=lambda p: (p.stat().st_mtime, str(p)))


def load_ldm_checkpoint(path: Path) -> dict:
    """An LDM checkpoint (a file, or a run folder: its ``checkpoints/last.pt``), with ``"path"`` set to the file.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the file is not an LDM checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt" if (path / "checkpoints" / "last.pt").is_file() else path / "last.pt"
    state = load_checkpoint(path)
    if state.get("kind") != "ldm":
        raise ValueError(f"{path}: not an LDM checkpoint (kind={state.get('kind')!r}); pass --checkpoint LDM_CKPT")
    state["path"] = str(path)
    return state


def sample(
    config: Config,
    num_samples: int | None = None,
    steps: int | None = None,
    scheduler_kind: str | None = None,
    seed: int | None = None,
    out: Path | None = None,
    checkpoint: Path | None = None,
    shape_keys: Sequence[str] = LDM_SHAPE_KEYS,
) -> list[Path]:
    """Generate ``num_samples`` volumes; returns the NIfTI paths this process wrote.

    The networks, scheduler settings and intensity range come from the checkpoint's own config (what the model
    was trained with); ``config`` supplies the sampling options (``ldm.sampling``), device, precision and where
    to look for checkpoints. Arguments left None take their ``ldm.sampling`` / ``seed`` defaults. Under
    ``torchrun`` each process generates every ``world_size``-th sample (sample i is the same either way).

    Args:
        shape_keys: network-shaping keys on which ``config`` must agree with the checkpoint's config (the sample
            command passes all of them when a config file is given, only those ``--set`` names otherwise).

    Raises:
        ValueError: ``config`` and the checkpoint differ on one of ``shape_keys`` (both values listed).
    """
    dist = init_distributed(config.device.device)
    try:
        return _generate(config, dist, num_samples, steps, scheduler_kind, seed, out, checkpoint, shape_keys)
    finally:
        cleanup_distributed()


def _generate(config: Config, dist: DistInfo, num_samples, steps, scheduler_kind, seed, out, checkpoint,
              shape_keys) -> list[Path]:
    log = get_logger()
    device = dist.device
    precision = resolve_precision(stage_config(config, "ldm").device.mixed_precision, device)  # the LDM's own
    sampling = config.ldm.sampling
    num_samples = num_samples or sampling.num_samples
    steps = steps or sampling.num_inference_steps
    seed = config.seed if seed is None else seed

    path = Path(checkpoint) if checkpoint is not None else newest_ldm_checkpoint(Path(config.output.output_dir))
    state = load_ldm_checkpoint(path)
    path = Path(state["path"])
    trained_config_file = path.parent.parent / "config.yaml"
    check_shape_keys(state["config"], config.model_dump(mode="json"), shape_keys, path, remedy=(
        f"To sample with the checkpoint's own settings, pass --checkpoint {path} without --config (and without "
        "--set for these keys)"
        + (f", or --config {trained_config_file} (the run's own config)." if trained_config_file.is_file() else ".")
    ))
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
    if config.device.compile:
        # In place (the modules' state dicts keep their keys): the denoising loop reuses the compiled UNet every step.
        unet.compile(mode=config.device.compile_mode)
        autoencoder.decoder.compile(mode=config.device.compile_mode)
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
