"""Fused units of the memory-saving path: autograd functions that save only their input and recompute the rest slab
by slab along the first spatial axis.

- :func:`norm_act_conv`: a GroupNorm -> SiLU -> convolution unit (SiLU optional); it recomputes the normalised and
  activated maps in backward (elementwise work only) and never materialises more than a slab of them;
- :func:`norm_act_conv_shortcut`: a residual block's first unit together with the block's 1x1 shortcut, whose
  backward accumulates the shortcut's gradient in place;
- :func:`upsample_conv`: a nearest-interpolation upsampling block, keeping only its low-resolution input.

With ``offload`` a unit keeps a (pinned) host copy of its input instead and reads it back slab by slab in
backward. Which blocks of a network run through which unit is :mod:`monai_diffusion.networks.memory_saving`'s
decision; the results equal the modules' own up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, Upsample

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "norm_act_conv", "norm_act_conv_shortcut", "upsample_conv"]

# Default number of elements of one chunk of a fused GroupNorm -> SiLU -> convolution unit, by device type. A chunk is
# a slab along the first spatial axis; only slabs of this size are ever materialised besides the unit's input, its
# output and (in backward) its input gradient. Small tensors fit in one chunk and run unsplit.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**24}

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _slab_depth(
    per_slice: int, size: int, device_type: str, chunk_elements: int | None, *, n_c_h: int, halo: int
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
    return _slab_depth(x.numel() // max(1, x.shape[2]), x.shape[2], x.device.type, chunk_elements, n_c_h=n_c_h,
                       halo=halo)


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


class _Map:
    """A map a fused unit reads by rows of its first spatial axis: a tensor on the device, or the copy in host memory
    an offloading unit keeps of its saved input, copied back one slab at a time (the whole map is never on the device
    again). The host copy is slab-major (first spatial axis outermost), so a slab is one contiguous block to copy."""

    def __init__(self, tensor: torch.Tensor | None, host: torch.Tensor | None = None,
                 device: torch.device | None = None) -> None:
        self.tensor, self.host = tensor, host
        if tensor is not None:
            self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        else:
            self.shape = torch.Size((host.shape[1], host.shape[2], host.shape[0], *host.shape[3:]))
            self.dtype, self.device = host.dtype, device
        self.ndim = len(self.shape)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """``map[:, :, lo:hi]`` on the device, ``0 <= lo <= hi <= size``."""
        if self.tensor is not None:
            return self.tensor[:, :, lo:hi]
        return self.host[lo:hi].to(self.device, non_blocking=True).movedim(0, 2).contiguous()

    @staticmethod
    def offloaded(x: torch.Tensor, depth: int) -> _Map:
        """A host copy of ``x`` (pinned when ``x`` is on a GPU), written slab by slab: no device-side temporary
        larger than a slab."""
        host = torch.empty((x.shape[2], x.shape[0], x.shape[1], *x.shape[3:]), dtype=x.dtype,
                           pin_memory=x.device.type == "cuda")
        for d0 in range(0, x.shape[2], depth):
            host[d0 : d0 + depth].copy_(x[:, :, d0 : d0 + depth].movedim(2, 0), non_blocking=True)
        return _Map(None, host, x.device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _affine(mean, rstd, gamma, beta, *, channels, nd):
    """Per (batch, channel) scale and shift with ``group_norm(x) = x * scale + shift``."""
    gamma_c = gamma.float().view(1, channels, *(1,) * nd)
    scale = _per_channel(rstd, channels, nd) * gamma_c
    shift = beta.float().view(1, channels, *(1,) * nd) - _per_channel(mean, channels, nd) * scale
    return scale, shift


def _activated(x: _Map, lo, hi, scale, *, shift, act, dtype):
    """Normalised (and activated) slab ``[lo, hi)`` of the first spatial axis in ``dtype``, zero outside ``x``."""
    size = x.shape[2]
    s0, s1 = max(lo, 0), min(hi, size)
    n = torch.addcmul(shift, x.rows(s0, s1).float(), scale)
    a = F.silu(n, inplace=True) if act else n
    a = a.to(dtype)
    if s0 == lo and s1 == hi:
        return a
    return F.pad(a, (0, 0) * (x.ndim - 3) + (s0 - lo, hi - s1))


def _grad_normed(rows, grad_a, d0, depth, *, scale, shift, act):
    """(dL/d(normalised), float32 rows) of the slab starting at ``d0``, from the activated map's gradient and the
    slab's input ``rows``."""
    xs = rows.float()
    g = grad_a[:, :, d0 : d0 + depth].float()
    if act:
        g = torch.ops.aten.silu_backward(g, torch.addcmul(shift, xs, scale))
    return g, xs


