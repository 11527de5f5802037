"""A small built-in data set of real brain anatomy that needs no download.

nilearn ships the MNI152 T1 template inside its package; every demo volume is that template
moved a little in the scanner (random rotation/scale/translation, sometimes mirrored left-right)
and given a different MR contrast (gamma, bias field, global scale, noise), all with MONAI's
random transforms. The files are written once into a cache folder and reused afterwards.

The conditional demo set (:func:`build_conditional_demo_dataset`, ``data.demo.conditional``) is a separate set of
files made the same way, with two additions that conditioning can be checked against: every brain is first scaled
by a known factor ``brain_scale`` (its volume by ``brain_scale ** 3``), and moves together with a tissue label map
(0 outside the brain, 1 CSF, 2 grey matter, 3 white matter) made from nilearn's grey- and white-matter probability
templates. Both go into the set's ``datalist.json`` beside the image paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Affined,
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
)
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Bump when the recipe below changes, so caches built by an older recipe are not reused.
DEMO_RECIPE_VERSION = 1
# nilearn resamples its 1 mm template (197x233x189) to 2 mm (99x117x95): small files, quick to train on.
DEMO_RESOLUTION_MM = 2
# The template's intensities lie in [0, 1]; stored as uint8 with this fixed factor (not per-volume
# max) so that the random global intensity scale survives, with head-room for bias field + scale.
DEMO_UINT8_SCALE = 180.0
# Noise is added only inside the head (voxels above this fraction of the max): it also keeps the
# gzip'd files small.
DEMO_FOREGROUND_FRACTION = 0.01
# Show a progress bar from this many volumes to build.
PROGRESS_MIN_FILES = 8

DEMO_AUGMENTATION = {
    "rotate_range_rad": 0.08,
    "scale_range": 0.06,
    "translate_range_vox": 3,
    "flip_lr_prob": 0.5,
    "bias_coeff_max": 0.2,
    "gamma_range": [0.8, 1.25],
    "intensity_scale": 0.1,
    "noise_std": 0.01,
}


# The conditional set: its own recipe version (a separate folder; the plain set's files are untouched).
DEMO_CONDITIONAL_VERSION = 1
# Each brain is scaled by a factor drawn uniformly from this range: its volume changes by 0.51x to 1.73x.
DEMO_BRAIN_SCALE_RANGE = (0.8, 1.2)
# Label values of the conditional set's tissue maps.
DEMO_LABELS = {0: "background", 1: "csf", 2: "grey matter", 3: "white matter"}
# A voxel of nilearn's brain mask above this value is brain; there it takes the likeliest tissue.
DEMO_BRAIN_MASK_THRESHOLD = 0.5


def default_demo_root() -> Path:
    """Base folder of the demo cache when the config gives none: ``~/.cache/monai_diffusion/demo``."""
    return Path(os.path.expanduser("~")) / ".cache" / "monai_diffusion" / "demo"


def demo_settings_hash(seed: int) -> str:
    """Short hash of everything that determines the demo files' content (not their count).

    Each file depends only on (settings, seed, index), so asking for more volumes later reuses the
    existing ones and only writes the missing ones.
    """
    settings = {
        "version": DEMO_RECIPE_VERSION,
        "resolution_mm": DEMO_RESOLUTION_MM,
        "uint8_scale": DEMO_UINT8_SCALE,
        "foreground_fraction": DEMO_FOREGROUND_FRACTION,
        "augmentation": DEMO_AUGMENTATION,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def conditional_demo_settings_hash(seed: int) -> str:
    """Short hash of everything that determines the conditional demo files' content (see :func:`demo_settings_hash`)."""
    settings = {
        "plain": demo_settings_hash(seed),
        "conditional_version": DEMO_CONDITIONAL_VERSION,
        "brain_scale_range": DEMO_BRAIN_SCALE_RANGE,
        "labels": DEMO_LABELS,
        "brain_mask_threshold": DEMO_BRAIN_MASK_THRESHOLD,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _demo_augmentation(keys: tuple[str, ...] = ("image",)) -> tuple[Compose, Compose]:
    """Random spatial and intensity variation of the template (MONAI dict transforms). The spatial part moves every
    key of ``keys`` alike (a label map after the image, with nearest-neighbour sampling); the intensity part only
    touches 'image'."""
    aug = DEMO_AUGMENTATION
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    spatial = Compose(
        [
            RandAffined(
                keys,
                prob=1.0,
                rotate_range=(aug["rotate_range_rad"],) * 3,
                scale_range=(aug["scale_range"],) * 3,
                translate_range=(aug["translate_range_vox"],) * 3,
                padding_mode="zeros",
                mode=modes if len(keys) > 1 else "bilinear",
            ),
            # Axis 0 of the RAS template is left-right; a mirrored brain is a plausible other subject.
            RandFlipd(keys, prob=aug["flip_lr_prob"], spatial_axis=0),
        ]
    )
    intensity = Compose(
        [
            RandBiasFieldd("image", prob=1.0, degree=3, coeff_range=(0.0, aug["bias_coeff_max"])),
            RandAdjustContrastd("image", prob=1.0, gamma=tuple(aug["gamma_range"])),
            RandScaleIntensityd("image", prob=1.0, factors=aug["intensity_scale"]),
            RandGaussianNoised("image", prob=1.0, mean=0.0, std=aug["noise_std"]),
        ]
    )
    return spatial, intensity


def _load_template() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template at DEMO_RESOLUTION_MM: (float32 array in [0, 1], 4x4 affine)."""
    from nilearn.datasets import load_mni152_template  # imported lazily: nilearn is slow to import

    template = load_mni152_template(resolution=DEMO_RESOLUTION_MM)
    return np.asarray(template.get_fdata(), dtype=np.float32), np.asarray(template.affine, dtype=np.float64)


def _load_tissue_labels() -> np.ndarray:
    """The tissue label map of the template at DEMO_RESOLUTION_MM (uint8, values of DEMO_LABELS): inside nilearn's
    brain mask the likeliest of CSF (what grey and white matter leave), grey and white matter; 0 outside."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_wm_template

    grey = np.asarray(load_mni152_gm_template(resolution=DEMO_RESOLUTION_MM).get_fdata(), dtype=np.float32)
    white = np.asarray(load_mni152_wm_template(resolution=DEMO_RESOLUTION_MM).get_fdata(), dtype=np.float32)
    brain = np.asarray(load_mni152_brain_mask(resolution=DEMO_RESOLUTION_MM).get_fdata()) > DEMO_BRAIN_MASK_THRESHOLD
    tissue = np.argmax(np.stack([1 - grey - white, grey, white]), axis=0) + 1
    return np.where(brain, tissue, 0).astype(np.uint8)


def _make_volume(template: np.ndarray, index: int, seed: int, labels: np.ndarray | None = None,
                 *, brain_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Volume ``index`` of the set: the template, randomly varied, as uint8 (deterministic in seed, index), and the
    label map moved with it (None without ``labels``). ``brain_scale`` first scales the anatomy about the grid's
    centre (1: the plain set's volume, bit for bit)."""
    keys = ("image",) if labels is None else ("image", "label")
    spatial, intensity = _demo_augmentation(keys)
    # Independent, reproducible streams per volume: the same (seed, index) always gives the same file.
    spatial_seed, intensity_seed = np.random.SeedSequence([seed, index]).generate_state(2)
    spatial.set_random_state(seed=int(spatial_seed))
    intensity.set_random_state(seed=int(intensity_seed))
    with torch.no_grad():
        data = {"image": torch.from_numpy(template)[None]}
        if labels is not None:
            data["label"] = torch.from_numpy(labels.astype(np.float32))[None]
        if brain_scale != 1.0:
            # MONAI scales the sampling grid: content grows by brain_scale when the grid shrinks by it.
            data = Affined(keys, scale_params=(1 / brain_scale,) * 3, padding_mode="zeros",
                           mode=["bilinear", "nearest"][: len(keys)])(data)
        moved = spatial(data)
        image = torch.as_tensor(moved["image"])
        head = image > DEMO_FOREGROUND_FRACTION * float(image.max())
        # Noise and bias only inside the head: real skull-stripped scans have a clean zero background.
        varied = torch.as_tensor(intensity({"image": image})["image"]) * head
    # The files keep the template's affine: the random motion is meant to move the anatomy within
    # the voxel grid (another subject position), so the affine MONAI updated alongside is dropped.
    scaled = np.rint(varied[0].numpy() * DEMO_UINT8_SCALE)
    label = torch.as_tensor(moved["label"])[0].round().numpy().astype(np.uint8) if labels is not None else None
    return np.clip(scaled, 0, 255).astype(np.uint8), label


def demo_brain_scale(index: int, seed: int) -> float:
    """The brain scale of conditional demo volume ``index``: uniform in DEMO_BRAIN_SCALE_RANGE, from its own
    reproducible stream (rounded to 4 decimals, as the datalist records it)."""
    low, high = DEMO_BRAIN_SCALE_RANGE
    draw = np.random.default_rng(np.random.SeedSequence([seed, index, 1])).uniform(low, high)
    return round(float(draw), 4)


def _save_atomically(volume: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a gzip'd NIfTI under a temporary name, then rename: a crash never leaves a half file."""
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)  # scanner coordinates, as real scans carry
    image.header.set_sform(affine, code=4)  # MNI152 space
    # The temporary name keeps the .nii.gz ending so nibabel gzips it; the PID keeps parallel
    # builders (e.g. several DDP ranks) from writing into each other's file.
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _set_folder(caller: str, cache_dir: Path | None, num_volumes: int, settings_hash: str) -> Path:
    """A set's folder: ``<cache_dir or ~/.cache/monai_diffusion/demo>/<settings hash>`` (absolute)."""
    if num_volumes < 1:
        raise ValueError(f"{caller}: num_volumes must be >= 1, got {num_volumes}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_demo_root()
    return (root / settings_hash).absolute()


def build_demo_dataset(cache_dir: Path | None, num_volumes: int, seed: int = 0) -> list[Path]:
    """Build (once) and return the demo set: ``num_volumes`` brain MRI volumes from the MNI152 template.

    Files are ``<cache_dir or ~/.cache/monai_diffusion/demo>/<settings hash>/demo_000.nii.gz`` ...:
    99x117x95 voxels at 2 mm isotropic spacing (RAS, MNI affine), uint8, gzip'd (~0.2 MB each).
    Files already there are reused; only missing ones are written, each atomically.

    Args:
        cache_dir: base folder of the cache (None: ``~/.cache/monai_diffusion/demo``). The files go in a
            sub-folder named after a hash of the generation settings and seed.
        num_volumes: how many volumes to return (>= 1).
        seed: seed of the random variations; each volume depends only on (seed, its index).

    Returns:
        Absolute paths of the ``num_volumes`` files, in index order.

    Raises:
        ValueError: when ``num_volumes`` < 1.
        OSError: when the cache folder cannot be created or written.
    """
    folder = _set_folder("build_demo_dataset", cache_dir, num_volumes, demo_settings_hash(seed))
    paths = [folder / f"demo_{index:03d}.nii.gz" for index in range(num_volumes)]
    missing = [(index, path) for index, path in enumerate(paths) if not path.is_file()]
    if not missing:
        return paths

    folder.mkdir(parents=True, exist_ok=True)
    logger.info("Building the demo data set: %d of %d volume(s) into %s", len(missing), num_volumes, folder)
    template, affine = _load_template()
    bar = tqdm(missing, desc="demo volumes", unit="vol", disable=len(missing) < PROGRESS_MIN_FILES)
    for index, path in bar:
        _save_atomically(_make_volume(template, index, seed)[0], affine, path)
    return paths


def build_conditional_demo_dataset(cache_dir: Path | None, num_volumes: int, seed: int = 0) -> Path:
    """Build (once) the conditional demo set and return its datalist: ``num_volumes`` brains of known size with their
    tissue label maps.

    Files are ``<cache_dir or ~/.cache/monai_diffusion/demo>/<settings hash>/demo_000.nii.gz`` and
    ``demo_000_label.nii.gz`` ... (99x117x95 voxels at 2 mm, uint8), and ``datalist.json``, a MONAI-style datalist
    whose 'training' entries are ``{"image": "demo_000.nii.gz", "label": "demo_000_label.nii.gz", "brain_scale":
    0.93}`` (paths relative to it), rewritten for the count asked. Volume i is what :func:`build_demo_dataset` makes
    of the same seed and index, its anatomy scaled first by ``brain_scale`` (:func:`demo_brain_scale`).

    Args:
        cache_dir, num_volumes, seed: as :func:`build_demo_dataset`.

    Returns:
        The absolute path of ``datalist.json``.

    Raises:
        ValueError, OSError: as :func:`build_demo_dataset`.
    """
    folder = _set_folder("build_conditional_demo_dataset", cache_dir, num_volumes, conditional_demo_settings_hash(seed))
    entries = [{"image": f"demo_{index:03d}.nii.gz", "label": f"demo_{index:03d}_label.nii.gz",
                "brain_scale": demo_brain_scale(index, seed)} for index in range(num_volumes)]
    missing = [(index, entry) for index, entry in enumerate(entries)
               if not ((folder / entry["image"]).is_file() and (folder / entry["label"]).is_file())]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("Building the conditional demo data set: %d of %d volume(s) into %s", len(missing), num_volumes,
                    folder)
        template, affine = _load_template()
        labels = _load_tissue_labels()
        for index, entry in tqdm(missing, desc="demo volumes", unit="vol", disable=len(missing) < PROGRESS_MIN_FILES):
            image, label = _make_volume(template, index, seed, labels, brain_scale=entry["brain_scale"])
            _save_atomically(label, affine, folder / entry["label"])  # the image last: its presence means both are
            _save_atomically(image, affine, folder / entry["image"])
    datalist = folder / "datalist.json"
    content = {"description": "monai-diffusion conditional demo: MNI152 brains scaled by brain_scale, tissue labels "
                              + ", ".join(f"{value} {name}" for value, name in DEMO_LABELS.items()),
               "training": entries}
    temporary = datalist.with_name(f".tmp-{os.getpid()}-{datalist.name}")
    temporary.write_text(json.dumps(content, indent=1))
    os.replace(temporary, datalist)
    return datalist
