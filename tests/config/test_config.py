"""Config schema, overrides and cross-field rules: every problem reported, each with its dotted path."""

from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from monai_diffusion.config import Config, ConfigError, config_from_dict, load_config, schema
from monai_diffusion.config.loading import parse_override
from monai_diffusion.config.render import render_default_config
from monai_diffusion.config.stages import stage_config, step_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "config").rglob("*.yaml"))


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


def test_defaults_are_valid():
    assert config_from_dict({}) == Config()


def test_seed_keys_are_accepted_with_their_meaning():
    config = config_from_dict(
        {
            "data": {"voxel_size": [256, 256, 64]},
            "autoencoder": {
                "num_channels": [16, 32, 64],
                "downsample_factors": [4, 2],
                "latent_channels": 3,
                "num_res_blocks": 1,
                "training": {
                    "batch_size": 1,
                    "gradient_accumulation_steps": 4,
                    "use_perceptual_loss": False,
                    "use_gradient_checkpointing": True,
                },
            },
            "device": {"mixed_precision": True},
            "fast_dev_run": True,
        }
    )
    assert config.autoencoder.downsample_factors == [4, 2]
    assert config.autoencoder.training.gradient_accumulation_steps == 4
    assert config.device.mixed_precision is True
    assert config.fast_dev_run is True


def test_unknown_keys_get_a_suggestion_and_all_errors_come_together():
    problems = problems_of(
        {
            "data": {"sourse": "demo", "voxel_size": [250, 256, 64]},
            "autoencoder": {"latent_chanels": 4, "downsample_factors": [4, 2], "training": {"batch_size": 0}},
            "device": {"mixed_precision": "fp8"},
        }
    )
    text = "\n".join(problems)
    assert "data.sourse: unknown key (did you mean 'data.source'?)" in text
    assert "autoencoder.latent_chanels: unknown key (did you mean 'autoencoder.latent_channels'?)" in text
    assert "autoencoder.training.batch_size" in text
    assert "device.mixed_precision" in text and "'fp8'" in text
    # the cross-field rule on the valid keys is reported in the same error
    assert any("axis 0 size 250 is not divisible by the total factor 8" in p for p in problems)
    assert len(problems) == 5


