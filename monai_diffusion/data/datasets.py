"""MONAI datasets (memory / disk / no cache) and the train/validation DataLoaders, DDP-aware."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose
from torch.utils.data import DistributedSampler

from monai_diffusion.config.schema import Config, DataConfig
from monai_diffusion.data.preprocessed import PREPROCESSED_VERSION, PreprocessedDataset, build_preprocessed, split_chain
from monai_diffusion.data.sources import list_volumes, screen_volumes
from monai_diffusion.data.transforms import CLASS_KEY, build_transforms, deterministic_settings, selected_channels
from monai_diffusion.data.workers import loader_worker_init

logger = logging.getLogger(__name__)

# fast_dev_run: a handful of volumes is enough to run every code path once.
FAST_DEV_TRAIN_ITEMS = 4
FAST_DEV_VAL_ITEMS = 2


def cache_root(config: Config) -> Path:
    """Folder for the disk cache and the screening cache: ``data.cache_dir`` or ``<output_dir>/cache``."""
    root = config.data.cache_dir if config.data.cache_dir is not None else Path(config.output.output_dir) / "cache"
    return Path(root).expanduser()


def file_state_hash(item: dict, settings_key: str) -> bytes:
    """PersistentDataset key of an item: its path, size and mtime plus the preprocessing settings.

    MONAI's default key is the item dict alone (the path), so an edited file or a changed
    voxel_size/spacing/intensity setting would silently reuse a stale cache entry. An item's class
    (data.intensity_by_class) is part of it too.
    """
    path = item["image"]
    try:
        stat = os.stat(path)
        state = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        state = None  # the load will fail with a clear error; no cache entry matters then
    identity = [os.fspath(path), state, settings_key] + ([str(item[CLASS_KEY])] if CLASS_KEY in item else [])
    digest = hashlib.sha256(json.dumps(identity).encode())
    return digest.hexdigest().encode()


def make_dataset(items: list[dict], transform: Compose, data: DataConfig, cache_dir: Path, *, settings_key: str,
                 progress: bool = True, rank: int = 0, world_size: int = 1) -> Dataset:
    """The dataset class ``data.cache`` asks for, caching the deterministic part of ``transform``.

    Args:
        items: ``[{"image": path}, ...]``.
        transform: from :func:`build_transforms`.
        data: the ``data`` section of the config.
        cache_dir: folder for cache=disk (a sub-folder ``persistent`` is used) and cache=preprocessed
            (``preprocessed/<settings key>``).
        settings_key: hash of the deterministic preprocessing settings (disk cache key).
        progress: show the caching progress bar (cache=memory, cache=preprocessed).
        rank, world_size: this process's place in the run (cache=preprocessed: each rank preprocesses its share).

    Returns:
        monai.data.CacheDataset (memory), PersistentDataset (disk),
        :class:`~monai_diffusion.data.preprocessed.PreprocessedDataset` (preprocessed) or Dataset (none).
    """
    if data.cache == "memory":
        # Threads fill the cache; nibabel's gzip decoding releases the GIL for much of the work.
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=max(1, data.num_workers), progress=progress)
    if data.cache == "disk":
        return PersistentDataset(
            items,
            transform,
            cache_dir=cache_dir / "persistent",
            hash_func=functools.partial(file_state_hash, settings_key=settings_key),
            # Keep the MetaTensor (affine, file name): the recipe writes NIfTI outputs with it.
            track_meta=True,
            # The cache holds MetaTensors with metadata torch's safe loader refuses; it is our own output.
            weights_only=False,
        )
    if data.cache == "preprocessed":
        deterministic, random = split_chain(transform)
        folder = cache_dir / "preprocessed" / f"v{PREPROCESSED_VERSION}-{settings_key[:16]}"
        files = build_preprocessed(
            items, deterministic, folder, lambda item: file_state_hash(item, settings_key).decode()[:24] + ".npy",
            num_workers=data.num_workers, rank=rank, world_size=world_size, progress=progress,
        )
        return PreprocessedDataset(items, files, random)
    return Dataset(items, transform)


def build_dataloaders(
    config: Config, rank: int = 0, world_size: int = 1, batch_size: int | None = None,
    *, patch_size: list[int] | None = None, foreground_ratio: float | None = None,
    foreground_threshold: float | None = None, mask_key: str | None = None,
) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Train and validation DataLoaders for ``config.data``, screened and cached as configured.

    Volumes are listed (:func:`list_volumes`), cut to 4 train / 2 val under ``fast_dev_run``,
    screened once (:func:`screen_volumes`, policy ``data.on_bad_file``) and wrapped in the dataset
    class of ``data.cache``. Batches are dicts; ``batch["image"]`` is a float32 MetaTensor of shape
    (B, in_channels, *voxel_size).

    The train loader samples with a torch DistributedSampler, also for one process
    (shuffle=True, seed=config.seed, equal share per rank; call ``sampler.set_epoch(epoch)``
    every epoch: the order depends only on seed and epoch, which exact resume needs). Under
    ``world_size`` > 1 the validation loader with MONAI's DistributedSampler (no shuffle,
    ``even_divisible=False``): every validation volume is seen exactly once across ranks, so ranks
    may get different counts (reduce metric sums and counts, not per-batch values).
    Random augmentations are seeded by config.seed + rank.

    Args:
        config: the whole config (data, autoencoder.in_channels, seed, fast_dev_run, output_dir).
        rank: this process's rank.
        world_size: number of processes.
        batch_size: volumes per batch (default ``config.autoencoder.training.batch_size``).
        patch_size: training batches are random crops of this size (validation keeps whole volumes); None: whole.
        foreground_ratio, foreground_threshold: foreground-weighted patches (see :func:`build_transforms`).
        mask_key: each item's label map (``data.mask_key``) goes through the spatial transforms with its image.

    Returns:
        (train loader, validation loader, train DistributedSampler).

    Raises:
        ValueError: bad volumes with on_bad_file='error', or no training volume left.
        FileNotFoundError: missing data folder/datalist/files (see :func:`list_volumes`).
    """
    data = config.data
    if batch_size is None:
        batch_size = config.autoencoder.training.batch_size
    expected_channels = config.autoencoder.in_channels
    train_items, val_items = list_volumes(data, config.seed)
    if config.fast_dev_run:
        train_items, val_items = train_items[:FAST_DEV_TRAIN_ITEMS], val_items[:FAST_DEV_VAL_ITEMS]

    root = cache_root(config)
    # One pass over both splits: one progress bar, one error message listing every bad file.
    # fast_dev_run promises no stale state, so it neither reads nor writes the screening cache.
    usable = screen_volumes(
        train_items + val_items,
        expected_channels=expected_channels,
        on_bad_file=data.on_bad_file,
        spatial_dims=len(data.voxel_size),
        spacing=data.spacing,
        cache_file=None if config.fast_dev_run else root / "screening.json",
        channels=selected_channels(data),
    )
    usable_paths = {item["image"] for item in usable}
    train_items = [item for item in train_items if item["image"] in usable_paths]
    val_items = [item for item in val_items if item["image"] in usable_paths]
    if not train_items:
        raise ValueError(
            f"No training volume left to train on (data.source={data.source!r}"
            + (", after skipping bad files)" if data.on_bad_file == "skip" else ")")
            + "; check data.data_dir / data.datalist / data.glob"
        )
    logger.info("Data: %d training and %d validation volume(s)", len(train_items), len(val_items))

    settings = deterministic_settings(data, expected_channels) | ({"mask_key": mask_key} if mask_key else {})
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    show_progress = rank == 0
    train_set = make_dataset(
        train_items, build_transforms(data, train=True, expected_channels=expected_channels, patch_size=patch_size,
                                      foreground_ratio=foreground_ratio, foreground_threshold_value=foreground_threshold,
                                      mask_key=mask_key),
        data, root, settings_key=settings_key, progress=show_progress, rank=rank, world_size=world_size,
    )
    val_set = make_dataset(
        val_items, build_transforms(data, train=False, expected_channels=expected_channels, mask_key=mask_key),
        data, root, settings_key=settings_key, progress=show_progress, rank=rank, world_size=world_size,
    )

    # Seeds MONAI's random transforms (via monai.data.DataLoader) and, with one process, the shuffle;
    # a different stream per rank keeps ranks from augmenting identically.
    generator = torch.Generator().manual_seed(config.seed + rank)
    common = {
        "batch_size": batch_size,
        "num_workers": data.num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": data.num_workers > 0,
        "worker_init_fn": loader_worker_init,
    }
    # A DistributedSampler even for one process: its order depends only on (seed, epoch), so a run
    # resumed mid-epoch replays exactly the batches it would have seen.
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed)
    # Validation: every volume exactly once across ranks (a rank may get none when there are fewer
    # volumes than ranks, which MONAI's DistributedSampler refuses).
    val_sampler = list(range(rank, len(val_set), world_size)) if world_size > 1 else None
    train_loader = DataLoader(train_set, sampler=train_sampler, generator=generator, **common)
    # A generator of its own here too: without one, monai.data.DataLoader draws from (and then
    # re-seeds) torch's global generator, which would disturb the recipe's seeding.
    val_loader = DataLoader(
        val_set, sampler=val_sampler, shuffle=False, generator=torch.Generator().manual_seed(config.seed), **common
    )
    return train_loader, val_loader, train_sampler
