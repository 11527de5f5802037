"""Autoencoder losses: KL, the structural (SSIM / MS-SSIM) term, the adversarial schedule and perceptual loss.

Reconstruction (L1), SSIM and the patch adversarial criterion are MONAI/PyTorch's own; what lives here is
what the config decides: weights, when the discriminator starts, and where perceptual weights come from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.losses import PatchAdversarialLoss, PerceptualLoss, SSIMLoss
from monai.utils import OptionalImportError, optional_import

from monai_diffusion.config.schema import AutoencoderTrainingConfig
from monai_diffusion.metrics import SSIM_WINDOW, ms_ssim

# What a torch hub folder holds once each perceptual network has been fetched: MONAI loads the 3D MedicalNet and
# RadImageNet networks from the Project-MONAI/perceptual-models hub repository (weights from Hugging Face, kept in
# the same folder), the 2D ones through the lpips package (torchvision weights under checkpoints/).
_HUB_ENTRIES = {
    "medicalnet_resnet10_23datasets": "Project-MONAI_perceptual-models_*",
    "medicalnet_resnet50_23datasets": "Project-MONAI_perceptual-models_*",
    "radimagenet_resnet50": "Project-MONAI_perceptual-models_*",
    "resnet50": "checkpoints/resnet50-*.pth",
    "squeeze": "checkpoints/squeezenet1_1-*.pth",
    "alex": "checkpoints/alexnet-owt-*.pth",
    "vgg": "checkpoints/vgg16-*.pth",
}
# The 2D networks also need these packages (not installed by default: lpips pulls in torchvision).
_EXTRA_PACKAGES = {"squeeze": "lpips torchvision", "alex": "lpips torchvision", "vgg": "lpips torchvision",
                   "resnet50": "torchvision"}
# The networks LPIPS wraps (the others come from torchvision or torch hub).
_LPIPS_NETWORKS = ("squeeze", "alex", "vgg")
LPIPS, has_lpips = optional_import("lpips", name="LPIPS")


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of N(mu, sigma) from N(0, 1), summed over the latent and averaged over the batch.

    Computed in fp32: under fp16 autocast ``log(sigma^2)`` of tiny sigmas underflows to -inf.
    """
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_item = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=list(range(1, z_mu.ndim)))
    return per_item.mean()


class StructuralLoss(torch.nn.Module):
    """``1 - SSIM`` (MONAI's SSIMLoss) or ``1 - MS-SSIM`` of a reconstruction, a term added to L1.

    L1 alone is satisfied by a blurred average in the first hundreds of steps; SSIM rewards local contrast and
    structure (edges, cortical folds), which is what a reader of the reconstruction looks at.

    Args:
        kind: ``"ssim"`` (one scale, 7-voxel Gaussian window like validation) or ``"ms_ssim"`` (as many scales as
            the volume allows, see :func:`monai_diffusion.metrics.ms_ssim_scales`).
        spatial_dims: 2 or 3.
        data_range: intensity range of the images (``data.intensity.b_max - b_min``).

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(self, kind: str, spatial_dims: int, data_range: float) -> None:
        super().__init__()
        if kind not in ("ssim", "ms_ssim"):
            raise ValueError(f"StructuralLoss: kind must be 'ssim' or 'ms_ssim', got {kind!r}")
        self.kind = kind
        self.data_range = data_range
        self.ssim = SSIMLoss(spatial_dims, data_range=data_range, win_size=SSIM_WINDOW) if kind == "ssim" else None

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        reconstruction, target = reconstruction.float(), target.float()
        if self.ssim is not None:
            return self.ssim(reconstruction, target)
        return 1.0 - ms_ssim(reconstruction, target, self.data_range).mean()


def adversarial_active(step: int, training: AutoencoderTrainingConfig) -> bool:
    """The discriminator trains, and its loss counts, from ``adv_start_step`` on (never when adv_weight is 0)."""
    return training.adv_weight > 0 and step >= training.adv_start_step


def build_adversarial_loss() -> PatchAdversarialLoss:
    """Least-squares patch GAN loss on the discriminator's raw outputs."""
    return PatchAdversarialLoss(criterion="least_squares")


def _two_ways(hub_folder: str) -> str:
    return (
        f"Either run once where the internet is reachable (the weights are then kept in torch hub's folder, "
        f"{hub_folder}), or copy such a hub folder here and set "
        f"autoencoder.training.perceptual_weights to it (offline, nothing is downloaded); "
        f"or set autoencoder.training.use_perceptual_loss=false."
    )


def perceptual_weights_at_hand(training: AutoencoderTrainingConfig) -> bool:
    """Whether the perceptual network's pretrained weights are on this machine, asking no network: the
    ``perceptual_pretrained_path`` file (resnet50), or a torch hub folder that holds them (``perceptual_weights``,
    else torch hub's own)."""
    if training.perceptual_pretrained_path is not None:
        return Path(training.perceptual_pretrained_path).expanduser().is_file()
    hub = Path(training.perceptual_weights).expanduser() if training.perceptual_weights else Path(torch.hub.get_dir())
    return any(hub.glob(_HUB_ENTRIES[training.perceptual_network]))


