"""The memory-saving training path of :class:`~monai_diffusion.networks.autoencoderkl.AutoencoderKL`: which block
runs how.

Used only with ``use_checkpoint=True``, in training with grad enabled. Over 95% of what an autoencoder step saves
for backward is the full-resolution maps, which downsampling factors do not touch, so this goes further than
checkpointing block by block:

- a GroupNorm -> SiLU -> convolution unit runs as one autograd function that saves only its input and recomputes
  the normalised and activated maps in backward (elementwise work only), slab by slab along the first spatial axis
  (:func:`~monai_diffusion.networks.fused_units.norm_act_conv`); a residual block is two such units, the first
  also running the block's 1x1 shortcut so that its backward accumulates the shortcut's gradient in place;
- a nearest-interpolation upsampling block runs the same way
  (:func:`~monai_diffusion.networks.fused_units.upsample_conv`), keeping only its low-resolution input;
- attention and the other blocks are checkpointed one by one, and a leading run of blocks (the encoder's
  full-resolution stage) can be recomputed as one segment (:func:`run_blocks`).

The fused units themselves are in :mod:`monai_diffusion.networks.fused_units`. Under :func:`offload_saved_maps` the
saved maps live in host memory and are read back slab by slab. It depends on MONAI's block types only; the network
calls :func:`run_blocks` and nothing else.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, Upsample
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch.utils.checkpoint import checkpoint

from monai_diffusion.networks.fused_units import norm_act_conv, norm_act_conv_shortcut, upsample_conv

__all__ = ["nearest_enlargement", "offload_saved_maps", "run_blocks"]


def nearest_enlargement(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` enlarged to ``size`` by repeating voxels: the residual path of an upsampling block."""
    return F.interpolate(x, size=tuple(size), mode="nearest")


def _fusable_upsample(block: nn.Module) -> bool:
    """Whether ``block`` is a nearest-interpolation Upsample with a 'same' post convolution and integer factors."""
    if not isinstance(block, Upsample) or list(dict(block.named_children())) != ["upsample_non_trainable", "postconv"]:
        return False
    interp = block.upsample_non_trainable
    if not isinstance(interp, nn.Upsample) or interp.mode != "nearest" or interp.size is not None:
        return False
    factors = interp.scale_factor if isinstance(interp.scale_factor, tuple) else (interp.scale_factor,)
    if any(float(f) != int(f) or f < 1 for f in factors):
        return False
    post = block.postconv
    return isinstance(post, Convolution) and _fusable(nn.GroupNorm(1, 1), post)


def _fusable(norm: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(norm(x))`` can run as one fused unit (stride 1, 'same' padding, no groups; see
    :func:`~monai_diffusion.networks.fused_units.norm_act_conv`)."""
    if not isinstance(norm, nn.GroupNorm) or not norm.affine or not isinstance(conv, Convolution):
        return False
    layer = getattr(conv, "conv", None)
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or len(conv) != 1:
        return False
    return (
        all(s == 1 for s in layer.stride)
        and all(d == 1 for d in layer.dilation)
        and layer.groups == 1
        and isinstance(layer.padding, tuple)
        and all(2 * p + 1 == k for p, k in zip(layer.padding, layer.kernel_size))
        and layer.padding_mode == "zeros"
    )


def _fusable_shortcut(shortcut: nn.Module) -> bool:
    """Whether a residual block's shortcut is a plain 1x1 convolution (then
    :func:`~monai_diffusion.networks.fused_units.norm_act_conv_shortcut` runs it)."""
    layer = getattr(shortcut, "conv", None)
    return (
        isinstance(shortcut, Convolution)
        and len(shortcut) == 1
        and isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and all(k == 1 for k in layer.kernel_size)
        and all(s == 1 for s in layer.stride)
        and all(p == 0 for p in layer.padding)
        and layer.groups == 1
    )


def _resblock_efficient(block: AEKLResBlock, x: torch.Tensor, chunk_elements: int | None,
                        offload: bool = False) -> torch.Tensor:
    """AEKLResBlock's forward as two fused units (the first with the block's 1x1 shortcut when it has one): saves its
    input and one inner map instead of seven maps; the shortcut is added into the second unit's output."""
    if isinstance(block.nin_shortcut, nn.Identity):
        h = norm_act_conv(x, block.norm1, block.conv1, True, chunk_elements=chunk_elements, offload=offload)
        shortcut = x
    else:
        h, shortcut = norm_act_conv_shortcut(x, block.norm1, block.conv1, block.nin_shortcut,
                                             chunk_elements=chunk_elements, offload=offload)
    out = norm_act_conv(h, block.norm2, block.conv2, True, chunk_elements=chunk_elements, offload=offload)
    # In place unless the sum is of a wider type (a float32 input under autocast), as the module's own sum would be.
    return out.add_(shortcut) if torch.promote_types(out.dtype, shortcut.dtype) == out.dtype else shortcut + out


