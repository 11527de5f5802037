# Adapted from MONAI's monai/networks/nets/autoencoderkl.py (Apache License 2.0, MONAI Consortium).
"""AutoencoderKL with a per-level, per-axis downsampling factor.

With every factor equal to 2 the module tree and parameter names are identical to
:class:`monai.networks.nets.AutoencoderKL`, so its state dicts load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SpatialAttentionBlock, Upsample
from monai.networks.nets.autoencoderkl import AEKLResBlock, AsymmetricPad
from monai.utils import ensure_tuple_rep
from torch.utils.checkpoint import checkpoint

__all__ = ["AutoencoderKL", "FactorDownsample", "Encoder", "Decoder"]


# ---------------------------------------------------------------------------------------------------------------------
# Memory-efficient training path (used only with use_checkpoint, in training with grad enabled)
# ---------------------------------------------------------------------------------------------------------------------

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


def _run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    use_checkpoint: bool,
    chunk_elements: int | None = None,
    checkpoint_blocks: bool = True,
) -> torch.Tensor:
    """Run ``blocks`` in order; with ``use_checkpoint``, keep as little as possible for backward.

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
    if not use_checkpoint:
        for block in blocks:
            x = block(x)
        return x
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


class FactorDownsample(nn.Module):
    """
    Convolution-based downsampling by an integer factor per axis; generalises MONAI's ``AEKLDownsample``.

    On an axis with factor ``s`` the input is padded by (0, 1) and convolved with kernel ``s + 1`` and
    stride ``s``. The kernel is one voxel wider than the stride, so windows overlap and every input voxel
    reaches the output (a kernel smaller than its stride would silently skip voxels). For an axis of
    size ``n`` divisible by ``s`` the output size is ``n / s``. ``s = 2`` gives exactly MONAI's layer
    (kernel 3, stride 2); ``s = 1`` gives kernel 2, stride 1, leaving the size unchanged.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        in_channels: number of input (and output) channels.
        factors: downsampling factor, an int for all axes or one int per axis. Defaults to 2.
    """

    def __init__(self, spatial_dims: int, in_channels: int, factors: Sequence[int] | int = 2) -> None:
        super().__init__()
        self.factors: tuple[int, ...] = tuple(int(f) for f in ensure_tuple_rep(factors, spatial_dims))
        # Same attribute names as AEKLDownsample, so state dict keys stay "<block>.conv.conv.weight".
        self.pad = AsymmetricPad(spatial_dims=spatial_dims)
        self.conv = Convolution(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            strides=self.factors,
            kernel_size=tuple(f + 1 for f in self.factors),
            padding=0,
            conv_only=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


class Encoder(nn.Module):
    """
    Convolutional cascade that downsamples the image into a spatial latent space.

    Same block layout as MONAI's AutoencoderKL encoder, with the downsampling layer of level ``i``
    using ``downsample_factors[i]``.

    Args:
        spatial_dims: number of spatial dimensions, could be 1, 2, or 3.
        in_channels: number of input channels.
        channels: sequence of block output channels.
        out_channels: number of channels in the bottom layer (latent space) of the autoencoder.
        num_res_blocks: number of residual blocks per level.
        norm_num_groups: number of groups for the GroupNorm layers, channels must be divisible by this number.
        norm_eps: epsilon for the normalization.
        attention_levels: indicate which level from channels contain an attention block.
        downsample_factors: per-axis factor of each downsampling layer, ``len(channels) - 1`` entries.
        with_nonlocal_attn: if True use non-local attention block.
        include_fc: whether to include the final linear layer in the attention blocks.
        use_combined_linear: whether to use a single linear layer for qkv projection.
        use_flash_attention: if True, compute attention with PyTorch's scaled_dot_product_attention.
        use_checkpoint: if True, checkpoint each block separately when training with grad enabled.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        downsample_factors: Sequence[Sequence[int]],
        with_nonlocal_attn: bool = True,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.use_checkpoint = use_checkpoint
        self.chunk_elements: int | None = None

        def res_block(in_ch: int, out_ch: int) -> nn.Module:
            return AEKLResBlock(spatial_dims, in_ch, norm_num_groups, norm_eps, out_ch)

        def attn_block(ch: int) -> nn.Module:
            return SpatialAttentionBlock(
                spatial_dims=spatial_dims,
                num_channels=ch,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                include_fc=include_fc,
                use_combined_linear=use_combined_linear,
                use_flash_attention=use_flash_attention,
            )

        # The block order must match MONAI's exactly: state dict keys are "blocks.<index>...".
        blocks: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, channels[0], strides=1, kernel_size=3, padding=1, conv_only=True)
        ]
        output_channel = channels[0]
        for i in range(len(channels)):
            input_channel = output_channel
            output_channel = channels[i]
            for _ in range(num_res_blocks[i]):
                blocks.append(res_block(input_channel, output_channel))
                input_channel = output_channel
                if attention_levels[i]:
                    blocks.append(attn_block(input_channel))
            if i < len(channels) - 1:
                blocks.append(FactorDownsample(spatial_dims, input_channel, downsample_factors[i]))

        if with_nonlocal_attn:
            blocks += [res_block(channels[-1], channels[-1]), attn_block(channels[-1])]
            blocks.append(res_block(channels[-1], channels[-1]))

        blocks.append(nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels[-1], eps=norm_eps, affine=True))
        blocks.append(
            Convolution(spatial_dims, channels[-1], out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)
        )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.use_checkpoint and self.training and torch.is_grad_enabled()
        if not use_checkpoint:
            return _run_blocks(self.blocks, x, False)
        # The full-resolution stage (input convolution, level-0 blocks, first downsampling) is recomputed as one
        # segment: its maps would otherwise stay alive through the whole decoder's backward, where the peak is.
        first_down = next((i for i, b in enumerate(self.blocks) if isinstance(b, FactorDownsample)), None)
        if first_down is None:
            return _run_blocks(self.blocks, x, True, self.chunk_elements)
        stage, rest = self.blocks[: first_down + 1], self.blocks[first_down + 1 :]
        x = checkpoint(_run_blocks, stage, x, True, self.chunk_elements, False, use_reentrant=False)
        return _run_blocks(rest, x, True, self.chunk_elements)


class Decoder(nn.Module):
    """
    Convolutional cascade upsampling from a spatial latent space into an image space.

    Same block layout as MONAI's AutoencoderKL decoder; the upsampling layers undo the encoder's
    ``downsample_factors`` in reverse order.

    Args:
        spatial_dims: number of spatial dimensions, could be 1, 2, or 3.
        channels: sequence of block output channels (in encoder order).
        in_channels: number of channels in the bottom layer (latent space) of the autoencoder.
        out_channels: number of output channels.
        num_res_blocks: number of residual blocks per level (in encoder order).
        norm_num_groups: number of groups for the GroupNorm layers, channels must be divisible by this number.
        norm_eps: epsilon for the normalization.
        attention_levels: indicate which level from channels contain an attention block.
        downsample_factors: per-axis factor of each encoder downsampling layer, ``len(channels) - 1`` entries.
        with_nonlocal_attn: if True use non-local attention block.
        use_convtranspose: if True, upsample with a transposed convolution (kernel = stride = factor);
            otherwise nearest interpolation followed by a 3-kernel convolution.
        include_fc: whether to include the final linear layer in the attention blocks.
        use_combined_linear: whether to use a single linear layer for qkv projection.
        use_flash_attention: if True, compute attention with PyTorch's scaled_dot_product_attention.
        use_checkpoint: if True, checkpoint each block separately when training with grad enabled.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        downsample_factors: Sequence[Sequence[int]],
        with_nonlocal_attn: bool = True,
        use_convtranspose: bool = False,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.use_checkpoint = use_checkpoint
        self.chunk_elements: int | None = None

        def res_block(in_ch: int, out_ch: int) -> nn.Module:
            return AEKLResBlock(spatial_dims, in_ch, norm_num_groups, norm_eps, out_ch)

        def attn_block(ch: int) -> nn.Module:
            return SpatialAttentionBlock(
                spatial_dims=spatial_dims,
                num_channels=ch,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                include_fc=include_fc,
                use_combined_linear=use_combined_linear,
                use_flash_attention=use_flash_attention,
            )

        def upsample_block(ch: int, factors: Sequence[int]) -> nn.Module:
            if use_convtranspose:
                # Upsample's deconv defaults kernel_size to scale_factor: kernel = stride, no overlap, no gap.
                return Upsample(spatial_dims, in_channels=ch, out_channels=ch, scale_factor=factors, mode="deconv")
            post_conv = Convolution(spatial_dims, ch, ch, strides=1, kernel_size=3, padding=1, conv_only=True)
            return Upsample(
                spatial_dims=spatial_dims,
                mode="nontrainable",
                in_channels=ch,
                out_channels=ch,
                interp_mode="nearest",
                scale_factor=tuple(float(f) for f in factors),
                post_conv=post_conv,
                align_corners=None,
            )

        reversed_channels = list(reversed(channels))
        reversed_attention_levels = list(reversed(attention_levels))
        reversed_num_res_blocks = list(reversed(num_res_blocks))
        reversed_factors = list(reversed(downsample_factors))

        # The block order must match MONAI's exactly: state dict keys are "blocks.<index>...".
        blocks: list[nn.Module] = [
            Convolution(
                spatial_dims, in_channels, reversed_channels[0], strides=1, kernel_size=3, padding=1, conv_only=True
            )
        ]
        if with_nonlocal_attn:
            blocks += [res_block(reversed_channels[0], reversed_channels[0]), attn_block(reversed_channels[0])]
            blocks.append(res_block(reversed_channels[0], reversed_channels[0]))

        block_out_ch = reversed_channels[0]
        for i in range(len(reversed_channels)):
            block_in_ch = block_out_ch
            block_out_ch = reversed_channels[i]
            for _ in range(reversed_num_res_blocks[i]):
                blocks.append(res_block(block_in_ch, block_out_ch))
                block_in_ch = block_out_ch
                if reversed_attention_levels[i]:
                    blocks.append(attn_block(block_in_ch))
            if i < len(channels) - 1:
                blocks.append(upsample_block(block_in_ch, reversed_factors[i]))

        blocks.append(nn.GroupNorm(num_groups=norm_num_groups, num_channels=block_in_ch, eps=norm_eps, affine=True))
        blocks.append(
            Convolution(spatial_dims, block_in_ch, out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)
        )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.use_checkpoint and self.training and torch.is_grad_enabled()
        return _run_blocks(self.blocks, x, use_checkpoint, self.chunk_elements)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _normalise_downsample_factors(
    downsample_factors: Sequence[Sequence[int] | int] | None, num_levels: int, spatial_dims: int
) -> tuple[tuple[int, ...], ...]:
    """Return one per-axis int tuple per downsampling level, raising ValueError on a malformed spec."""
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
    normalised = []
    for level, entry in enumerate(downsample_factors):
        if isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
            if len(entry) != spatial_dims:
                raise ValueError(
                    f"downsample_factors[{level}] must be an int or a sequence of spatial_dims = {spatial_dims} "
                    f"ints, got {len(entry)} values: {entry!r}."
                )
            factors = tuple(entry)
        else:
            factors = (entry,) * spatial_dims
        for f in factors:
            # Floats are refused rather than rounded: a silently changed factor changes the latent shape.
            if not _is_int(f) or f < 1:
                raise ValueError(f"downsample_factors[{level}] must contain only integers >= 1, got {entry!r}.")
        normalised.append(tuple(int(f) for f in factors))
    return tuple(normalised)


class AutoencoderKL(nn.Module):
    """
    Autoencoder model with KL-regularized latent space based on
    Rombach et al. "High-Resolution Image Synthesis with Latent Diffusion Models" https://arxiv.org/abs/2112.10752
    and Pinaya et al. "Brain Imaging Generation with Latent Diffusion Models" https://arxiv.org/abs/2209.07162,
    with a downsampling factor chosen per level and per axis.

    With ``downsample_factors=None`` (2 everywhere) it is a drop-in replacement for
    :class:`monai.networks.nets.AutoencoderKL`: same module tree and parameter names, identical outputs.
    Unlike MONAI's class, attention defaults to PyTorch's scaled_dot_product_attention and
    ``use_checkpoint`` checkpoints each block on its own.

    Args:
        spatial_dims: number of spatial dimensions, could be 1, 2, or 3.
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_res_blocks: number of residual blocks per level, an int for all levels or one per level.
        channels: number of output channels for each block.
        attention_levels: sequence of levels to add attention.
        latent_channels: latent embedding dimension.
        norm_num_groups: number of groups for the GroupNorm layers, channels must be divisible by this number.
        norm_eps: epsilon for the normalization.
        with_encoder_nonlocal_attn: if True use non-local attention block in the encoder.
        with_decoder_nonlocal_attn: if True use non-local attention block in the decoder.
        use_checkpoint: if True, checkpoint each encoder/decoder block separately during training
            (when grad is enabled), trading recomputation for activation memory.
        use_convtranspose: if True, use ConvTranspose (kernel = stride = factor) to upsample in the decoder;
            otherwise nearest interpolation followed by a 3-kernel convolution.
        include_fc: whether to include the final linear layer in the attention block. Default to True.
        use_combined_linear: whether to use a single linear layer for qkv projection in the attention block,
            default to False.
        use_flash_attention: if True (default), compute attention with PyTorch's
            scaled_dot_product_attention (flash / memory-efficient kernels where available).
        downsample_factors: downsampling factor of each level, ``len(channels) - 1`` entries. Each entry is
            an int (same factor on every axis) or a sequence of ``spatial_dims`` ints (one per axis); 1 means
            no downsampling on that axis, e.g. ``[[4, 4, 2], [2, 2, 2]]`` turns 512x512x128 into 64x64x32.
            ``None`` means 2 on every axis at every level (MONAI's behaviour). The decoder upsamples by the
            same factors in reverse order.

    Raises:
        ValueError: if ``spatial_dims`` is not 1, 2 or 3.
        ValueError: if ``channels`` is empty or ``latent_channels`` is less than 1.
        ValueError: if any of ``channels`` is not a multiple of ``norm_num_groups``.
        ValueError: if ``attention_levels`` does not have the same length as ``channels``.
        ValueError: if ``num_res_blocks`` is a sequence whose length differs from ``channels``.
        ValueError: if ``downsample_factors`` does not have ``len(channels) - 1`` entries, an entry is a
            sequence whose length differs from ``spatial_dims``, or a factor is not an integer >= 1.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_checkpoint: bool = False,
        use_convtranspose: bool = False,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = True,
        downsample_factors: Sequence[Sequence[int] | int] | None = None,
    ) -> None:
        super().__init__()

        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if len(channels) == 0:
            raise ValueError("channels must have at least one entry.")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}.")
        # GroupNorm needs every channel count to split evenly into groups.
        if any(ch % norm_num_groups != 0 for ch in channels):
            raise ValueError(
                f"AutoencoderKL expects all channels being multiple of norm_num_groups ({norm_num_groups}), "
                f"got channels={tuple(channels)}."
            )
        if len(channels) != len(attention_levels):
            raise ValueError(
                f"AutoencoderKL expects channels being same size of attention_levels, got {len(channels)} channels "
                f"and {len(attention_levels)} attention_levels."
            )
        if isinstance(num_res_blocks, int):
            num_res_blocks = ensure_tuple_rep(num_res_blocks, len(channels))
        if len(num_res_blocks) != len(channels):
            raise ValueError(
                "`num_res_blocks` should be a single integer or a tuple of integers with the same length as "
                f"`channels` ({len(channels)}), got {tuple(num_res_blocks)}."
            )
        self.downsample_factors: tuple[tuple[int, ...], ...] = _normalise_downsample_factors(
            downsample_factors, len(channels) - 1, spatial_dims
        )

        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.encoder = Encoder(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            channels=channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            downsample_factors=self.downsample_factors,
            with_nonlocal_attn=with_encoder_nonlocal_attn,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        self.decoder = Decoder(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=latent_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            downsample_factors=self.downsample_factors,
            with_nonlocal_attn=with_decoder_nonlocal_attn,
            use_convtranspose=use_convtranspose,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )

        def conv1x1() -> Convolution:
            return Convolution(
                spatial_dims, latent_channels, latent_channels, strides=1, kernel_size=1, padding=0, conv_only=True
            )

        self.quant_conv_mu = conv1x1()
        self.quant_conv_log_sigma = conv1x1()
        self.post_quant_conv = conv1x1()
        self.use_checkpoint = use_checkpoint

    @property
    def use_checkpoint(self) -> bool:
        """Whether encoder and decoder blocks are checkpointed one by one during training."""
        return self.encoder.use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        # Kept on the encoder/decoder so that calling them directly honours the flag too.
        self.encoder.use_checkpoint = bool(value)
        self.decoder.use_checkpoint = bool(value)

    @property
    def total_factor(self) -> tuple[int, ...]:
        """Overall downsampling factor per axis: the product of all levels' factors."""
        return tuple(math.prod(axis) for axis in zip(*self.downsample_factors)) or (1,) * self.spatial_dims

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """
        Spatial shape of the latent for an input of spatial shape ``spatial_shape``.

        Args:
            spatial_shape: input spatial size, ``spatial_dims`` ints (no batch or channel dimension).

        Raises:
            ValueError: if ``spatial_shape`` does not have ``spatial_dims`` entries, or a size is not divisible
                by the total downsampling factor of its axis (the reconstruction would not match the input).
        """
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) != self.spatial_dims:
            raise ValueError(
                f"Expected {self.spatial_dims} spatial dimensions, got spatial shape {spatial_shape} "
                f"(input should be B x C x {' x '.join(['S'] * self.spatial_dims)})."
            )
        for axis, (size, factor) in enumerate(zip(spatial_shape, self.total_factor)):
            if size % factor != 0:
                raise ValueError(
                    f"Input spatial size {size} on axis {axis} is not divisible by the total downsampling factor "
                    f"{factor} of that axis (total_factor={self.total_factor}, spatial shape {spatial_shape})."
                )
        return tuple(size // factor for size, factor in zip(spatial_shape, self.total_factor))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Forwards an image through the spatial encoder, obtaining the latent mean and sigma representations.

        Args:
            x: BxCx[SPATIAL DIMS] tensor, each spatial size divisible by ``total_factor`` of its axis.

        Returns:
            z_mu and z_sigma, each Bx[LATENT CHANNELS]x[LATENT SPATIAL DIMS] (see ``latent_shape``).

        Raises:
            ValueError: if the spatial shape of ``x`` does not fit the model (see ``latent_shape``).
        """
        # Fail early with a clear message rather than a shape mismatch deep in the decoder.
        self.latent_shape(x.shape[2:])
        h = self.encoder(x)
        z_mu = self.quant_conv_mu(h)
        z_log_var = self.quant_conv_log_sigma(h)
        z_log_var = torch.clamp(z_log_var, -30.0, 20.0)
        z_sigma = torch.exp(z_log_var / 2)
        return z_mu, z_sigma

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """
        Draws a latent sample ``z_mu + eps * z_sigma`` with standard gaussian ``eps`` (reparameterisation trick).

        Args:
            z_mu: Bx[Z_CHANNELS]x[LATENT SPACE SIZE] mean obtained by the encoder.
            z_sigma: Bx[Z_CHANNELS]x[LATENT SPACE SIZE] standard deviation obtained by the encoder.

        Returns:
            sample of shape Bx[Z_CHANNELS]x[LATENT SPACE SIZE]
        """
        eps = torch.randn_like(z_sigma)
        return z_mu + eps * z_sigma

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """
        Encodes and decodes an input image through the latent mean (no sampling).

        Args:
            x: BxCx[SPATIAL DIMENSIONS] tensor.

        Returns:
            reconstructed image, of the same shape as input
        """
        z_mu, _ = self.encode(x)
        return self.decode(z_mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """
        Based on a latent space sample, forwards it through the Decoder.

        Args:
            z: Bx[Z_CHANNELS]x[LATENT SPACE SHAPE]

        Returns:
            decoded image tensor, spatial size ``total_factor`` times the latent's.
        """
        z = self.post_quant_conv(z)
        dec: torch.Tensor = self.decoder(z)
        return dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the reconstruction of a sampled latent, with the latent mean and sigma."""
        z_mu, z_sigma = self.encode(x)
        z = self.sampling(z_mu, z_sigma)
        reconstruction = self.decode(z)
        return reconstruction, z_mu, z_sigma

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled latent used as the diffusion model's input (as called by LatentDiffusionInferer)."""
        z_mu, z_sigma = self.encode(x)
        return self.sampling(z_mu, z_sigma)

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Decodes a latent produced by the diffusion model (as called by LatentDiffusionInferer)."""
        return self.decode(z)
