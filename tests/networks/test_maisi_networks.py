"""Config -> MAISI's networks (monai.apps.generation.maisi): MAISI's own arguments reach its classes, and the
splitting options change memory, not results."""

from __future__ import annotations

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiConvolution

from monai_diffusion.config import config_from_dict
from monai_diffusion.networks.builders import build_autoencoder

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