def test_keys_inside_intensity_sections_keep_their_full_path():
    """'intensity' begins like pydantic's union tag 'int'; it must stay in the reported path."""
    (problem,) = problems_of({"data": {"intensity": {"lowr": 1}}})
    assert problem == "data.intensity.lowr: unknown key (did you mean 'data.intensity.lower'?)"
    (problem,) = problems_of({"data": {"intensity_by_class": {"mri": {"uper": 99}}}})
    assert problem == "data.intensity_by_class.mri.uper: unknown key (did you mean 'data.intensity_by_class.mri.upper'?)"


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    (problem,) = problems_of({"device": {"gpu": 1}})
    assert problem.startswith("device.gpu: unknown key (known keys here: device, mixed_precision")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"autoencoder": {"downsample_factors": [4, 2, 2]}}, "expected 2 entries (len(num_channels) - 1"),
        ({"autoencoder": {"downsample_factors": [4, 0]}}, "each an int >= 1"),
        ({"autoencoder": {"downsample_factors": [[4, 4], 2]}}, "a list of 3 ints"),
        ({"autoencoder": {"num_channels": [24, 32, 64]}}, "divisible by norm_num_groups=16; [24] are not"),
        ({"autoencoder": {"attention_levels": [True]}}, "autoencoder.attention_levels: expected 3 entries"),
        ({"autoencoder": {"num_res_blocks": [1, 1]}}, "autoencoder.num_res_blocks: expected an int or 3 entries"),
        ({"data": {"voxel_size": [64, 64, 60]}, "autoencoder": {"downsample_factors": [4, 2]}},
         "axis 2 size 60 is not divisible by the total factor 8 on that axis (nearest valid sizes: 56, 64)"),
        ({"data": {"voxel_size": [64, 64, 32]}, "autoencoder": {"downsample_factors": [4, 4]},
          "ldm": {"unet": {"num_channels": [32, 64, 64], "attention_levels": [False, False, True]}}},
         "a 3-level UNet needs every axis divisible by 4; axis 2 (2) is not"),
        ({"data": {"source": "folder"}}, "data.data_dir: required when data.source is 'folder'"),
        ({"data": {"intensity": {"lower": 99, "upper": 1}}}, "percentiles need 0 <= lower < upper <= 100"),
        ({"autoencoder": {"training": {"max_epochs": None}}}, "set at least one bound"),
        ({"ldm": {"training": {"lr_schedule": "cosine"}}}, "'cosine' needs ldm.training.max_steps"),
        ({"autoencoder": {"training": {"lr_schedule": "cosine", "max_steps": 2, "warmup_steps": 20}}},
         "autoencoder.training.warmup_steps / autoencoder.training.max_steps: 'cosine' decays after the warm-up"),
        ({"ldm": {"scheduler": {"type": "rflow"}, "sampling": {"scheduler": "ddim"}}}, "cannot sample with 'ddim'"),
        ({"ldm": {"unet": {"num_head_channels": 7}}}, "not divisible by 7 head channels"),
        # stage sizes: the autoencoder's volume and patches
        ({"autoencoder": {"training": {"voxel_size": [64, 64, 62]}}},
         "autoencoder.training.voxel_size / autoencoder.downsample_factors: axis 2 size 62 is not divisible by the "
         "total factor 4"),
        ({"autoencoder": {"training": {"patch_size": [32, 32, 30]}}},
         "autoencoder.training.patch_size / autoencoder.downsample_factors: axis 2 size 30"),
        ({"autoencoder": {"training": {"patch_size": [32, 32]}}},
         "autoencoder.training.patch_size: expected 3 sizes >= 1 like data.voxel_size, got [32, 32]"),
        ({"autoencoder": {"training": {"voxel_size": [48, 48, 48], "patch_size": [64, 32, 32]}}},
         "autoencoder.training.patch_size: [64, 32, 32] does not fit in the autoencoder's volume [48, 48, 48] "
         "(autoencoder.training.voxel_size)"),
        ({"autoencoder": {"training": {"patch_foreground_ratio": 0.5}}},
         "autoencoder.training.patch_foreground_ratio: needs autoencoder.training.patch_size"),
        ({"autoencoder": {"training": {"patch_size": [32, 32, 32], "patch_foreground_threshold": 0.2}}},
         "autoencoder.training.patch_foreground_threshold: only read with autoencoder.training.patch_foreground_ratio"),
        # learning-rate schedules
        ({"ldm": {"training": {"lr_schedule": "multistep"}}},
         "ldm.training.lr_milestones: 'multistep' needs increasing milestones >= 1, got []"),
        ({"ldm": {"training": {"lr_schedule": "multistep", "lr_milestones": [1000, 100]}}},
         "increasing milestones >= 1, got [1000, 100]"),
        ({"autoencoder": {"training": {"lr_schedule": "polynomial", "warmup_steps": 10}}},
         "autoencoder.training.warmup_steps / autoencoder.training.lr_schedule: 'polynomial' is PyTorch's "
         "PolynomialLR without warm-up"),
        ({"ldm": {"training": {"lr_gamma": 0.5}}}, "ldm.training.lr_gamma: only read by lr_schedule 'multistep', not "
                                                   "'constant'"),
        ({"ldm": {"training": {"lr_schedule": "cosine", "lr_schedule_interval": "epoch", "max_epochs": None,
                               "max_steps": 10}}},
         "ldm.training.lr_schedule: 'cosine' per epoch needs ldm.training.max_epochs"),
        # losses
        ({"autoencoder": {"training": {"disc_steps_per_generator_step": 5, "gradient_accumulation_steps": 2}}},
         "autoencoder.training.disc_steps_per_generator_step / gradient_accumulation_steps: 5 discriminator steps"),
        ({"autoencoder": {"training": {"perceptual_pretrained_path": "w.pth"}}},
         "autoencoder.training.perceptual_pretrained_path: only read for perceptual_network 'resnet50'"),
        # data: channels and intensity classes
        ({"data": {"channel": [0, 1]}},
         "data.channel / autoencoder.in_channels: data.channel keeps 2 channel(s) [0, 1], but autoencoder.in_channels "
         "is 1"),
        ({"data": {"channel": [2, 2]}, "autoencoder": {"in_channels": 2}}, "data.channel: expected an index or a list "
                                                                         "of distinct indices, got [2, 2]"),
        ({"data": {"intensity_by_class": {"ct": {"mode": "range", "lower": -1000, "upper": 1000, "b_min": -1}}}},
         "data.intensity_by_class.ct.b_min/b_max: every class keeps data.intensity's output range [0.0, 1.0], got "
         "[-1.0, 1.0]"),
        ({"data": {"intensity_by_class": {"mri": {"lower": 50, "upper": 10}}}},
         "data.intensity_by_class.mri.lower/upper: percentiles need 0 <= lower < upper <= 100"),
        # rectified-flow settings on another scheduler
        ({"ldm": {"scheduler": {"sample_method": "uniform", "base_img_size_numel": 4096}}},
         "ldm.scheduler.base_img_size_numel: applies to rectified flow only, ldm.scheduler.type is 'ddpm'"),
        # device
        ({"device": {"compile_mode": "max-autotune"}},
         "device.compile_mode: only read with device.compile true ('max-autotune' has no effect)"),
        # output: experiment trackers
        ({"output": {"loggers": ["tensorboard", "tensorboard"]}}, "output.loggers: 'tensorboard' listed more than once"),
        ({"output": {"mlflow_tracking_uri": "http://localhost:5000"}},
         "output.mlflow_tracking_uri: only read with 'mlflow' in output.loggers, got ['tensorboard']"),
        ({"output": {"loggers": [], "mlflow_experiment_name": "brains"}},
         "output.mlflow_experiment_name: only read with 'mlflow' in output.loggers, got []"),
    ],
)
def test_each_cross_field_rule(raw, expected):
    assert any(expected in p for p in problems_of(raw)), problems_of(raw)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"data": {"voxel_size": [16, 16, 16]}},
         "autoencoder.training.disc_num_layers / data.voxel_size: a 3-layer patch discriminator needs every axis >= 24 "
         "(3 x 2^3), and the autoencoder trains at 16x16x16; the largest depth that fits is 2 (or train on a larger "
         "size)"),
        ({"autoencoder": {"training": {"patch_size": [48, 48, 16], "disc_num_layers": 4}}},
         "autoencoder.training.disc_num_layers / autoencoder.training.patch_size: a 4-layer patch discriminator needs "
         "every axis >= 48 (3 x 2^4), and the autoencoder trains at 48x48x16; the largest depth that fits is 2"),
        ({"autoencoder": {"training": {"voxel_size": [32, 32, 20]}}},
         "autoencoder.training.disc_num_layers / autoencoder.training.voxel_size: a 3-layer"),
        ({"data": {"voxel_size": [4, 4, 4]}, "autoencoder": {"training": {"disc_num_layers": 1}},
          "ldm": {"unet": {"num_channels": [32], "attention_levels": [False]}}},
         "no depth fits: set autoencoder.training.adv_weight to 0"),
    ],
)
def test_a_discriminator_too_deep_for_the_training_size_is_refused_before_a_run(raw, expected, tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, to_run=True)
    assert any(expected in p for p in info.value.problems), info.value.problems
    # A finished run's stored config is read without it: an LDM's autoencoder may have trained with another config.
    config_from_dict(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="disc_num_layers"):  # what every command reads its config with
        load_config(path)