def _conv_backward(grad_out, inputs, weight, has_bias, *, padding):
    """(input, weight, bias) gradients of a stride-1 convolution whose first spatial axis is not padded."""
    nd = inputs.ndim - 2
    return torch.ops.aten.convolution_backward(
        grad_out, inputs, weight, [weight.shape[0]] if has_bias else None, [1] * nd, [0, *padding[1:]], [1] * nd,
        False, [0] * nd, 1, [True, True, has_bias],
    )


def _unit_forward(x, gamma, beta, weight, *, bias, groups, eps, act, padding, depth):
    """``conv(silu(group_norm(x)))`` (SiLU optional) slab by slab; returns ``(output, mean, rstd, compute dtype)``."""
    device_type = x.device.type
    compute_dtype = _compute_dtype(x)
    with torch.autocast(device_type, enabled=False):
        mean, rstd = _group_stats(x, groups, eps, depth)
        scale, shift = _affine(mean, rstd, gamma, beta, channels=x.shape[1], nd=x.ndim - 2)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        size, halo = x.shape[2], padding[0]
        conv = _CONV_FNS[x.ndim - 2]
        source = _Map(x)
        out = None
        for d0 in range(0, size, depth):
            d1 = min(size, d0 + depth)
            a = _activated(source, d0 - halo, d1 + halo, scale, shift=shift, act=act, dtype=compute_dtype)
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
    return out, mean, rstd, compute_dtype


def _unit_backward(grad_out, x: _Map, gamma, beta, weight, bias, mean, rstd, groups, act, padding, depth,
                   compute_dtype, shortcut=None):
    """Gradients ``(x, gamma, beta, weight, bias)`` of :func:`_unit_forward`, slab by slab.

    ``shortcut(d0, d1, rows)``, when given, returns the float32 gradient a shortcut branch sends to rows
    ``[d0, d1)`` of ``x`` (``rows``: those rows of ``x``); it is added into this unit's gradient buffer as the last
    pass writes it, so no second input-sized gradient exists to be summed with this one.
    """
    device_type = x.device.type
    nd = x.ndim - 2
    batch, channels, size = x.shape[0], x.shape[1], x.shape[2]
    halo = padding[0]
    with torch.autocast(device_type, enabled=False):
        scale, shift = _affine(mean, rstd, gamma, beta, channels=channels, nd=nd)
        w = weight.to(compute_dtype)
        grad_out = grad_out.to(compute_dtype)
        # Pass 1: convolution backward slab by slab; the activated map's gradient (halos overlap) is summed in
        # a buffer that becomes grad_x.
        grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
        for d0 in range(0, size, depth):
            d1 = min(size, d0 + depth)
            lo, hi = d0 - halo, d1 + halo
            a = _activated(x, lo, hi, scale, shift=shift, act=act, dtype=compute_dtype)
            g_in, g_w, g_b = _conv_backward(grad_out[:, :, d0:d1], a, w, bias is not None, padding=padding)
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
            g_n, xs = _grad_normed(x.rows(d0, min(size, d0 + depth)), grad_x, d0, depth, scale=scale, shift=shift,
                                   act=act)
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
        per_group = math.prod(x.shape) // (batch * groups)
        gamma_f = gamma.float()
        m1 = (sum_g * gamma_f).view(batch, groups, -1).sum(-1) / per_group
        m2 = (sum_gxhat * gamma_f).view(batch, groups, -1).sum(-1) / per_group
        coef_a = _per_channel(rstd, channels, nd) * gamma_f.view(1, channels, *(1,) * nd)
        coef_b = _per_channel(-rstd.square() * m2, channels, nd)
        coef_c = _per_channel(rstd.square() * m2 * mean - rstd * m1, channels, nd)
        # Pass 3: write grad_x over the buffer, slab by slab.
        for d0 in range(0, size, depth):
            d1 = min(size, d0 + depth)
            rows = x.rows(d0, d1)
            if keep or not act:
                g_n = grad_x[:, :, d0:d1].float()
                xs = rows.float()
            else:
                g_n, xs = _grad_normed(rows, grad_x, d0, depth, scale=scale, shift=shift, act=act)
            slab = torch.addcmul(coef_c, xs, coef_b).addcmul_(g_n, coef_a)
            if shortcut is not None:
                slab += shortcut(d0, d1, rows)
            grad_x[:, :, d0:d1] = slab
            del g_n, xs, slab, rows
    return grad_x, grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype), grad_w.to(weight.dtype), (
        grad_b.to(bias.dtype) if bias is not None else None)


def _saved_input(ctx, x: torch.Tensor, offload: bool, depth: int) -> torch.Tensor | None:
    """What a unit hands ``save_for_backward`` for its input: ``x``, or None when it keeps a host copy instead (as a
    plain attribute, out of reach of saved-tensor hooks: it is in host memory already)."""
    ctx.host_input = _Map.offloaded(x, depth) if offload else None
    return None if offload else x


