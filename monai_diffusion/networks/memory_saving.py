"""The memory-saving training path of :class:`~monai_diffusion.networks.autoencoderkl.AutoencoderKL`.

Used only with ``use_checkpoint=True``, in training with grad enabled. Over 95% of what an autoencoder step saves
for backward is the full-resolution maps, which downsampling factors do not touch, so this goes further than
checkpointing block by block:

- a GroupNorm -> SiLU -> convolution unit runs as one autograd function that saves only its input and recomputes
  the normalised and activated maps in backward (elementwise work only), slab by slab along the first spatial axis
  (:func:`norm_act_conv`); a residual block is two such units;
- a nearest-interpolation upsampling block runs the same way (:func:`upsample_conv`), keeping only its
  low-resolution input;
- attention and the other blocks are checkpointed one by one, and a leading run of blocks (the encoder's
  full-resolution stage) can be recomputed as one segment (:func:`run_blocks`).

It depends on MONAI's block types only; the network calls :func:`run_blocks` and nothing else.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, Upsample
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch.utils.checkpoint import checkpoint

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "norm_act_conv", "run_blocks", "upsample_conv"]

# Default number of elements of one chunk of a fused GroupNorm -> SiLU -> convolution unit, by device type. A chunk is
# a slab along the first spatial axis; only slabs of this size are ever materialised besides the unit's input, its
# output and (in backward) its input gradient. Small tensors fit in one chunk and run unsplit.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**24}

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _slab_depth(
    per_slice: int, size: int, device_type: str, chunk_elements: int | None, n_c_h: int, halo: int
) -> int:
    """Rows of the first spatial axis per slab, for slabs of about ``chunk_elements`` elements.

    Args:
        per_slice: elements of one row (batch x channels x the other spatial axes) of the map a slab materialises.
        size: rows in all.
        device_type: picks the default slab size (:data:`DEFAULT_CHUNK_ELEMENTS`) when ``chunk_elements`` is None.
        n_c_h: batch x channels x second spatial size of the convolution's input (0 below 2D).
        halo: rows the convolution reads beyond a slab on each side.
    """
    if chunk_elements is not None:
        return max(1, min(size, int(chunk_elements) // max(1, per_slice)))
    depth = DEFAULT_CHUNK_ELEMENTS.get(device_type, DEFAULT_CHUNK_ELEMENTS["cuda"]) // max(1, per_slice)
    if device_type == "cpu" and n_c_h:
        # PyTorch sends a CPU convolution whose N*C*D*H is at most 20480 to its slow reference kernel instead of
        # oneDNN: keep every default slab above that.
        depth = max(depth, 20481 // n_c_h + 1 - 2 * halo)
    return max(1, min(size, depth))


def _chunk_depth(x: torch.Tensor, chunk_elements: int | None, halo: int = 1) -> int:
    """Slab rows for a fused unit whose convolution reads a map shaped like ``x``."""
    n_c_h = x.shape[0] * x.shape[1] * x.shape[3] if x.ndim >= 4 else 0
    return _slab_depth(x.numel() // max(1, x.shape[2]), x.shape[2], x.device.type, chunk_elements, n_c_h, halo)


def _group_stats(x: torch.Tensor, groups: int, eps: float, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm mean and 1/std per (batch, group) in float32, accumulated slab by slab (Chan et al.'s update)."""
    batch = x.shape[0]
    if x.dtype == torch.float32 and x.is_contiguous():
        var, mean = torch.var_mean(x.view(batch, groups, -1), dim=-1, correction=0)  # no copy needed
        return mean, torch.rsqrt(var + eps)
    count, mean, m2 = 0, None, None
    for d0 in range(0, x.shape[2], depth):
        slab = x[:, :, d0 : d0 + depth].float().reshape(batch, groups, -1)
        n = slab.shape[-1]
        var_s, mean_s = torch.var_mean(slab, dim=-1, correction=0)
        if mean is None:
            count, mean, m2 = n, mean_s, var_s * n
            continue
        total = count + n
        delta = mean_s - mean
        mean = mean + delta * (n / total)
        m2 = m2 + var_s * n + delta.square() * (count * n / total)
        count = total
    return mean, torch.rsqrt(m2 / count + eps)


