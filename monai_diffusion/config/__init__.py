"""Typed configuration: schema, loading with overrides, cross-field rules."""

from monai_diffusion.config.loading import ConfigError, apply_overrides, config_from_dict, load_config, save_config
from monai_diffusion.config.schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "config_from_dict", "load_config", "save_config"]