def _input_map(ctx, saved: torch.Tensor | None) -> _Map:
    return ctx.host_input if saved is None else _Map(saved)


class _NormActConv(torch.autograd.Function):
    """``conv(silu(group_norm(x)))`` (SiLU optional) that saves only ``x`` for backward and runs slab by slab.

    Autograd on the three modules keeps the normalised map, the activated map and (under AMP) a float32 copy of
    the input for backward: three maps per unit besides the input. This keeps ``x`` only and recomputes the rest,
    one slab along the first spatial axis at a time (with a halo of ``padding`` voxels for the convolution), in
    forward and backward; the GroupNorm statistics are those of the whole tensor. Under autocast the normalisation
    runs in float32 and hands the convolution the autocast dtype, so the unit's output (the next unit's saved
    input) is half precision too: the norm "returns the half-precision dtype". With ``offload`` the saved ``x`` is a
    copy in host memory, read back slab by slab in backward.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias, groups, eps, act, padding, depth, offload):  # type: ignore[override]
        out, mean, rstd, compute_dtype = _unit_forward(x, gamma, beta, weight, bias=bias, groups=groups, eps=eps,
                                                       act=act, padding=padding, depth=depth)
        ctx.save_for_backward(_saved_input(ctx, x, offload, depth), gamma, beta, weight, bias, mean, rstd)
        ctx.config = (groups, act, tuple(padding), depth, compute_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, gamma, beta, weight, bias, mean, rstd = ctx.saved_tensors
        grads = _unit_backward(grad_out, _input_map(ctx, x), gamma, beta, weight, bias, mean, rstd, *ctx.config)
        return (*grads, None, None, None, None, None, None)


class _NormActConvShortcut(torch.autograd.Function):
    """A residual block's first unit together with its 1x1-convolution shortcut (the block changes the channel
    count): returns ``(conv(silu(group_norm(x))), shortcut(x))``.

    Autograd would sum the input gradients of the two branches of ``x``: the shortcut's, input-sized, would be kept
    through the whole backward of the block's inner units, beside the unit's own gradient buffer. Here the unit's
    backward computes the shortcut's input gradient slab by slab from the shortcut's output gradient (the block's
    output channels, fewer than the input's in the decoder) and adds it into its own buffer; the shortcut's weight
    gradients are summed on the way. Saves only ``x`` (in host memory with ``offload``).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias, shortcut_weight, shortcut_bias, groups, eps, padding, depth,  # type: ignore[override]
                offload):
        out, mean, rstd, compute_dtype = _unit_forward(x, gamma, beta, weight, bias=bias, groups=groups, eps=eps,
                                                       act=True, padding=padding, depth=depth)
        with torch.autocast(x.device.type, enabled=False):
            w = shortcut_weight.to(compute_dtype)
            b = shortcut_bias.to(compute_dtype) if shortcut_bias is not None else None
            shortcut = _CONV_FNS[x.ndim - 2](x.to(compute_dtype), w, b)
        ctx.save_for_backward(_saved_input(ctx, x, offload, depth), gamma, beta, weight, bias, mean, rstd,
                              shortcut_weight, shortcut_bias)
        ctx.config = (groups, True, tuple(padding), depth, compute_dtype)
        return out, shortcut

    @staticmethod
    def backward(ctx, grad_out, grad_shortcut):  # type: ignore[override]
        x, gamma, beta, weight, bias, mean, rstd, shortcut_weight, shortcut_bias = ctx.saved_tensors
        compute_dtype = ctx.config[-1]
        has_bias = shortcut_bias is not None
        w = shortcut_weight.to(compute_dtype)
        grad_sw = torch.zeros(shortcut_weight.shape, dtype=torch.float32, device=shortcut_weight.device)
        grad_sb = torch.zeros(shortcut_weight.shape[0], dtype=torch.float32, device=shortcut_weight.device)

        def shortcut(d0, d1, rows):
            g_in, g_w, g_b = _conv_backward(grad_shortcut[:, :, d0:d1].to(compute_dtype), rows.to(compute_dtype), w,
                                            has_bias, padding=(0,) * (rows.ndim - 2))
            grad_sw.add_(g_w)
            if has_bias:
                grad_sb.add_(g_b)
            return g_in.float()

        with torch.autocast(grad_out.device.type, enabled=False):
            grads = _unit_backward(grad_out, _input_map(ctx, x), gamma, beta, weight, bias, mean, rstd, *ctx.config,
                                   shortcut=shortcut if grad_shortcut is not None else None)
        return (*grads, grad_sw.to(shortcut_weight.dtype), grad_sb.to(shortcut_bias.dtype) if has_bias else None,
                None, None, None, None, None)


