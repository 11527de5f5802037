"""The MONAI transform chain from a NIfTI path to a fixed-size, intensity-scaled float32 volume."""

from __future__ import annotations

import operator
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    Transform,
)
from monai.transforms.traits import RandomizableTrait

from monai_diffusion.config.schema import DataConfig, IntensityConfig

IMAGE_KEY = "image"
# Where the foreground of foreground-weighted patch sampling lives, between the two transforms that use it.
FOREGROUND_KEY = "foreground"
# The default foreground threshold: this share of the output intensity range above b_min.
FOREGROUND_FRACTION = 0.05
# The datalist field that picks an item's data.intensity_by_class entry (MAISI's name for it).
CLASS_KEY = "class"
# Resampling a volume to more voxels than this (after data.spacing) is refused: it would take
# several GB per volume before the crop, almost always a spacing given in the wrong unit.
MAX_RESAMPLED_VOXELS = 512**3


def resampled_shape(shape: Sequence[int], pixdim: Sequence[float], spacing: Sequence[float] | None) -> tuple[int, ...]:
    """Spatial shape after resampling from voxel size ``pixdim`` to ``spacing`` (unchanged when None)."""
    if spacing is None:
        return tuple(int(size) for size in shape)
    return tuple(max(1, round(size * abs(float(p)) / float(s))) for size, p, s in zip(shape, pixdim, spacing))


def describe_resampling_problem(
    shape: Sequence[int], pixdim: Sequence[float], spacing: Sequence[float] | None
) -> str | None:
    """Why a volume cannot be resampled to ``spacing`` as configured, or None when it can."""
    if spacing is None:
        return None
    if any(not np.isfinite(p) or p == 0 for p in pixdim):
        return f"has an invalid voxel size {tuple(float(p) for p in pixdim)} in its header; cannot resample to data.spacing"
    target = resampled_shape(shape, pixdim, spacing)
    if int(np.prod(target)) > MAX_RESAMPLED_VOXELS:
        return (
            f"would be resampled from {tuple(shape)} voxels of {tuple(round(float(p), 4) for p in pixdim)} mm to "
            f"{target} voxels at data.spacing={list(spacing)} mm (over {MAX_RESAMPLED_VOXELS:,} voxels); "
            "is data.spacing in mm?"
        )
    return None


