"""Factors -> per-axis factors -> total factor -> latent shape: one torch-free owner, the network agrees with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monai_diffusion.factors import latent_shape, per_axis_factors, total_factor


def test_per_axis_total_and_latent():
    levels = per_axis_factors([4, [2, 2, 1]], 2, 3)
    assert levels == ((4, 4, 4), (2, 2, 1))
    assert total_factor(levels, 3) == (8, 8, 4)
    assert latent_shape((256, 256, 64), total_factor(levels, 3)) == (32, 32, 16)
    assert per_axis_factors(None, 2, 3) == ((2, 2, 2), (2, 2, 2))  # MONAI's 2 everywhere
    assert total_factor((), 2) == (1, 1)


@pytest.mark.parametrize("factors, message", [([4], "2 entries"), ([4, 0], "integers >= 1"), ([4, 2.0], "integers >= 1"),
                                              ([[4, 4], 2], "spatial_dims = 3"), ("42", "a sequence"),
                                              ([True, 2], "integers >= 1")])
def test_malformed_factors_name_the_rule(factors, message):
    with pytest.raises(ValueError, match=message):
        per_axis_factors(factors, 2, 3)


def test_indivisible_size_names_axis_size_and_factor():
    with pytest.raises(ValueError, match=r"size 60 on axis 0 .* factor 8"):
        latent_shape((60, 64, 32), (8, 8, 8))
    with pytest.raises(ValueError, match="3 spatial dimensions"):
        latent_shape((64, 64), (8, 8, 8))


def test_a_configs_downsampling_is_worked_out_in_the_config_layer():
    from monai_diffusion.config import Config, config_from_dict
    from monai_diffusion.config.stages import downsampling

    default = downsampling(Config())  # None: 2 on every axis at every level
    assert (default.factors, default.per_axis, default.total) == ([2, 2], ((2, 2, 2), (2, 2, 2)), (4, 4, 4))
    assert default.latent_shape(Config().data.voxel_size) == (16, 16, 16)
    config = config_from_dict({"data": {"voxel_size": [256, 256, 64]},
                               "autoencoder": {"downsample_factors": [[4, 4, 2], 2]}})
    spelt = downsampling(config)
    assert (spelt.factors, spelt.total, spelt.latent_shape((256, 256, 64))) == ([[4, 4, 2], 2], (8, 8, 4), (32, 32, 16))
    spelt.factors[0][0] = 99
    assert config.autoencoder.downsample_factors == [[4, 4, 2], 2]  # a copy: the config stays as it was
    with pytest.raises(ValueError, match="2 entries"):
        downsampling(Config().model_copy(update={"autoencoder": Config().autoencoder.model_copy(
            update={"downsample_factors": [4]})}))


def test_the_network_uses_the_same_arithmetic():
    from monai_diffusion.networks import AutoencoderKL

    model = AutoencoderKL(3, channels=(8, 8, 8), attention_levels=(False,) * 3, num_res_blocks=1, norm_num_groups=8,
                          downsample_factors=[[4, 4, 2], 2])
    assert model.downsample_factors == per_axis_factors([[4, 4, 2], 2], 2, 3)
    assert model.total_factor == (8, 8, 4)
    assert model.latent_shape((256, 256, 64)) == latent_shape((256, 256, 64), (8, 8, 4)) == (32, 32, 16)


def test_importing_it_does_not_import_torch():
    code = ("import sys, monai_diffusion.factors, monai_diffusion.config, monai_diffusion.config.stages; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
