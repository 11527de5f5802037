"""Render a config as YAML with every key's schema description as a comment (config/ldm_config.yaml)."""

from __future__ import annotations

import yaml

from pydantic import BaseModel

from monai_diffusion.config.schema import Config

HEADER = """\
# monai-diffusion default configuration: every key, its default and what it does.
# Generated from monai_diffusion/config/schema.py by `python tools/render_default_config.py`.
#
# Run:   monai-diffusion validate --config config/ldm_config.yaml
#        monai-diffusion train-autoencoder --config config/ldm_config.yaml
#        monai-diffusion train-ldm --config config/ldm_config.yaml
#        monai-diffusion sample --config config/ldm_config.yaml --num-samples 4
# Trade: defaults are a middle ground (64^3 volumes, stock 2x-per-level downsampling); see
# config/examples/ for presets that trade memory for latent resolution.
"""


def _scalar(value) -> str:
    """One YAML flow-style value, quoted where YAML needs it (e.g. '*.nii*')."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def render(model: BaseModel, indent: int = 0) -> list[str]:
    lines: list[str] = []
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(render(value, indent + 1))
            continue
        dumped = model.model_dump(mode="json", include={name})[name]
        comment = f"  # {field.description}" if field.description else ""
        lines.append(f"{pad}{name}: {_scalar(dumped)}{comment}")
    return lines


def render_default_config() -> str:
    return HEADER + "\n".join(render(Config())) + "\n"
