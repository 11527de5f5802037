"""Config -> MONAI's constructors: the attention and UNet options and the scheduler settings reach MONAI's classes,
and the defaults build what they built before these settings existed."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from monai_diffusion.config import config_from_dict
from monai_diffusion.config.rules import discriminator_min_size
from monai_diffusion.config.schema import AutoencoderConfig
from monai_diffusion.networks.builders import build_autoencoder, build_discriminator, build_scheduler, build_unet


def parameters(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


@pytest.mark.parametrize("include_fc, combined", [(True, False), (False, False), (True, True)])
def test_attention_options_build_monais_networks(include_fc, combined):
    config = config_from_dict({
        "data": {"voxel_size": [16, 16, 16]},
        "autoencoder": {"num_channels": [8, 16], "norm_num_groups": 8, "attention_levels": [False, True],
                        "include_fc": include_fc, "use_combined_linear": combined},
        "ldm": {"unet": {"num_channels": [16, 32], "attention_levels": [False, True], "num_head_channels": [0, 8],
                         "norm_num_groups": 8, "include_fc": include_fc, "use_combined_linear": combined,
                         "resblock_updown": not include_fc}},
    })
    ours = build_autoencoder(config.autoencoder)
    monai = MonaiAutoencoderKL(3, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, norm_num_groups=8,
                               latent_channels=3, include_fc=include_fc, use_combined_linear=combined)
    assert parameters(ours) == parameters(monai)
    unet = build_unet(config.ldm, 3)
    reference = DiffusionModelUNet(3, 3, 3, channels=(16, 32), attention_levels=(False, True),
                                   num_head_channels=(0, 8), num_res_blocks=1, norm_num_groups=8,
                                   include_fc=include_fc, use_combined_linear=combined, resblock_updown=not include_fc)
    assert parameters(unet) == parameters(reference)


def test_scheduler_defaults_are_what_they_were():
    """Before these settings: rectified flow with discrete logit-normal timesteps shifted relative to the training
    latent, DDPM/DDIM without clipping."""
    config = config_from_dict({"ldm": {"scheduler": {"type": "rflow"}}})
    rflow = build_scheduler(config.ldm.scheduler, latent_shape=(4, 16, 16, 16))
    assert isinstance(rflow, RFlowScheduler)
    assert (rflow.use_discrete_timesteps, rflow.sample_method, rflow.use_timestep_transform) == (True, "logit-normal",
                                                                                                  True)
    assert (rflow.base_img_size_numel, rflow.transform_scale, rflow.spatial_dim) == (16**3, 1.0, 3)
    ddpm = build_scheduler(config_from_dict({}).ldm.scheduler)
    assert isinstance(ddpm, DDPMScheduler) and ddpm.clip_sample is False


def test_maisis_rectified_flow_settings_reach_monais_scheduler():
    config = config_from_dict({"ldm": {"scheduler": {
        "type": "rflow", "use_discrete_timesteps": False, "sample_method": "uniform", "scale": 1.4,
        "base_img_size_numel": 32768, "transform_scale": 2.0}}})
    rflow = build_scheduler(config.ldm.scheduler, latent_shape=(4, 64, 64, 64))
    assert (rflow.use_discrete_timesteps, rflow.sample_method) == (False, "uniform")
    assert (rflow.base_img_size_numel, rflow.transform_scale) == (32768, 2.0)
    torch.manual_seed(0)
    timesteps = rflow.sample_timesteps(torch.zeros(64, 4, 8, 8, 8))
    assert timesteps.dtype.is_floating_point and not torch.equal(timesteps, timesteps.round())  # continuous
    # logit-normal's location and scale are MONAI's LogisticNormal parameters.
    skewed = config_from_dict({"ldm": {"scheduler": {"type": "rflow", "loc": 2.0, "scale": 0.5,
                                                     "use_timestep_transform": False}}})
    scheduler = build_scheduler(skewed.ldm.scheduler, latent_shape=(4, 8, 8, 8))
    torch.manual_seed(0)
    late = scheduler.sample_timesteps(torch.zeros(2000, 1, 2, 2, 2)).float().mean()
    assert late > 0.8 * scheduler.num_train_timesteps  # sigmoid(N(2, 0.5)) is mostly near 1


def test_ddpm_clip_sample_reaches_monais_scheduler():
    config = config_from_dict({"ldm": {"scheduler": {"clip_sample": True}}})
    assert build_scheduler(config.ldm.scheduler, "ddim").clip_sample is True
    assert math.isclose(build_scheduler(config.ldm.scheduler).betas[0].item(), 0.0015, rel_tol=1e-4)


@pytest.mark.parametrize("size", [(16, 16, 16), (23, 23, 23), (24, 24, 24), (32, 32, 32), (48, 48, 48), (48, 48, 12),
                                  (32, 16), (8, 8, 8)])
def test_the_discriminator_size_rule_is_monais_patch_discriminator(size):
    """config.rules refuses exactly the discriminator depths MONAI's PatchDiscriminator cannot train at a size."""
    for layers in range(1, 5):
        discriminator = build_discriminator(AutoencoderConfig(training={"disc_num_layers": layers, "disc_channels": 2}),
                                            len(size)).train()
        try:
            discriminator(torch.rand(1, 1, *size))
            trains = True
        except (ValueError, RuntimeError):  # instance norm of one element, or a kernel larger than the padded input
            trains = False
        assert trains == (min(size) >= discriminator_min_size(layers)), (size, layers)


def test_a_definition_written_as_a_bundle_config_builds_the_same_network_through_monais_parser():
    import json

    from monai.bundle import ConfigParser

    from monai_diffusion.networks.builders import autoencoder_definition, scheduler_definition, unet_definition

    config = config_from_dict({
        "data": {"voxel_size": [16, 16, 16]},
        "autoencoder": {"num_channels": [8, 16], "norm_num_groups": 8, "downsample_factors": [[2, 2, 1]]},
        "ldm": {"unet": {"num_channels": [16, 32], "attention_levels": [False, True], "num_head_channels": [0, 8],
                         "norm_num_groups": 8}, "scheduler": {"type": "rflow"}},
    })
    definitions = {"autoencoder": autoencoder_definition(config.autoencoder, use_checkpoint=False),
                   "unet": unet_definition(config.ldm, 3, conditioning={"with_conditioning": True,
                                                                        "cross_attention_dim": 4,
                                                                        "num_class_embeds": None}),
                   "scheduler": scheduler_definition(config.ldm.scheduler, latent_shape=(3, 8, 8, 16))}
    written = json.loads(json.dumps({name: d.bundle_config() for name, d in definitions.items()}))
    assert written["unet"]["_target_"] == "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet"
    assert written["autoencoder"]["downsample_factors"] == [[2, 2, 1]]  # tuples become JSON lists
    parser = ConfigParser(written)
    for name in ("autoencoder", "unet"):
        assert parameters(parser.get_parsed_content(name)) == parameters(definitions[name].build())
    scheduler = parser.get_parsed_content("scheduler")
    assert isinstance(scheduler, RFlowScheduler) and scheduler.base_img_size_numel == 8 * 8 * 16
