"""Generating volumes with a trained LDM: shared by the sample command, the training commands' validation samples
and evaluation.

:func:`sample` finds and loads an LDM checkpoint (UNet or its EMA weights, scale factor, latent shape, affine of the
training data) and the autoencoder it was trained on, then for each sample draws noise from a seeded generator,
denoises it (:func:`~monai_diffusion.diffusion.sample_latents`), decodes it (whole volume or tiled), clips it to the
training intensity range and writes ``sample-NNN.nii.gz`` and ``sample-NNN.png``. :func:`generate_volume` is one
such volume; :func:`load_ldm_checkpoint`, :func:`newest_ldm_checkpoint` and :func:`ema_weights` read a trained LDM,
:func:`load_ldm` builds its networks.

A conditional LDM samples with one row of conditions per sample, guided (:class:`~monai_diffusion.conditioning.
Denoiser`); a ControlNet checkpoint (train-controlnet) samples its LDM steered to follow a label map, in the map's
space. Their samples are named after their seed and conditions and listed in ``samples.csv``.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric
from tqdm import tqdm

from monai_diffusion.conditioning import (
    MODALITY_KEY,
    ConditionEncoder,
    Denoiser,
    control_size,
    format_spacing,
    read_control,
)
from monai_diffusion.config.loading import config_from_dict
from monai_diffusion.config.schema import Config, SamplingConfig
from monai_diffusion.config.stages import stage_config
from monai_diffusion.diffusion import check_sampler, sample_latents
from monai_diffusion.engine.checkpoint import check_shape_keys, find_checkpoint, load_checkpoint, newest_checkpoint
from monai_diffusion.engine.distributed import DistInfo, all_reduce_mean, barrier, cleanup_distributed, init_distributed
from monai_diffusion.engine.ema import ema_weights
from monai_diffusion.engine.logging import get_logger, save_png, save_sample, volume_panel
from monai_diffusion.engine.loop import TrainingRun
from monai_diffusion.engine.precision import Precision, resolve_precision
from monai_diffusion.latents import (
    SPACING_KEY,
    LatentRecord,
    decode_latents,
    load_autoencoder,
    reconstruct,
    resolve_autoencoder_checkpoint,
    state_dict_hash,
    voxel_spacing,
)
from monai_diffusion.metrics import SSIM_WINDOW
from monai_diffusion.networks.builders import LDM_SHAPE_KEYS, build_controlnet, build_scheduler, build_unet

__all__ = [
    "MANIFEST",
    "SEED_STRIDE",
    "LoadedLDM",
    "checked_conditions",
    "condition_dropout",
    "ema_weights",
    "generate_volume",
    "load_ldm",
    "load_ldm_checkpoint",
    "maisi_rows",
    "manifest_names",
    "newest_ldm_checkpoint",
    "sample",
    "sample_description",
    "sample_record",
    "validation_reconstructions",
    "validation_sample",
    "with_spacing",
    "write_manifest",
]

# Samples of one seed are drawn from generators seeded ``seed * SEED_STRIDE + index``: sample i is the same
# whatever --num-samples is, and nearby seeds do not share samples.
SEED_STRIDE = 100_003
# fast_dev_run samples its validation volume with this many denoising steps.
FAST_DEV_RUN_INFERENCE_STEPS = 2
# Written beside conditional and mask-steered samples: one row per file.
MANIFEST = "samples.csv"


@torch.no_grad()
def generate_volume(
    unet: torch.nn.Module,
    autoencoder: torch.nn.Module,
    *,
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
    z = sample_latents(unet, scheduler, kind, (1, *latent_shape), num_steps=num_steps, device=device,
                       generator=generator, precision=precision, progress=progress)
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


@torch.no_grad()
def validation_sample(
    denoiser, network: torch.nn.Module, autoencoder: torch.nn.Module, *, config: Config, trained: Config,
    record: LatentRecord, affine: torch.Tensor, precision: Precision, run: TrainingRun, step: int, title: str,
) -> Path | None:
    """The validation sample of train-ldm and train-controlnet: rank 0 generates one volume with ``denoiser`` (in
    which ``network``, the weights being trained or their EMA, sits in eval mode meanwhile) and writes it as
    ``<run>/samples/sample-step<N>.{nii.gz,png}`` with ``affine``, its panel and mean / std logged; the other ranks
    wait. Returns the NIfTI file (None on the other ranks).

    The noise comes from a generator seeded with ``config.seed``: every validation starts from the same noise (progress
    is visible) and the training RNG is untouched (a resumed run replays training exactly).

    Args:
        denoiser: the UNet, or a :class:`~monai_diffusion.conditioning.Denoiser` with conditions or a ControlNet.
        network: the module to hold in eval mode while sampling.
        autoencoder: the frozen autoencoder that decodes the latent.
        config: the run's config (``ldm.sampling``, ``seed``, ``fast_dev_run``).
        trained: the LDM's own config (its scheduler and intensity range).
        record: the LDM's latents (shape, scale factor).
        affine: the voxel-to-world matrix the volume is written with.
        precision: the run's precision.
        run, step, title: the training run (its folder, device and writer), the step, the panel's title.
    """
    nifti = None
    if run.dist.is_main:
        was_training = network.training
        network.eval()
        sampling = config.ldm.sampling
        kind = sampling.scheduler or trained.ldm.scheduler.type
        steps = min(sampling.num_inference_steps, FAST_DEV_RUN_INFERENCE_STEPS) if config.fast_dev_run \
            else sampling.num_inference_steps
        intensity = trained.data.intensity
        value_range = (intensity.b_min, intensity.b_max) if intensity.mode != "none" else None
        device = run.dist.device
        volume = generate_volume(
            denoiser, autoencoder, scheduler=build_scheduler(trained.ldm.scheduler, kind, record.latent_shape),
            kind=kind, latent_shape=record.latent_shape, scale_factor=record.scale_factor, sampling=sampling,
            num_steps=steps, value_range=value_range, device=device,
            generator=torch.Generator(device=device).manual_seed(config.seed), precision=precision,
        )
        nifti, panel = save_sample(volume[0], affine, run.dir / "samples", f"sample-step{step:08d}",
                                   value_range=value_range,
                                   title=title)
        if panel is not None:
            run.writer.image("val/sample", panel, step)
        run.writer.scalars({"val/sample_mean": volume.mean().item(), "val/sample_std": volume.std().item()}, step)
        network.train(was_training)
    barrier()  # the other ranks wait here while rank 0 samples
    return nifti


@torch.no_grad()
def validation_reconstructions(autoencoder: torch.nn.Module, loader, *, config: Config, precision: Precision,
                               run: TrainingRun, step: int) -> dict[str, float]:
    """The validation of train-autoencoder: reconstruction L1, PSNR and SSIM over the validation set (whole volumes;
    window by window at the patch size when the autoencoder trains on patches), reduced over the ranks, logged with
    a PNG panel of input vs reconstruction (``<run>/images/reconstruction-step<N>.png``).

    Returns:
        ``{"val/l1", "val/psnr", "val/ssim"}`` means over every rank's volumes (the same on every rank), or {} when
        there are no validation volumes.
    """
    dist, intensity = run.dist, config.data.intensity
    tile_size = config.autoencoder.training.patch_size
    autoencoder.eval()
    value_range = intensity.b_max - intensity.b_min
    psnr = PSNRMetric(max_val=value_range, reduction="sum")
    ssim = SSIMMetric(spatial_dims=len(config.data.voxel_size), data_range=value_range, win_size=SSIM_WINDOW,
                      reduction="sum")
    # Ranks may hold different numbers of validation volumes: reduce sums and counts, not means.
    sums = {"val/l1": 0.0, "val/psnr": 0.0, "val/ssim": 0.0}
    count, panel = 0, None
    for index, batch in enumerate(loader):
        if config.fast_dev_run and index >= 1:
            break
        images = batch["image"].to(dist.device)
        with precision.autocast():
            reconstruction = reconstruct(autoencoder, images, tile_size)
        reconstruction = reconstruction.float()
        sums["val/l1"] += F.l1_loss(reconstruction, images, reduction="none").flatten(1).mean(1).sum().item()
        sums["val/psnr"] += psnr(reconstruction, images).sum().item()
        sums["val/ssim"] += ssim(reconstruction, images).sum().item()
        count += images.shape[0]
        if panel is None:
            panel = volume_panel([("input", images[0].cpu()), ("reconstruction", reconstruction[0].cpu())],
                                 value_range=(intensity.b_min, intensity.b_max))
    autoencoder.train()
    total = all_reduce_mean(float(count)) * dist.world_size
    if total == 0:
        return {}
    metrics = {key: all_reduce_mean(value) * dist.world_size / total for key, value in sums.items()}
    if dist.is_main:
        run.writer.scalars(metrics, step)
        if panel is not None:
            run.writer.image("val/reconstruction", panel, step)
            save_png(panel, run.dir / "images" / f"reconstruction-step{step:08d}.png")
    return metrics


def newest_ldm_checkpoint(output_dir: Path, command: str = "ldm") -> Path:
    """The checkpoint of the newest ``<output_dir>/<command>-*`` run (``command``: ldm or controlnet), as
    :func:`~monai_diffusion.engine.checkpoint.newest_checkpoint` finds it.

    Raises:
        FileNotFoundError: there is none.
    """
    # train-controlnet looks for its LDM here too, where the setting is controlnet.ldm_checkpoint.
    elsewhere = " (train-controlnet: set controlnet.ldm_checkpoint)" if command == "ldm" else ""
    return newest_checkpoint(output_dir, command, noun="LDM" if command == "ldm" else "ControlNet",
                             remedy=f"train one (monai-diffusion train-{command}) or pass --checkpoint{elsewhere}")


def load_ldm_checkpoint(path: Path, kinds: Sequence[str] = ("ldm",)) -> dict:
    """An LDM checkpoint (a file, or a run folder: its checkpoint as
    :func:`~monai_diffusion.engine.checkpoint.find_checkpoint` finds it), with ``"path"`` set to the file; ``kinds``
    may admit a ControlNet checkpoint (``"controlnet"``) too.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the file is not a checkpoint of those kinds.
    """
    path = find_checkpoint(path)
    state = load_checkpoint(path)
    if state.get("kind") not in kinds:
        raise ValueError(f"{path}: not an LDM checkpoint (kind={state.get('kind')!r}); pass --checkpoint LDM_CKPT")
    state["path"] = str(path)
    return state


@dataclass
class LoadedLDM:
    """A trained LDM, ready to sample (:func:`load_ldm`).

    Attributes:
        state: its checkpoint, ``"path"`` included.
        trained: the config it was trained with (its stored one).
        unet: the UNet with the EMA weights when kept (else the raw ones), frozen, on the device.
        weights: which of the two: "EMA" or "raw (no EMA saved)".
        weights_hash: :func:`~monai_diffusion.latents.state_dict_hash` of those weights (a ControlNet records it).
        autoencoder: the autoencoder it was trained on, frozen, on the device.
        encoder: its conditions (None: unconditional).
        record: what its checkpoint keeps about its latents (the autoencoder's file and digest, ...).
        latent_shape, scale_factor, affine: its latent (channels, then per axis), the latent scale factor and the
            affine of its training data (the record's).
    """

    state: dict
    trained: Config
    unet: torch.nn.Module
    weights: str
    weights_hash: str
    autoencoder: torch.nn.Module
    encoder: ConditionEncoder | None
    record: LatentRecord
    latent_shape: tuple[int, ...]
    scale_factor: float
    affine: torch.Tensor

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return Path(self.state["path"])

    @property
    def step(self) -> int:
        """The optimizer steps it was trained for."""
        return int(self.state["step"])


def load_ldm(state: dict, config: Config, device: torch.device, *, shape_keys: Sequence[str] = (),
             remedy: str | None = None) -> LoadedLDM:
    """The networks of the LDM checkpoint ``state`` (:func:`load_ldm_checkpoint`) on ``device``, built from its own
    config, and the autoencoder it was trained on: the recorded path, or ``config``'s ``ldm.autoencoder_checkpoint``
    when that file has moved.

    Args:
        state, config, device: the checkpoint, the config of the run that uses it, where the networks go.
        shape_keys: keys that ``config`` must share with the LDM's own config (checked first; ``remedy`` is what the
            error suggests).

    Raises:
        FileNotFoundError: the autoencoder is gone.
        ValueError: a shape key differs, or the autoencoder found has other weights than the one the LDM was
            trained on.
    """
    path = Path(state["path"])
    if shape_keys:
        check_shape_keys(state["config"], config.model_dump(mode="json"), shape_keys, path, remedy=remedy)
    trained = config_from_dict(state["config"], source=f"{path} (stored config)")
    record = LatentRecord.from_checkpoint(state)
    ae_path = record.autoencoder_checkpoint
    if not ae_path.is_file() and config.ldm.autoencoder_checkpoint is not None:
        ae_path = resolve_autoencoder_checkpoint(config)
    if not ae_path.is_file():
        raise FileNotFoundError(
            f"The autoencoder this LDM was trained with is gone: {record.autoencoder_checkpoint}; set "
            f"ldm.autoencoder_checkpoint to its new location"
        )
    autoencoder, ae_hash = load_autoencoder(ae_path, trained, device)
    if ae_hash != record.autoencoder_hash:
        raise ValueError(
            f"Autoencoder {ae_path} has weights {ae_hash}, but the LDM {path} was trained on latents of "
            f"{record.autoencoder_hash}; point ldm.autoencoder_checkpoint at the autoencoder it was trained with"
        )
    encoder = ConditionEncoder.from_state(record.conditioning)
    latent_shape = record.latent_shape
    unet = build_unet(trained.ldm, latent_shape[0], len(latent_shape) - 1,
                      encoder.unet_arguments() if encoder is not None else None)
    weights = ema_weights(state["ema"]) if state.get("ema") is not None else state["unet"]
    unet.load_state_dict(weights)
    unet.to(device).eval().requires_grad_(False)
    if config.device.compile:
        # In place (the modules' state dicts keep their keys): the denoising loop reuses the compiled UNet every step.
        unet.compile(mode=config.device.compile_mode)
        autoencoder.decoder.compile(mode=config.device.compile_mode)
    return LoadedLDM(
        state=state, trained=trained, unet=unet,
        weights="EMA" if state.get("ema") is not None else "raw (no EMA saved)", weights_hash=state_dict_hash(weights),
        autoencoder=autoencoder, encoder=encoder, record=record,
        latent_shape=latent_shape, scale_factor=record.scale_factor, affine=record.affine,
    )


def sample(
    config: Config,
    num_samples: int | None = None,
    steps: int | None = None,
    scheduler_kind: str | None = None,
    *, seed: int | None = None,
    out: Path | None = None,
    checkpoint: Path | None = None,
    shape_keys: Sequence[str] = LDM_SHAPE_KEYS,
    conditions: Sequence[dict] | None = None,
    where: Sequence[str] | None = None,
    guidance: float | None = None,
    mask: Path | None = None,
    spacing: Sequence[float] | None = None,
    modality: str | None = None,
) -> list[Path]:
    """Generate ``num_samples`` volumes; returns the NIfTI paths this process wrote.

    The networks, scheduler settings and intensity range come from the checkpoint's own config (what the model
    was trained with); ``config`` supplies the sampling options (``ldm.sampling``), device, precision and where
    to look for checkpoints. Arguments left None take their ``ldm.sampling`` / ``seed`` defaults. Under
    ``torchrun`` each process generates every ``world_size``-th sample (sample i is the same either way).

    Args:
        shape_keys: network-shaping keys on which ``config`` must agree with the checkpoint's config (the sample
            command passes all of them when a config file is given, only those ``--set`` names otherwise; with
            ``--mask`` a ControlNet's).
        conditions: the values of a conditional LDM's conditions, ``{name: value}``, one row per sample (their
            count is the number of samples). None: unconditional samples (a conditional LDM's null condition).
        where: where each row came from, named in errors (default ``--condition``).
        guidance: classifier-free guidance scale (None: ``ldm.sampling.guidance_scale``).
        mask: a label map the samples follow: needs a ControlNet checkpoint (by default the newest
            ``<output_dir>/controlnet-*`` run); the samples take its affine.
        spacing: MAISI's UNet: the voxel spacing (mm per axis) it generates at, and the samples' affine gets
            (None: the training data's, or the mask's).
        modality: MAISI's UNet: the modality of every sample, a name of MAISI's vocabulary (None: the one the
            checkpoint keeps, ``ldm.unet.modality`` or the training split's most frequent).

    Raises:
        ValueError: ``config`` and the checkpoint differ on one of ``shape_keys`` (both values listed); conditions
            for an LDM trained without them, unknown, missing, non-numeric or unknown-category values (naming the
            row and key); guidance without conditions or from a UNet trained without condition dropout; a mask
            without a ControlNet checkpoint or a ControlNet checkpoint without a mask; a spacing or modality for a
            UNet that takes none, or one MAISI's UNet cannot take.
    """
    dist = init_distributed(config.device.device)
    try:
        return _generate(config, dist, num_samples, steps, scheduler_kind=scheduler_kind, seed=seed, out=out,
                         checkpoint=checkpoint, shape_keys=shape_keys,
                         conditions=conditions, where=where, guidance=guidance, mask=mask, spacing=spacing,
                         modality=modality)
    finally:
        cleanup_distributed()


def _generate(config: Config, dist: DistInfo, num_samples, steps, *, scheduler_kind, seed, out, checkpoint,
              shape_keys, conditions, where, guidance, mask, spacing, modality) -> list[Path]:
    log = get_logger()
    device = dist.device
    precision = resolve_precision(stage_config(config, "ldm").device.mixed_precision, device)  # the LDM's own
    sampling = config.ldm.sampling
    steps = steps or sampling.num_inference_steps
    seed = config.seed if seed is None else seed

    # ---- the checkpoint: an LDM, or a ControlNet and the LDM it steers
    output_dir = Path(config.output.output_dir)
    path = Path(checkpoint) if checkpoint is not None else newest_ldm_checkpoint(
        output_dir, "controlnet" if mask is not None else "ldm")
    state = load_ldm_checkpoint(path, kinds=("ldm", "controlnet"))
    path = Path(state["path"])
    controlling = state["kind"] == "controlnet"
    if controlling != (mask is not None):
        raise ValueError(f"{path} is a ControlNet checkpoint: it samples with --mask LABEL_MAP" if controlling else
                         f"--mask needs a ControlNet checkpoint (monai-diffusion train-controlnet); {path} is an LDM")
    trained_config_file = path.parent.parent / "config.yaml"
    check_shape_keys(state["config"], config.model_dump(mode="json"), shape_keys, path, remedy=(
        f"To sample with the checkpoint's own settings, pass --checkpoint {path} without --config (and without "
        "--set for these keys)"
        + (f", or --config {trained_config_file} (the run's own config)." if trained_config_file.is_file() else ".")
    ))
    ldm = load_ldm(load_ldm_checkpoint(state["ldm_checkpoint"]) if controlling else state, config, device)
    trained = ldm.trained
    kind = scheduler_kind or sampling.scheduler or trained.ldm.scheduler.type
    check_sampler(kind, trained.ldm.scheduler.type)
    controlnet, control, affine = None, None, ldm.affine
    if controlling:
        if ldm.weights_hash != state["ldm_hash"]:
            raise ValueError(f"The LDM {ldm.state['path']} has other weights ({ldm.weights_hash}) than the one the "
                             f"ControlNet {path} was trained with ({state['ldm_hash']})")
        trained_controlnet = config_from_dict(state["config"], source=f"{path} (stored config)").controlnet
        controlnet = build_controlnet(trained.ldm, trained_controlnet, ldm.latent_shape[0], len(ldm.latent_shape) - 1,
                                      conditioning=ldm.encoder.unet_arguments() if ldm.encoder is not None else None)
        controlnet.load_state_dict(ema_weights(state["ema"]) if state.get("ema") is not None else state["controlnet"])
        controlnet.to(device).eval().requires_grad_(False)
        size = control_size(ldm.latent_shape[1:], trained_controlnet.conditioning_embedding_num_channels)
        control, affine = read_control(Path(mask), trained.data, trained_controlnet.num_labels, size)
        control = control[None].to(device)

    # ---- what each sample is conditioned on (MAISI's UNet: and its spacing and modality)
    rows, guidance = checked_conditions(
        ldm.encoder, conditions, where, guidance, num_samples=num_samples, default_guidance=sampling.guidance_scale,
        dropout=condition_dropout(ldm.state), model=f"the LDM {ldm.path}")
    num_samples = len(rows) if rows is not None else (num_samples or sampling.num_samples)
    covariates = rows is not None  # else their null condition (a conditional LDM's unconditional model)
    rows, affine = maisi_rows(ldm.encoder, rows, num_samples, spacing=spacing, modality=modality, affine=affine,
                              model=f"the LDM {path}")

    scheduler = build_scheduler(trained.ldm.scheduler, kind, ldm.latent_shape)
    intensity = trained.data.intensity
    value_range = (intensity.b_min, intensity.b_max) if intensity.mode != "none" else None
    out = Path(out) if out is not None else path.parent.parent / "generated"
    log.info(
        "sampling %d volume(s) from %s (step %d, %s weights) with %s, %d steps, seed %d, scale factor %.6g%s%s -> %s",
        num_samples, path, state["step"], ldm.weights, kind, steps, seed, ldm.scale_factor,
        ", tiled decode" if sampling.tiled_decode else "",
        f", guidance {guidance:g}" if rows is not None else "", out,
    )
    records = [sample_record(index, seed, rows[index] if rows is not None else None, guidance, mask=mask)
               for index in range(num_samples)]
    described = rows is not None or mask is not None
    written = []
    mine = range(dist.rank, num_samples, dist.world_size)
    for index in tqdm(mine, desc="samples", dynamic_ncols=True, disable=len(mine) < 2 or not dist.is_main):
        generator = torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + index)
        denoiser, condition = ldm.unet, None
        if ldm.encoder is not None:  # without rows, the null condition: the LDM's unconditional model
            condition = ldm.encoder.encode(rows[index:index + 1], covariates=covariates) if rows is not None \
                else ldm.encoder.null(1)
        if condition is not None or controlnet is not None:
            denoiser = Denoiser(ldm.unet, condition.to(device) if condition is not None else None, guidance,
                                controlnet, control=control, control_scale=config.controlnet.conditioning_scale)
        volume = generate_volume(
            denoiser, ldm.autoencoder, scheduler=scheduler, kind=kind, latent_shape=ldm.latent_shape,
            scale_factor=ldm.scale_factor, sampling=sampling, num_steps=steps, value_range=value_range, device=device,
            generator=generator, precision=precision, progress=True,
        )
        record = records[index]
        nifti, _ = save_sample(volume[0], affine, out, record["file"][: -len(".nii.gz")], value_range=value_range,
                               title=f"seed {seed} #{index}",
                               description=sample_description(record) if described else None)
        written.append(nifti)
        log.info("wrote %s", nifti)
    if described and dist.is_main:
        write_manifest(out / MANIFEST, records, manifest_names(ldm.encoder, rows, covariates=covariates))
    barrier()
    return written


def checked_conditions(encoder: ConditionEncoder | None, conditions: Sequence[dict] | None,
                       where: Sequence[str] | None, guidance: float | None, *, num_samples: int | None,
                       default_guidance: float, dropout: float, model: str) -> tuple[list[dict] | None, float]:
    """The rows of conditions to sample with (None: unconditional) and the guidance scale, checked against what the
    LDM was trained with (``encoder``: its conditions; ``dropout``: its ``ldm.conditioning.dropout``; ``model``: how
    errors name it). ``guidance`` None takes ``default_guidance``.

    Raises:
        ValueError: guidance without conditions, conditions for an unconditional LDM, a count that is not
            ``num_samples``, unknown or missing names, values the encoder refuses, or guidance other than 1 from an
            LDM trained without condition dropout.
    """
    if conditions is None:
        if encoder is not None and encoder.modalities is not None:  # MAISI's UNet: guided towards the modality
            return None, _guidance(default_guidance if guidance is None else guidance, dropout, model)
        if guidance is not None:
            raise ValueError(f"--guidance {guidance:g} steers samples towards their conditions; give them with "
                             "--condition KEY=VALUE or --conditions TABLE.csv")
        if encoder is not None and encoder.names:
            get_logger().info("no conditions given: sampling the LDM's unconditional model (null condition)")
        return None, 1.0
    where = list(where) if where is not None else ["--condition"] * len(conditions)
    if encoder is None:
        raise ValueError(f"{where[0]}: {model} was trained without conditions (data.conditions was empty); "
                         f"sample it without --condition / --conditions")
    if num_samples is not None and num_samples != len(conditions):
        raise ValueError(f"{where[0]}: {len(conditions)} rows of conditions make {len(conditions)} samples, not "
                         f"--num-samples {num_samples}")
    for row, place in zip(conditions, where):
        unknown = sorted(set(row) - set(encoder.names))
        missing = [name for name in encoder.names if name not in row]
        if unknown or missing:
            raise ValueError(
                f"{place}: {model} was trained with conditions {encoder.names}; "
                + (f"{unknown} not among them" if unknown else "")
                + ("; " if unknown and missing else "")
                + (f"give {missing} too (every condition, or none for unconditional samples)" if missing else "")
            )
    if encoder.maisi is None:
        encoder.encode(conditions, where)  # every value checked before any sample is drawn (MAISI's: with its inputs)
    return list(conditions), _guidance(default_guidance if guidance is None else guidance, dropout, model)


def _guidance(guidance: float, dropout: float, model: str) -> float:
    """The guidance scale, refused above or below 1 for a UNet that never learnt the unconditional model."""
    if guidance != 1 and dropout == 0:
        raise ValueError(f"guidance {guidance:g} extrapolates from the unconditional model, but {model} was "
                         f"trained with ldm.conditioning.dropout 0 (it never learnt one); sample with guidance 1")
    return guidance


def maisi_rows(encoder: ConditionEncoder | None, rows: list[dict] | None, num_samples: int, *,
               spacing: Sequence[float] | None, modality: str | None, affine: torch.Tensor,
               model: str, options: Sequence[str] = ("--spacing", "--modality"),
               ) -> tuple[list[dict] | None, torch.Tensor]:
    """The rows of conditions with MAISI's UNet's own inputs added (the spacing, default the ``affine``'s; the
    modality, default the checkpoint's), and the affine the samples are written with (scaled to that spacing). Other
    UNets: the rows and affine as they are. ``sample`` and the bundle's sampler both call it.

    Args:
        encoder, rows, num_samples: the LDM's conditions, the checked rows (None: none given), the samples' count.
        spacing, modality: the values asked for (None: the defaults).
        affine: the affine the samples would be written with (the training data's, or the label map's).
        model, options: how errors name the LDM and the two settings.

    Raises:
        ValueError: a spacing or modality for a UNet that takes none (naming the option), or values MAISI's UNet
            cannot take (every row checked before any sample is drawn).
    """
    takes_spacing = encoder is not None and encoder.takes_spacing
    takes_modality = encoder is not None and encoder.modalities is not None
    for option, value, taken in zip(options, (spacing, modality), (takes_spacing, takes_modality)):
        if value is not None and not taken:
            raise ValueError(f"{option}: {model} has a UNet without that input (only MAISI's UNet, "
                             "ldm.unet.architecture 'maisi', takes a voxel spacing and a modality)")
    if encoder is None or encoder.maisi is None:
        return rows, affine
    inputs = {}
    if takes_spacing:
        given = [float(v) for v in spacing] if spacing is not None else voxel_spacing(affine).tolist()
        inputs[SPACING_KEY] = format_spacing(given)
        if spacing is not None:
            affine = with_spacing(affine, given)
    if takes_modality:
        inputs[MODALITY_KEY] = modality if modality is not None else encoder.maisi["modality"]
    given = rows is not None
    rows = [row | inputs for row in (rows if given else [{}] * num_samples)]
    encoder.encode(rows, covariates=given)  # every value checked before any sample is drawn
    return rows, affine


def manifest_names(encoder: ConditionEncoder | None, rows: list[dict] | None, *, covariates: bool) -> list[str]:
    """The condition columns of ``samples.csv``: what each row holds (the covariates where they were given;
    MAISI's spacing and modality), none without rows."""
    if rows is None or encoder is None:
        return []
    return [name for name in encoder.row_names if covariates or name not in encoder.names]


def with_spacing(affine: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """``affine`` with each axis' column scaled to ``spacing`` mm (directions and origin kept)."""
    affine = torch.as_tensor(affine, dtype=torch.float64).clone()
    dims = affine.shape[-1] - 1
    scale = torch.as_tensor(spacing, dtype=torch.float64) / voxel_spacing(affine)
    affine[:dims, :dims] *= scale[None, :]
    return affine


def _name_part(value) -> str:
    """A value as part of a file name: letters, digits, '.' and '-' kept, anything else '_'."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.\-]", "_", text)


def condition_dropout(state: dict) -> float:
    """The ``ldm.conditioning.dropout`` an LDM checkpoint was trained with, as its stored config says (0 where it
    predates the key: it was trained without dropout)."""
    return float(state["config"].get("ldm", {}).get("conditioning", {}).get("dropout", 0.0))


def sample_record(index: int, seed: int, row: dict | None, guidance: float, *, mask: Path | None) -> dict:
    """A sample's manifest row: its file name (from its seed, conditions and mask), index, seeds, guidance, mask and
    conditions. Unconditional samples keep the plain ``sample-NNN`` name."""
    parts = [f"sample-{index:03d}"]
    if row is not None or mask is not None:
        parts.append(f"seed{seed}")
    if row is not None:
        parts += [f"{_name_part(name)}-{_name_part(value)}" for name, value in row.items()]
    if mask is not None:
        parts.append(f"mask-{_name_part(Path(mask).name.split('.')[0])}")
    record = {"file": "_".join(parts) + ".nii.gz", "index": index, "seed": seed,
              "generator_seed": seed * SEED_STRIDE + index, "guidance": guidance if row is not None else "",
              "mask": os.fspath(Path(mask).absolute()) if mask is not None else ""}
    return record | ({f"{name}": value for name, value in row.items()} if row is not None else {})


def sample_description(record: dict) -> str:
    """The NIfTI header description of a sample: its conditions, guidance, seed (and mask)."""
    fixed = {"file", "index", "seed", "generator_seed", "guidance", "mask"}
    conditions = " ".join(f"{k}={_name_part(v) if not isinstance(v, str) else v}" for k, v in record.items()
                          if k not in fixed)
    text = f"{conditions} guidance={record['guidance']:g}" if conditions else ""
    text += f" seed={record['seed']}#{record['index']}"
    if record["mask"]:
        text += f" mask={Path(record['mask']).name}"
    return text.strip()


def write_manifest(path: Path, records: list[dict], names: list[str]) -> None:
    """``samples.csv``: one row per sample file, its seeds, guidance, mask and conditions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["file", "index", "seed", "generator_seed", "guidance", "mask", *names]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, path)
