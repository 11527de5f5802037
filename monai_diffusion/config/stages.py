"""The config as one training stage sees it: the settings a stage may have of its own, resolved.

The autoencoder, the LDM and the ControlNet stage can each set their own precision (``<stage>.training.mixed_precision``) and the
autoencoder its own volume size (``autoencoder.training.voxel_size``; the LDM trains and generates at
``data.voxel_size``). :func:`stage_config` writes a stage's values into ``device.mixed_precision`` and
``data.voxel_size``, so the code below a command (data loading, precision, the memory probe) reads one place
whatever the stage. :func:`step_config` goes one further for the memory probe: the spatial size of one training
batch, the autoencoder's patches when it trains on patches.

:func:`downsampling` is the config's autoencoder downsampling worked out once: its factors per level (``None`` means 2
on every axis at every level), per axis, in total, and the latent shape of a volume. The rules, the memory probe,
the planner and the benchmark read it from here, without torch (the arithmetic is :mod:`monai_diffusion.factors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from monai_diffusion import factors as factor_math
from monai_diffusion.config.schema import Config, Factor

Stage = Literal["autoencoder", "ldm", "controlnet"]

__all__ = ["Downsampling", "Stage", "downsampling", "stage_config", "step_config"]


@dataclass(frozen=True)
class Downsampling:
    """A config's autoencoder downsampling (see :func:`downsampling`).

    Attributes:
        factors: one entry per level as ``autoencoder.downsample_factors`` spells it (an int, or one int per axis),
            ``None`` written out as 2 at every level: e.g. ``[2, 2]``, ``[4, 2]``, ``[[8, 8, 4], 2]``.
        per_axis: one tuple of factors per level, one factor per axis.
        total: the overall factor per axis (the product over the levels).
    """

    factors: list[Factor]
    per_axis: tuple[tuple[int, ...], ...]
    total: tuple[int, ...]

    def latent_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        """The spatial latent shape of a volume of ``size`` (e.g. ``config.data.voxel_size``: the LDM's latent).

        Raises:
            ValueError: ``size`` has another number of axes, or a size is not divisible by its axis' total factor.
        """
        return factor_math.latent_shape(size, self.total)


def downsampling(config: Config) -> Downsampling:
    """The downsampling of ``config``'s autoencoder: ``len(autoencoder.num_channels) - 1`` levels of
    ``autoencoder.downsample_factors`` over the axes of ``data.voxel_size``.

    Raises:
        ValueError: the factors do not fit the levels or the axes, or one is not an integer >= 1 (the rules report it
            with the keys to change).
    """
    ae, spatial_dims = config.autoencoder, len(config.data.voxel_size)
    num_levels = max(len(ae.num_channels) - 1, 0)
    per_axis = factor_math.per_axis_factors(ae.downsample_factors, num_levels, spatial_dims)
    given = ae.downsample_factors if ae.downsample_factors is not None else [2] * num_levels
    spelt = [list(entry) if isinstance(entry, list) else entry for entry in given]  # a copy: the config stays its own
    return Downsampling(spelt, per_axis, factor_math.total_factor(per_axis, spatial_dims))


def stage_config(config: Config, stage: Stage) -> Config:
    """A copy of ``config`` with ``data.voxel_size`` and ``device.mixed_precision`` set to ``stage``'s own values
    where it has them; the stage's own keys are then cleared, so the copy says it through the shared keys alone
    (code that changes ``data.voxel_size`` afterwards, like the memory planner's probes, is not overruled, and
    applying it again changes nothing).

    Raises:
        ValueError: an unknown stage.
    """
    if stage not in ("autoencoder", "ldm", "controlnet"):
        raise ValueError(f"stage must be 'autoencoder', 'ldm' or 'controlnet', got {stage!r}")
    resolved = config.model_copy(deep=True)
    training = {"autoencoder": resolved.autoencoder.training, "ldm": resolved.ldm.training,
                "controlnet": resolved.controlnet.training}[stage]
    if training.mixed_precision is not None:
        resolved.device.mixed_precision = training.mixed_precision
        training.mixed_precision = None
    if stage == "autoencoder" and training.voxel_size is not None:
        resolved.data.voxel_size = list(training.voxel_size)
        training.voxel_size = None
    return resolved


def step_config(config: Config, stage: Stage) -> Config:
    """:func:`stage_config` whose ``data.voxel_size`` is the spatial size of one training batch: the autoencoder's
    ``patch_size`` when it trains on patches (then cleared), the stage's volume otherwise."""
    resolved = stage_config(config, stage)
    patch = resolved.autoencoder.training.patch_size
    if stage == "autoencoder" and patch is not None:
        resolved.data.voxel_size = list(patch)
        resolved.autoencoder.training.patch_size = None
    return resolved