def _per_channel(values: torch.Tensor, channels: int, nd: int) -> torch.Tensor:
    """(batch, groups) or (batch, channels) float32 values as a (batch, channels, 1, ...) tensor."""
    batch = values.shape[0]
    if values.shape[1] != channels:
        values = values.repeat_interleave(channels // values.shape[1], dim=1)
    return values.reshape(batch, channels, *(1,) * nd)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.is_contiguous():
        return torch.contiguous_format
    if t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _NormActConv(torch.autograd.Function):
    """``conv(silu(group_norm(x)))`` (SiLU optional) that saves only ``x`` for backward and runs slab by slab.

    Autograd on the three modules keeps the normalised map, the activated map and (under AMP) a float32 copy of
    the input for backward: three maps per unit besides the input. This keeps ``x`` only and recomputes the rest,
    one slab along the first spatial axis at a time (with a halo of ``padding`` voxels for the convolution), in
    forward and backward; the GroupNorm statistics are those of the whole tensor. Under autocast the normalisation
    runs in float32 and hands the convolution the autocast dtype, so the unit's output (the next unit's saved
    input) is half precision too: the norm "returns the half-precision dtype".
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias, groups, eps, act, padding, depth):  # type: ignore[override]
        device_type = x.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            mean, rstd = _group_stats(x, groups, eps, depth)
            scale, shift = _NormActConv._affine(mean, rstd, gamma, beta, x.shape[1], x.ndim - 2)
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            size, halo = x.shape[2], padding[0]
            conv = _CONV_FNS[x.ndim - 2]
            out = None
            for d0 in range(0, size, depth):
                d1 = min(size, d0 + depth)
                a = _NormActConv._activated(x, d0 - halo, d1 + halo, scale, shift, act, compute_dtype)
                y = conv(a, w, b, padding=(0, *padding[1:]))
                if d1 - d0 == size:  # one slab: the convolution's own output, in its own memory format
                    out = y
                    break
                if out is None:
                    # Same memory format as the convolution picks (it decides what randn_like(out) draws downstream).
                    out = torch.empty(
                        (x.shape[0], weight.shape[0], *x.shape[2:]), dtype=y.dtype, device=y.device
                    ).to(memory_format=_memory_format(y))
                out[:, :, d0:d1] = y
                del a, y
        ctx.save_for_backward(x, gamma, beta, weight, bias, mean, rstd)
        ctx.config = (groups, act, tuple(padding), depth, compute_dtype)
        return out

    @staticmethod
    def _affine(mean, rstd, gamma, beta, channels, nd):
        """Per (batch, channel) scale and shift with ``group_norm(x) = x * scale + shift``."""
        gamma_c = gamma.float().view(1, channels, *(1,) * nd)
        scale = _per_channel(rstd, channels, nd) * gamma_c
        shift = beta.float().view(1, channels, *(1,) * nd) - _per_channel(mean, channels, nd) * scale
        return scale, shift

    @staticmethod
    def _activated(x, lo, hi, scale, shift, act, dtype):
        """Normalised (and activated) slab ``[lo, hi)`` of the first spatial axis in ``dtype``, zero outside ``x``."""
        size = x.shape[2]
        s0, s1 = max(lo, 0), min(hi, size)
        n = torch.addcmul(shift, x[:, :, s0:s1].float(), scale)
        a = F.silu(n, inplace=True) if act else n
        a = a.to(dtype)
        if s0 == lo and s1 == hi:
            return a
        return F.pad(a, (0, 0) * (x.ndim - 3) + (s0 - lo, hi - s1))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, gamma, beta, weight, bias, mean, rstd = ctx.saved_tensors
        groups, act, padding, depth, compute_dtype = ctx.config
        device_type = x.device.type
        nd = x.ndim - 2
        batch, channels, size = x.shape[0], x.shape[1], x.shape[2]
        halo = padding[0]
        with torch.autocast(device_type, enabled=False):
            scale, shift = _NormActConv._affine(mean, rstd, gamma, beta, channels, nd)
            w = weight.to(compute_dtype)
            grad_out = grad_out.to(compute_dtype)
            # Pass 1: convolution backward slab by slab; the activated map's gradient (halos overlap) is summed in
            # a buffer that becomes grad_x.
            grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
            for d0 in range(0, size, depth):
                d1 = min(size, d0 + depth)
                lo, hi = d0 - halo, d1 + halo
                a = _NormActConv._activated(x, lo, hi, scale, shift, act, compute_dtype)
                g_in, g_w, g_b = torch.ops.aten.convolution_backward(
                    grad_out[:, :, d0:d1],
                    a,
                    w,
                    [weight.shape[0]] if bias is not None else None,
                    [1] * nd,
                    [0, *padding[1:]],
                    [1] * nd,
                    False,
                    [0] * nd,
                    1,
                    [True, True, bias is not None],
                )
                grad_w += g_w
                if bias is not None:
                    grad_b += g_b
                s0, s1 = max(lo, 0), min(hi, size)
                grad_x[:, :, s0:s1] += g_in[:, :, s0 - lo : s1 - lo]
                del a, g_in, g_w, g_b
            # Pass 2: gradient w.r.t. the normalised map, and its per-channel sums (affine grads, GroupNorm backward).
            reduce_dims = tuple(range(2, x.ndim))
            sum_g = torch.zeros(batch, channels, dtype=torch.float32, device=x.device)
            sum_gx = torch.zeros_like(sum_g)
            keep = grad_x.dtype == torch.float32  # store it in place; in half precision, recompute it in pass 3
            for d0 in range(0, size, depth):
                g_n, xs = _NormActConv._grad_normed(x, grad_x, d0, depth, scale, shift, act)
                sum_g += g_n.sum(dim=reduce_dims)
                sum_gx += (g_n * xs).sum(dim=reduce_dims)
                if keep and act:
                    grad_x[:, :, d0 : d0 + depth] = g_n
            # sum over a channel of g * x_hat, with x_hat = (x - mean) * rstd
            mean_c, rstd_c = _per_channel(mean, channels, 0), _per_channel(rstd, channels, 0)
            sum_gxhat = (sum_gx - mean_c * sum_g) * rstd_c
            grad_gamma, grad_beta = sum_gxhat.sum(0), sum_g.sum(0)
            # grad_x = rstd * (gamma * g - m1 - x_hat * m2), m1 / m2 the group means of gamma * g and gamma * g * x_hat;
            # as grad_x = g * A + x * B + C with A per channel, B and C per group.
            per_group = x.numel() // (batch * groups)
            gamma_f = gamma.float()
            m1 = (sum_g * gamma_f).view(batch, groups, -1).sum(-1) / per_group
            m2 = (sum_gxhat * gamma_f).view(batch, groups, -1).sum(-1) / per_group
            coef_a = _per_channel(rstd, channels, nd) * gamma_f.view(1, channels, *(1,) * nd)
            coef_b = _per_channel(-rstd.square() * m2, channels, nd)
            coef_c = _per_channel(rstd.square() * m2 * mean - rstd * m1, channels, nd)
            # Pass 3: write grad_x over the buffer, slab by slab.
            for d0 in range(0, size, depth):
                if keep or not act:
                    g_n = grad_x[:, :, d0 : d0 + depth].float()
                    xs = x[:, :, d0 : d0 + depth].float()
                else:
                    g_n, xs = _NormActConv._grad_normed(x, grad_x, d0, depth, scale, shift, act)
                slab = torch.addcmul(coef_c, xs, coef_b).addcmul_(g_n, coef_a)
                grad_x[:, :, d0 : d0 + depth] = slab
                del g_n, xs, slab
        return (
            grad_x,
            grad_gamma.to(gamma.dtype),
            grad_beta.to(beta.dtype),
            grad_w.to(weight.dtype),
            grad_b.to(bias.dtype) if bias is not None else None,
            None,
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def _grad_normed(x, grad_a, d0, depth, scale, shift, act):
        """(dL/d(normalised), float32 x) of the slab starting at ``d0``, from the activated map's gradient."""
        xs = x[:, :, d0 : d0 + depth].float()
        g = grad_a[:, :, d0 : d0 + depth].float()
        if act:
            g = torch.ops.aten.silu_backward(g, torch.addcmul(shift, xs, scale))
        return g, xs


class _UpsampleConv(torch.autograd.Function):
    """``conv(nearest_upsample(x))`` computed slab by slab along the first spatial axis, saving only ``x``.

    The decoder's last upsampling makes the largest maps of the network (full resolution, the second-finest
    level's channels). Autograd would keep the upsampled map for the convolution's backward, and the recomputation
    of a checkpoint would rebuild it whole; here only a slab of it (plus a halo of ``padding`` rows) ever exists,
    in forward and backward. ``x`` itself is low resolution.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, factors, padding, depth):  # type: ignore[override]
        device_type = x.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            size = x.shape[2] * factors[0]
            conv = _CONV_FNS[x.ndim - 2]
            out = None
            for d0 in range(0, size, depth):
                d1 = min(size, d0 + depth)
                a = _UpsampleConv._upsampled(x, d0 - padding[0], d1 + padding[0], factors, compute_dtype)
                y = conv(a, w, b, padding=(0, *padding[1:]))
                if d1 - d0 == size:
                    out = y
                    break
                if out is None:
                    out = torch.empty(
                        (x.shape[0], weight.shape[0], size, *y.shape[3:]), dtype=y.dtype, device=y.device
                    ).to(memory_format=_memory_format(y))
                out[:, :, d0:d1] = y
                del a, y
        ctx.save_for_backward(x, weight, bias)
        ctx.config = (tuple(factors), tuple(padding), depth, compute_dtype)
        return out

    @staticmethod
    def _upsampled(x, lo, hi, factors, dtype):
        """Rows ``[lo, hi)`` of the nearest-upsampled ``x`` in ``dtype``, zero outside it."""
        f0, size = factors[0], x.shape[2] * factors[0]
        s0, s1 = max(lo, 0), min(hi, size)
        r0, r1 = s0 // f0, -(-s1 // f0)
        up = F.interpolate(x[:, :, r0:r1].to(dtype), scale_factor=tuple(float(f) for f in factors), mode="nearest")
        up = up[:, :, s0 - r0 * f0 : s1 - r0 * f0]
        if s0 == lo and s1 == hi:
            return up
        return F.pad(up, (0, 0) * (x.ndim - 3) + (s0 - lo, hi - s1))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        factors, padding, depth, compute_dtype = ctx.config
        device_type = x.device.type
        nd = x.ndim - 2
        f0, size, halo = factors[0], grad_out.shape[2], padding[0]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            grad_out = grad_out.to(compute_dtype)
            grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
            for d0 in range(0, size, depth):
                d1 = min(size, d0 + depth)
                lo, hi = d0 - halo, d1 + halo
                a = _UpsampleConv._upsampled(x, lo, hi, factors, compute_dtype)
                g_in, g_w, g_b = torch.ops.aten.convolution_backward(
                    grad_out[:, :, d0:d1],
                    a,
                    w,
                    [weight.shape[0]] if bias is not None else None,
                    [1] * nd,
                    [0, *padding[1:]],
                    [1] * nd,
                    False,
                    [0] * nd,
                    1,
                    [True, True, bias is not None],
                )
                grad_w += g_w
                if bias is not None:
                    grad_b += g_b
                # Nearest upsampling's backward: sum the gradient over each input voxel's block of copies.
                s0, s1 = max(lo, 0), min(hi, size)
                r0, r1 = s0 // f0, -(-s1 // f0)
                g = F.pad(g_in[:, :, s0 - lo : s1 - lo].float(), (0, 0) * (nd - 1) + (s0 - r0 * f0, r1 * f0 - s1))
                blocks = [g.shape[0], g.shape[1]]
                for n, f in zip(x.shape[2:], factors):
                    blocks += [n, f]
                blocks[2] = r1 - r0
                g = g.reshape(blocks).sum(dim=tuple(range(3, 3 + 2 * nd, 2)))
                grad_x[:, :, r0:r1] += g
                del a, g_in, g_w, g_b, g
        return (
            grad_x.to(x.dtype),
            grad_w.to(weight.dtype),
            grad_b.to(bias.dtype) if bias is not None else None,
            None,
            None,
            None,
        )


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


def upsample_conv(x: torch.Tensor, block: Upsample, chunk_elements: int | None = None) -> torch.Tensor:
    """A nearest-interpolation Upsample block (interpolation, then its post convolution) through
    :class:`_UpsampleConv`: same result, only ``x`` saved, slabs of about ``chunk_elements`` elements."""
    interp, layer = block.upsample_non_trainable, block.postconv.conv
    spatial = x.ndim - 2
    factors = interp.scale_factor if isinstance(interp.scale_factor, tuple) else (interp.scale_factor,) * spatial
    factors = tuple(int(f) for f in factors)
    # Slabs are counted on the upsampled map, which is what a slab materialises.
    up_shape = [n * f for n, f in zip(x.shape[2:], factors)]
    per_slice = x.shape[0] * x.shape[1] * math.prod(up_shape[1:])
    n_c_h = x.shape[0] * x.shape[1] * up_shape[1] if spatial > 1 else 0
    depth = _slab_depth(per_slice, up_shape[0], x.device.type, chunk_elements, n_c_h, layer.padding[0])
    return _UpsampleConv.apply(x, layer.weight, layer.bias, factors, tuple(layer.padding), depth)


def _fusable(norm: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(norm(x))`` can run as a :class:`_NormActConv` (stride 1, 'same' padding, no groups)."""
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


def norm_act_conv(
    x: torch.Tensor, norm: nn.GroupNorm, conv: Convolution, act: bool = True, chunk_elements: int | None = None
) -> torch.Tensor:
    """``conv(silu(norm(x)))`` (``conv(norm(x))`` with ``act=False``) saving only ``x`` for backward.

    Same result as running the modules, computed slab by slab along the first spatial axis (see
    :class:`_NormActConv`); ``chunk_elements`` bounds a slab's size (None: :data:`DEFAULT_CHUNK_ELEMENTS`).
    """
    layer = conv.conv
    return _NormActConv.apply(
        x,
        norm.weight,
        norm.bias,
        layer.weight,
        layer.bias,
        norm.num_groups,
        norm.eps,
        act,
        tuple(layer.padding),
        _chunk_depth(x, chunk_elements, layer.padding[0]),
    )


def _resblock_efficient(block: AEKLResBlock, x: torch.Tensor, chunk_elements: int | None) -> torch.Tensor:
    """AEKLResBlock's forward as two fused units: saves its input and one inner map instead of seven maps."""
    h = norm_act_conv(x, block.norm1, block.conv1, True, chunk_elements)
    h = norm_act_conv(h, block.norm2, block.conv2, True, chunk_elements)
    return block.nin_shortcut(x) + h


def _efficient_resblock_ok(block: nn.Module) -> bool:
    return (
        type(block) is AEKLResBlock and _fusable(block.norm1, block.conv1) and _fusable(block.norm2, block.conv2)
    )


@torch.compiler.disable
def run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, chunk_elements: int | None = None, first_segment: int = 0
) -> torch.Tensor:
    """Run ``blocks`` in order, keeping as little as possible for backward.

    ``blocks[:first_segment]`` is recomputed in backward as one checkpoint (inside it the blocks still run through
    the fused units, without nested checkpoints); the encoder passes its full-resolution stage here, whose maps
    would otherwise stay alive through the whole decoder's backward, where the peak is.

    Args:
        blocks: the encoder's or decoder's blocks.
        x: their input.
        chunk_elements: elements of one slab of a fused unit (None: :data:`DEFAULT_CHUNK_ELEMENTS`).
        first_segment: how many leading blocks to recompute as one segment (0: none).
    """
    if first_segment:
        x = checkpoint(_run_blocks, blocks[:first_segment], x, chunk_elements, False, use_reentrant=False)
    return _run_blocks(blocks[first_segment:], x, chunk_elements)


