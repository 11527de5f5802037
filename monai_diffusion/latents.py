"""Latents for the diffusion model: autoencoder fingerprint, the per-volume latent cache, the scale factor, and
(tiled) decoding.

The latent cache stores, for every training volume, the autoencoder's posterior ``mu`` and ``sigma`` (not one
sampled latent), so a fresh latent ``mu + sigma * eps`` is drawn every time a volume is used. It lives in
``<output_dir>/latent_cache/<key>/`` with one ``<volume-id>.pt`` per volume, written atomically, where

- ``key`` hashes the autoencoder's weights (:func:`state_dict_hash`), the settings of the deterministic data
  transforms (:func:`monai_diffusion.data.transforms.deterministic_settings`) and the encoding precision: a
  different autoencoder or different preprocessing gives a new folder, i.e. the cache is rebuilt;
- ``volume-id`` hashes the source file's absolute path, size and modification time: an edited file is
  encoded again, a new file is encoded on its own, unchanged files are reused.

Augmentation is not part of the cache (a cached latent cannot be flipped/rotated); the cache encodes the
deterministic transform chain (``build_transforms(train=False)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from monai_diffusion.config.schema import Config, LDMTrainingConfig
from monai_diffusion.data import build_dataloaders, build_transforms, list_volumes, loader_worker_init, screen_volumes
from monai_diffusion.data.datasets import FAST_DEV_TRAIN_ITEMS, cache_root
from monai_diffusion.data.transforms import CLASS_KEY, deterministic_settings, selected_channels
from monai_diffusion.engine.checkpoint import check_shape_keys, find_checkpoint, newest_checkpoint
from monai_diffusion.engine.distributed import DistInfo, barrier
from monai_diffusion.engine.weights import load_weights, read_weights
from monai_diffusion.networks.builders import AUTOENCODER_SHAPE_KEYS, build_autoencoder

__all__ = [
    "CACHE_VERSION",
    "SPACING_KEY",
    "CacheResult",
    "LatentDataset",
    "LatentRecord",
    "build_latent_cache",
    "cache_key",
    "compute_scale_factor",
    "decode_latents",
    "encode_volume",
    "latent_loader",
    "load_autoencoder",
    "load_cache_entry",
    "plain_affine",
    "reconstruct",
    "resolve_autoencoder_checkpoint",
    "resolve_tile_size",
    "state_dict_hash",
    "tiled_decode",
    "training_items",
    "volume_id",
    "voxel_spacing",
]

logger = logging.getLogger("monai_diffusion")

# Bump when what a cache entry holds, or how it is computed, changes: old caches are then not reused.
CACHE_VERSION = 1
CACHE_ROOT = "latent_cache"
# The key a volume's voxel spacing (mm per axis) travels under beside its cached posterior.
SPACING_KEY = "voxel_spacing"


# ------------------------------------------------------------------------------------------- the autoencoder


def resolve_autoencoder_checkpoint(config: Config) -> Path:
    """``ldm.autoencoder_checkpoint`` (a file, or a run folder: its best.pt, else last.pt), or when unset the
    newest ``<output_dir>/autoencoder-*/checkpoints/best.pt``, else the newest ``.../last.pt``.

    Raises:
        FileNotFoundError: naming the key and the path (or the places searched) when there is no checkpoint.
    """
    given = config.ldm.autoencoder_checkpoint
    if given is not None:
        return find_checkpoint(given, what="ldm.autoencoder_checkpoint")
    return newest_checkpoint(
        config.output.output_dir, "autoencoder",
        remedy="ldm.autoencoder_checkpoint is not set: train an autoencoder first (monai-diffusion train-autoencoder) "
        "or set it to a checkpoint file or run folder",
    )


def load_autoencoder(path: Path, config: Config, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The trained autoencoder from ``path``, checked against ``config``, frozen and in eval mode on ``device``.

    ``path`` is a train-autoencoder checkpoint, or weights of the network the config's ``autoencoder`` section
    builds in a file made elsewhere (:func:`~monai_diffusion.engine.weights.read_weights`): a plain state dict as
    MONAI's tutorial and bundles save it (e.g. the BraTS bundle's ``model_autoencoder.pt``), in today's key layout or
    MONAI Generative's older one, or a released file that wraps one (MAISI's autoencoder under ``unet_state_dict``).
    Such a file records no settings: the config's ``autoencoder`` section must describe its network.

    Returns:
        (autoencoder, hash of its weights as :func:`state_dict_hash`).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: a file that holds no autoencoder weights.
        ValueError: another kind of checkpoint, its shape-defining settings differ from the config's (every
            differing key listed with both values), or weights that do not fit the config's autoencoder (the first
            differing tensors listed with both shapes).
    """
    path = Path(path)
    found = read_weights(path, "autoencoder", what="ldm.autoencoder_checkpoint")
    if found.checkpoint is not None:
        try:
            check_shape_keys(found.checkpoint.get("config", {}), config.model_dump(mode="json"),
                             AUTOENCODER_SHAPE_KEYS)
        except ValueError as exc:
            raise ValueError(
                f"Autoencoder checkpoint {path} does not match the config's autoencoder settings. {exc}"
            ) from None
    autoencoder = build_autoencoder(config.autoencoder, len(config.data.voxel_size), use_checkpoint=False)
    load_weights(autoencoder, found, strict=True, what="ldm.autoencoder_checkpoint", kind="autoencoder",
                 remedy="Set autoencoder.* to the network it was trained as.")
    autoencoder.to(device).eval().requires_grad_(False)
    if found.checkpoint is not None:
        return autoencoder, state_dict_hash(found.weights)
    logger.info("autoencoder weights from %s (%s)", path, found.layout)
    return autoencoder, state_dict_hash(autoencoder.state_dict())


