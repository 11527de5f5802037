"""Image-quality measures shared by validation, training losses and ``monai-diffusion evaluate``.

All of them are MONAI's own metrics; what lives here is the few choices around them that must be made the
same way everywhere: how many MS-SSIM scales a volume is large enough for, and the trilinear resampling
baseline an autoencoder is compared against ("what would plain down- and up-sampling to the same number of
values give?").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ms_ssim

# Wang et al. (2003): the five-scale MS-SSIM weights. Fewer scales take the first ones, renormalised to sum 1.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11
SSIM_WINDOW = 7

__all__ = [
    "MS_SSIM_KERNEL",
    "MS_SSIM_WEIGHTS",
    "SSIM_WINDOW",
    "ms_ssim",
    "ms_ssim_scales",
    "ms_ssim_weights",
    "resampling_baseline",
    "resampling_size",
]


def ms_ssim_scales(spatial_shape: Sequence[int], kernel_size: int = MS_SSIM_KERNEL) -> int:
    """How many MS-SSIM scales (at most 5) a volume of ``spatial_shape`` is large enough for.

    MONAI's ``compute_ms_ssim`` checks every axis for ``size // (scales - 1) ** 2 > kernel_size - 1``, and its
    unpadded window must still fit the coarsest scale (``size // 2 ** (scales - 1) >= kernel_size``); a 64^3
    volume with the standard 11-voxel window allows 3 scales, 32^3 allows 2, 192^3 all 5.

    Raises:
        ValueError: the volume is too small for even one scale.
    """
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        divisor = max(1, scales - 1) ** 2
        if all(size // divisor > kernel_size - 1 and size // 2 ** (scales - 1) >= kernel_size for size in spatial_shape):
            return scales
    raise ValueError(
        f"MS-SSIM: a volume of shape {tuple(spatial_shape)} is too small for a {kernel_size}-voxel window "
        f"(every axis must be at least {kernel_size})"
    )


def ms_ssim_weights(scales: int) -> tuple[float, ...]:
    """The first ``scales`` standard MS-SSIM weights, renormalised so they sum to 1."""
    weights = MS_SSIM_WEIGHTS[:scales]
    total = sum(weights)
    return tuple(w / total for w in weights)


def ms_ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float, scales: int | None = None) -> torch.Tensor:
    """MS-SSIM per item of (B, C, *spatial) tensors (MONAI's ``compute_ms_ssim``), with as many scales as fit.

    Args:
        prediction: reconstructed or generated volumes.
        target: reference volumes of the same shape.
        data_range: intensity range of the data (``b_max - b_min``).
        scales: number of scales; None takes :func:`ms_ssim_scales` of the volume's shape.

    Returns:
        Tensor of shape (B,) (channels averaged).
    """
    scales = scales or ms_ssim_scales(prediction.shape[2:])
    value = compute_ms_ssim(
        prediction, target, spatial_dims=prediction.ndim - 2, data_range=data_range,
        kernel_size=MS_SSIM_KERNEL, weights=ms_ssim_weights(scales),
    )
    return value.reshape(value.shape[0], -1).mean(1)


def resampling_size(spatial_shape: Sequence[int], num_values: int) -> tuple[int, ...]:
    """A grid of about ``num_values`` voxels with the same proportions as ``spatial_shape``.

    Used to give the trilinear baseline as many values as the autoencoder's latent holds (spatial size times
    latent channels): each axis is scaled by the same ratio and rounded (at least 1).
    """
    ratio = (num_values / math.prod(spatial_shape)) ** (1.0 / len(spatial_shape))
    return tuple(max(1, round(size * ratio)) for size in spatial_shape)


def resampling_baseline(images: torch.Tensor, num_values: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Shrink (B, C, *spatial) volumes to about ``num_values`` values per channel and interpolate back.

    Linear interpolation both ways (trilinear in 3D) without anti-aliasing: on the demo brains a Gaussian
    pre-filter (MONAI ``Resize(anti_aliasing=True)``) scored about 1 dB lower, so this is the stronger
    baseline. Returns (the resampled volumes at the input's size, the small grid's size).
    """
    spatial = tuple(images.shape[2:])
    small = resampling_size(spatial, num_values)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    down = F.interpolate(images.float(), size=small, mode=mode, align_corners=False)
    return F.interpolate(down, size=spatial, mode=mode, align_corners=False), small