def test_a_discriminator_that_fits_or_none_at_all_passes():
    for training in ({"disc_num_layers": 2}, {"adv_weight": 0}):
        config_from_dict({"data": {"voxel_size": [16, 16, 16]}, "autoencoder": {"training": training}}, to_run=True)
    config_from_dict({"data": {"voxel_size": [24, 24, 24]}, "autoencoder": {"num_channels": [32, 64]}}, to_run=True)


def test_loggers_take_tensorboard_and_mlflow_only():
    assert config_from_dict({}).output.loggers == ["tensorboard"]
    assert config_from_dict({"output": {"loggers": ["mlflow"]}}).output.loggers == ["mlflow"]
    assert any(p.startswith("output.loggers.0") and "'tensorboard' or 'mlflow'" in p
               for p in problems_of({"output": {"loggers": ["wandb"]}})), problems_of({"output": {"loggers": ["wandb"]}})


def test_mlflow_without_its_package_is_refused_before_a_run_naming_the_key_and_the_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    raw = {"output": {"loggers": ["tensorboard", "mlflow"]}}
    config_from_dict(raw)  # a run's stored config, read again to rebuild its networks, is read without it
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:  # what every command reads its config with
        load_config(path)
    assert info.value.problems == ["output.loggers: 'mlflow' needs the mlflow package, which is not installed: "
                                   "pip install 'monai-diffusion[mlflow]' (or: pip install mlflow-skinny)"]


def test_a_saved_config_lists_every_key_and_still_validates():
    """Rules on keys a setting does not read compare with the defaults, not with what the YAML spelt out: a run's
    saved config.yaml (every key written) validates again."""
    rflow = config_from_dict({"ldm": {"scheduler": {"type": "rflow", "sample_method": "uniform"},
                                      "training": {"lr_schedule": "multistep", "lr_milestones": [10]}}})
    assert config_from_dict(rflow.model_dump(mode="json")) == rflow
    assert config_from_dict(Config().model_dump(mode="json")) == Config()