def build_perceptual_loss(training: AutoencoderTrainingConfig, spatial_dims: int = 3,
                          random_weights: bool = False) -> PerceptualLoss:
    """MONAI's PerceptualLoss; its pretrained weights are downloaded into the torch hub cache on first use.

    Two routes, as with MONAI itself:

    - ``perceptual_weights`` unset: MONAI fetches the network into torch hub's folder (``torch.hub.get_dir()``,
      i.e. ``$TORCH_HOME/hub``) the first time and reuses it afterwards.
    - ``perceptual_weights: FOLDER``: an existing torch hub folder (copied from a connected machine) is used
      offline: nothing is downloaded (``HF_HUB_OFFLINE`` is set while loading).

    ``resnet50`` (torchvision's, the BraTS bundle's) reads ``perceptual_pretrained_path`` instead when it is set
    (MONAI's ``pretrained_path`` / ``pretrained_state_dict_key``). 2D networks see ``perceptual_fake_3d_ratio`` of
    the slices along each axis.

    Args:
        training: ``autoencoder.training``; ``perceptual_network`` and ``perceptual_weights`` are read.
        spatial_dims: 3 uses the 3D MedicalNet networks directly; 2D networks run on slices (fake 3D).
        random_weights: the same network with random weights, nothing read or downloaded: for measuring a step's
            memory, which does not depend on the weights' values (``plan`` where they are not at hand). The 2D
            networks still need their packages; MedicalNet and RadImageNet cannot be built so, since torch hub
            brings their architecture with their weights.

    Raises:
        FileNotFoundError: ``perceptual_weights`` holds no weights for the network, or the download failed
            (no network); the message says both ways to provide them.
        ImportError: a 2D network was chosen and ``lpips``/``torchvision`` are not installed.
    """
    network = training.perceptual_network
    default_hub = torch.hub.get_dir()
    if random_weights:
        return _with_random_weights(training, spatial_dims, default_hub)
    weights_file = Path(training.perceptual_pretrained_path).expanduser() if training.perceptual_pretrained_path else None
    if weights_file is not None and not weights_file.is_file():
        raise FileNotFoundError(
            f"autoencoder.training.perceptual_pretrained_path: no such file: {weights_file} (expected the weights of "
            f"the '{network}' perceptual network)"
        )
    offline_dir = Path(training.perceptual_weights).expanduser() if training.perceptual_weights else None
    if weights_file is not None:
        offline_dir = None  # the weights come from the file; nothing is fetched
    if offline_dir is not None and not any(offline_dir.glob(_HUB_ENTRIES[network])):
        raise FileNotFoundError(
            f"autoencoder.training.perceptual_weights: no weights for perceptual network '{network}' in "
            f"{offline_dir} (looked for {_HUB_ENTRIES[network]}). " + _two_ways(default_hub)
        )
    medicalnet = network.startswith("medicalnet")
    # torch.hub's own setting (None unless set_dir was called), restored as it was so $TORCH_HOME keeps working.
    previous_hub, previous_offline = getattr(torch.hub, "_hub_dir", None), os.environ.get("HF_HUB_OFFLINE")
    if offline_dir is not None:
        torch.hub.set_dir(str(offline_dir))
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return PerceptualLoss(
            spatial_dims=spatial_dims,
            network_type=network,
            is_fake_3d=not medicalnet,
            fake_3d_ratio=training.perceptual_fake_3d_ratio,
            pretrained_path=str(weights_file) if weights_file is not None else None,
            pretrained_state_dict_key=training.perceptual_state_dict_key,
            channel_wise=medicalnet,
        )
    except (ImportError, OptionalImportError) as exc:
        packages = _EXTRA_PACKAGES.get(network, "huggingface_hub")
        raise ImportError(
            f"autoencoder.training.perceptual_network '{network}' needs packages that are not installed "
            f"({exc}); pip install {packages}, or choose a medicalnet_* network"
        ) from exc
    except OSError as exc:  # URLError, HTTPError and Hugging Face's connection errors are all OSErrors
        raise FileNotFoundError(
            f"autoencoder.training.use_perceptual_loss: could not get the weights of perceptual network "
            f"'{network}' ({type(exc).__name__}: {exc}). " + _two_ways(default_hub)
        ) from exc
    finally:
        if offline_dir is not None:
            torch.hub._hub_dir = previous_hub
            if previous_offline is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous_offline


def _with_random_weights(training: AutoencoderTrainingConfig, spatial_dims: int, default_hub: str) -> PerceptualLoss:
    """:func:`build_perceptual_loss`'s network with random weights.

    torchvision's ResNet50 takes MONAI's ``pretrained=False``. The LPIPS networks do not: MONAI passes
    ``pretrained`` to LPIPS's linear heads only, and LPIPS still downloads its ImageNet backbone unless told
    ``pnet_rand``, which MONAI does not pass on. So the loss is MONAI's (its slices and its sum over the three
    axes) built around the random ResNet50, and its network is then replaced by the random LPIPS one.
    """
    network = training.perceptual_network
    if network not in (*_LPIPS_NETWORKS, "resnet50"):
        raise FileNotFoundError(
            f"autoencoder.training.perceptual_network '{network}' cannot be built with random weights: torch hub "
            "brings its architecture together with its weights. " + _two_ways(default_hub)
        )
    try:
        if network in _LPIPS_NETWORKS and not has_lpips:
            raise OptionalImportError("lpips is not installed")
        loss = PerceptualLoss(spatial_dims=spatial_dims, network_type="resnet50", is_fake_3d=True,
                              fake_3d_ratio=training.perceptual_fake_3d_ratio, pretrained=False)
        if network in _LPIPS_NETWORKS:
            loss.perceptual_function = LPIPS(pretrained=False, net=network, pnet_rand=True, verbose=False)
    except (ImportError, OptionalImportError) as exc:
        raise ImportError(
            f"autoencoder.training.perceptual_network '{network}' needs packages that are not installed "
            f"({exc}); pip install {_EXTRA_PACKAGES[network]}"
        ) from exc
    return loss
