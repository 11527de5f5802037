"""Autoencoder losses: KL, the adversarial schedule and perceptual-weights loading.

Reconstruction (L1) and the patch adversarial criterion are MONAI/PyTorch's own; what lives here is what
the config decides: weights, when the discriminator starts, and where perceptual weights come from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.losses import PatchAdversarialLoss, PerceptualLoss

from monai_diffusion.config.schema import AutoencoderTrainingConfig

# Where torch.hub keeps each perceptual network (nothing is ever downloaded at run time).
_HUB_ENTRIES = {
    "medicalnet_resnet10_23datasets": "warvito_MedicalNet-models_*",
    "medicalnet_resnet50_23datasets": "warvito_MedicalNet-models_*",
    "squeeze": "checkpoints/squeezenet1_1-*.pth",
    "alex": "checkpoints/alexnet-owt-*.pth",
    "vgg": "checkpoints/vgg16-*.pth",
}


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of N(mu, sigma) from N(0, 1), summed over the latent and averaged over the batch.

    Computed in fp32: under fp16 autocast ``log(sigma^2)`` of tiny sigmas underflows to -inf.
    """
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_item = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=list(range(1, z_mu.ndim)))
    return per_item.mean()


def adversarial_active(step: int, training: AutoencoderTrainingConfig) -> bool:
    """The discriminator trains, and its loss counts, from ``adv_start_step`` on (never when adv_weight is 0)."""
    return training.adv_weight > 0 and step >= training.adv_start_step


def build_adversarial_loss() -> PatchAdversarialLoss:
    """Least-squares patch GAN loss on the discriminator's raw outputs."""
    return PatchAdversarialLoss(criterion="least_squares")


def build_perceptual_loss(training: AutoencoderTrainingConfig, spatial_dims: int = 3) -> PerceptualLoss:
    """MONAI's PerceptualLoss with weights from a local torch hub cache.

    Args:
        training: ``autoencoder.training``; ``perceptual_network`` and ``perceptual_weights`` (a torch hub
            folder; default: ``torch.hub.get_dir()``) are read.
        spatial_dims: 3 uses MedicalNet networks directly; 2D networks (squeeze/alex/vgg) run slice-wise.

    Raises:
        FileNotFoundError: the weights are not in the cache, with the command that puts them there.
        ImportError: a 2D network was chosen and the ``lpips`` package is not installed.
    """
    network = training.perceptual_network
    hub_dir = Path(training.perceptual_weights) if training.perceptual_weights else Path(torch.hub.get_dir())
    pattern = _HUB_ENTRIES[network]
    if not any(hub_dir.glob(pattern)):
        raise FileNotFoundError(
            f"autoencoder.training.perceptual_weights: no weights for perceptual network '{network}' in {hub_dir} "
            f"(looked for {pattern}). Nothing is downloaded at run time. On a machine with internet run\n"
            f"  TORCH_HOME=/some/dir python -c \"from monai.losses import PerceptualLoss; "
            f"PerceptualLoss(spatial_dims=3, network_type='{network}', is_fake_3d={'medicalnet' not in network})\"\n"
            f"then copy /some/dir/hub here and set autoencoder.training.perceptual_weights to it, "
            f"or set autoencoder.training.use_perceptual_loss=false."
        )
    torch.hub.set_dir(str(hub_dir))
    medicalnet = network.startswith("medicalnet")
    return PerceptualLoss(
        spatial_dims=spatial_dims,
        network_type=network,
        is_fake_3d=not medicalnet,
        fake_3d_ratio=0.25,
        channel_wise=medicalnet,
    )
