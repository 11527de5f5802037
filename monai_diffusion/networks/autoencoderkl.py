# Adapted from MONAI's monai/networks/nets/autoencoderkl.py (Apache License 2.0, MONAI Consortium).
"""AutoencoderKL with a per-level, per-axis downsampling factor.

With every factor equal to 2 the module tree and parameter names are identical to
:class:`monai.networks.nets.AutoencoderKL`, so its state dicts load with ``strict=True``. The factors' arithmetic
is :mod:`monai_diffusion.factors`; the memory-saving training path behind ``use_checkpoint`` is
:mod:`monai_diffusion.networks.memory_saving`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SpatialAttentionBlock, Upsample
from monai.networks.nets.autoencoderkl import AEKLResBlock, AsymmetricPad
from monai.utils import ensure_tuple_rep

from monai_diffusion import factors as factor_math
from monai_diffusion.networks.memory_saving import nearest_enlargement, run_blocks

__all__ = ["AutoencoderKL", "FactorDownsample", "FactorUpsample", "Encoder", "Decoder"]

logger = logging.getLogger("monai_diffusion")


class FactorDownsample(nn.Module):
    """
    Convolution-based downsampling by an integer factor per axis; generalises MONAI's ``AEKLDownsample``.

    On an axis with factor ``s`` the input is padded by (0, 1) and convolved with kernel ``s + 1`` and
    stride ``s``. The kernel is one voxel wider than the stride, so windows overlap and every input voxel
    reaches the output (a kernel smaller than its stride would silently skip voxels). For an axis of
    size ``n`` divisible by ``s`` the output size is ``n / s``. ``s = 2`` gives exactly MONAI's layer
    (kernel 3, stride 2); ``s = 1`` gives kernel 2, stride 1, leaving the size unchanged.

    With ``residual`` the average of each ``s``-block of the input is added to the convolution's output: a
    parameter-free path through the resampling (as in DC-AE's residual autoencoding, Chen et al. 2024,
    https://arxiv.org/abs/2410.10733), so a large factor starts from a faithful coarse copy instead of having to
    learn one.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        in_channels: number of input (and output) channels.
        factors: downsampling factor, an int for all axes or one int per axis. Defaults to 2.
        residual: add the block average of the input (no parameters). Defaults to False (MONAI's layer).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, factors: Sequence[int] | int = 2, residual: bool = False
    ) -> None:
        super().__init__()
        self.factors: tuple[int, ...] = tuple(int(f) for f in ensure_tuple_rep(factors, spatial_dims))
        self.spatial_dims = spatial_dims
        self.residual = residual
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
        out = self.conv(self.pad(x))
        if self.residual:
            out = out + getattr(F, f"avg_pool{self.spatial_dims}d")(x, kernel_size=self.factors)
        return out


class FactorUpsample(Upsample):
    """
    MONAI's ``Upsample`` (same children, so the same state dict keys), optionally with a parameter-free residual:
    the nearest-neighbour enlargement of the input is added to the block's output, mirroring
    :class:`FactorDownsample`'s ``residual``.

    Args:
        residual: add the nearest-neighbour enlargement of the input. Defaults to False (MONAI's block).
        kwargs: passed to :class:`monai.networks.blocks.Upsample`.
    """

    def __init__(self, *, residual: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + nearest_enlargement(x, out.shape[2:]) if self.residual else out


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
        use_checkpoint: if True, train through the memory-saving path (see ``AutoencoderKL``).
        chunk_elements: elements of one slab of the memory-saving path's fused units (None: a default per device).
        residual_resampling: add a parameter-free block average to each downsampling (see ``FactorDownsample``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        out_channels: int,
        *, num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        downsample_factors: Sequence[Sequence[int]],
        with_nonlocal_attn: bool = True,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = True,
        use_checkpoint: bool = False,
        chunk_elements: int | None = None,
        residual_resampling: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.use_checkpoint = use_checkpoint
        self.chunk_elements = chunk_elements

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
                blocks.append(FactorDownsample(spatial_dims, input_channel, downsample_factors[i], residual_resampling))

        if with_nonlocal_attn:
            blocks += [res_block(channels[-1], channels[-1]), attn_block(channels[-1])]
            blocks.append(res_block(channels[-1], channels[-1]))

        blocks.append(nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels[-1], eps=norm_eps, affine=True))
        blocks.append(
            Convolution(spatial_dims, channels[-1], out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)
        )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            # The full-resolution stage (input convolution, level-0 blocks, first downsampling) is recomputed as one
            # segment: its maps would otherwise stay alive through the whole decoder's backward, where the peak is.
            first_down = next((i for i, b in enumerate(self.blocks) if isinstance(b, FactorDownsample)), -1)
            return run_blocks(self.blocks, x, self.chunk_elements, first_segment=first_down + 1)
        for block in self.blocks:
            x = block(x)
        return x


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
        use_checkpoint: if True, train through the memory-saving path (see ``AutoencoderKL``).
        chunk_elements: elements of one slab of the memory-saving path's fused units (None: a default per device).
        residual_resampling: add a parameter-free nearest enlargement to each upsampling (see ``FactorUpsample``).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        in_channels: int,
        out_channels: int,
        *, num_res_blocks: Sequence[int],
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
        chunk_elements: int | None = None,
        residual_resampling: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.use_checkpoint = use_checkpoint
        self.chunk_elements = chunk_elements

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
                return FactorUpsample(spatial_dims=spatial_dims, in_channels=ch, out_channels=ch, scale_factor=factors,
                                      mode="deconv", residual=residual_resampling)
            post_conv = Convolution(spatial_dims, ch, ch, strides=1, kernel_size=3, padding=1, conv_only=True)
            return FactorUpsample(
                residual=residual_resampling,
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
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return run_blocks(self.blocks, x, self.chunk_elements)
        for block in self.blocks:
            x = block(x)
        return x


class AutoencoderKL(nn.Module):
    """
    Autoencoder model with KL-regularized latent space based on
    Rombach et al. "High-Resolution Image Synthesis with Latent Diffusion Models" https://arxiv.org/abs/2112.10752
    and Pinaya et al. "Brain Imaging Generation with Latent Diffusion Models" https://arxiv.org/abs/2209.07162,
    with a downsampling factor chosen per level and per axis.

    With ``downsample_factors=None`` (2 everywhere) it is a drop-in replacement for
    :class:`monai.networks.nets.AutoencoderKL`: same module tree and parameter names, identical outputs.
    Unlike MONAI's class, attention defaults to PyTorch's scaled_dot_product_attention and
    ``use_checkpoint`` trains through a memory-saving path instead of recomputing the whole encoder and decoder.

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
        use_checkpoint: if True, during training (with grad enabled) keep as little as possible for backward:
            fused slab-wise norm/activation/convolution units, per-block checkpoints and the encoder's
            full-resolution stage recomputed as one segment (:mod:`monai_diffusion.networks.memory_saving`).
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
        chunk_elements: elements of one slab of the memory-saving path's fused units (``use_checkpoint``); a
            smaller slab lowers the peak and costs time. None: 2**21 on CPU, 2**24 on CUDA.
        residual_resampling: add a parameter-free path through every resampling layer: each downsampling adds
            the block average of its input, each upsampling the nearest-neighbour enlargement of its input (DC-AE's
            residual autoencoding, https://arxiv.org/abs/2410.10733). No new parameters, so the state dict is
            unchanged; with large factors it speeds up early training. Defaults to False (MONAI's network).

    Raises:
        ValueError: if ``spatial_dims`` is not 1, 2 or 3.
        ValueError: if ``channels`` is empty or ``latent_channels`` is less than 1.
        ValueError: if any of ``channels`` is not a multiple of ``norm_num_groups``.
        ValueError: if ``attention_levels`` does not have the same length as ``channels``.
        ValueError: if ``num_res_blocks`` is a sequence whose length differs from ``channels``.
        ValueError: if ``downsample_factors`` does not have ``len(channels) - 1`` entries, an entry is a
            sequence whose length differs from ``spatial_dims``, or a factor is not an integer >= 1.
        ValueError: if ``chunk_elements`` is given and less than 1.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        *, channels: Sequence[int] = (32, 64, 64, 64),
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
        chunk_elements: int | None = None,
        residual_resampling: bool = False,
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
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1 (or None for the default), got {chunk_elements}.")
        self.downsample_factors: tuple[tuple[int, ...], ...] = factor_math.per_axis_factors(
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
            chunk_elements=chunk_elements,
            residual_resampling=residual_resampling,
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
            chunk_elements=chunk_elements,
            residual_resampling=residual_resampling,
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
        """Whether the encoder and decoder train through the memory-saving path."""
        return self.encoder.use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        # Kept on the encoder/decoder so that calling them directly honours the flag too.
        self.encoder.use_checkpoint = bool(value)
        self.decoder.use_checkpoint = bool(value)

    @property
    def total_factor(self) -> tuple[int, ...]:
        """Overall downsampling factor per axis: the product of all levels' factors."""
        return factor_math.total_factor(self.downsample_factors, self.spatial_dims)

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """
        Spatial shape of the latent for an input of spatial shape ``spatial_shape``.

        Args:
            spatial_shape: input spatial size, ``spatial_dims`` ints (no batch or channel dimension).

        Raises:
            ValueError: if ``spatial_shape`` does not have ``spatial_dims`` entries, or a size is not divisible
                by the total downsampling factor of its axis (the reconstruction would not match the input).
        """
        return factor_math.latent_shape(spatial_shape, self.total_factor)

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

    def load_old_state_dict(self, old_state_dict: dict, verbose: bool = False) -> None:
        """
        Load a state dict of an AutoencoderKL trained with MONAI Generative
        (https://github.com/Project-MONAI/GenerativeModels), the same renames as MONAI's own ``load_old_state_dict``:
        attention projections moved into ``<block>.attn`` (``to_q``/``to_k``/``to_v``, ``proj_attn`` ->
        ``attn.out_proj``, identity when the old block had none) and the upsampling convolution ``conv`` became
        ``postconv``. The factors do not change any name, so old checkpoints of any factors load.

        Args:
            old_state_dict: state dict of the old model (left unchanged).
            verbose: if True, log the keys that differ between the two layouts and the ones left unused.

        Raises:
            KeyError: an old key this layout needs is missing.
            RuntimeError: the renamed state dict does not fit the model (``load_state_dict(strict=True)``).
        """
        old_state_dict = dict(old_state_dict)
        new_state_dict = self.state_dict()
        if all(k in new_state_dict for k in old_state_dict):
            logger.info("All keys match, loading state dict.")
            self.load_state_dict(old_state_dict)
            return

        if verbose:
            for k in new_state_dict:
                if k not in old_state_dict:
                    logger.info("key %s not found in old state dict", k)
            for k in old_state_dict:
                if k not in new_state_dict:
                    logger.info("key %s not found in new state dict", k)

        for k in new_state_dict:
            if k in old_state_dict:
                new_state_dict[k] = old_state_dict.pop(k)

        attention_blocks = [k.replace(".attn.to_q.weight", "") for k in new_state_dict if "attn.to_q.weight" in k]
        for block in attention_blocks:
            for name in ("to_q", "to_k", "to_v"):
                new_state_dict[f"{block}.attn.{name}.weight"] = old_state_dict.pop(f"{block}.{name}.weight")
                new_state_dict[f"{block}.attn.{name}.bias"] = old_state_dict.pop(f"{block}.{name}.bias")
            out_w, out_b = f"{block}.attn.out_proj.weight", f"{block}.attn.out_proj.bias"
            proj_w, proj_b = f"{block}.proj_attn.weight", f"{block}.proj_attn.bias"
            if out_w in new_state_dict:
                if proj_w in old_state_dict:
                    new_state_dict[out_w] = old_state_dict.pop(proj_w)
                    new_state_dict[out_b] = (
                        old_state_dict.pop(proj_b) if proj_b in old_state_dict else torch.zeros_like(new_state_dict[out_b])
                    )
                else:
                    # An old block without an output projection: identity and zero keep its output unchanged.
                    new_state_dict[out_w] = torch.eye(
                        new_state_dict[out_w].shape[0], dtype=new_state_dict[out_w].dtype,
                        device=new_state_dict[out_w].device,
                    )
                    new_state_dict[out_b] = torch.zeros_like(new_state_dict[out_b])
            elif proj_w in old_state_dict:
                # This model has no output projection (include_fc=False): the old one must not surface as unexpected.
                old_state_dict.pop(proj_w)
                old_state_dict.pop(proj_b, None)

        for k in new_state_dict:
            if "postconv" in k:
                new_state_dict[k] = old_state_dict.pop(k.replace("postconv", "conv"))
        if verbose:
            logger.info("remaining keys in old_state_dict: %s", list(old_state_dict))
        self.load_state_dict(new_state_dict, strict=True)
