"""The config as one training stage sees it: the settings a stage may have of its own, resolved.

The autoencoder, the LDM and the ControlNet stage can each set their own precision (``<stage>.training.mixed_precision``) and the
autoencoder its own volume size (``autoencoder.training.voxel_size``; the LDM trains and generates at
``data.voxel_size``). :func:`stage_config` writes a stage's values into ``device.mixed_precision`` and
``data.voxel_size``, so the code below a command (data loading, precision, the memory probe) reads one place
whatever the stage. :func:`step_config` goes one further for the memory probe: the spatial size of one training
batch, the autoencoder's patches when it trains on patches.
"""

from __future__ import annotations

from typing import Literal

from monai_diffusion.config.schema import Config

Stage = Literal["autoencoder", "ldm", "controlnet"]

__all__ = ["Stage", "stage_config", "step_config"]


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
