"""Checkpoints written before the three training commands shared one loop still resume: each stage's run stopped
after step 2 by the older code (tests/fixtures/pre_one_loop) continues to step 3 with today's code and matches the
older code's straight three-step run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import conditional_raw, write_conditional_data

from monai_diffusion import train_autoencoder, train_controlnet, train_ldm
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.engine.checkpoint import load_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_one_loop"
RECIPES = {"autoencoder": train_autoencoder, "ldm": train_ldm, "controlnet": train_controlnet}
NETWORK = {"autoencoder": "autoencoder", "ldm": "unet", "controlnet": "controlnet"}
STAGE_OVERRIDES = json.loads((FIXTURES / "overrides.json").read_text())
UPSTREAM = {"ldm": ("autoencoder", "autoencoder_checkpoint"), "controlnet": ("ldm", "ldm_checkpoint")}


def relocated(value, old: str, new: str):
    """``value`` with every string under the folder ``old`` moved under ``new`` (dicts and lists walked)."""
    if isinstance(value, dict):
        return {key: relocated(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [relocated(item, old, new) for item in value]
    return value.replace(old, new) if isinstance(value, str) and value.startswith(old) else value


def place(name: str, tmp_path: Path, at: Path | None = None) -> tuple[dict, Path]:
    """The fixture ``name`` with its paths moved under ``tmp_path``, saved at ``at`` (default: a run folder of its
    own); returns it and where it lies."""
    old = (FIXTURES / "root.txt").read_text().strip()
    state = relocated(torch.load(FIXTURES / name, weights_only=False), old, str(tmp_path))
    path = at or tmp_path / "resumed" / "old-run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state, path


@pytest.mark.parametrize("stage", ["autoencoder", "ldm", "controlnet"])
def test_a_checkpoint_of_the_older_loop_resumes_to_the_straight_runs_weights(stage, tmp_path):
    datalist = write_conditional_data(tmp_path / "data", count=6)
    stopped, path = place(f"{stage}-stopped.pt", tmp_path)
    overrides = list(STAGE_OVERRIDES[stage])
    # The stages upstream of this one, where the stopped run's checkpoint says they are.
    upstream_stage, key = UPSTREAM.get(stage, (None, None))
    while upstream_stage is not None:
        upstream, upstream_path = place(f"{upstream_stage}-straight.pt", tmp_path, Path(stopped[key]))
        overrides.append(f"{'controlnet' if key == 'ldm_checkpoint' else 'ldm'}.{key}={upstream_path}")
        upstream_stage, key = UPSTREAM.get(upstream_stage, (None, None))
        stopped = upstream
    config = config_from_dict(apply_overrides(conditional_raw(datalist, tmp_path / "resumed"), overrides))

    run = RECIPES[stage].train(config, resume=str(path))

    resumed = load_checkpoint(run / "checkpoints" / "last.pt")
    straight = torch.load(FIXTURES / f"{stage}-straight.pt", weights_only=False)
    assert run == path.parent.parent and resumed["step"] == straight["step"] == 3
    for name, value in straight[NETWORK[stage]].items():
        torch.testing.assert_close(resumed[NETWORK[stage]][name], value, rtol=1e-5, atol=1e-6, msg=name)
    if straight.get("ema") is not None:
        assert int(resumed["ema"]["n_averaged"]) == int(straight["ema"]["n_averaged"]) == 3
