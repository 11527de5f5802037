"""Cross-field rules: checked on the typed config before any data is loaded or model built.

Each rule names every key it involves, so a user knows which line of the YAML to change. Most rules hold for any
config, a finished run's stored one included (it is read again to rebuild the run's networks). A few only say
whether a config can run: they apply to the config a command is given (``to_run``), not to a stored one, so a
checkpoint written before such a rule existed keeps loading.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence

from pydantic import BaseModel

from monai_diffusion.config.schema import (
    AUTOENCODER_MAISI_ONLY,
    AUTOENCODER_OURS_ONLY,
    MAISI_MODALITIES,
    UNET_MAISI_ONLY,
    Config,
    TrainingConfig,
)
from monai_diffusion.config.stages import downsampling, stage_config


# ldm.scheduler keys only MONAI's RFlowScheduler reads.
RFLOW_ONLY = (
    "use_discrete_timesteps", "sample_method", "loc", "scale", "use_timestep_transform", "transform_scale",
    "base_img_size_numel",
)


def check_rules(config: Config, to_run: bool = False) -> list[str]:
    """Return every broken cross-field rule as 'key(s): what is wrong, what was expected'.

    Args:
        config: the config.
        to_run: the config is about to run (a command's ``--config`` and ``--set``): add the rules a run needs,
            which the stored config of a finished run need not meet (a discriminator too deep for the autoencoder's
            training size: :func:`_check_discriminator`).
    """
    problems: list[str] = []
    data, ae, ldm = config.data, config.autoencoder, config.ldm
    spatial_dims = len(data.voxel_size)
    if spatial_dims not in (2, 3):
        problems.append(f"data.voxel_size: expected 3 sizes (or 2 for 2D), got {data.voxel_size}")
    if any(s < 1 for s in data.voxel_size):
        problems.append(f"data.voxel_size: sizes must be >= 1, got {data.voxel_size}")
    if data.spacing is not None and len(data.spacing) != spatial_dims:
        problems.append(f"data.spacing: expected {spatial_dims} values like data.voxel_size, got {data.spacing}")
    if data.source == "folder" and data.data_dir is None:
        problems.append("data.data_dir: required when data.source is 'folder'")
    if data.source == "datalist" and data.datalist is None:
        problems.append("data.datalist: required when data.source is 'datalist'")
    if data.intensity.mode == "percentile" and not 0 <= data.intensity.lower < data.intensity.upper <= 100:
        problems.append(
            "data.intensity.lower/upper: percentiles need 0 <= lower < upper <= 100, "
            f"got {data.intensity.lower} and {data.intensity.upper}"
        )
    if data.intensity.mode == "range" and not data.intensity.lower < data.intensity.upper:
        problems.append(f"data.intensity.lower/upper: need lower < upper, got {data.intensity.lower}, {data.intensity.upper}")

    # ---- autoencoder architecture
    num_levels = len(ae.num_channels)
    if num_levels < 1:
        problems.append("autoencoder.num_channels: needs at least one level")
    bad = [c for c in ae.num_channels if c % ae.norm_num_groups]
    if bad:
        problems.append(
            f"autoencoder.num_channels / autoencoder.norm_num_groups: every channel count must be divisible "
            f"by norm_num_groups={ae.norm_num_groups}; {bad} are not"
        )
    if ae.attention_levels is not None and len(ae.attention_levels) != num_levels:
        problems.append(
            f"autoencoder.attention_levels: expected {num_levels} entries (one per autoencoder.num_channels), "
            f"got {len(ae.attention_levels)}"
        )
    if isinstance(ae.num_res_blocks, list) and len(ae.num_res_blocks) != num_levels:
        problems.append(
            f"autoencoder.num_res_blocks: expected an int or {num_levels} entries, got {len(ae.num_res_blocks)}"
        )
    try:
        factors = downsampling(config)
    except ValueError:
        factors = None
        problems.append(
            f"autoencoder.downsample_factors: expected {num_levels - 1} entries (len(num_channels) - 1 = "
            f"{num_levels} - 1), each an int >= 1 or a list of {spatial_dims} ints >= 1; got {ae.downsample_factors}"
        )
    if factors is not None and spatial_dims in (2, 3):
        factor = factors.total
        # Every size a stage works at: the LDM's (data.voxel_size), the autoencoder's own and its patches.
        for key, size in _stage_sizes(config):
            if key != "data.voxel_size" and (len(size) != spatial_dims or any(s < 1 for s in size)):
                problems.append(f"{key}: expected {spatial_dims} sizes >= 1 like data.voxel_size, got {size}")
                continue
            for axis, (s, f) in enumerate(zip(size, factor)):
                if s % f:
                    problems.append(
                        f"{key} / autoencoder.downsample_factors: axis {axis} size {s} is not divisible "
                        f"by the total factor {f} on that axis (nearest valid sizes: {s // f * f or f}, "
                        f"{(s // f + 1) * f})"
                    )
        if ae.training.patch_size is None and ae.training.patch_foreground_ratio is not None:
            problems.append("autoencoder.training.patch_foreground_ratio: needs autoencoder.training.patch_size "
                            "(it weights where patches are cut)")
        if ae.training.patch_foreground_ratio is None and ae.training.patch_foreground_threshold is not None:
            problems.append("autoencoder.training.patch_foreground_threshold: only read with "
                            "autoencoder.training.patch_foreground_ratio")
        patch, volume = ae.training.patch_size, ae.training.voxel_size or data.voxel_size
        if patch is not None and len(patch) == len(volume) and any(p > v for p, v in zip(patch, volume)):
            problems.append(
                f"autoencoder.training.patch_size: {patch} does not fit in the autoencoder's volume {volume} "
                f"({'autoencoder.training.voxel_size' if ae.training.voxel_size else 'data.voxel_size'})"
            )
        if not any(p.startswith("data.voxel_size /") for p in problems):
            latent = list(factors.latent_shape(data.voxel_size))
            problems += _check_unet(config, latent)

    # ---- training bounds and schedules
    for name, section in (("autoencoder.training", ae.training), ("ldm.training", ldm.training),
                          ("controlnet.training", config.controlnet.training)):
        if section.max_epochs is None and section.max_steps is None:
            problems.append(f"{name}.max_epochs / {name}.max_steps: set at least one bound")
        problems += _check_lr_schedule(name, section)
        if section.init_checkpoint is None and _changed(section, ["init_strict"]):
            problems.append(f"{name}.init_strict: only read with {name}.init_checkpoint")
    if config.controlnet.training.scale_factor is not None:
        problems.append("controlnet.training.scale_factor: not read, the ControlNet scales latents by its LDM's factor "
                        "(set ldm.training.scale_factor when training the LDM)")
    t = ae.training
    if t.use_perceptual_loss and t.perceptual_weight == 0:
        problems.append("autoencoder.training.perceptual_weight: is 0 while use_perceptual_loss is true")
    if t.perceptual_network != "resnet50":
        for key in _changed(t, ["perceptual_pretrained_path", "perceptual_state_dict_key"]):
            problems.append(
                f"autoencoder.training.{key}: only read for perceptual_network 'resnet50' (MONAI's pretrained_path), "
                f"not '{t.perceptual_network}'"
            )
    if t.disc_steps_per_generator_step > 1 and t.gradient_accumulation_steps > 1:
        problems.append(
            f"autoencoder.training.disc_steps_per_generator_step / gradient_accumulation_steps: "
            f"{t.disc_steps_per_generator_step} discriminator steps per generator step train on one batch, so "
            f"they need gradient_accumulation_steps 1, got {t.gradient_accumulation_steps}"
        )
    if to_run:
        problems += _check_discriminator(config)
    problems += _check_channels(config)
    problems += _check_maisi_autoencoder(config, factors.total if factors is not None else None)
    problems += _check_maisi_unet(config)

    # ---- diffusion
    sched = ldm.scheduler
    if sched.type != "rflow":
        for key in _changed(sched, RFLOW_ONLY):
            problems.append(f"ldm.scheduler.{key}: applies to rectified flow only, ldm.scheduler.type is '{sched.type}'")
    if sched.type != "rflow" and sched.beta_start >= sched.beta_end:
        problems.append(f"ldm.scheduler.beta_start / beta_end: need beta_start < beta_end, got {sched.beta_start}, {sched.beta_end}")
    sampler = ldm.sampling.scheduler or sched.type
    if (sampler == "rflow") != (sched.type == "rflow"):
        problems.append(
            f"ldm.sampling.scheduler / ldm.scheduler.type: a model trained with '{sched.type}' cannot sample "
            f"with '{sampler}' (rectified flow predicts velocity, DDPM/DDIM predict noise)"
        )
    if not config.device.compile and _changed(config.device, ["compile_mode"]):
        problems.append(f"device.compile_mode: only read with device.compile true ('{config.device.compile_mode}' "
                        "has no effect)")
    if ldm.sampling.tile_size is not None and len(ldm.sampling.tile_size) != spatial_dims:
        problems.append(f"ldm.sampling.tile_size: expected {spatial_dims} sizes, got {ldm.sampling.tile_size}")
    problems += _check_conditions(config)
    if data.mask_key is not None and factors is not None and spatial_dims in (2, 3):
        problems += _check_controlnet(config, factors.total)
    problems += _check_loggers(config, to_run)
    return problems


# What output.loggers 'mlflow' needs, and the command that installs it.
MLFLOW_INSTALL = "pip install 'monai-diffusion[mlflow]' (or: pip install mlflow-skinny)"


def _check_loggers(config: Config, to_run: bool) -> list[str]:
    """``output.loggers``: each logger once, the MLflow keys only with 'mlflow', and (for a config about to run)
    the mlflow package installed, so a run does not fail after its setup."""
    output, problems = config.output, []
    repeated = sorted({name for name in output.loggers if output.loggers.count(name) > 1})
    if repeated:
        problems.append(f"output.loggers: {', '.join(map(repr, repeated))} listed more than once")
    if "mlflow" not in output.loggers:
        for key in _changed(output, ["mlflow_tracking_uri", "mlflow_experiment_name"]):
            problems.append(f"output.{key}: only read with 'mlflow' in output.loggers, got {output.loggers}")
    elif to_run and importlib.util.find_spec("mlflow") is None:
        problems.append(f"output.loggers: 'mlflow' needs the mlflow package, which is not installed: {MLFLOW_INSTALL}")
    return problems


def _check_conditions(config: Config) -> list[str]:
    """Covariates need a source whose entries carry fields; names, vocabularies and guidance must make sense."""
    data, conditioning, problems = config.data, config.ldm.conditioning, []
    fields = [c.name for c in data.conditions] + ([data.mask_key] if data.mask_key is not None else [])
    for what, present in (("data.conditions", bool(data.conditions)), ("data.mask_key", data.mask_key is not None)):
        if present and data.source == "folder":
            problems.append(f"{what} / data.source: a folder's volumes carry no fields; use data.source 'datalist' "
                            "(JSON keys or CSV columns)")
        if present and data.source == "demo" and not data.demo.conditional:
            problems.append(f"{what} / data.demo.conditional: the plain demo set has no covariates or label maps; "
                            "set data.demo.conditional: true (fields brain_scale and label)")
    repeated = sorted({name for name in fields if fields.count(name) > 1})
    if repeated:
        problems.append(f"data.conditions / data.mask_key: each field once, {repeated} repeated")
    for index, condition in enumerate(data.conditions):
        key = f"data.conditions[{index}]"
        if condition.name in ("image", "split") or not condition.name.strip():
            problems.append(f"{key}.name: {condition.name!r} is not a covariate field ('image' and 'split' are taken)")
        if condition.categories is not None and condition.type == "continuous":
            problems.append(f"{key}.categories: only read for type 'categorical', {condition.name!r} is continuous")
        if condition.categories is not None and (not condition.categories
                                                 or len(set(condition.categories)) != len(condition.categories)):
            problems.append(f"{key}.categories: expected distinct labels, got {condition.categories}")
    guidance = config.ldm.sampling.guidance_scale
    unet = config.ldm.unet
    modality = unet.architecture == "maisi" and unet.num_class_embeds is not None
    if guidance != 1 and (data.conditions or modality) and conditioning.dropout == 0:
        problems.append(
            f"ldm.sampling.guidance_scale / ldm.conditioning.dropout: guidance {guidance} extrapolates from the "
            "unconditional model, which a UNet trained with dropout 0 never learnt; train with dropout > 0 "
            "(e.g. 0.1) or sample with guidance 1"
        )
    return problems


def _check_controlnet(config: Config, factor: tuple[int, ...]) -> list[str]:
    """The ControlNet's conditioning embedding halves the mask ``len - 1`` times down to the latent: the mask is
    pooled from the image grid by the rest of the autoencoder's factor, which must be whole on every axis."""
    channels = config.controlnet.conditioning_embedding_num_channels
    if not channels or any(c < 1 for c in channels):
        return [f"controlnet.conditioning_embedding_num_channels: expected channels >= 1, got {channels}"]
    halvings = 2 ** (len(channels) - 1)
    bad = [f for f in factor if f % halvings]
    if bad:
        return [
            f"controlnet.conditioning_embedding_num_channels / autoencoder.downsample_factors: {len(channels)} "
            f"entries halve the mask {len(channels) - 1} time(s) (x{halvings}), which must divide the total factor "
            f"{list(factor)} on every axis; use {int(math.log2(_largest_power_of_two(factor))) + 1} entries or fewer"
        ]
    return []


def _largest_power_of_two(factor: Sequence[int]) -> int:
    """The largest power of two dividing every entry of ``factor``."""
    power = 1
    while all(f % (power * 2) == 0 for f in factor):
        power *= 2
    return power


def _stage_sizes(config: Config) -> list[tuple[str, list[int]]]:
    """(key, size) of every volume size a stage trains or validates at, named by the key that sets it."""
    t = config.autoencoder.training
    sizes = [("data.voxel_size", config.data.voxel_size)]
    if t.voxel_size is not None:
        sizes.append(("autoencoder.training.voxel_size", t.voxel_size))
    if t.patch_size is not None:
        sizes.append(("autoencoder.training.patch_size", t.patch_size))
    return sizes


def discriminator_min_size(num_layers: int) -> int:
    """The smallest axis MONAI's PatchDiscriminator (kernel 4, padding 1) trains on with ``num_layers`` layers.

    Its first convolution and all but the last of its ``num_layers`` normalised layers have stride 2 (each takes an
    axis of n to n // 2), the last normalised layer and the output convolution stride 1 (each takes n to n - 1). So
    an axis needs 3 voxels after the ``num_layers`` halvings: the last normalised layer leaves 2 of them (its
    instance norm needs more than one element, the output convolution a padded input of 4), the output 1. An axis
    of n fits ``num_layers`` when ``n >= 3 * 2**num_layers`` (16^3 fits 2 layers, 24^3 and 32^3 fit 3, 48^3 fits 4).
    """
    return 3 * 2**num_layers


def _check_discriminator(config: Config) -> list[str]:
    """The patch discriminator must fit the size the autoencoder trains at (its patches, or its volume), or the
    first adversarial step fails inside PyTorch without naming a setting.

    A rule to run: the stored config of an LDM or ControlNet run may carry a discriminator that never trained at
    its size (its autoencoder trained with another config), and must keep loading."""
    t, spatial_dims = config.autoencoder.training, len(config.data.voxel_size)
    if t.adv_weight == 0:
        return []
    if t.patch_size is not None:
        key, size = "autoencoder.training.patch_size", t.patch_size
    elif t.voxel_size is not None:
        key, size = "autoencoder.training.voxel_size", t.voxel_size
    else:
        key, size = "data.voxel_size", config.data.voxel_size
    if spatial_dims not in (2, 3) or len(size) != spatial_dims or any(s < 1 for s in size):
        return []  # reported with the size's own key
    need = discriminator_min_size(t.disc_num_layers)
    if min(size) >= need:
        return []
    depth = 0
    while min(size) >= discriminator_min_size(depth + 1):
        depth += 1
    fix = (f"the largest depth that fits is {depth}" if depth
           else "no depth fits: set autoencoder.training.adv_weight to 0")
    return [
        f"autoencoder.training.disc_num_layers / {key}: a {t.disc_num_layers}-layer patch discriminator needs every "
        f"axis >= {need} (3 x 2^{t.disc_num_layers}), and the autoencoder trains at {'x'.join(map(str, size))}; "
        f"{fix} (or train on a larger size)"
    ]


def _check_lr_schedule(name: str, t: TrainingConfig) -> list[str]:
    """The LR schedule of a training section: what it needs to know where it ends, and keys it does not read."""
    problems = []
    per_epoch = t.lr_schedule_interval == "epoch"
    if t.lr_schedule == "cosine" and not per_epoch and t.max_steps is None:
        problems.append(f"{name}.lr_schedule: 'cosine' needs {name}.max_steps to know where it ends")
    if t.lr_schedule == "cosine" and not per_epoch and t.max_steps is not None and t.warmup_steps >= t.max_steps:
        problems.append(
            f"{name}.warmup_steps / {name}.max_steps: 'cosine' decays after the warm-up, so warmup_steps "
            f"({t.warmup_steps}) must be below max_steps ({t.max_steps})"
        )
    if t.lr_schedule == "cosine" and per_epoch and t.max_epochs is None:
        problems.append(f"{name}.lr_schedule: 'cosine' per epoch needs {name}.max_epochs to know where it ends")
    if t.lr_schedule in ("multistep", "polynomial") and t.warmup_steps:
        problems.append(
            f"{name}.warmup_steps / {name}.lr_schedule: '{t.lr_schedule}' is PyTorch's "
            f"{'MultiStepLR' if t.lr_schedule == 'multistep' else 'PolynomialLR'} without warm-up; set warmup_steps "
            f"to 0 (got {t.warmup_steps}) or use 'constant' / 'cosine'"
        )
    if t.lr_schedule == "multistep":
        milestones = t.lr_milestones
        if not milestones or milestones[0] < 1 or any(a >= b for a, b in zip(milestones, milestones[1:])):
            problems.append(f"{name}.lr_milestones: 'multistep' needs increasing milestones >= 1, got {milestones}")
    for key, schedule in (("lr_milestones", "multistep"), ("lr_gamma", "multistep"), ("lr_power", "polynomial")):
        if t.lr_schedule != schedule and _changed(t, [key]):
            problems.append(f"{name}.{key}: only read by lr_schedule '{schedule}', not '{t.lr_schedule}'")
    return problems


def _changed(section: BaseModel, keys: Iterable[str]) -> list[str]:
    """The ``keys`` of ``section`` whose value differs from the schema's default (sorted).

    Compared with the default, not with what the YAML spelt out: a saved run config lists every key.
    """
    fields = type(section).model_fields
    return sorted(key for key in keys if getattr(section, key) != fields[key].get_default(call_default_factory=True))


def _check_channels(config: Config) -> list[str]:
    """Channel selection against the autoencoder's input, and one output range for every intensity class."""
    data, problems = config.data, []
    if data.channel is not None:
        kept = [data.channel] if isinstance(data.channel, int) else data.channel
        if not kept or len(set(kept)) != len(kept):
            problems.append(f"data.channel: expected an index or a list of distinct indices, got {data.channel}")
        elif len(kept) != config.autoencoder.in_channels:
            problems.append(
                f"data.channel / autoencoder.in_channels: data.channel keeps {len(kept)} channel(s) {kept}, but "
                f"autoencoder.in_channels is {config.autoencoder.in_channels}"
            )
    for name, intensity in data.intensity_by_class.items():
        key = f"data.intensity_by_class.{name}"
        if (intensity.b_min, intensity.b_max) != (data.intensity.b_min, data.intensity.b_max):
            problems.append(
                f"{key}.b_min/b_max: every class keeps data.intensity's output range "
                f"[{data.intensity.b_min}, {data.intensity.b_max}], got [{intensity.b_min}, {intensity.b_max}]"
            )
        if intensity.mode == "percentile" and not 0 <= intensity.lower < intensity.upper <= 100:
            problems.append(f"{key}.lower/upper: percentiles need 0 <= lower < upper <= 100, got "
                            f"{intensity.lower} and {intensity.upper}")
        if intensity.mode == "range" and not intensity.lower < intensity.upper:
            problems.append(f"{key}.lower/upper: need lower < upper, got {intensity.lower}, {intensity.upper}")
    return problems


def _check_unet(config: Config, latent: list[int]) -> list[str]:
    """The diffusion UNet halves the latent at every level but the last: each level must divide it."""
    unet = config.ldm.unet
    problems = []
    levels = len(unet.num_channels)
    if len(unet.attention_levels) != levels:
        problems.append(
            f"ldm.unet.attention_levels: expected {levels} entries (one per ldm.unet.num_channels), "
            f"got {len(unet.attention_levels)}"
        )
    if isinstance(unet.num_res_blocks, list) and len(unet.num_res_blocks) != levels:
        problems.append(f"ldm.unet.num_res_blocks: expected an int or {levels} entries")
    if isinstance(unet.num_head_channels, list) and len(unet.num_head_channels) != levels:
        problems.append(f"ldm.unet.num_head_channels: expected an int or {levels} entries")
    bad = [c for c in unet.num_channels if c % unet.norm_num_groups]
    if bad:
        problems.append(
            f"ldm.unet.num_channels / ldm.unet.norm_num_groups: channels {bad} are not divisible by "
            f"{unet.norm_num_groups}"
        )
    heads = unet.num_head_channels if isinstance(unet.num_head_channels, list) else [unet.num_head_channels] * levels
    for level, (ch, head, attn) in enumerate(zip(unet.num_channels, heads, unet.attention_levels)):
        if attn and (head < 1 or ch % head):
            problems.append(
                f"ldm.unet.num_head_channels: level {level} has {ch} channels, not divisible by {head} head channels"
            )
    need = 2 ** (levels - 1)
    for axis, size in enumerate(latent):
        if size % need:
            problems.append(
                f"ldm.unet.num_channels: the latent is {latent} and a {levels}-level UNet needs every axis "
                f"divisible by {need}; axis {axis} ({size}) is not. Use fewer UNet levels, a larger "
                f"data.voxel_size or smaller autoencoder.downsample_factors"
            )
    return problems


# MAISI's convolutions cut their input into num_splits slabs along dim_split that overlap by up to 4 voxels: every slab
# must hold at least this many, and the axis must divide evenly (else the output loses the remainder).
MIN_SPLIT_VOXELS = 4


def _check_maisi_autoencoder(config: Config, factor: tuple[int, ...] | None) -> list[str]:
    """The keys of one autoencoder architecture refused with the other; MAISI's: 3D, float16 GroupNorm under fp16
    autocast, slabs of num_splits that fit every size the autoencoder runs at."""
    ae, problems = config.autoencoder, []
    if ae.architecture == "ours":
        return [f"autoencoder.{key}: applies to architecture 'maisi' (MAISI's AutoencoderKlMaisi), "
                f"autoencoder.architecture is 'ours'" for key in _changed(ae, AUTOENCODER_MAISI_ONLY)]
    for key in _changed(ae, AUTOENCODER_OURS_ONLY):
        problems.append(f"autoencoder.{key}: applies to architecture 'ours'; MAISI's AutoencoderKlMaisi "
                        f"(autoencoder.architecture 'maisi') halves every axis at each level but the last "
                        f"({2 ** max(len(ae.num_channels) - 1, 0)}x for {len(ae.num_channels)} levels)")
    spatial_dims = len(config.data.voxel_size)
    if spatial_dims != 3:
        problems.append(f"autoencoder.architecture: 'maisi' is 3D only (MAISI's GroupNorm takes 5D tensors); "
                        f"data.voxel_size has {spatial_dims} sizes")
    if ae.norm_float16:
        for stage, key in (("autoencoder", "autoencoder.training"), ("ldm", "ldm.training"),
                           ("controlnet", "controlnet.training")):
            value = stage_config(config, stage).device.mixed_precision
            if value == "fp16" or (value is True and config.device.device != "cpu"):
                continue
            problems.append(
                f"autoencoder.norm_float16 / {key}.mixed_precision (or device.mixed_precision): MAISI's float16 "
                f"GroupNorm outputs need fp16 autocast wherever the autoencoder runs; the {stage} stage runs "
                f"{value!r}{' on the CPU (bf16)' if value is True else ''}: set it to fp16, or norm_float16 to false"
            )
    if ae.num_splits > 1 and factor is not None and spatial_dims == 3:
        problems += _check_splits(config, factor)
    return problems


def _check_splits(config: Config, factor: tuple[int, ...]) -> list[str]:
    """Every size MAISI's autoencoder runs at (the stages' volumes, patches and decode windows), at each of its
    levels, along dim_split: divisible by num_splits into slabs of at least MIN_SPLIT_VOXELS."""
    ae, problems = config.autoencoder, []
    axis, splits, levels = ae.dim_split, ae.num_splits, len(ae.num_channels)
    sizes = [(key, size[axis]) for key, size in _stage_sizes(config) if len(size) == 3]
    sampling = config.ldm.sampling
    if sampling.tiled_decode and not any(config.data.voxel_size[a] % factor[a] for a in range(3)):
        latent = config.data.voxel_size[axis] // factor[axis]
        tile = sampling.tile_size[axis] if sampling.tile_size is not None else math.ceil(latent / 2)
        sizes.append(("ldm.sampling.tile_size", min(tile, latent) * factor[axis]))
    need = splits * MIN_SPLIT_VOXELS
    for key, size in sizes:
        level_sizes = [size // 2**level for level in range(levels)]
        if any(s % splits or s < need for s in level_sizes):
            problems.append(
                f"autoencoder.num_splits / autoencoder.dim_split / {key}: {splits} slabs along axis {axis} need that "
                f"axis divisible by {splits} into >= {MIN_SPLIT_VOXELS} voxels at every level, i.e. a multiple of "
                f"{splits * 2 ** (levels - 1)} and >= {need * 2 ** (levels - 1)} (got {size}; levels "
                f"{level_sizes}); use fewer splits or another dim_split"
            )
    return problems


def _check_maisi_unet(config: Config) -> list[str]:
    """The keys of MAISI's UNet refused with MONAI's; MAISI's: 3D (its spacing input has 3 values), one source of
    each volume's modality, a name of MAISI's vocabulary, and its class embedding kept for the modality."""
    unet, data, problems = config.ldm.unet, config.data, []
    if unet.architecture == "monai":
        return [f"ldm.unet.{key}: applies to architecture 'maisi' (MAISI's DiffusionModelUNetMaisi), "
                f"ldm.unet.architecture is 'monai'" for key in _changed(unet, UNET_MAISI_ONLY)]
    if len(data.voxel_size) != 3:
        problems.append(f"ldm.unet.architecture: 'maisi' is 3D only (its spacing input takes 3 values); "
                        f"data.voxel_size has {len(data.voxel_size)} sizes")
    if unet.num_class_embeds is None:
        problems += [f"ldm.unet.{key}: only read with ldm.unet.num_class_embeds (MAISI's modality embedding), which "
                     "is null" for key in ("modality", "modality_key") if getattr(unet, key) is not None]
        return problems
    if (unet.modality is None) == (unet.modality_key is None):
        problems.append(
            "ldm.unet.modality / ldm.unet.modality_key: MAISI's UNet takes each volume's modality (num_class_embeds "
            f"{unet.num_class_embeds}); set " + ("one of them, e.g. modality: ct" if unet.modality is None
                                                 else "one of them, not both")
        )
    if unet.modality is not None:
        code = MAISI_MODALITIES.get(unet.modality)
        if code is None:
            problems.append(f"ldm.unet.modality: {unet.modality!r} is not in MAISI's modality vocabulary "
                            f"({', '.join(MAISI_MODALITIES)})")
        elif code >= unet.num_class_embeds:
            problems.append(f"ldm.unet.modality / ldm.unet.num_class_embeds: '{unet.modality}' is class {code}, "
                            f"outside an embedding of {unet.num_class_embeds} classes")
    if unet.modality_key is not None:
        if data.source != "datalist":
            problems.append(f"ldm.unet.modality_key / data.source: only a datalist's entries carry a modality field, "
                            f"data.source is '{data.source}'; use ldm.unet.modality for one modality")
        taken = {"image", "split"} | {c.name for c in data.conditions}
        if unet.modality_key in taken or not unet.modality_key.strip():
            problems.append(f"ldm.unet.modality_key: {unet.modality_key!r} is not a free datalist field ('image', "
                            "'split' and the data.conditions names are taken)")
    if config.ldm.conditioning.categorical_via == "class_embedding" and any(
            c.type == "categorical" for c in data.conditions):
        problems.append("ldm.conditioning.categorical_via / ldm.unet.architecture: MAISI's UNet's class embedding "
                        "holds the modality; its categorical data.conditions go through 'cross_attention'")
    return problems
