"""The diffusion process both ways, and a trained LDM: shared by train-ldm, sample and evaluation.

- Training: :func:`diffusion_loss` noises a latent and regresses the target of each scheduler and prediction type.
- Sampling: :func:`sample_latents` inverts that process step by step (the sampler must be of the family the model
  was trained with, :func:`check_sampler`); :func:`generate_volume` decodes the result into an image.
- A trained model: :func:`load_ldm_checkpoint` (a file or run folder), :func:`newest_ldm_checkpoint`,
  :func:`ema_weights`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from monai_diffusion.config.schema import SamplingConfig
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.engine.precision import Precision
from monai_diffusion.latents import decode_latents

__all__ = [
    "check_sampler",
    "diffusion_loss",
    "ema_weights",
    "generate_volume",
    "load_ldm_checkpoint",
    "newest_ldm_checkpoint",
    "sample_latents",
]


# ------------------------------------------------------------------------------------------------ training


def diffusion_loss(model, scheduler, kind: str, z: torch.Tensor, precision: Precision) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------------ sampling


def check_sampler(kind: str, trained: str) -> None:
    """Rectified flow predicts velocity, DDPM/DDIM noise (or x0 / v): a model samples only with its family.

    Raises:
        ValueError: ``kind`` and ``trained`` are of different families.
    """
    if (kind == "rflow") != (trained == "rflow"):
        raise ValueError(
            f"Cannot sample with '{kind}' a model trained with '{trained}' (rectified flow predicts velocity, "
            f"DDPM/DDIM predict noise); use {'rflow' if trained == 'rflow' else 'ddpm or ddim'}"
        )


@torch.no_grad()
def sample_latents(
    unet: torch.nn.Module,
    scheduler,
    kind: str,
    shape: tuple[int, ...],
    num_steps: int,
    device: torch.device,
    generator: torch.Generator,
    precision: Precision | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise Gaussian noise of ``shape`` (B, C, *latent) in ``num_steps`` scheduler steps; returns scaled latents.

    All randomness (the start noise, DDPM's per-step noise) comes from ``generator`` (on ``device``), so the
    result depends on its seed only, not on the global RNG.
    """
    z = torch.randn(shape, generator=generator, device=device)
    if kind == "rflow":
        scheduler.set_timesteps(num_steps, device=device, input_img_size_numel=math.prod(shape[2:]))
        timesteps = scheduler.timesteps
        next_timesteps = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)))
    else:
        scheduler.set_timesteps(num_steps, device=device)
        timesteps = scheduler.timesteps
        next_timesteps = [None] * len(timesteps)
    unet.eval()
    for t, next_t in tqdm(list(zip(timesteps, next_timesteps)), desc="denoising", disable=not progress,
                          leave=False, dynamic_ncols=True):
        t_batch = torch.full((shape[0],), t.item(), device=device, dtype=timesteps.dtype)
        if precision is not None:
            with precision.autocast():
                output = unet(z, timesteps=t_batch)
        else:
            output = unet(z, timesteps=t_batch)
        output = output.float()
        if kind == "rflow":
            z, _ = scheduler.step(output, t, z, next_t)
        else:
            z, _ = scheduler.step(output, int(t), z, generator=generator)
    return z


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


# ------------------------------------------------------------------------------------------- a trained LDM


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
