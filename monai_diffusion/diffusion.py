"""The diffusion process both ways: the training target of each scheduler and the sampler that inverts it.

- Training: :func:`diffusion_loss` noises a latent and regresses the target of each scheduler and prediction type.
- Sampling: :func:`sample_latents` inverts that process step by step; the sampler must be of the family the model
  was trained with (:func:`check_sampler`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from monai_diffusion.engine.precision import Precision

__all__ = ["check_sampler", "diffusion_loss", "sample_latents"]


# ------------------------------------------------------------------------------------------------ training


def diffusion_loss(model, scheduler, kind: str, z: torch.Tensor, *, precision: Precision,
                   loss: str = "mse") -> torch.Tensor:
    """Noise ``z`` at random timesteps and regress the scheduler's training target (``loss``: MSE, or L1 as MAISI).

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
    if loss == "l1":
        return F.l1_loss(prediction.float(), target.float())
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
    *, num_steps: int,
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
