from __future__ import annotations

import pytest
import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.autoencoderkl import AEKLDownsample
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from helpers import old_layout

import monai_diffusion.networks.autoencoderkl as aekl_module
import monai_diffusion.networks.fused_units as fused_units
import monai_diffusion.networks.memory_saving as memory_saving
from monai_diffusion.networks import AutoencoderKL, FactorDownsample

# Tiny settings so the whole file runs in seconds on CPU.
TINY = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, norm_num_groups=8, latent_channels=3)
# No attention anywhere: attention is global, so it would hide any voxel the downsampling skips.
NO_ATTN = dict(
    num_res_blocks=1,
    norm_num_groups=4,
    latent_channels=2,
    with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------------
# Drop-in compatibility with MONAI at factor 2
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_convtranspose", [False, True])
@pytest.mark.parametrize(
    "spatial_dims, kwargs, shape",
    [
        (3, dict(channels=(8, 16, 16), attention_levels=(False, False, True)), (2, 1, 16, 16, 16)),
        (2, dict(channels=(8, 16), attention_levels=(False, True), in_channels=2, out_channels=2), (2, 2, 16, 16)),
    ],
)
def test_monai_state_dict_loads_strict_and_outputs_match(use_convtranspose, spatial_dims, kwargs, shape):
    common = dict(num_res_blocks=1, norm_num_groups=8, latent_channels=3, use_convtranspose=use_convtranspose, **kwargs)
    # MONAI with its default (explicit) attention; ours with SDPA by default: same maths.
    reference = MonaiAutoencoderKL(spatial_dims, use_flash_attention=False, **common).eval()
    model = AutoencoderKL(spatial_dims, **common).eval()

    ref_state = reference.state_dict()
    assert list(model.state_dict()) == list(ref_state)
    model.load_state_dict(ref_state, strict=True)

    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), reference.reconstruct(x), atol=1e-5, rtol=1e-5)
        for ours, theirs in zip(model.encode(x), reference.encode(x)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        z = torch.randn(shape[0], 3, *[s // 2 ** (len(kwargs["channels"]) - 1) for s in shape[2:]])
        torch.testing.assert_close(model.decode(z), reference.decode(z), atol=1e-5, rtol=1e-5)


def test_defaults_match_monai_except_flash_attention():
    model = AutoencoderKL(3)
    reference = MonaiAutoencoderKL(3)
    assert model.downsample_factors == ((2, 2, 2),) * 3
    assert model.total_factor == (8, 8, 8)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    attn = [m for m in model.modules() if hasattr(m, "use_flash_attention")]
    assert attn and all(m.use_flash_attention for m in attn)


def test_factor_two_downsample_equals_monai_layer():
    ours = FactorDownsample(spatial_dims=3, in_channels=4, factors=2)
    theirs = AEKLDownsample(spatial_dims=3, in_channels=4)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 4, 8, 6, 10)
    torch.testing.assert_close(ours(x), theirs(x))


# ---------------------------------------------------------------------------------------------------------------------
# Per-axis factors: normalisation, shapes, layer design
# ---------------------------------------------------------------------------------------------------------------------


def test_downsample_factors_are_normalised_per_level_and_axis():
    model = AutoencoderKL(
        3, channels=(8, 8, 8), attention_levels=(False,) * 3, downsample_factors=[4, (2, 2, 1)], **NO_ATTN
    )
    assert model.downsample_factors == ((4, 4, 4), (2, 2, 1))
    assert model.total_factor == (8, 8, 4)
    assert model.latent_shape((64, 32, 16)) == (8, 4, 4)
    single_level = AutoencoderKL(2, channels=(8,), attention_levels=(False,), **NO_ATTN)
    assert single_level.downsample_factors == ()
    assert single_level.total_factor == (1, 1)


@pytest.mark.parametrize("factor", range(1, 17))
def test_downsample_layer_kernel_stride_and_size(factor):
    layer = FactorDownsample(spatial_dims=1, in_channels=1, factors=factor)
    conv = layer.conv.conv
    assert conv.kernel_size == (factor + 1,) and conv.stride == (factor,) and conv.padding == (0,)
    n = 3 * factor
    assert layer(torch.zeros(1, 1, n)).shape[-1] == n // factor


@pytest.mark.parametrize("factors", [(1, 1, 1), (3, 1, 2), (4, 8, 16), (16, 2, 1)])
def test_downsample_layer_reaches_every_voxel(factors):
    layer = FactorDownsample(spatial_dims=3, in_channels=2, factors=factors)
    x = torch.randn(1, 2, 16, 16, 16, requires_grad=True)
    out = layer(x)
    assert out.shape[2:] == tuple(16 // f for f in factors)
    out.sum().backward()
    assert (x.grad != 0).all()


def _replace_group_norms(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.GroupNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            _replace_group_norms(child)


@pytest.mark.parametrize(
    "channels, factors, shape",
    [
        ((4, 8), [4], (16, 16, 16)),
        ((4, 8), [8], (16, 16, 16)),
        ((4, 8), [16], (32, 32, 32)),
        ((4, 8, 8), [4, 2], (16, 16, 16)),
        ((4, 8, 8), [[4, 2, 1], [4, 1, 2]], (32, 16, 8)),
    ],
)
def test_every_input_voxel_reaches_the_latent(channels, factors, shape):
    model = AutoencoderKL(
        3, channels=channels, attention_levels=(False,) * len(channels), downsample_factors=factors, **NO_ATTN
    )
    # GroupNorm statistics pass a little gradient to every voxel and would hide a skipped one: drop them so
    # only the convolutions' receptive fields count.
    _replace_group_norms(model)
    x = torch.randn(1, 1, *shape, requires_grad=True)
    z_mu, _ = model.encode(x)
    assert z_mu.shape[2:] == model.latent_shape(shape)
    z_mu.sum().backward()
    assert (x.grad != 0).all(), f"{int((x.grad == 0).sum())} input voxels do not reach the latent"


@pytest.mark.parametrize("use_convtranspose", [False, True])
def test_anisotropic_round_trip_shapes(use_convtranspose):
    model = AutoencoderKL(
        3,
        channels=(8, 16, 16),
        attention_levels=(False, False, True),
        num_res_blocks=1,
        norm_num_groups=8,
        latent_channels=3,
        downsample_factors=[[4, 4, 2], [2, 1, 1]],
        use_convtranspose=use_convtranspose,
    )
    x = torch.randn(2, 1, 32, 16, 8)
    reconstruction, z_mu, z_sigma = model(x)
    assert reconstruction.shape == x.shape
    assert z_mu.shape == z_sigma.shape == (2, 3, 4, 4, 4)
    assert model.encode_stage_2_inputs(x).shape == z_mu.shape
    assert model.decode_stage_2_outputs(z_mu).shape == x.shape


def test_convtranspose_upsample_uses_kernel_equal_to_stride():
    model = AutoencoderKL(
        3,
        channels=(4, 8, 8),
        attention_levels=(False,) * 3,
        downsample_factors=[[4, 2, 1], [2, 1, 3]],
        use_convtranspose=True,
        **NO_ATTN,
    )
    deconvs = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    # Decoder undoes the encoder's levels in reverse order.
    assert [d.stride for d in deconvs] == [(2, 1, 3), (4, 2, 1)]
    assert [d.kernel_size for d in deconvs] == [(2, 1, 3), (4, 2, 1)]


@pytest.mark.parametrize("spatial_dims, shape", [(1, (2, 1, 32)), (2, (2, 1, 32, 16))])
def test_lower_dimensional_models(spatial_dims, shape):
    model = AutoencoderKL(
        spatial_dims,
        channels=(4, 8),
        attention_levels=(False, True),
        num_res_blocks=1,
        norm_num_groups=4,
        downsample_factors=[4 if spatial_dims == 1 else (4, 1)],
    )
    reconstruction, z_mu, _ = model(torch.randn(shape))
    assert reconstruction.shape == shape
    assert z_mu.shape[2:] == model.latent_shape(shape[2:])


# ---------------------------------------------------------------------------------------------------------------------
# Input shape checks
# ---------------------------------------------------------------------------------------------------------------------


def _anisotropic_model() -> AutoencoderKL:
    return AutoencoderKL(3, channels=(4, 8), attention_levels=(False, False), downsample_factors=[[4, 2, 1]], **NO_ATTN)


def test_latent_shape_rejects_indivisible_size_naming_axis_size_and_factor():
    model = _anisotropic_model()
    assert model.latent_shape((16, 6, 5)) == (4, 3, 5)
    with pytest.raises(ValueError, match=r"size 7 on axis 1 .* factor 2"):
        model.latent_shape((16, 7, 5))
    with pytest.raises(ValueError, match="3 spatial dimensions"):
        model.latent_shape((16, 8))


@pytest.mark.parametrize("method", ["encode", "forward", "reconstruct", "encode_stage_2_inputs"])
def test_encoding_an_indivisible_input_raises_clear_error(method):
    model = _anisotropic_model()
    with pytest.raises(ValueError, match=r"size 6 on axis 0 .* factor 4"):
        getattr(model, method)(torch.randn(1, 1, 6, 8, 8))


# ---------------------------------------------------------------------------------------------------------------------
# Constructor validation: one test per rule
# ---------------------------------------------------------------------------------------------------------------------


def _build(**overrides) -> AutoencoderKL:
    kwargs = dict(
        spatial_dims=3, channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


def test_rejects_wrong_number_of_downsample_factors():
    with pytest.raises(ValueError, match=r"len\(channels\) - 1 = 1 entries"):
        _build(downsample_factors=[2, 2])


@pytest.mark.parametrize("factors", [[0], [[2, 0, 2]], [-2], [2.0], [[2, 2.5, 2]], [True]])
def test_rejects_factor_below_one_or_not_integer(factors):
    with pytest.raises(ValueError, match="integers >= 1"):
        _build(downsample_factors=factors)


def test_rejects_per_axis_factors_of_wrong_length():
    with pytest.raises(ValueError, match="spatial_dims = 3"):
        _build(downsample_factors=[[2, 2]])


def test_rejects_channels_not_divisible_by_norm_num_groups():
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        _build(channels=(8, 12))


def test_rejects_attention_levels_of_wrong_length():
    with pytest.raises(ValueError, match="same size of attention_levels"):
        _build(attention_levels=(False,))


def test_rejects_num_res_blocks_of_wrong_length():
    with pytest.raises(ValueError, match="num_res_blocks"):
        _build(num_res_blocks=(1, 1, 1))


@pytest.mark.parametrize("spatial_dims", [0, 4])
def test_rejects_unsupported_spatial_dims(spatial_dims):
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        _build(spatial_dims=spatial_dims)


def test_rejects_latent_channels_below_one():
    with pytest.raises(ValueError, match="latent_channels must be >= 1"):
        _build(latent_channels=0)


def test_rejects_chunk_elements_below_one():
    with pytest.raises(ValueError, match="chunk_elements must be >= 1"):
        _build(chunk_elements=0)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------------


def _count_checkpoint_calls(monkeypatch) -> list[type]:
    calls: list[type] = []
    original = memory_saving.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(type(fn))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(memory_saving, "checkpoint", counting_checkpoint)
    return calls


def _outputs_and_grads(models, x):
    results = []
    for model in models:
        torch.manual_seed(1)  # same sampling noise in forward
        reconstruction, z_mu, z_sigma = model(x)
        (reconstruction.square().mean() + z_mu.mean() + z_sigma.mean()).backward()
        results.append(((reconstruction, z_mu, z_sigma), [p.grad for p in model.parameters()]))
    return results


@pytest.mark.parametrize("chunk_elements", [None, 600])
def test_checkpointing_gives_same_outputs_and_gradients(monkeypatch, chunk_elements):
    # [[4, 4, 1], 2]: a factor-4 upsampling at full resolution (the fused upsample unit) and anisotropy.
    settings = dict(TINY, channels=(8, 16, 16), attention_levels=(False, False, True),
                    downsample_factors=[[4, 4, 1], 2])
    plain = AutoencoderKL(3, **settings).train()
    # 600 elements: every fused unit runs in many slabs (with halos), not in one piece.
    checkpointed = AutoencoderKL(3, use_checkpoint=True, chunk_elements=chunk_elements, **settings).train()
    assert checkpointed.encoder.chunk_elements == checkpointed.decoder.chunk_elements == chunk_elements
    checkpointed.load_state_dict(plain.state_dict())
    calls = _count_checkpoint_calls(monkeypatch)

    x = torch.randn(2, 1, 16, 16, 8)
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = _outputs_and_grads((plain, checkpointed), x)
    for ours, theirs in zip(out_ckpt, out_plain):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    for (name, _), g_ckpt, g_plain in zip(plain.named_parameters(), grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, atol=2e-5, rtol=1e-4, msg=name)

    # Residual blocks, norm+conv heads and the nearest upsampling run as fused units (no checkpoint); the
    # encoder's full-resolution stage is one checkpoint; attention and downsampling are checkpointed one by one.
    enc, dec = list(checkpointed.encoder.blocks), list(checkpointed.decoder.blocks)
    first_down = next(i for i, b in enumerate(enc) if isinstance(b, aekl_module.FactorDownsample))
    fused = (aekl_module.AEKLResBlock, aekl_module.Convolution, torch.nn.GroupNorm, aekl_module.Upsample)
    expected = [type(memory_saving._run_blocks)]
    expected += [type(b) for b in enc[first_down + 1 :] + dec if not isinstance(b, fused)]
    assert calls == expected
    assert aekl_module.FactorDownsample in calls and aekl_module.SpatialAttentionBlock in calls
    assert calls.count(aekl_module.FactorDownsample) == 1  # the first one is inside the stage: not nested
    assert aekl_module.AEKLResBlock not in calls and aekl_module.Encoder not in calls


def test_checkpointing_keeps_far_less_for_backward():
    settings = dict(channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1,
                    norm_num_groups=8, downsample_factors=[4, 2])
    x = torch.randn(1, 1, 32, 32, 16)

    def saved_bytes(model):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)[0].mean().backward()
        return sum(storages.values())

    plain = saved_bytes(AutoencoderKL(3, **settings).train())
    checkpointed = saved_bytes(AutoencoderKL(3, use_checkpoint=True, **settings).train())
    # Only the input of the encoder stage, block boundaries and one map inside each decoder residual block.
    assert checkpointed < 0.3 * plain


def test_fused_units_match_the_modules_under_autocast():
    from monai.networks.blocks import Convolution

    norm = torch.nn.GroupNorm(4, 8)
    conv = Convolution(3, 8, 4, strides=1, kernel_size=3, padding=1, conv_only=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 6, 5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = conv(torch.nn.functional.silu(norm(x)))
        fused = fused_units.norm_act_conv(x, norm, conv, True, chunk_elements=80)
    # The norm hands the convolution the autocast dtype: the unit's output (next unit's saved input) is bf16.
    assert fused.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), reference.float(), atol=0.05, rtol=0.05)
    grads = [torch.autograd.grad(y.float().square().sum(), [x, norm.weight, conv.conv.weight]) for y in (fused, reference)]
    for g_fused, g_ref in zip(*grads):
        assert g_fused.dtype == g_ref.dtype
        torch.testing.assert_close(g_fused, g_ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("factors, shape", [((4, 4, 4), (2, 6, 3, 4, 2)), ((2, 2, 1), (1, 6, 5, 3, 4))])
@pytest.mark.parametrize("chunk_elements", [None, 50])
def test_fused_upsample_matches_the_block(factors, shape, chunk_elements):
    from monai.networks.blocks import Convolution

    post = Convolution(3, 6, 6, strides=1, kernel_size=3, padding=1, conv_only=True)
    block = aekl_module.Upsample(3, mode="nontrainable", in_channels=6, out_channels=6, interp_mode="nearest",
                                 scale_factor=tuple(float(f) for f in factors), post_conv=post, align_corners=None)
    assert memory_saving._fusable_upsample(block)
    x = torch.randn(shape, requires_grad=True)
    reference = block(x)
    fused = fused_units.upsample_conv(x, block, chunk_elements)
    torch.testing.assert_close(fused, reference)
    g = torch.randn_like(reference)
    params = [x, post.conv.weight, post.conv.bias]
    for a, b in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(reference, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_a_residual_block_with_a_shortcut_convolution_matches_the_module(autocast):
    """The decoder's channel-reducing block: its first unit runs the 1x1 shortcut and adds the shortcut's gradient
    into its own; same output and gradients as MONAI's block, in many slabs, in float32 and under bf16 autocast."""
    block = aekl_module.AEKLResBlock(3, 16, 8, 1e-6, 8)
    for norm in (block.norm1, block.norm2):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    assert memory_saving._efficient_resblock_ok(block) and memory_saving._fusable_shortcut(block.nin_shortcut)
    x = torch.randn(2, 16, 7, 5, 4, requires_grad=True)
    params = [x, *block.parameters()]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        reference = block(x)
        fused = memory_saving._resblock_efficient(block, x, chunk_elements=90)
    assert fused.dtype == reference.dtype
    tolerance = dict(atol=0.1, rtol=0.05) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.float(), reference.float(), **tolerance)
    g = torch.randn_like(reference)
    names = ["x", *(name for name, _ in block.named_parameters())]
    for name, a, b in zip(names, torch.autograd.grad(fused, params, g), torch.autograd.grad(reference, params, g)):
        assert a.dtype == b.dtype, name
        if autocast and name == "conv1.conv.bias":
            continue  # norm2 removes any per-channel constant: its gradient is rounding noise either way
        if autocast:  # bf16 rounding, relative to the gradient's scale
            tolerance = dict(atol=0.02 * b.abs().max().item(), rtol=0.05)
        torch.testing.assert_close(a, b, msg=name, **tolerance)


def test_the_shortcut_gradient_accumulated_in_the_unit_lowers_the_peak():
    """Backward of the channel-reducing block (32 -> 16 channels at 128x128x64, float32): autograd on two units and
    the module's shortcut keeps the shortcut's 32-channel input gradient beside the unit's own buffer; accumulated
    inside the unit, the peak drops by at least one 16-channel map (64 MiB; measured: ~100 MiB of ~320)."""
    from monai_diffusion.memory.probe import CpuPeak, _trim_allocator, rss_mb

    block = aekl_module.AEKLResBlock(3, 32, 8, 1e-6, 16)
    x = torch.randn(1, 32, 128, 128, 64, requires_grad=True)

    def two_units_and_the_module_shortcut(x):  # the memory-saving path before the shortcut joined the unit
        h = fused_units.norm_act_conv(x, block.norm1, block.conv1, True)
        return block.nin_shortcut(x) + fused_units.norm_act_conv(h, block.norm2, block.conv2, True)

    def backward_peak(forward) -> float:
        y = forward(x)
        g = torch.randn_like(y)
        _trim_allocator()
        before = rss_mb()
        with CpuPeak() as peak:
            y.backward(g)
        x.grad = None
        block.zero_grad(set_to_none=True)
        return peak.peak_mb - before

    separate = backward_peak(two_units_and_the_module_shortcut)
    joined = backward_peak(lambda x: memory_saving._resblock_efficient(block, x, None))
    assert joined < separate - 16 * 128 * 128 * 64 * 4 / 2**20, (joined, separate)


def _offloaded_copies(monkeypatch) -> list[tuple[int, ...]]:
    """Make the fused units offload on the CPU too (a host copy read back slab by slab, as on a GPU); returns the
    shapes of the maps they copied."""
    copies = []
    original = fused_units._Map.offloaded

    def offloaded(x, depth):
        copies.append(tuple(x.shape))
        return original(x, depth)

    monkeypatch.setattr(fused_units._Map, "offloaded", staticmethod(offloaded))
    monkeypatch.setattr(memory_saving, "_offloads", lambda x: memory_saving._OFFLOAD.get())
    return copies


def test_offloaded_saved_maps_give_the_same_step_and_leave_only_small_tensors_saved(monkeypatch):
    settings = dict(TINY, channels=(8, 16, 16), attention_levels=(False, False, True), downsample_factors=[[4, 4, 1], 2])
    plain = AutoencoderKL(3, **settings).train()
    offloading = AutoencoderKL(3, use_checkpoint=True, chunk_elements=600, **settings).train()
    offloading.load_state_dict(plain.state_dict())
    copies = _offloaded_copies(monkeypatch)
    x = torch.randn(2, 1, 16, 16, 8)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    torch.manual_seed(1)
    reference = plain(x)
    (reference[0].square().mean() + reference[1].mean() + reference[2].mean()).backward()
    torch.manual_seed(1)
    with memory_saving.offload_saved_maps(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = offloading(x)
    (outputs[0].square().mean() + outputs[1].mean() + outputs[2].mean()).backward()

    for ours, theirs in zip(outputs, reference):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    for (name, p_plain), p_ours in zip(plain.named_parameters(), offloading.parameters()):
        torch.testing.assert_close(p_ours.grad, p_plain.grad, atol=2e-5, rtol=1e-4, msg=name)
    # Every fused unit outside the encoder's recomputed full-resolution stage kept a host copy of its input (the
    # decoder's full-resolution ones included); what went through autograd's saving was weights, statistics and the
    # small maps of the attention and downsampling blocks' checkpoints.
    assert (2, 16, 16, 16, 8) in copies and (2, 8, 16, 16, 8) in copies
    assert len(copies) >= 8
    assert max(saved) < 2 * 8 * 16 * 16 * 8  # not one full-resolution map


def test_offloading_changes_nothing_on_the_cpu():
    model = AutoencoderKL(3, use_checkpoint=True, **TINY).train()
    x = torch.randn(1, 1, 8, 8, 8)
    torch.manual_seed(1)
    reference = model(x)[0]
    torch.manual_seed(1)
    with memory_saving.offload_saved_maps():
        assert not memory_saving._offloads(x)
        offloaded = model(x)[0]
    torch.testing.assert_close(offloaded, reference, rtol=0, atol=0)

def test_checkpointing_is_skipped_in_eval_and_without_grad(monkeypatch):
    model = AutoencoderKL(3, use_checkpoint=True, **TINY)
    calls = _count_checkpoint_calls(monkeypatch)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        model.train()(x)
    model.eval()(x)
    assert calls == []
    model.use_checkpoint = False
    assert not model.encoder.use_checkpoint and not model.decoder.use_checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# MONAI LatentDiffusionInferer works unchanged
# ---------------------------------------------------------------------------------------------------------------------


def _ldm_models() -> tuple[AutoencoderKL, DiffusionModelUNet]:
    autoencoder = AutoencoderKL(3, downsample_factors=[[4, 4, 2]], **TINY).eval()
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=3,
        out_channels=3,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    )
    return autoencoder, unet


def test_latent_diffusion_inferer_training_call():
    autoencoder, unet = _ldm_models()
    scheduler = DDPMScheduler(num_train_timesteps=10)
    inferer = LatentDiffusionInferer(scheduler=scheduler, scale_factor=1.0)
    images = torch.randn(2, 1, 16, 16, 8)
    latent_shape = (2, 3, *autoencoder.latent_shape(images.shape[2:]))
    noise = torch.randn(latent_shape)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (2,)).long()

    prediction = inferer(images, autoencoder_model=autoencoder, diffusion_model=unet, noise=noise, timesteps=timesteps)
    assert prediction.shape == latent_shape
    torch.nn.functional.mse_loss(prediction, noise).backward()
    assert all(p.grad is None for p in autoencoder.parameters())  # the inferer encodes without grad


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
def test_latent_diffusion_inferer_sampling(scheduler_cls):
    autoencoder, unet = _ldm_models()
    unet.eval()
    scheduler = scheduler_cls(num_train_timesteps=30)
    scheduler.set_timesteps(num_inference_steps=3)
    inferer = LatentDiffusionInferer(scheduler=scheduler, scale_factor=1.0)
    image_shape = (1, 1, 16, 16, 8)
    noise = torch.randn(1, 3, *autoencoder.latent_shape(image_shape[2:]))

    image = inferer.sample(input_noise=noise, autoencoder_model=autoencoder, diffusion_model=unet, verbose=False)
    assert image.shape == image_shape
    assert torch.isfinite(image).all()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of the MONAI Generative era
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factors", [None, [4, [2, 2, 1]]])
def test_load_old_state_dict_renames_monai_generative_keys(factors):
    settings = dict(channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1, norm_num_groups=8,
                    latent_channels=3, downsample_factors=factors)
    trained = AutoencoderKL(3, **settings)
    for parameter in trained.parameters():  # weights no fresh model has by chance
        torch.nn.init.normal_(parameter)
    old = old_layout(trained.state_dict())
    assert any(".proj_attn." in k for k in old) and any("postconv" in k for k in trained.state_dict())
    assert not set(old) <= set(trained.state_dict())  # really the old layout: a plain load would fail

    model = AutoencoderKL(3, **settings)
    kept = dict(old)
    model.load_old_state_dict(old)
    assert old == kept  # the caller's dict is left as it was
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_load_old_state_dict_without_output_projection_uses_identity():
    settings = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, norm_num_groups=8)
    old = old_layout(AutoencoderKL(3, **settings).state_dict(), with_proj_attn=False)
    model = AutoencoderKL(3, **settings)
    model.load_old_state_dict(old)
    projections = [k for k in model.state_dict() if k.endswith("attn.out_proj.weight")]
    assert projections
    for key in projections:
        weight = model.state_dict()[key]
        torch.testing.assert_close(weight, torch.eye(weight.shape[0]))
        torch.testing.assert_close(model.state_dict()[key.replace("weight", "bias")], torch.zeros(weight.shape[0]))


# Residual resampling
# ---------------------------------------------------------------------------------------------------------------------


def test_residual_resampling_adds_parameter_free_paths_and_keeps_the_state_dict():
    settings = dict(TINY, channels=(8, 16, 16), attention_levels=(False, False, False), downsample_factors=[[4, 4, 2], 2])
    plain = AutoencoderKL(3, **settings)
    residual = AutoencoderKL(3, residual_resampling=True, **settings)
    assert residual.state_dict().keys() == plain.state_dict().keys()
    residual.load_state_dict(plain.state_dict())

    down = next(b for b in residual.encoder.blocks if isinstance(b, aekl_module.FactorDownsample))
    x = torch.randn(1, 8, 16, 16, 8)
    # With the convolution silenced, what is left is the block average of the input.
    torch.nn.init.zeros_(down.conv.conv.weight)
    torch.nn.init.zeros_(down.conv.conv.bias)
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool3d(x, kernel_size=(4, 4, 2)))

    up = next(b for b in residual.decoder.blocks if isinstance(b, aekl_module.FactorUpsample))
    small = torch.randn(1, 16, 2, 2, 2)
    enlarged = up(small)
    up.residual = False
    torch.testing.assert_close(enlarged - up(small), small.repeat_interleave(2, 2).repeat_interleave(2, 3)
                               .repeat_interleave(2, 4))

    images = torch.randn(2, 1, 16, 16, 8)
    with torch.no_grad():
        assert not torch.allclose(residual.reconstruct(images), plain.reconstruct(images))


def test_residual_resampling_through_the_memory_saving_path():
    settings = dict(TINY, channels=(8, 16, 16), attention_levels=(False, False, True),
                    downsample_factors=[[4, 4, 1], 2], residual_resampling=True)
    plain = AutoencoderKL(3, **settings).train()
    checkpointed = AutoencoderKL(3, use_checkpoint=True, chunk_elements=600, **settings).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 16, 8)
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = _outputs_and_grads((plain, checkpointed), x)
    for ours, theirs in zip(out_ckpt, out_plain):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    for (name, _), g_ckpt, g_plain in zip(plain.named_parameters(), grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, atol=2e-5, rtol=1e-4, msg=name)
