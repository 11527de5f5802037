"""The rules of conditional configs: each names its keys, and a config without conditions means what it meant."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from monai_diffusion.config import ConfigError, config_from_dict, load_config
from monai_diffusion.config.stages import stage_config

ROOT = Path(__file__).resolve().parents[2]
DATALIST = {"source": "datalist", "datalist": "/d/list.json"}


@pytest.mark.parametrize("raw, message", [
    ({"data": {"source": "folder", "data_dir": "/d", "conditions": [{"name": "age"}]}},
     "data.conditions / data.source: a folder's volumes carry no fields"),
    ({"data": {"source": "folder", "data_dir": "/d", "mask_key": "seg"}},
     "data.mask_key / data.source: a folder's volumes carry no fields"),
    ({"data": {"conditions": [{"name": "brain_scale"}]}},
     "data.conditions / data.demo.conditional: the plain demo set has no covariates"),
    ({"data": {**DATALIST, "conditions": [{"name": "age"}, {"name": "age", "type": "categorical"}]}},
     r"data.conditions / data.mask_key: each field once, \['age'\] repeated"),
    ({"data": {**DATALIST, "conditions": [{"name": "seg"}], "mask_key": "seg"}}, r"\['seg'\] repeated"),
    ({"data": {**DATALIST, "conditions": [{"name": "image"}]}}, r"data.conditions\[0\].name: 'image' is not"),
    ({"data": {**DATALIST, "conditions": [{"name": "age", "categories": ["a"]}]}},
     r"data.conditions\[0\].categories: only read for type 'categorical'"),
    ({"data": {**DATALIST, "conditions": [{"name": "sex", "type": "categorical", "categories": ["F", "F"]}]}},
     r"data.conditions\[0\].categories: expected distinct labels"),
    ({"data": {**DATALIST, "conditions": [{"name": "age"}]},
      "ldm": {"conditioning": {"dropout": 0.0}, "sampling": {"guidance_scale": 3.0}}},
     "ldm.sampling.guidance_scale / ldm.conditioning.dropout: guidance 3.0 extrapolates"),
    ({"data": {**DATALIST, "mask_key": "seg"}, "autoencoder": {"num_channels": [32, 64], "downsample_factors": [2]},
      "ldm": {"unet": {"num_channels": [32, 64], "attention_levels": [False, False]}},
      "controlnet": {"conditioning_embedding_num_channels": [16, 32, 64]}},
     r"controlnet.conditioning_embedding_num_channels / autoencoder.downsample_factors: 3 entries halve the mask "
     r"2 time\(s\) \(x4\), which must divide the total factor \[2, 2, 2\] on every axis; use 2 entries or fewer"),
    ({"controlnet": {"training": {"max_epochs": None}}},
     "controlnet.training.max_epochs / controlnet.training.max_steps: set at least one bound"),
])
def test_each_rule_names_its_keys(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_the_controlnet_rule_reads_the_factor_only_with_label_maps():
    # Factor 2 with the default two-entry embedding (x2) is fine; three entries are only refused with a mask key.
    raw = {"autoencoder": {"num_channels": [32, 64], "downsample_factors": [2]},
           "ldm": {"unet": {"num_channels": [32, 64], "attention_levels": [False, False]}},
           "controlnet": {"conditioning_embedding_num_channels": [16, 32, 64]}}
    config_from_dict(raw)
    config_from_dict({**raw, "data": {**DATALIST, "mask_key": "seg"}, "controlnet": {}})


def test_without_conditions_a_config_means_what_it_meant():
    config = config_from_dict({})
    assert config.data.conditions == [] and config.data.mask_key is None and not config.data.demo.conditional
    assert config.ldm.sampling.guidance_scale == 1.0
    # Guidance from a config without conditions is never read: no rule against it.
    config_from_dict({"ldm": {"conditioning": {"dropout": 0.0}, "sampling": {"guidance_scale": 3.0}}})


def test_the_controlnet_stage_has_its_own_precision():
    config = config_from_dict({"device": {"mixed_precision": "no"},
                               "controlnet": {"training": {"mixed_precision": "bf16"}}})
    assert stage_config(config, "controlnet").device.mixed_precision == "bf16"
    assert stage_config(config, "ldm").device.mixed_precision == "no"


def test_the_conditional_demo_preset_is_valid_and_conditional():
    path = ROOT / "config" / "examples" / "conditional_demo.yaml"
    config = load_config(str(path), [])
    assert config.data.demo.conditional and [c.name for c in config.data.conditions] == ["brain_scale"]
    assert config.data.mask_key == "label" and config.controlnet.num_labels == 4
    assert yaml.safe_load(path.read_text())["data"]["source"] == "demo"