def _run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, chunk_elements: int | None = None, checkpoint_blocks: bool = True
) -> torch.Tensor:
    """Run ``blocks`` in order through the memory-saving units.

    - a residual block runs as two fused GroupNorm -> SiLU -> convolution units (:func:`norm_act_conv`): it keeps
      its input and the map between its two convolutions, and never materialises a full normalised or activated
      map, in forward or backward;
    - a GroupNorm followed by a convolution (the encoder's and decoder's output heads) runs as one fused unit;
    - a nearest-interpolation upsampling block runs as one fused slab-wise unit (:func:`upsample_conv`) that keeps
      only its low-resolution input;
    - every other non-trivial block (attention, downsampling, transposed-convolution upsampling) is checkpointed
      on its own;
    - a bare convolution runs as is: what it saves for backward is its input, which is kept anyway.

    This replaces MONAI's recomputation of the whole encoder/decoder at once, which saves far less peak memory.
    The results equal the plain forward's up to float rounding. ``checkpoint_blocks=False`` (blocks already inside
    an outer checkpoint) runs the other blocks plainly instead of nesting checkpoints.
    """
    index = 0
    while index < len(blocks):
        block = blocks[index]
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if _efficient_resblock_ok(block):
            x = _resblock_efficient(block, x, chunk_elements)
        elif following is not None and _fusable(block, following):
            x = norm_act_conv(x, block, following, False, chunk_elements)
            index += 1
        elif _fusable_upsample(block):
            x = upsample_conv(x, block, chunk_elements)
        elif isinstance(block, (Convolution, nn.GroupNorm)) or not checkpoint_blocks:
            x = block(x)
        else:
            x = checkpoint(block, x, use_reentrant=False)
        index += 1
    return x