def _efficient_resblock_ok(block: nn.Module) -> bool:
    return (
        type(block) is AEKLResBlock
        and _fusable(block.norm1, block.conv1)
        and _fusable(block.norm2, block.conv2)
        and (isinstance(block.nin_shortcut, nn.Identity) or _fusable_shortcut(block.nin_shortcut))
    )


_OFFLOAD = contextvars.ContextVar("offload_saved_maps", default=False)


@contextlib.contextmanager
def offload_saved_maps(enabled: bool = True):
    """Within it, a training forward keeps what it saves for backward in host memory: the fused units of the
    memory-saving path keep a (pinned) host copy of their saved input and read it back slab by slab in backward, so
    no whole saved map returns to the device; every other tensor saved for backward goes to host memory through
    ``torch.autograd.graph.save_on_cpu``. Costs a copy to the host and back of every saved map, every step. On a CPU
    the maps are in host memory already: nothing changes.

    Args:
        enabled: False makes it a no-op (so callers need no branch).
    """
    if not enabled:
        yield
        return
    token = _OFFLOAD.set(True)
    try:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            yield
    finally:
        _OFFLOAD.reset(token)


def _offloads(x: torch.Tensor) -> bool:
    """Whether the fused units running on ``x`` keep their saved inputs in host memory (see
    :func:`offload_saved_maps`)."""
    return _OFFLOAD.get() and x.device.type != "cpu"


@torch.compiler.disable  # traced, the slab loops unroll into graphs that take minutes to compile; they run as written
def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, chunk_elements: int | None = None, first_segment: int = 0
) -> torch.Tensor:
    """Run ``blocks`` in order, keeping as little as possible for backward.

    ``blocks[:first_segment]`` is recomputed in backward as one checkpoint (inside it the blocks still run through
    the fused units, without nested checkpoints, and keep their saved inputs on the device: the recomputation must
    save what the first forward saved); the encoder passes its full-resolution stage here, whose maps would otherwise
    stay alive through the whole decoder's backward, where the peak is. Under :func:`offload_saved_maps` the other
    blocks' fused units keep their saved inputs in host memory.

    Args:
        blocks: the encoder's or decoder's blocks.
        x: their input.
        chunk_elements: elements of one slab of a fused unit (None: the unit's default by device,
            :data:`~monai_diffusion.networks.fused_units.DEFAULT_CHUNK_ELEMENTS`).
        first_segment: how many leading blocks to recompute as one segment (0: none).
    """
    if first_segment:
        x = checkpoint(_run_blocks, blocks[:first_segment], x, chunk_elements, False, use_reentrant=False)
    return _run_blocks(blocks[first_segment:], x, chunk_elements, offload=_offloads(x))


def _run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, chunk_elements: int | None = None, checkpoint_blocks: bool = True,
    *, offload: bool = False,
) -> torch.Tensor:
    """Run ``blocks`` in order through the memory-saving units.

    - a residual block runs as two fused GroupNorm -> SiLU -> convolution units (:func:`norm_act_conv`): it keeps
      its input and the map between its two convolutions, and never materialises a full normalised or activated
      map, in forward or backward; a 1x1-convolution shortcut runs inside the first unit, whose backward adds the
      shortcut's gradient into its own buffer;
    - a GroupNorm followed by a convolution (the encoder's and decoder's output heads) runs as one fused unit;
    - a nearest-interpolation upsampling block runs as one fused slab-wise unit (:func:`upsample_conv`) that keeps
      only its low-resolution input;
    - every other non-trivial block (attention, downsampling, transposed-convolution upsampling) is checkpointed
      on its own;
    - a bare convolution runs as is: what it saves for backward is its input, which is kept anyway.

    This replaces MONAI's recomputation of the whole encoder/decoder at once, which saves far less peak memory.
    The results equal the plain forward's up to float rounding. ``checkpoint_blocks=False`` (blocks already inside
    an outer checkpoint) runs the other blocks plainly instead of nesting checkpoints. ``offload``: the fused units
    keep their saved inputs in host memory.
    """
    index = 0
    while index < len(blocks):
        block = blocks[index]
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if _efficient_resblock_ok(block):
            x = _resblock_efficient(block, x, chunk_elements, offload)
        elif following is not None and _fusable(block, following):
            x = norm_act_conv(x, block, following, False, chunk_elements=chunk_elements, offload=offload)
            index += 1
        elif _fusable_upsample(block):
            out = upsample_conv(x, block, chunk_elements, offload)
            x = out + nearest_enlargement(x, out.shape[2:]) if getattr(block, "residual", False) else out
        elif isinstance(block, (Convolution, nn.GroupNorm)) or not checkpoint_blocks:
            x = block(x)
        else:
            x = checkpoint(block, x, use_reentrant=False)
        index += 1
    return x
