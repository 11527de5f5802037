"""Network definitions."""

from __future__ import annotations

from .autoencoderkl import AutoencoderKL, FactorDownsample

__all__ = ["AutoencoderKL", "FactorDownsample"]
