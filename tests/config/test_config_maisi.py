"""The MAISI architectures in the config: their own keys typed and refused with the other architecture, each rule
naming its keys, and the config layer's downsampling treating MAISI's autoencoder as 2 per level."""

from __future__ import annotations

import pytest

from monai_diffusion.config import ConfigError, config_from_dict
from monai_diffusion.config.stages import downsampling

MAISI_AE = {"architecture": "maisi", "num_channels": [8, 8, 16], "norm_num_groups": 4, "latent_channels": 4}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


def test_maisis_autoencoder_is_2_per_level_in_the_config_layer():
    config = config_from_dict({"data": {"voxel_size": [64, 48, 32]}, "autoencoder": MAISI_AE})
    factors = downsampling(config)
    assert factors.factors == [2, 2] and factors.total == (4, 4, 4)
    assert factors.latent_shape([64, 48, 32]) == (16, 12, 8)


@pytest.mark.parametrize("section, expected", [
    ({"downsample_factors": [4, 2]}, "autoencoder.downsample_factors: applies to architecture 'ours'"),
    ({"residual_resampling": True}, "autoencoder.residual_resampling: applies to architecture 'ours'"),
])
def test_keys_of_our_autoencoder_are_refused_with_maisis(section, expected):
    problems = problems_of({"data": {"voxel_size": [32, 32, 32]}, "autoencoder": MAISI_AE | section})
    assert any(p.startswith(expected) and "4x for 3 levels" in p for p in problems), problems


@pytest.mark.parametrize("key, value", [("num_splits", 2), ("dim_split", 1), ("norm_float16", True),
                                        ("save_mem", False)])
def test_keys_of_maisis_autoencoder_are_refused_with_ours(key, value):
    problems = problems_of({"autoencoder": {key: value}})
    assert problems == [(f"autoencoder.{key}: applies to architecture 'maisi' (MAISI's AutoencoderKlMaisi), "
                         "autoencoder.architecture is 'ours'")]


def test_maisis_keys_are_typed():
    problems = problems_of({"autoencoder": MAISI_AE | {"num_splits": 0, "dim_split": 3, "norm_float16": "maybe"}})
    assert {p.split(":")[0] for p in problems} == {"autoencoder.num_splits", "autoencoder.dim_split",
                                                   "autoencoder.norm_float16"}


def test_maisis_autoencoder_is_3d_only():
    problems = problems_of({"data": {"voxel_size": [32, 32]}, "autoencoder": MAISI_AE,
                            "ldm": {"unet": {"num_channels": [8], "attention_levels": [False]}}})
    assert any(p.startswith("autoencoder.architecture: 'maisi' is 3D only") for p in problems), problems


def test_float16_group_norms_need_fp16_in_every_stage_that_runs_the_autoencoder():
    raw = {"data": {"voxel_size": [32, 32, 32]}, "autoencoder": MAISI_AE | {"norm_float16": True},
           "ldm": {"training": {"mixed_precision": "fp16"}}}
    problems = problems_of(raw)
    assert [p.split(":")[0] for p in problems] == [
        "autoencoder.norm_float16 / autoencoder.training.mixed_precision (or device.mixed_precision)",
        "autoencoder.norm_float16 / controlnet.training.mixed_precision (or device.mixed_precision)"]
    config_from_dict(raw | {"device": {"mixed_precision": "fp16"}})
    with pytest.raises(ConfigError, match="runs True on the CPU"):
        config_from_dict(raw | {"device": {"device": "cpu", "mixed_precision": True}})


