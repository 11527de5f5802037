"""Downsampling factors: per level -> per level and axis -> total per axis -> latent shape.

The one place this arithmetic is written. It imports nothing but the standard library, so the config rules (which
run before torch is needed), the network, the memory planner and the tools all compute the same latent shape.
Each caller words its own messages around it; the errors raised here name the broken rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

__all__ = ["per_axis_factors", "total_factor", "latent_shape"]

Levels = tuple[tuple[int, ...], ...]


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def per_axis_factors(downsample_factors: Sequence[Sequence[int] | int] | None, num_levels: int, spatial_dims: int) -> Levels:
    """One tuple of ``spatial_dims`` ints per downsampling level.

    Args:
        downsample_factors: one entry per level, each an int (every axis) or ``spatial_dims`` ints; None means 2
            on every axis at every level (MONAI's AutoencoderKL).
        num_levels: downsampling levels, ``len(channels) - 1``.
        spatial_dims: axes of a volume (3) or image (2).

    Raises:
        ValueError: not a sequence, not ``num_levels`` entries, an entry of the wrong length, or a factor that is
            not an integer >= 1 (floats are refused rather than rounded: a rounded factor changes the latent).
    """
    if downsample_factors is None:
        return tuple((2,) * spatial_dims for _ in range(num_levels))
    if isinstance(downsample_factors, (str, bytes)) or not isinstance(downsample_factors, Sequence):
        raise ValueError(
            f"downsample_factors must be a sequence with one entry per downsampling level, got {downsample_factors!r}."
        )
    if len(downsample_factors) != num_levels:
        raise ValueError(
            f"downsample_factors must have len(channels) - 1 = {num_levels} entries (one per downsampling level), "
            f"got {len(downsample_factors)}."
        )
    levels = []
    for level, entry in enumerate(downsample_factors):
        if isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
            if len(entry) != spatial_dims:
                raise ValueError(
                    f"downsample_factors[{level}] must be an int or a sequence of spatial_dims = {spatial_dims} "
                    f"ints, got {len(entry)} values: {entry!r}."
                )
            axes = tuple(entry)
        else:
            axes = (entry,) * spatial_dims
        if not all(_is_int(f) and f >= 1 for f in axes):
            raise ValueError(f"downsample_factors[{level}] must contain only integers >= 1, got {entry!r}.")
        levels.append(tuple(int(f) for f in axes))
    return tuple(levels)


def total_factor(levels: Levels, spatial_dims: int) -> tuple[int, ...]:
    """Overall factor per axis: the product of every level's factor on that axis (1s without levels)."""
    return tuple(math.prod([level[axis] for level in levels]) for axis in range(spatial_dims))


def latent_shape(spatial_shape: Sequence[int], total: Sequence[int]) -> tuple[int, ...]:
    """Spatial shape of the latent of an input of ``spatial_shape`` under per-axis ``total`` factors.

    Raises:
        ValueError: ``spatial_shape`` has another number of axes, or a size is not divisible by its axis' factor
            (the reconstruction would not match the input).
    """
    spatial_shape, total = tuple(int(s) for s in spatial_shape), tuple(total)
    if len(spatial_shape) != len(total):
        raise ValueError(
            f"Expected {len(total)} spatial dimensions, got spatial shape {spatial_shape} "
            f"(input should be B x C x {' x '.join(['S'] * len(total))})."
        )
    for axis, (size, factor) in enumerate(zip(spatial_shape, total)):
        if size % factor:
            raise ValueError(
                f"Input spatial size {size} on axis {axis} is not divisible by the total downsampling factor "
                f"{factor} of that axis (total_factor={total}, spatial shape {spatial_shape})."
            )
    return tuple(size // factor for size, factor in zip(spatial_shape, total))