class _UpsampleConv(torch.autograd.Function):
    """``conv(nearest_upsample(x))`` computed slab by slab along the first spatial axis, saving only ``x``.

    The decoder's last upsampling makes the largest maps of the network (full resolution, the second-finest
    level's channels). Autograd would keep the upsampled map for the convolution's backward, and the recomputation
    of a checkpoint would rebuild it whole; here only a slab of it (plus a halo of ``padding`` rows) ever exists,
    in forward and backward. ``x`` itself is low resolution.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, factors, padding, depth, offload):  # type: ignore[override]
        device_type = x.device.type
        compute_dtype = _compute_dtype(x)
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            size = x.shape[2] * factors[0]
            conv = _CONV_FNS[x.ndim - 2]
            source = _Map(x)
            out = None
            for d0 in range(0, size, depth):
                d1 = min(size, d0 + depth)
                a = _UpsampleConv._upsampled(source, d0 - padding[0], d1 + padding[0], factors, dtype=compute_dtype)
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
        # The low-resolution input's rows are few; offloaded they are still read back a slab at a time.
        ctx.save_for_backward(_saved_input(ctx, x, offload, max(1, depth // factors[0])), weight, bias)
        ctx.config = (tuple(factors), tuple(padding), depth, compute_dtype)
        return out

    @staticmethod
    def _upsampled(x: _Map, lo, hi, factors, *, dtype):
        """Rows ``[lo, hi)`` of the nearest-upsampled ``x`` in ``dtype``, zero outside it."""
        f0, size = factors[0], x.shape[2] * factors[0]
        s0, s1 = max(lo, 0), min(hi, size)
        r0, r1 = s0 // f0, -(-s1 // f0)
        up = F.interpolate(x.rows(r0, r1).to(dtype), scale_factor=tuple(float(f) for f in factors), mode="nearest")
        up = up[:, :, s0 - r0 * f0 : s1 - r0 * f0]
        if s0 == lo and s1 == hi:
            return up
        return F.pad(up, (0, 0) * (x.ndim - 3) + (s0 - lo, hi - s1))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved, weight, bias = ctx.saved_tensors
        x = _input_map(ctx, saved)
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
                a = _UpsampleConv._upsampled(x, lo, hi, factors, dtype=compute_dtype)
                g_in, g_w, g_b = _conv_backward(grad_out[:, :, d0:d1], a, w, bias is not None, padding=padding)
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
            None,
        )


def upsample_conv(x: torch.Tensor, block: Upsample, chunk_elements: int | None = None,
                  offload: bool = False) -> torch.Tensor:
    """A nearest-interpolation Upsample block (interpolation, then its post convolution) through
    :class:`_UpsampleConv`: same result, only ``x`` saved (in host memory with ``offload``), slabs of about
    ``chunk_elements`` elements."""
    interp, layer = block.upsample_non_trainable, block.postconv.conv
    spatial = x.ndim - 2
    factors = interp.scale_factor if isinstance(interp.scale_factor, tuple) else (interp.scale_factor,) * spatial
    factors = tuple(int(f) for f in factors)
    # Slabs are counted on the upsampled map, which is what a slab materialises.
    up_shape = [n * f for n, f in zip(x.shape[2:], factors)]
    per_slice = x.shape[0] * x.shape[1] * math.prod(up_shape[1:])
    n_c_h = x.shape[0] * x.shape[1] * up_shape[1] if spatial > 1 else 0
    depth = _slab_depth(per_slice, up_shape[0], x.device.type, chunk_elements, n_c_h=n_c_h, halo=layer.padding[0])
    return _UpsampleConv.apply(x, layer.weight, layer.bias, factors, tuple(layer.padding), depth, offload)


def norm_act_conv(
    x: torch.Tensor, norm: nn.GroupNorm, conv: Convolution, act: bool = True, *, chunk_elements: int | None = None,
    offload: bool = False,
) -> torch.Tensor:
    """``conv(silu(norm(x)))`` (``conv(norm(x))`` with ``act=False``) saving only ``x`` for backward (a host copy of
    it with ``offload``).

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
        offload,
    )


def norm_act_conv_shortcut(
    x: torch.Tensor, norm: nn.GroupNorm, conv: Convolution, shortcut: Convolution, *,
    chunk_elements: int | None = None, offload: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv(silu(norm(x))), shortcut(x))`` for a residual block's first unit and its 1x1-convolution shortcut,
    saving only ``x`` (a host copy of it with ``offload``); the shortcut's input gradient is added into the unit's own
    gradient buffer slab by slab (see :class:`_NormActConvShortcut`)."""
    layer = conv.conv
    return _NormActConvShortcut.apply(
        x, norm.weight, norm.bias, layer.weight, layer.bias, shortcut.conv.weight, shortcut.conv.bias,
        norm.num_groups, norm.eps, tuple(layer.padding), _chunk_depth(x, chunk_elements, layer.padding[0]), offload,
    )
