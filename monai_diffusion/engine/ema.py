"""Exponential moving average of model weights, via ``torch.optim.swa_utils.AveragedModel``."""

from __future__ import annotations

import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from monai_diffusion.engine.distributed import unwrap

__all__ = ["build_ema", "ema_weights"]


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model``: ``ema = decay * ema + (1 - decay) * model`` per update.

    Usage: call ``ema.update_parameters(model)`` after every optimizer step that actually
    stepped (``StepResult.stepped``); sample with ``ema.module``; checkpoint ``ema.state_dict()``
    (it includes the update count ``n_averaged``), or ``ema.module.state_dict()`` for weights a
    bare model loads.

    Notes:
        - AveragedModel's first ``update_parameters`` copies the model's weights (no averaging),
          so the EMA starts from the weights after the first step, not from the random init.
        - Buffers (e.g. norm statistics) are averaged too (``use_buffers=True``).
        - The copy lives on the model's device and costs one extra set of weights. It is made
          from the bare model (a DDP/compile wrapper is unwrapped), frozen and in eval mode.

    Args:
        model: the trained model (possibly DDP-wrapped), already on its device.
        decay: EMA decay in [0, 1), e.g. 0.999 (``ldm.training.ema_decay``).

    Returns:
        The ``AveragedModel``.

    Raises:
        ValueError: ``decay`` outside [0, 1).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
    ema = AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def ema_weights(ema_state: dict) -> dict:
    """The averaged model's weights in an ``AveragedModel.state_dict()`` (``module.`` prefix, ``n_averaged``): what
    the bare network loads."""
    return {key[len("module."):]: value for key, value in ema_state.items() if key.startswith("module.")}
