"""Regenerate config/ldm_config.yaml from the schema (a test checks it is up to date)."""

from pathlib import Path

from monai_diffusion.config.render import render_default_config

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "config" / "ldm_config.yaml"
    target.write_text(render_default_config())
    print(f"wrote {target}")