def _item_class(item: dict) -> str | None:
    """An item's class (data.intensity_by_class), part of its cache entry's name; None when it has none."""
    return str(item[CLASS_KEY]) if CLASS_KEY in item else None


# ------------------------------------------------------------------------------------------------ fingerprints


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a state dict's names, dtypes, shapes and tensor bytes.

    The weights alone decide it: the same autoencoder saved as ``best.pt`` and ``last.pt``, or saved again with
    another step counter, hashes the same; one changed weight changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # A uint8 view reads the raw bytes of any dtype (numpy has no bfloat16).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(autoencoder_hash: str, transform_settings: dict, precision_name: str) -> str:
    """The cache folder name: changes whenever the autoencoder, the deterministic preprocessing or the
    encoding precision changes."""
    payload = json.dumps(
        {
            "version": CACHE_VERSION,
            "autoencoder": autoencoder_hash,
            "transforms": transform_settings,
            "precision": precision_name,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def volume_id(path: str | os.PathLike, item_class: str | None = None) -> str:
    """File name of a volume's cache entry: absolute path + size + modification time (an edited file gets a new
    entry; its stale one is never read), and the item's class when it has one (data.intensity_by_class)."""
    resolved = os.path.abspath(os.fspath(path))
    stat = os.stat(resolved)
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}" + (f"|{item_class}" if item_class is not None else "")
    return hashlib.sha256(key.encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_volume(autoencoder: torch.nn.Module, image: torch.Tensor, device: torch.device, precision=None):
    """Posterior ``(mu, sigma)`` of one (C, *spatial) volume, each float32 on the CPU, shape (latent C, *latent).

    Args:
        autoencoder: the frozen autoencoder (eval mode).
        image: the transformed volume (channel first, no batch axis).
        device: where to encode.
        precision: a :class:`~monai_diffusion.engine.precision.Precision` (autocast), or None for fp32.
    """
    # A plain tensor: MetaTensor metadata would follow the latents into the cache (and slow every op).
    x = torch.as_tensor(image).as_subclass(torch.Tensor).unsqueeze(0).to(device=device, dtype=torch.float32)
    context = precision.autocast() if precision is not None else contextlib.nullcontext()
    with context:
        mu, sigma = autoencoder.encode(x)
    return mu[0].float().cpu(), sigma[0].float().cpu()


def voxel_spacing(affine) -> torch.Tensor:
    """The voxel spacing (mm per axis, float64) of an affine (4x4 for 3D), or of each of a batch of them: the length
    of each column of its rotation-and-scale part."""
    affine = torch.as_tensor(affine).as_subclass(torch.Tensor).to("cpu", torch.float64)
    dims = affine.shape[-1] - 1
    return torch.linalg.vector_norm(affine[..., :dims, :dims], dim=-2)


def plain_affine(affine) -> torch.Tensor:
    """A MetaTensor's affine as a plain float64 CPU tensor (4x4 for 3D), safe for ``weights_only`` loading."""
    return torch.as_tensor(affine).as_subclass(torch.Tensor).detach().to("cpu", torch.float64).clone()


def _save_atomic(payload: dict, path: Path) -> None:
    """torch.save through a temp file in the same folder + os.replace: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_cache_entry(path: Path) -> dict:
    """One cache entry: ``{"mu", "sigma", "affine", "image"}`` (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class CacheResult:
    """What :func:`build_latent_cache` did.

    Attributes:
        folder: ``<output_dir>/latent_cache/<key>``.
        files: one entry file per item, in item order (every rank gets the full list).
        encoded: volumes this rank encoded now (0 when everything was cached already).
    """

    folder: Path
    files: list[Path]
    encoded: int


def build_latent_cache(
    autoencoder: torch.nn.Module,
    items: Sequence[dict],
    transform: Callable[[dict], dict],
    folder: Path,
    *, device: torch.device,
    precision=None,
    dist: DistInfo | None = None,
    describe: dict | None = None,
) -> CacheResult:
    """Encode every volume missing from ``folder`` (each rank its shard ``items[rank::world_size]``), then wait
    for all ranks; return the entry files of all items.

    Args:
        autoencoder: the frozen autoencoder, on ``device``, in eval mode.
        items: ``[{"image": path}, ...]``.
        transform: the deterministic transform chain (``build_transforms(data, train=False)``).
        folder: the cache folder (see :func:`cache_key`).
        device: where to encode.
        precision: autocast for encoding (None: fp32); part of the cache key.
        dist: this process's place in the run (None: single process).
        describe: written once to ``folder/cache.json`` for people (what the key stands for).
    """
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{volume_id(item['image'], _item_class(item))}.pt" for item in items]
    todo = [(item, path) for item, path in list(zip(items, files))[rank::world_size] if not path.is_file()]
    if todo:
        logger.info("latent cache %s: encoding %d of %d volume(s)%s", folder, len(todo), len(items),
                    f" on rank {rank}" if world_size > 1 else "")
    for item, path in tqdm(todo, desc="encoding latents", unit="volume", disable=rank != 0 or not todo,
                           dynamic_ncols=True):
        image = transform(dict(item))["image"]
        mu, sigma = encode_volume(autoencoder, image, device, precision)
        affine = getattr(image, "affine", None)
        _save_atomic(
            {
                "mu": mu,
                "sigma": sigma,
                "affine": plain_affine(affine) if affine is not None else None,
                "image": str(item["image"]),
            },
            path,
        )
    if rank == 0 and describe is not None and not (folder / "cache.json").is_file():
        tmp = folder / f".cache.json.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(describe, indent=2, sort_keys=True, default=str))
        os.replace(tmp, folder / "cache.json")
    barrier()  # every rank's shard is on disk before anyone reads the whole cache
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise RuntimeError(
            f"latent cache {folder}: {len(missing)} entry file(s) missing after encoding (is the output folder "
            f"shared by all ranks?), e.g. {missing[0]}"
        )
    if not todo and rank == 0:
        logger.info("latent cache %s: all %d volume(s) already encoded", folder, len(items))
    return CacheResult(folder=folder, files=files, encoded=len(todo))


class LatentDataset(torch.utils.data.Dataset):
    """Cached posteriors as ``{"mu": (C, *latent), "sigma": (C, *latent)}``, read from disk per item, with the
    item's ``fields`` beside them (its covariates, a ControlNet's control input) and, with ``spacing``, the volume's
    voxel spacing (``SPACING_KEY``, mm, from the entry's affine; MAISI's UNet takes it): what is not part of the
    encoded image stays out of the cache, which the conditional and unconditional runs on the same volumes share."""

    def __init__(self, files: Sequence[Path], fields: Sequence[dict] | None = None, *, spacing: bool = False) -> None:
        self.files = [Path(f) for f in files]
        self.fields = list(fields) if fields is not None else [{} for _ in self.files]
        self.spacing = spacing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = load_cache_entry(self.files[index])
        item = {**self.fields[index], "mu": entry["mu"], "sigma": entry["sigma"]}
        if self.spacing:
            item[SPACING_KEY] = voxel_spacing(entry["affine"])
        return item


def training_items(config: Config) -> list[dict]:
    """The screened training volumes of a stage on latents (the validation split is not used: validation there is
    sampling), with their datalist fields."""
    data = config.data
    items, _ = list_volumes(data, config.seed)
    if config.fast_dev_run:
        items = items[:FAST_DEV_TRAIN_ITEMS]
    items = screen_volumes(
        items,
        expected_channels=config.autoencoder.in_channels,
        on_bad_file=data.on_bad_file,
        spatial_dims=len(data.voxel_size),
        spacing=data.spacing,
        cache_file=None if config.fast_dev_run else cache_root(config) / "screening.json",
        channels=selected_channels(data),
    )
    if not items:
        raise ValueError(f"No training volume to train on (data.source={data.source!r})")
    return items


def latent_loader(config: Config, training: LDMTrainingConfig, autoencoder: torch.nn.Module, items: Sequence[dict],
                  *, autoencoder_path: Path, autoencoder_hash: str, precision, dist: DistInfo,
                  fields: Sequence[dict] | None = None, mask_key: str | None = None, spacing: bool = False):
    """The training batches of a stage on latents (train-ldm, train-controlnet) and their sampler.

    With ``training.cache_latents`` every item is encoded once into the latent cache (:func:`build_latent_cache`;
    the ranks share the work) and batches are ``{"mu", "sigma"}`` plus the item's ``fields``; otherwise they are
    ``{"image", ...}`` straight from the data chain (``data.augment`` applies; with ``mask_key`` the label maps move
    with the images) with every datalist field of the item.

    Args:
        config: the stage's config (``stage_config``).
        training: the stage's training section (``batch_size``, ``cache_latents``).
        autoencoder: the frozen autoencoder on the device.
        items: the training items (:func:`training_items`).
        autoencoder_path, autoencoder_hash: where it came from and its weights' hash (the cache key, cache.json).
        precision: the stage's precision (encoding runs under it; part of the cache key).
        dist: this process's place in the run.
        fields: per item, what cached batches carry beside the posteriors.
        mask_key: the label-map field the on-the-fly chain transforms with the image (``data.mask_key``).
        spacing: cached batches carry each volume's voxel spacing (``SPACING_KEY``; image batches have their affine).

    Returns:
        (loader, its DistributedSampler, the :class:`CacheResult` or None without a cache).
    """
    if not training.cache_latents:
        loader, _, sampler = build_dataloaders(config, dist.rank, dist.world_size, training.batch_size,
                                               mask_key=mask_key)
        return loader, sampler, None
    if dist.is_main and (config.data.augment.flip_prob > 0 or config.data.augment.affine_prob > 0):
        logger.warning("cache_latents: data.augment is not applied to cached latents")
    deterministic = build_transforms(config.data, train=False, expected_channels=config.autoencoder.in_channels)
    settings = deterministic_settings(config.data, config.autoencoder.in_channels)
    key = cache_key(autoencoder_hash, settings, precision.name)
    cache = build_latent_cache(
        autoencoder, items, deterministic, Path(config.output.output_dir) / CACHE_ROOT / key, device=dist.device,
        precision=precision,
        dist=dist, describe={"autoencoder_checkpoint": str(autoencoder_path), "autoencoder_hash": autoencoder_hash,
                        "transforms": settings, "precision": precision.name},
    )
    dataset = LatentDataset(cache.files, fields, spacing=spacing)
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=config.seed)
    # Own generator: iterating never draws from the global RNG, so a resumed run replays it exactly.
    loader = DataLoader(
        dataset, batch_size=training.batch_size, sampler=sampler, num_workers=config.data.num_workers,
        pin_memory=dist.device.type == "cuda", generator=torch.Generator().manual_seed(config.seed),
        worker_init_fn=loader_worker_init,
    )
    return loader, sampler, cache


# --------------------------------------------------------------------------------------------- scale factor


def compute_scale_factor(posteriors: Iterable[tuple[torch.Tensor, torch.Tensor]], seed: int = 0) -> float:
    """``1 / std`` of sampled latents ``mu + sigma * eps`` over all given volumes (all channels and voxels).

    ``eps`` comes from a private generator seeded with ``seed``: the result is reproducible and the global RNG is
    untouched. Sums are kept in float64, one volume at a time.

    Args:
        posteriors: ``(mu, sigma)`` pairs, e.g. the first ``ldm.training.scale_factor_volumes`` cache entries.
        seed: seed of ``eps``.

    Raises:
        ValueError: no volumes, or latents with (near) zero spread.
    """
    generator = torch.Generator().manual_seed(seed)
    count, total, total_sq = 0, 0.0, 0.0
    for mu, sigma in posteriors:
        mu, sigma = mu.detach().double().cpu(), sigma.detach().double().cpu()
        eps = torch.randn(mu.shape, generator=generator, dtype=torch.float64)
        z = mu + sigma * eps
        count += z.numel()
        total += float(z.sum())
        total_sq += float((z * z).sum())
    if count < 2:
        raise ValueError("latent scale factor: no latents to compute it from (no training volumes?)")
    variance = (total_sq - total * total / count) / (count - 1)
    std = math.sqrt(max(variance, 0.0))
    if not math.isfinite(std) or std < 1e-8:
        raise ValueError(f"latent scale factor: the latents have standard deviation {std}; is the autoencoder trained?")
    return 1.0 / std


# ------------------------------------------------------------------------------------------------- decoding


def resolve_tile_size(latent_spatial: Sequence[int], tile_size: Sequence[int] | None) -> tuple[int, ...]:
    """Decode window in latent voxels: the configured one (capped at the latent), or half the latent per axis."""
    if tile_size is None:
        return tuple(max(1, math.ceil(s / 2)) for s in latent_spatial)
    if len(tile_size) != len(latent_spatial):
        raise ValueError(f"ldm.sampling.tile_size: expected {len(latent_spatial)} sizes, got {list(tile_size)}")
    return tuple(max(1, min(int(t), int(s))) for t, s in zip(tile_size, latent_spatial))


def tiled_decode(
    autoencoder: torch.nn.Module,
    z: torch.Tensor,
    tile_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    *, output_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode ``z`` window by window with MONAI's ``sliding_window_inference``.

    The predictor (the decoder) returns windows ``total_factor`` times larger than its latent windows;
    ``sliding_window_inference`` detects the ratio and places ("zooms") each output window at the scaled
    position, blending overlaps with a Gaussian importance map. Only one window's decoder activations are alive
    at a time; the assembled output may live on ``output_device`` (e.g. the CPU) to save GPU memory.

    The decoder's GroupNorm normalises each window with that window's own statistics, so the result is close
    to, not identical with, a whole-volume decode (larger windows and overlap bring it closer).
    """
    roi = resolve_tile_size(z.shape[2:], tile_size)
    return sliding_window_inference(
        z,
        roi_size=roi,
        sw_batch_size=1,
        predictor=autoencoder.decode,
        overlap=overlap,
        mode="gaussian",
        device=output_device,
    )


@torch.no_grad()
def reconstruct(autoencoder: torch.nn.Module, images: torch.Tensor, tile_size: Sequence[int] | None = None,
                overlap: float = 0.25) -> torch.Tensor:
    """Encode ``images`` to the latent mean and decode it: whole, or window by window when ``tile_size`` (image
    voxels per axis, divisible by the total factor) is given, with MONAI's ``sliding_window_inference`` blending the
    windows' overlaps with a Gaussian importance map. An autoencoder trained on patches reconstructs whole volumes
    this way at its patch size: it sees what it trained on, and only one window's maps exist at a time. Runs in
    the caller's autocast, if any (train-autoencoder's validation and evaluate call it under the run's precision)."""
    if tile_size is None:
        return autoencoder.reconstruct(images)
    return sliding_window_inference(images, roi_size=list(tile_size), sw_batch_size=1,
                                    predictor=autoencoder.reconstruct, overlap=overlap, mode="gaussian")


@torch.no_grad()
def decode_latents(
    autoencoder: torch.nn.Module,
    z: torch.Tensor,
    scale_factor: float,
    tiled: bool = False,
    *, tile_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    precision=None,
    output_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Undo the scale factor and decode a batch of diffusion latents to images (float32)."""
    z = z / scale_factor
    context = precision.autocast() if precision is not None else contextlib.nullcontext()
    with context:
        if tiled:
            image = tiled_decode(autoencoder, z, tile_size, overlap, output_device=output_device)
        else:
            image = autoencoder.decode(z)
    return image.float()


# ------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class LatentRecord:
    """What an LDM checkpoint keeps beside its networks: which frozen autoencoder made the latents (its file and
    the digest of its weights), the latent scale factor (computed once), the latents' shape, the data's affine
    (samples are written with it) and the conditions' statistics. A resumed run, ``train-controlnet``, ``sample`` and
    ``evaluate`` read it back with :meth:`from_checkpoint`.

    Attributes:
        autoencoder_checkpoint: the autoencoder's checkpoint file.
        autoencoder_hash: the digest of its weights (``latents.load_autoencoder``).
        scale_factor: the latent scale factor.
        latent_shape: (channels, then per axis).
        affine: the training data's affine (4x4, float64).
        conditioning: ``ConditionEncoder.state()``, None when unconditional.
    """

    autoencoder_checkpoint: Path
    autoencoder_hash: str
    scale_factor: float
    latent_shape: tuple[int, ...]
    affine: torch.Tensor
    conditioning: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale_factor": self.scale_factor,
            "autoencoder_checkpoint": str(self.autoencoder_checkpoint),
            "autoencoder_hash": self.autoencoder_hash,
            "latent_shape": list(self.latent_shape),
            "affine": self.affine,
            **({"conditioning": self.conditioning} if self.conditioning is not None else {}),
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> LatentRecord:
        """The record of an LDM checkpoint (a dict :func:`~monai_diffusion.engine.checkpoint.load_checkpoint`
        read)."""
        return cls(
            autoencoder_checkpoint=Path(state["autoencoder_checkpoint"]),
            autoencoder_hash=state["autoencoder_hash"],
            scale_factor=float(state["scale_factor"]),
            latent_shape=tuple(int(size) for size in state["latent_shape"]),
            affine=torch.as_tensor(state["affine"], dtype=torch.float64),
            conditioning=state.get("conditioning") or None,
        )
