"""benchmarks/quality_study.py end to end at a tiny size: real training runs, evaluate, the report and its panels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_study_trains_evaluates_and_writes_the_report(tmp_path):
    out = tmp_path / "docs" / "quality.md"
    command = [
        sys.executable, "benchmarks/quality_study.py", "--steps", "3", "--size", "32", "32", "32", "--spacing", "6", "6",
        "6", "--only", "[4,2]", "[16]", "--work", str(tmp_path / "work"), "--out", str(out),
        "--set", "data.demo.num_volumes=6", "--set", f"data.demo.cache_dir={tmp_path / 'demo'}",
        "--set", "data.val_fraction=0.34", "--set", "autoencoder.training.warmup_steps=0",
        "--set", "output.log_every_n_steps=1",
        # a 2^3 latent ([16] at 32^3) needs a 2-level diffusion UNet to pass the config rules
        "--set", "ldm.unet.num_channels=[32,64]", "--set", "ldm.unet.attention_levels=[false,true]",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| [")]
    assert [row.split(" | ")[0] for row in rows] == ["| [4,2]", "| [16]"]
    assert "| 8x8x8 | 3x4x4x4 | 192 |" in rows[0] and "| 16x16x16 | 3x2x2x2 | 24 |" in rows[1]
    panels = sorted(p.name for p in (tmp_path / "docs" / "quality-panels").iterdir())
    assert panels == ["16.png", "4-2.png"] and "(quality-panels/4-2.png)" in report
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["name"] for row in saved] == ["[4,2]", "[16]"] and all(row["step_time_s"] > 0 for row in saved)

    # --reuse keeps what the first call trained and evaluated: the report again, no second training run.
    first = out.read_text()
    result = subprocess.run([*command, "--reuse"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert out.read_text() == first
    assert (tmp_path / "work" / "factors-4-2.log").read_text().count("train-autoencoder") == 1