def test_splits_must_cut_every_level_of_every_size_into_whole_slabs():
    raw = {"data": {"voxel_size": [32, 48, 32]},
           "autoencoder": MAISI_AE | {"num_splits": 2, "dim_split": 1,
                                      "training": {"voxel_size": [32, 36, 32], "patch_size": [16, 24, 16]}},
           "ldm": {"sampling": {"tiled_decode": True, "tile_size": [4, 6, 4]}}}
    problems = problems_of(raw)
    # 36 -> 18 -> 9 loses a voxel; 24 -> 12 -> 6 leaves slabs of 3; a 6-voxel latent window decodes 24 -> 6 too.
    assert [p.split(":")[0] for p in problems] == [
        "autoencoder.num_splits / autoencoder.dim_split / autoencoder.training.voxel_size",
        "autoencoder.num_splits / autoencoder.dim_split / autoencoder.training.patch_size",
        "autoencoder.num_splits / autoencoder.dim_split / ldm.sampling.tile_size"]
    assert "a multiple of 8 and >= 32 (got 36; levels [36, 18, 9])" in problems[0]
    ok = {"voxel_size": [32, 32, 32], "patch_size": [16, 32, 16]}
    config_from_dict(raw | {"autoencoder": raw["autoencoder"] | {"training": ok},
                            "ldm": {"sampling": {"tiled_decode": True, "tile_size": [4, 8, 4]}}})


MAISI_UNET = {"architecture": "maisi", "num_channels": [8, 16], "attention_levels": [False, True],
              "num_head_channels": 8, "norm_num_groups": 8}


@pytest.mark.parametrize("key, value", [("include_spacing_input", False), ("num_class_embeds", 64),
                                        ("modality", "ct"), ("modality_key", "modality")])
def test_keys_of_maisis_unet_are_refused_with_monais(key, value):
    assert problems_of({"ldm": {"unet": {key: value}}}) == [
        (f"ldm.unet.{key}: applies to architecture 'maisi' (MAISI's DiffusionModelUNetMaisi), ldm.unet.architecture "
         "is 'monai'")]


@pytest.mark.parametrize("unet, data, expected", [
    ({}, {}, "ldm.unet.modality / ldm.unet.modality_key: MAISI's UNet takes each volume's modality"),
    ({"modality": "ct", "modality_key": "class"}, {"source": "datalist", "datalist": "d.json"},
     "set one of them, not both"),
    ({"modality": "pet"}, {}, "ldm.unet.modality: 'pet' is not in MAISI's modality vocabulary"),
    ({"modality": "mri_t1", "num_class_embeds": 8}, {}, "'mri_t1' is class 9, outside an embedding of 8 classes"),
    ({"modality_key": "modality"}, {}, "ldm.unet.modality_key / data.source: only a datalist's entries"),
    ({"modality_key": "image"}, {"source": "datalist", "datalist": "d.json"}, "'image' is not a free datalist field"),
    ({"num_class_embeds": None, "modality": "ct"}, {},
     "ldm.unet.modality: only read with ldm.unet.num_class_embeds"),
])
def test_each_rule_of_maisis_unet(unet, data, expected):
    problems = problems_of({"data": data, "ldm": {"unet": MAISI_UNET | unet}})
    assert any(expected in p for p in problems), problems


def test_maisis_class_embedding_holds_the_modality_so_categorical_covariates_use_cross_attention():
    raw = {"data": {"source": "datalist", "datalist": "d.json", "conditions": [{"name": "sex", "type": "categorical"}]},
           "ldm": {"unet": MAISI_UNET | {"modality": "ct"}, "conditioning": {"categorical_via": "class_embedding"}}}
    assert any(p.startswith("ldm.conditioning.categorical_via / ldm.unet.architecture") for p in problems_of(raw))
    raw["ldm"]["conditioning"]["categorical_via"] = "cross_attention"
    config_from_dict(raw)


def test_guidance_towards_maisis_modality_needs_it_dropped_in_training():
    raw = {"ldm": {"unet": MAISI_UNET | {"modality": "ct"}, "conditioning": {"dropout": 0.0},
                   "sampling": {"guidance_scale": 3.0}}}
    assert any(p.startswith("ldm.sampling.guidance_scale / ldm.conditioning.dropout") for p in problems_of(raw))
    config_from_dict(raw | {"ldm": raw["ldm"] | {"conditioning": {"dropout": 0.1}}})
