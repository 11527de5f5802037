"""Config -> MAISI's networks (monai.apps.generation.maisi): MAISI's own arguments reach its classes, the splitting
options change memory, not results, and the config builds MAISI's published networks parameter for parameter."""

from __future__ import annotations

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiConvolution
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from monai_diffusion.config import config_from_dict
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.networks.builders import build_autoencoder, build_controlnet, build_unet
from monai_diffusion.steps import build_controlnet_training

TINY_AE = {"architecture": "maisi", "num_channels": [8, 8, 16], "norm_num_groups": 4, "latent_channels": 4,
           "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
           "with_decoder_nonlocal_attn": False}


def test_maisis_arguments_reach_its_autoencoder():
    config = config_from_dict({"data": {"voxel_size": [32, 32, 32]},
                               "autoencoder": TINY_AE | {"num_splits": 2, "dim_split": 1, "num_res_blocks": [1, 2, 1],
                                                         "training": {"use_gradient_checkpointing": True}}})
    network = build_autoencoder(config.autoencoder)
    assert type(network) is AutoencoderKlMaisi
    assert network.use_checkpoint  # MAISI's use_checkpointing is autoencoder.training.use_gradient_checkpointing
    convolutions = [m for m in network.modules() if isinstance(m, MaisiConvolution)]
    assert {(m.num_splits, m.dim_split) for m in convolutions} == {(2, 1)}
    assert not build_autoencoder(config.autoencoder, use_checkpoint=False).use_checkpoint
    # The sigma the encoder starts with is set the same way as for ours.
    assert torch.allclose(network.quant_conv_log_sigma.conv.bias, torch.full((4,), 2 * torch.log(torch.tensor(0.01))))


def test_slabs_give_the_same_reconstruction_and_a_4x_latent():
    whole = config_from_dict({"data": {"voxel_size": [32, 32, 32]}, "autoencoder": TINY_AE})
    split = config_from_dict({"data": {"voxel_size": [32, 32, 32]},
                              "autoencoder": TINY_AE | {"num_splits": 2, "dim_split": 2}})
    torch.manual_seed(0)
    a = build_autoencoder(whole.autoencoder).eval()
    b = build_autoencoder(split.autoencoder).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        mu, _ = a.encode(x)
        assert mu.shape == (1, 4, 8, 8, 8)
        assert torch.equal(a.reconstruct(x), b.reconstruct(x))


# ---------------------------------------------------------------- MAISI's published networks, parameter for parameter

# NVIDIA-Medtech/NV-Generate-CTMR configs/config_network_rflow.json at commit
# da438fec6484cdb6f421f8c7051d954ebefff730: autoencoder_def, diffusion_unet_def and controlnet_def, argument for
# argument (include_body_region false; use_flash_attention, a CUDA-only switch of the UNet, off on this CPU).
RFLOW_AUTOENCODER = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[64, 128, 256],
                         num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-06,
                         attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
                         with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False,
                         norm_float16=True, num_splits=4, dim_split=1)
RFLOW_UNET = dict(spatial_dims=3, in_channels=4, out_channels=4, num_channels=[64, 128, 256, 512],
                  attention_levels=[False, False, True, True], num_head_channels=[0, 0, 32, 32], num_res_blocks=2,
                  use_flash_attention=False, include_top_region_index_input=False,
                  include_bottom_region_index_input=False, include_spacing_input=True, num_class_embeds=128,
                  resblock_updown=True, include_fc=True)
RFLOW_CONTROLNET = dict(spatial_dims=3, in_channels=4, num_channels=[64, 128, 256, 512],
                        attention_levels=[False, False, True, True], num_head_channels=[0, 0, 32, 32], num_res_blocks=2,
                        use_flash_attention=False, conditioning_embedding_in_channels=8,
                        conditioning_embedding_num_channels=[8, 32, 64], num_class_embeds=128, resblock_updown=True,
                        include_fc=True)
# The same networks as this project's config spells them (config/recipes/maisi_vae_rflow.yaml sets these keys).
RFLOW_CONFIG = {
    "data": {"voxel_size": [256, 256, 256]},
    "autoencoder": {"architecture": "maisi", "in_channels": 1, "latent_channels": 4, "num_channels": [64, 128, 256],
                    "num_res_blocks": 2, "norm_num_groups": 32, "attention_levels": [False, False, False],
                    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
                    "use_convtranspose": False, "norm_float16": True, "num_splits": 4, "dim_split": 1,
                    "training": {"mixed_precision": "fp16"}},
    "ldm": {"unet": {"architecture": "maisi", "num_channels": [64, 128, 256, 512],
                     "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32],
                     "num_res_blocks": 2, "norm_num_groups": 32, "resblock_updown": True, "include_fc": True,
                     "include_spacing_input": True, "num_class_embeds": 128, "modality": "ct"},
            "training": {"mixed_precision": "fp16"}},
    "controlnet": {"num_labels": 9, "conditioning_embedding_num_channels": [8, 32, 64],
                   "training": {"mixed_precision": "fp16"}},
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def test_the_config_builds_maisis_published_networks_parameter_for_parameter():
    """Built on the meta device: shapes without memory, so the 180M-parameter UNet costs nothing."""
    config = config_from_dict(RFLOW_CONFIG)
    with torch.device("meta"):
        autoencoder = build_autoencoder(config.autoencoder)
        unet = build_unet(config.ldm, config.autoencoder.latent_channels)
        controlnet = build_controlnet(config.ldm, config.controlnet, config.autoencoder.latent_channels)
        published = (AutoencoderKlMaisi(**RFLOW_AUTOENCODER), DiffusionModelUNetMaisi(**RFLOW_UNET),
                     ControlNetMaisi(**RFLOW_CONTROLNET))
    built = (autoencoder, unet, controlnet)
    assert [type(n) for n in built] == [type(n) for n in published]
    assert [shapes(n) for n in built] == [shapes(n) for n in published]  # the released checkpoints' key layout
    assert [count(n) for n in built] == [count(n) for n in published] == [20_944_897, 180_500_868, 72_037_072]


def test_maisis_controlnet_starts_from_its_unet_where_their_shapes_agree():
    """MAISI's UNet embeds the spacing beside the time step, so its residual blocks take a wider embedding than its
    ControlNet's: those projections start fresh, the rest is copied (MAISI's copy_model_state)."""
    config = config_from_dict({
        "data": {"voxel_size": [16, 16, 16]},
        "autoencoder": TINY_AE,
        "ldm": {"unet": {"architecture": "maisi", "num_channels": [8, 16], "attention_levels": [False, True],
                         "num_head_channels": 8, "norm_num_groups": 8, "modality": "ct"}},
        "controlnet": {"conditioning_embedding_num_channels": [8, 16]},
    })
    unet = build_unet(config.ldm, 4)
    stage = build_controlnet_training(config, config, unet, (4, 4, 4, 4), device=torch.device("cpu"),
                                      precision=resolve_precision(False, torch.device("cpu")), max_steps=1)
    copied = {k for k, v in stage.controlnet.state_dict().items() if k in unet.state_dict()
              and v.shape == unet.state_dict()[k].shape}
    assert "class_embedding.weight" in copied and "down_blocks.0.resnets.0.conv1.conv.weight" in copied
    for key in copied:
        assert torch.equal(stage.controlnet.state_dict()[key], unet.state_dict()[key]), key
    assert "down_blocks.0.resnets.0.time_emb_proj.weight" not in copied  # 32 -> 8 vs the UNet's 64 -> 8
