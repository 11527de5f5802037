"""Cross-field rules: checked on the typed config before any data is loaded or model built.

Each rule names every key it involves, so a user knows which line of the YAML to change.
"""

from __future__ import annotations

from monai_diffusion.config.schema import Config
from monai_diffusion.factors import latent_shape, per_axis_factors, total_factor


def check_rules(config: Config) -> list[str]:
    """Return every broken cross-field rule as 'key(s): what is wrong, what was expected'."""
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
        levels = per_axis_factors(ae.downsample_factors, max(num_levels - 1, 0), spatial_dims)
    except ValueError:
        levels = None
        problems.append(
            f"autoencoder.downsample_factors: expected {num_levels - 1} entries (len(num_channels) - 1 = "
            f"{num_levels} - 1), each an int >= 1 or a list of {spatial_dims} ints >= 1; got {ae.downsample_factors}"
        )
    if levels is not None and spatial_dims in (2, 3):
        factor = total_factor(levels, spatial_dims)
        for axis, (size, f) in enumerate(zip(data.voxel_size, factor)):
            if size % f:
                problems.append(
                    f"data.voxel_size / autoencoder.downsample_factors: axis {axis} size {size} is not divisible "
                    f"by the total factor {f} on that axis (nearest valid sizes: {size // f * f or f}, "
                    f"{(size // f + 1) * f})"
                )
        if not any(p.startswith("data.voxel_size /") for p in problems):
            latent = list(latent_shape(data.voxel_size, factor))
            problems += _check_unet(config, latent)

    # ---- training bounds and schedules
    for name, section in (("autoencoder.training", ae.training), ("ldm.training", ldm.training)):
        if section.max_epochs is None and section.max_steps is None:
            problems.append(f"{name}.max_epochs / {name}.max_steps: set at least one bound")
        if section.lr_schedule == "cosine" and section.max_steps is None:
            problems.append(f"{name}.lr_schedule: 'cosine' needs {name}.max_steps to know where it ends")
    t = ae.training
    if t.use_perceptual_loss and t.perceptual_weight == 0:
        problems.append("autoencoder.training.perceptual_weight: is 0 while use_perceptual_loss is true")

    # ---- diffusion
    sched = ldm.scheduler
    if sched.type != "rflow" and sched.beta_start >= sched.beta_end:
        problems.append(f"ldm.scheduler.beta_start / beta_end: need beta_start < beta_end, got {sched.beta_start}, {sched.beta_end}")
    sampler = ldm.sampling.scheduler or sched.type
    if (sampler == "rflow") != (sched.type == "rflow"):
        problems.append(
            f"ldm.sampling.scheduler / ldm.scheduler.type: a model trained with '{sched.type}' cannot sample "
            f"with '{sampler}' (rectified flow predicts velocity, DDPM/DDIM predict noise)"
        )
    if ldm.sampling.tile_size is not None and len(ldm.sampling.tile_size) != spatial_dims:
        problems.append(f"ldm.sampling.tile_size: expected {spatial_dims} sizes, got {ldm.sampling.tile_size}")
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
