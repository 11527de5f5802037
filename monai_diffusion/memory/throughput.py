"""How fast the data pipeline delivers training volumes: volumes per second through a config's transform chain, by
DataLoader worker count and cache, on CT-like NIfTI.gz files written for the purpose (what ``monai-diffusion
benchmark --suite loader`` runs).

A measurement builds the training dataset exactly as training does (:func:`~monai_diffusion.data.datasets.make_dataset`
with the config's ``data.cache``; for ``preprocessed`` the cache is built first and timed on its own), then reads every
volume once through a DataLoader of batch 1. It reports the wall time (from the loader's start, workers' start-up
included) and the CPU time of this process and its worker processes: on a shared machine the wall time depends on
what else runs, the CPU time per volume much less, and ``workers / cpu_s_per_volume`` is what that many free cores
would deliver.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import DataLoader

from monai_diffusion.config.schema import Config
from monai_diffusion.data.datasets import make_dataset
from monai_diffusion.data.transforms import build_transforms, deterministic_settings
from monai_diffusion.data.workers import loader_worker_init

__all__ = ["measure_loader", "write_ct_volumes"]


def write_ct_volumes(folder: Path, shape: Sequence[int], count: int, spacing: Sequence[float] = (0.8, 0.8, 2.0),
                     *, seed: int = 0) -> list[Path]:
    """``count`` CT-like int16 NIfTI.gz volumes of ``shape`` at ``spacing`` mm: air (-1000 HU, noise 5) around an
    elliptic body (40 HU, noise 20) holding two bones (700 HU), compressed as scanners' exports are. Existing files
    of the same name are kept (a folder can be reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    bones = ((x - 0.35) ** 2 + y**2 < 0.01) | ((x + 0.35) ** 2 + y**2 < 0.01)
    paths = []
    for index in range(count):
        path = folder / f"ct_{'x'.join(map(str, shape))}_{index:03d}.nii.gz"
        paths.append(path)
        if path.is_file():
            continue
        values = np.where(body[..., None], rng.normal(40, 20, shape), rng.normal(-1000, 5, shape))
        values = np.where(bones[..., None], 700.0, values).astype(np.int16)
        nib.save(nib.Nifti1Image(values, np.diag([*spacing, 1.0])), path)
    return paths


def _cpu_seconds() -> float:
    """CPU time of this process and its finished (joined) child processes: the DataLoader's workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_loader(config: Config, items: list[dict], workers: int, cache_dir: Path | None = None) -> dict[str, Any]:
    """Read every item once through the training chain of ``config`` (its ``data.cache``, augmentation and the
    autoencoder's patches) with ``workers`` DataLoader workers; returns the record (seconds, volumes per second).

    Args:
        config: the config whose ``data`` section (and ``autoencoder.training.patch_size``) is measured.
        items: ``[{"image": path}, ...]``.
        workers: DataLoader worker processes (0: the measuring process itself).
        cache_dir: where cache=disk / cache=preprocessed write (None: a temporary folder, removed afterwards).
    """
    data = config.data.model_copy(update={"num_workers": workers})
    t = config.autoencoder.training
    chain = build_transforms(data, train=True, expected_channels=config.autoencoder.in_channels,
                             patch_size=t.patch_size, foreground_ratio=t.patch_foreground_ratio,
                             foreground_threshold_value=t.patch_foreground_threshold)
    settings_key = hashlib.sha256(json.dumps(deterministic_settings(data, config.autoencoder.in_channels),
                                             sort_keys=True).encode()).hexdigest()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(cache_dir) if cache_dir is not None else Path(scratch)
        record: dict[str, Any] = {"volumes": len(items), "workers": workers, "cache": data.cache,
                                  "load_before": round(os.getloadavg()[0], 2)}
        start_cpu, start = _cpu_seconds(), time.perf_counter()
        dataset = make_dataset(items, chain, data, root, settings_key=settings_key, progress=False)
        built = time.perf_counter() - start
        if data.cache in ("memory", "preprocessed"):  # filled before training: its own figure
            record["build_s"] = round(built, 2)
            record["build_cpu_s"] = round(_cpu_seconds() - start_cpu, 2)
        gc.collect()
        start_cpu, start = _cpu_seconds(), time.perf_counter()
        # As training reads it (MONAI's collate flattens the list a foreground-weighted crop returns).
        loader = DataLoader(dataset, batch_size=1, num_workers=workers, worker_init_fn=loader_worker_init)
        first = None
        iterator = iter(loader)
        shape = None
        for batch in iterator:
            first = first if first is not None else time.perf_counter() - start
            shape = list(batch["image"].shape[2:])
        del iterator, loader  # the workers are joined: their CPU time is counted
        gc.collect()
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
    return record | {
        "shape": shape,
        "wall_s": round(wall, 2),
        "first_s": round(first or math.nan, 2),
        "volumes_per_s": round(len(items) / wall, 3),
        "cpu_s_per_volume": round(cpu / len(items), 3),
        "load_after": round(os.getloadavg()[0], 2),
    }
