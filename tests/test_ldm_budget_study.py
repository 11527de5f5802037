"""benchmarks/ldm_budget_study.py end to end at a tiny size: real train-ldm runs at two budgets over one trained
autoencoder, each scored by evaluate beside its real-vs-real floor, the report and the sample panels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from monai_diffusion import train_autoencoder
from monai_diffusion.config import apply_overrides, config_from_dict

from helpers import tiny_config_dict, write_volumes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # four subprocess runs (~30-50 s on 2 cores); the benchmark, not the product
def test_ldm_budget_study_trains_each_budget_and_reports_it_beside_the_floor(tmp_path):
    write_volumes(tmp_path / "images", 10)
    raw = apply_overrides(tiny_config_dict(tmp_path / "images", tmp_path / "runs"), [
        "data.val_fraction=0.2", "autoencoder.training.max_steps=2", "autoencoder.training.max_epochs=2",
        "ldm.training.max_epochs=100", "ldm.training.scale_factor_volumes=2", "ldm.sampling.num_inference_steps=2",
        "ldm.training.val_every_n_epochs=100",
    ])
    autoencoder_run = train_autoencoder.train(config_from_dict(raw))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "docs" / "ldm-budgets.md"
    command = [sys.executable, "benchmarks/ldm_budget_study.py", "--autoencoder", str(autoencoder_run),
               "--config", str(config), "--steps", "3", "1", "--num-samples", "4", "--work", str(tmp_path / "work"),
               "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["steps"] for row in saved] == [1, 3]
    for row in saved:
        run = tmp_path / "work" / f"ldm-{row['steps']}-steps"
        assert json.loads((run / "evaluation" / "summary.json").read_text()) == row["report"]
        assert row["report"]["n"] == 4 and row["report"]["checkpoint_step"] == row["steps"]
    report = out.read_text()
    lines = [line for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    first = saved[0]["report"]
    assert lines[0].startswith(f"| 1 | {saved[0]['train_seconds'] / 60:.1f} | 4 | {first['mmd']:.4g} "
                               f"| {first['mmd_floor']:.4g} |")
    assert "Warning (from evaluate): n = 4 volumes per set, below 100" in report  # carried into the report
    assert (tmp_path / "docs" / "ldm-budgets-panels" / "ldm-3-steps.png").is_file()
    assert "(ldm-budgets-panels/ldm-1-steps.png)" in report

    # --reuse reads what the first call trained and evaluated: no second train-ldm run.
    result = subprocess.run([*command, "--reuse"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "work" / "ldm-3-steps.log").read_text().count("train-ldm") == 1