def test_stage_config_gives_each_stage_its_own_size_and_precision():
    config = config_from_dict({
        "data": {"voxel_size": [32, 32, 32]}, "device": {"mixed_precision": "bf16"},
        "autoencoder": {"training": {"voxel_size": [48, 48, 40], "patch_size": [16, 16, 16], "mixed_precision": False}},
        "ldm": {"training": {"mixed_precision": "fp16"}},
    })
    autoencoder, ldm = stage_config(config, "autoencoder"), stage_config(config, "ldm")
    assert (autoencoder.data.voxel_size, autoencoder.device.mixed_precision) == ([48, 48, 40], False)
    assert autoencoder.autoencoder.training.patch_size == [16, 16, 16]  # validation still reconstructs whole volumes
    assert (ldm.data.voxel_size, ldm.device.mixed_precision) == ([32, 32, 32], "fp16")
    assert stage_config(autoencoder, "autoencoder") == autoencoder  # says it through the shared keys only
    assert (step_config(config, "autoencoder").data.voxel_size, step_config(config, "ldm").data.voxel_size) == (
        [16, 16, 16], [32, 32, 32])
    assert config.data.voxel_size == [32, 32, 32] and config.device.mixed_precision == "bf16"  # left as it was
    # Without stage settings every stage is the config itself.
    assert stage_config(Config(), "autoencoder") == stage_config(Config(), "ldm") == Config()


def test_per_axis_factors_for_anisotropic_volumes():
    config = config_from_dict(
        {"data": {"voxel_size": [128, 128, 32]}, "autoencoder": {"downsample_factors": [[4, 4, 2], [2, 2, 2]]},
         "ldm": {"unet": {"num_channels": [32, 64], "attention_levels": [False, True]}}}
    )
    assert config.autoencoder.downsample_factors == [[4, 4, 2], [2, 2, 2]]


@pytest.mark.parametrize("value", [True, False, "fp16", "bf16", "fp32", "no"])
def test_mixed_precision_values(value):
    assert config_from_dict({"device": {"mixed_precision": value}}).device.mixed_precision == value
    assert config_from_dict({"ldm": {"training": {"mixed_precision": value}}}).ldm.training.mixed_precision == value
    assert set(get_args(get_args(schema.MixedPrecision)[1])) == {"fp16", "bf16", "fp32", "no"}


TRAINING_SECTIONS = (schema.AutoencoderTrainingConfig, schema.LDMTrainingConfig, schema.ControlNetTrainingConfig)


@pytest.mark.parametrize("section", TRAINING_SECTIONS, ids=lambda s: s.__name__)
def test_training_sections_share_one_declaration(section):
    """A stage's training section is the shared one: a stage may change a default or a description, never a
    field's type or bounds."""
    assert issubclass(section, schema.TrainingConfig)
    for name, shared in schema.TrainingConfig.model_fields.items():
        field = section.model_fields[name]
        assert (field.annotation, field.metadata) == (shared.annotation, shared.metadata), name
        assert field.description, name


def test_each_stage_keeps_its_training_defaults():
    stages = {
        "autoencoder": (schema.AutoencoderTrainingConfig(), (1, 100, 1)),
        "ldm": (schema.LDMTrainingConfig(), (2, 200, 10)),
        "controlnet": (schema.ControlNetTrainingConfig(), (2, 200, 10)),
    }
    for stage, (section, (batch, epochs, validate_every)) in stages.items():
        assert (section.batch_size, section.max_epochs, section.val_every_n_epochs) == (batch, epochs,
                                                                                        validate_every), stage
        assert (section.lr, section.grad_clip, section.lr_schedule, section.keep_last_checkpoints) == (
            1e-4, 1.0, "constant", 2), stage
    assert schema.ControlNetTrainingConfig().model_dump() == schema.LDMTrainingConfig().model_dump()


def test_every_schema_class_has_a_docstring():
    classes = [c for c in vars(schema).values()
               if isinstance(c, type) and issubclass(c, BaseModel) and c.__module__ == schema.__name__]
    assert len(classes) > 15
    assert [c.__name__ for c in classes if not (c.__doc__ or "").strip()] == []


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"autoencoder": {"num_channels": [16, 32, 64]}}))
    config = load_config(path, ["autoencoder.downsample_factors=[4, 2]", "device.mixed_precision=bf16",
                                "output.output_dir=/tmp/x", "fast_dev_run=true"])
    assert config.autoencoder.downsample_factors == [4, 2]
    assert config.autoencoder.num_channels == [16, 32, 64]
    assert config.device.mixed_precision == "bf16"
    assert str(config.output.output_dir) == "/tmp/x"
    assert config.fast_dev_run is True
    assert parse_override("a.b=") == (["a", "b"], None)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["autoencoder.latent_channels"])


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml: .*not valid YAML"):
        load_config(bad)


def test_default_config_file_is_generated_from_the_schema():
    assert (ROOT / "config" / "ldm_config.yaml").read_text() == render_default_config(), (
        "config/ldm_config.yaml is stale: run python tools/render_default_config.py"
    )
    assert load_config(ROOT / "config" / "ldm_config.yaml") == Config()


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_validates_and_says_how_to_run_it(preset):
    load_config(preset)
    head = preset.read_text().splitlines()[:12]
    assert head[0].startswith("#"), f"{preset.name} must begin with a comment"
    assert any("monai-diffusion" in line or "python" in line for line in head if line.startswith("#"))
