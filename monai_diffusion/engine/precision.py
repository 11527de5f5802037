"""Mixed precision: turn ``device.mixed_precision`` into an autocast context and grad scalers."""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Precision", "precision_name", "resolve_precision"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
logger = logging.getLogger("monai_diffusion")


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run.

    Attributes:
        name: ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        device_type: ``"cuda"`` or ``"cpu"`` (what :func:`torch.autocast` takes).
    """

    name: str
    device_type: str

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise ValueError(f"precision name must be one of {sorted(_DTYPES)}, got {self.name!r}")

    @property
    def dtype(self) -> torch.dtype:
        """The autocast compute dtype (``torch.float32`` for fp32)."""
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass and loss: ``torch.autocast`` or, for fp32, a no-op.

        Returns:
            A fresh context manager (one per ``with`` statement).
        """
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """A new gradient scaler; enabled only for fp16.

        fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and does
        not need it. A disabled scaler is a pass-through, so the training step is the same code
        for every precision. Make one per optimizer: the scale adapts to that loss's gradients.

        Returns:
            ``torch.amp.GradScaler`` for this device type.
        """
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def _cpu_fp16_supported() -> bool:
    """Whether this torch build runs fp16 autocast on CPU (older builds warn and ignore it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type="cpu", dtype=torch.float16):
                out = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))
        return out.dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


def _cuda_bf16_supported(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively (Ampere or newer); emulated bf16 is very slow."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def precision_name(setting: bool | str, device_type: str) -> str:
    """What ``device.mixed_precision`` asks for on a device type, before the hardware is consulted.

    ``False``/``"no"``/``"fp32"`` -> ``"fp32"``; ``True`` -> ``"fp16"`` on CUDA, ``"bf16"`` on CPU (the CPU's native
    reduced precision); ``"fp16"``/``"bf16"`` -> themselves. :func:`resolve_precision` adds what the machine
    supports; the memory planner uses this alone to name the precision of a device it does not run on.

    Args:
        setting: the config value.
        device_type: ``"cuda"`` or ``"cpu"``.

    Raises:
        ValueError: an unknown setting.
    """
    if setting is False or (isinstance(setting, str) and setting.lower() in ("no", "fp32")):
        return "fp32"
    if setting is True:
        return "bf16" if device_type == "cpu" else "fp16"
    if isinstance(setting, str) and setting.lower() in ("fp16", "bf16"):
        return setting.lower()
    raise ValueError(f"device.mixed_precision: expected true, false, 'fp16', 'bf16', 'fp32' or 'no', got {setting!r}")


def resolve_precision(setting: bool | str, device: torch.device) -> Precision:
    """Resolve ``device.mixed_precision`` for the device the run uses, and log the choice.

    ============  =================  ==========================================
    setting       CUDA               CPU
    ============  =================  ==========================================
    False, "no"   fp32               fp32
    "fp32"        fp32               fp32
    True          fp16               bf16 (logged with the reason)
    "fp16"        fp16               fp16 if this torch supports it, else bf16 (warning)
    "bf16"        bf16 (ValueError   bf16
                  without support)
    ============  =================  ==========================================

    Args:
        setting: the config value (the schema's ``MixedPrecision``): ``True``/``False`` or ``"fp16"``, ``"bf16"``,
            ``"fp32"``, ``"no"`` (``"fp32"`` and ``"no"`` are the same).
        device: the training device (``DistInfo.device``).

    Returns:
        The :class:`Precision` to train with.

    Raises:
        ValueError: an unknown setting, or ``"bf16"`` on a GPU without native bf16 support.
    """
    device = torch.device(device)
    device_type = "cuda" if device.type == "cuda" else "cpu"
    on_cpu = device_type == "cpu"
    name = precision_name(setting, device_type)

    if name == "fp32":
        reason = "mixed precision off"
    elif setting is True:
        # CPU autocast is built around bf16 (oneDNN, AVX512-BF16/AMX kernels); bf16 keeps fp32's exponent range, so
        # no loss scaling is needed either.
        reason = (
            "mixed_precision=true on CPU: using bf16, the CPU's native reduced precision (fp16 is for CUDA)"
            if on_cpu
            else "mixed_precision=true on CUDA"
        )
    else:
        reason = f"mixed_precision={name}"
    if name == "fp16" and on_cpu and not _cpu_fp16_supported():
        logger.warning("mixed_precision=fp16: this PyTorch build has no fp16 autocast on CPU; using bf16 instead")
        name, reason = "bf16", "fp16 unsupported on CPU by this PyTorch, fell back to bf16"
    if name == "bf16" and not on_cpu and not _cuda_bf16_supported(device):
        raise ValueError(
            f"device.mixed_precision: bf16 is not supported natively by {device} "
            f"({torch.cuda.get_device_name(device)}); use 'fp16' (or true) instead"
        )

    precision = Precision(name=name, device_type=device_type)
    logger.info("Precision: %s on %s (%s)", name, device, reason)
    return precision