class ValidateVolumed(MapTransform):
    """Reject a volume the rest of the chain cannot handle, naming its file and the problem.

    Runs right after loading (channel-first): checks the channel count (or, when ``channels`` are
    selected next, that the file has them), the number of spatial axes, that values are finite, and
    that resampling to ``spacing`` stays a sane size.
    Screening (:func:`monai_diffusion.data.sources.screen_volumes`) normally catches these first;
    this keeps the chain safe on its own, e.g. when files change after screening.
    """

    def __init__(
        self,
        keys: KeysCollection,
        expected_channels: int = 1,
        spatial_dims: int = 3,
        spacing: Sequence[float] | None = None,
        *, channels: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.expected_channels = expected_channels
        self.spatial_dims = spatial_dims
        self.spacing = spacing
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            meta = getattr(image, "meta", {}) or {}
            name = meta.get("filename_or_obj", f"<{key}>")
            shape = tuple(image.shape)
            if len(shape) != self.spatial_dims + 1:
                raise ValueError(
                    f"{name}: loaded as shape {shape} (channel first), expected 1 channel axis + "
                    f"{self.spatial_dims} spatial axes to crop/pad to data.voxel_size"
                )
            if self.channels is not None and shape[0] <= max(self.channels):
                raise ValueError(
                    f"{name}: has {shape[0]} channel(s) (shape {shape}, channel first), but data.channel selects "
                    f"{list(self.channels)}"
                )
            if self.channels is None and shape[0] != self.expected_channels:
                raise ValueError(
                    f"{name}: has {shape[0]} channel(s) (shape {shape}, channel first), expected "
                    f"{self.expected_channels} (autoencoder.in_channels)"
                )
            finite = torch.isfinite(torch.as_tensor(image))
            if not bool(finite.all()):
                raise ValueError(f"{name}: contains {int((~finite).sum())} NaN/Inf value(s)")
            affine = getattr(image, "affine", None)
            if affine is not None:
                pixdim = affine_to_spacing(affine, r=self.spatial_dims)
                problem = describe_resampling_problem(shape[1:], pixdim.tolist(), self.spacing)
                if problem:
                    raise ValueError(f"{name}: {problem}")
        return d


def selected_channels(data: DataConfig) -> list[int] | None:
    """The channel indices ``data.channel`` keeps, or None when every channel is kept."""
    if data.channel is None:
        return None
    return [data.channel] if isinstance(data.channel, int) else list(data.channel)


def deterministic_settings(data: DataConfig, expected_channels: int = 1) -> dict:
    """The settings that decide the cacheable (non-random) part of the chain, for cache keys."""
    settings = {
        "orientation": data.orientation,
        "spacing": data.spacing,
        "intensity": data.intensity.model_dump(),
        "voxel_size": data.voxel_size,
        "expected_channels": expected_channels,
        "reader": "NibabelReader",
        "version": 1,  # bump when the chain below changes
    }
    # Only when set: caches written before these settings existed stay valid.
    if data.channel is not None:
        settings["channel"] = selected_channels(data)
    if data.intensity_by_class:
        settings["intensity_by_class"] = {name: i.model_dump() for name, i in sorted(data.intensity_by_class.items())}
    return settings


def background_value(data: DataConfig) -> float:
    """Intensity of empty space after scaling: pads and rotations fill with it so edges are invisible (every
    intensity class shares data.intensity's b_min)."""
    scaled = data.intensity.mode != "none" or any(i.mode != "none" for i in data.intensity_by_class.values())
    return float(data.intensity.b_min) if scaled else 0.0


def intensity_transform(intensity: IntensityConfig) -> Transform | None:
    """MONAI's intensity scaling on key ``"image"`` for one intensity setting (None for mode 'none')."""
    if intensity.mode == "percentile":
        # channel_wise: each channel (e.g. modality) gets its own percentiles.
        return ScaleIntensityRangePercentilesd(
            IMAGE_KEY, lower=intensity.lower, upper=intensity.upper, b_min=intensity.b_min, b_max=intensity.b_max,
            clip=intensity.clip, channel_wise=True,
        )
    if intensity.mode == "range":
        return ScaleIntensityRanged(
            IMAGE_KEY, a_min=intensity.lower, a_max=intensity.upper, b_min=intensity.b_min, b_max=intensity.b_max,
            clip=intensity.clip,
        )
    return None


class IntensityByClassd(Transform):
    """Scale each item's intensities with the transform of its class (the item's ``"class"`` field): MAISI scales CT
    by a fixed HU window and MRI by percentiles in one data set. Items of another class, or none, get ``default``.

    Args:
        by_class: class name -> MONAI intensity transform (or None: left as loaded).
        default: the transform for every other item (or None).
    """

    def __init__(self, by_class: Mapping[str, Transform | None], default: Transform | None) -> None:
        self.by_class = dict(by_class)
        self.default = default

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        transform = self.by_class.get(str(data.get(CLASS_KEY)), self.default) if CLASS_KEY in data else self.default
        return transform(data) if transform is not None else dict(data)


class ForegroundLabeld(MapTransform, RandomizableTrait):
    """Add ``label_key``: a one-channel uint8 map, 1 where any channel of the key is above ``threshold`` (the
    foreground RandCropByPosNegLabeld centres patches on; MONAI's own takes a label map, which volumes here lack).

    Not random, but marked so (MONAI's RandomizableTrait): the caches stop before it, since the threshold is not part
    of their key and the map would add a quarter to every cached volume.

    Args:
        keys: the image key.
        threshold: intensity (after scaling) above which a voxel is foreground.
        label_key: where the map goes.
    """

    def __init__(self, keys: KeysCollection, threshold: float, label_key: str = FOREGROUND_KEY) -> None:
        super().__init__(keys)
        self.threshold = float(threshold)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            d[self.label_key] = (image > self.threshold).any(dim=0, keepdim=True).to(torch.uint8)
        return d


def foreground_threshold(data: DataConfig, threshold: float | None) -> float:
    """The foreground threshold of patch sampling: ``threshold``, or ``b_min`` + 5% of the output range."""
    if threshold is not None:
        return float(threshold)
    return data.intensity.b_min + FOREGROUND_FRACTION * (data.intensity.b_max - data.intensity.b_min)


def build_transforms(data: DataConfig, train: bool, expected_channels: int = 1,
                     patch_size: Sequence[int] | None = None, *, foreground_ratio: float | None = None,
                     foreground_threshold_value: float | None = None, mask_key: str | None = None) -> Compose:
    """MONAI dict transforms on key ``"image"``: NIfTI path -> float32 tensor of shape (C, *voxel_size).

    Chain: LoadImaged (nibabel) -> EnsureChannelFirstd -> ValidateVolumed -> [Lambdad keeping the
    ``data.channel`` channels] -> Orientationd -> [Spacingd] -> intensity scaling (percentile / range /
    none, per item class with ``data.intensity_by_class``) -> ResizeWithPadOrCropd -> [train:
    RandSpatialCropd to ``patch_size`` (or, weighted to foreground, ForegroundLabeld -> RandCropByPosNegLabeld),
    RandFlipd per axis, RandAffined] -> EnsureTyped(float32).
    Everything before the first random transform is deterministic, so CacheDataset/PersistentDataset
    cache it.

    The output is a MetaTensor: ``image.affine`` is the voxel->world (RAS mm) affine after
    reorientation/resampling/cropping (use it to write NIfTI outputs), ``image.pixdim`` the spacing.

    With ``mask_key`` the item's label map (key ``mask_key``, on the image's voxel grid) goes through every spatial
    transform with the image, the same random ones included, resampled nearest-neighbour and padded with 0
    (background); it comes out as (1, *voxel_size) float32 labels (whole numbers, as in the file).

    Args:
        data: the ``data`` section of the config.
        train: add the random augmentations of ``data.augment`` (and the patch crop).
        expected_channels: channels every volume must have (``autoencoder.in_channels``); with
            ``data.channel`` the channels kept.
        patch_size: train on random crops of this size (``autoencoder.training.patch_size``); None: whole volumes.
        foreground_ratio: share of patches centred on foreground (``patch_foreground_ratio``); None: uniform crops.
        foreground_threshold_value: the foreground's intensity threshold (None: see :func:`foreground_threshold`).
        mask_key: the item's label-map key (``data.mask_key``, train-controlnet); None: images alone.

    Returns:
        The Compose.
    """
    spatial_dims = len(data.voxel_size)
    background = background_value(data)
    channels = selected_channels(data)
    keys = [IMAGE_KEY] if mask_key is None else [IMAGE_KEY, mask_key]
    spatial_keys = IMAGE_KEY if mask_key is None else keys  # what every spatial transform moves
    transforms: list = [
        # squeeze_non_spatial_dims: NIfTI's vector layout (x, y, z, 1, c) loads as (x, y, z, c).
        LoadImaged(spatial_keys, reader="NibabelReader", image_only=True, squeeze_non_spatial_dims=True),
        # Plain 3D files get a channel axis; 4D (x,y,z,c) files have theirs moved first.
        EnsureChannelFirstd(spatial_keys),
        ValidateVolumed(IMAGE_KEY, expected_channels=expected_channels, spatial_dims=spatial_dims, spacing=data.spacing,
                        channels=channels),
    ]
    if mask_key is not None:
        transforms.append(SameGridd(IMAGE_KEY, mask_key))
    if channels is not None:
        # Indexing with a list keeps the channel axis (and the MetaTensor's affine); itemgetter pickles for workers.
        transforms.append(Lambdad(IMAGE_KEY, func=operator.itemgetter(channels)))
    transforms += _orient_and_space(data, keys)

    scale = intensity_transform(data.intensity)
    if data.intensity_by_class:
        by_class = {name: intensity_transform(setting) for name, setting in data.intensity_by_class.items()}
        transforms.append(IntensityByClassd(by_class, scale))
    elif scale is not None:
        transforms.append(scale)
    # Pad after scaling with the scaled background value (e.g. -1 for [-1, 1] targets, or air for CT).
    transforms.append(ResizeWithPadOrCropd(IMAGE_KEY, spatial_size=data.voxel_size, mode="constant", value=background))
    if mask_key is not None:
        transforms.append(ResizeWithPadOrCropd(mask_key, spatial_size=data.voxel_size, mode="constant", value=0))

    if train and patch_size is not None and foreground_ratio is None:
        transforms.append(RandSpatialCropd(spatial_keys, roi_size=list(patch_size), random_size=False))
    elif train and patch_size is not None:
        # One patch per volume (a list of one item: MONAI's collate flattens it into the batch).
        transforms += [
            ForegroundLabeld(IMAGE_KEY, foreground_threshold(data, foreground_threshold_value)),
            RandCropByPosNegLabeld(spatial_keys, label_key=FOREGROUND_KEY, spatial_size=list(patch_size),
                                   pos=foreground_ratio, neg=1.0 - foreground_ratio, num_samples=1),
            DeleteItemsd(FOREGROUND_KEY),
        ]
    if train:
        augment = data.augment
        if augment.flip_prob > 0:
            transforms += [RandFlipd(spatial_keys, prob=augment.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)]
        if augment.affine_prob > 0:
            rotations = 1 if spatial_dims == 2 else 3
            transforms.append(
                RandAffined(
                    spatial_keys,
                    prob=augment.affine_prob,
                    rotate_range=(augment.rotate_range,) * rotations,
                    scale_range=(augment.scale_range,) * spatial_dims,
                    spatial_size=list(patch_size) if patch_size is not None else data.voxel_size,
                    mode="bilinear" if mask_key is None else ["bilinear", "nearest"],
                    # 'zeros' fills exactly the background when it is 0; otherwise repeat the border
                    # (background after padding) rather than inventing a 0 that is not background.
                    padding_mode=("zeros" if background == 0 else "border") if mask_key is None
                    else ["zeros" if background == 0 else "border", "zeros"],
                    cache_grid=True,
                )
            )
    transforms.append(EnsureTyped(IMAGE_KEY, dtype=torch.float32, track_meta=True))
    if mask_key is not None:
        transforms.append(EnsureTyped(mask_key, dtype=torch.float32, track_meta=True))
    return Compose(transforms)


def _orient_and_space(data: DataConfig, keys: Sequence[str]) -> list[Transform]:
    """Orientationd and [Spacingd] on ``keys``: the image bilinear, label maps nearest-neighbour (one key: as the
    image-only chain always had it)."""
    spatial_dims = len(data.voxel_size)
    modes = ["bilinear" if key == IMAGE_KEY else "nearest" for key in keys]
    one_or_all = keys[0] if len(keys) == 1 else list(keys)
    # labels=None: axis letters follow the MetaTensor's space (RAS for nibabel), MONAI's coming default.
    transforms: list[Transform] = [Orientationd(one_or_all, axcodes=data.orientation[:spatial_dims], labels=None)]
    if data.spacing is not None:
        transforms.append(Spacingd(one_or_all, pixdim=data.spacing, mode=modes[0] if len(keys) == 1 else modes,
                                   padding_mode="border"))
    return transforms


def build_mask_transforms(data: DataConfig, mask_key: str) -> Compose:
    """The deterministic chain of :func:`build_transforms` for a label map alone: loaded, reoriented, resampled
    (nearest) and cropped/padded exactly as an image on the same grid is, so it lines up with that image's cached
    latent; (1, *voxel_size) float32 labels out, with its affine."""
    return Compose([
        LoadImaged(mask_key, reader="NibabelReader", image_only=True, squeeze_non_spatial_dims=True),
        EnsureChannelFirstd(mask_key),
        *_orient_and_space(data, [mask_key]),
        ResizeWithPadOrCropd(mask_key, spatial_size=data.voxel_size, mode="constant", value=0),
        EnsureTyped(mask_key, dtype=torch.float32, track_meta=True),
    ])


class SameGridd(MapTransform):
    """Reject a label map that does not lie on its image's voxel grid (shape and affine), naming both files: the
    spatial transforms would otherwise move the two apart."""

    def __init__(self, image_key: str, mask_key: str) -> None:
        super().__init__([image_key, mask_key])
        self.image_key, self.mask_key = image_key, mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image, mask = d[self.image_key], d[self.mask_key]
        problem = grid_mismatch(image.shape[1:], image.affine, mask.shape[1:], mask.affine)
        if problem:
            name = (getattr(mask, "meta", {}) or {}).get("filename_or_obj", f"<{self.mask_key}>")
            image_name = (getattr(image, "meta", {}) or {}).get("filename_or_obj", f"<{self.image_key}>")
            raise ValueError(f"{name}: label map ({self.mask_key}) {problem} of its image {image_name}")
        if mask.shape[0] != 1:
            raise ValueError(f"{(getattr(mask, 'meta', {}) or {}).get('filename_or_obj')}: a label map has one channel, "
                             f"got {mask.shape[0]}")
        return d


def grid_mismatch(shape, affine, other_shape, other_affine, *, atol: float = 1e-3) -> str | None:
    """How a label map's grid (``other_*``) differs from its image's, or None when they agree."""
    if tuple(shape) != tuple(other_shape):
        return f"has shape {tuple(other_shape)}, not the shape {tuple(shape)}"
    a, b = np.asarray(torch.as_tensor(affine), dtype=np.float64), np.asarray(torch.as_tensor(other_affine), dtype=np.float64)
    if a.shape != b.shape or not np.allclose(a, b, atol=atol):
        return "has another affine (voxel -> world) than the one"
    return None
