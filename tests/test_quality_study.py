"""benchmarks/quality_study.py end to end at a tiny size: real training runs, evaluate, the report and its panels."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def study_module():
    spec = importlib.util.spec_from_file_location("quality_study", ROOT / "benchmarks" / "quality_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_run(tmp_path: Path, *, steps: int, seed: int, psnr: float) -> dict:
    """A row as study_setting returns it, for a run that scored ``psnr`` on held-out volumes (trilinear: 20 dB)."""
    panel = tmp_path / f"panel-{steps}-{seed}.png"
    panel.write_bytes(b"png")
    summary = {f"{who}_{what}": {"mean": value, "std": 0.5} for who, scores in
               (("autoencoder", (psnr, 0.8, 0.9)), ("trilinear", (20.0, 0.6, 0.8)))
               for what, value in zip(("psnr", "ssim", "ms_ssim"), scores)}
    report = {"summary": summary, "volumes": 4, "latent_shape": [3, 8, 8, 8], "image_shape": [1, 64, 64, 64],
              "latent_values": 1536, "ms_ssim_scales": 3}
    return {"name": "[4,2]", "steps": steps, "seed": seed, "report": report, "step_time_s": 0.5,
            "peak_memory_mib": 800.0, "train_minutes": steps / 120, "panel": panel}


def test_learning_curve_report_gives_the_mean_and_spread_over_seeds_and_what_each_budget_bought(tmp_path):
    study = study_module()
    rows = [synthetic_run(tmp_path, steps=steps, seed=seed, psnr=psnr)
            for seed, scores in ((0, (22.0, 23.0)), (7, (22.4, 23.6))) for steps, psnr in zip((350, 700), scores)]
    args = argparse.Namespace(steps=[350, 700], training_seeds=[0, 7], size=[64, 64, 64], spacing=[3.0, 3.0, 3.0],
                              device="cpu")
    out = tmp_path / "docs" / "quality-steps.md"
    panels = tmp_path / "docs" / "quality-steps-panels"
    panels.mkdir(parents=True)
    report = study.render(rows, args, "CPU", panels, out)
    lines = report.splitlines()
    assert lines[0] == "# How reconstruction quality grows with training"
    assert "| [4,2] | 350 | 2.9 | 22.20 (22.00-22.40) | 0.800 | 0.900 | +2.20 (+2.00 to +2.40) |  |" in lines
    assert "| [4,2] | 700 | 5.8 | 23.30 (23.00-23.60) | 0.800 | 0.900 | +3.30 (+3.00 to +3.60) | +1.10 |" in lines
    assert "| trilinear at equal values | | | 20.00 | 0.600 | 0.800 | | |" in lines
    assert "training seed (0, 7)" in report
    assert (panels / "learning-curve-4-2.png").is_file() and (panels / "4-2-700-steps.png").read_bytes() == b"png"

    # One budget, one seed: the factor table, PSNR with its spread over the held-out volumes.
    single = study.render(rows[:1], argparse.Namespace(steps=[350], training_seeds=None, size=[64, 64, 64],
                                                       spacing=[3.0, 3.0, 3.0], device="cpu"), "CPU", panels, out)
    assert single.startswith("# Reconstruction quality by downsampling factor")
    assert "| [4,2] | 8x8x8 | 3x8x8x8 | 1,536 | 22.00 ± 0.50 | 0.800 | 0.900 | 20.00 / 0.600 / 0.800 | +2.00 |" in single
    assert "## Along the run" not in single  # the run validated fewer than three times

    # A run that validated along the way: its held-out PSNR at every validation, beside trilinear, and the chart.
    rows[0]["validation"] = [{"step": step, "psnr": psnr, "ssim": 0.7} for step, psnr in
                             ((100, 19.5), (200, 21.0), (300, 21.75))]
    along = study.render(rows[:1], argparse.Namespace(steps=[350], training_seeds=None, size=[64, 64, 64],
                                                      spacing=[3.0, 3.0, 3.0], device="cpu"), "CPU", panels, out)
    assert "### [4,2], 350 steps: held-out quality along the run" in along and "every 100 steps" in along
    assert "| 100 | 19.50 | 0.700 | -0.50 |" in along and "| 300 | 21.75 | 0.700 | +1.75 |" in along
    chart = panels / "validation-curve-4-2-350-steps.png"
    assert "(quality-steps-panels/validation-curve-4-2-350-steps.png)" in along
    from PIL import Image

    pixels = np.asarray(Image.open(chart).convert("RGB"))
    assert (pixels != 255).any(axis=2).mean() > 0.02


@pytest.mark.slow
def test_quality_study_learning_curves_over_budgets_and_seeds(tmp_path):
    """Two budgets x two training seeds: four real runs, the learning-curve table with the spread over seeds, and
    the chart. Seeds really change the training (different figures), budgets get their own runs."""
    out = tmp_path / "docs" / "quality-steps.md"
    command = [
        sys.executable, "benchmarks/quality_study.py", "--steps", "4", "2", "--training-seeds", "0", "7",
        "--size", "32", "32", "32", "--spacing", "6", "6", "6", "--only", "[4,2]", "--work", str(tmp_path / "work"),
        "--out", str(out), "--set", "data.demo.num_volumes=6", "--set", f"data.demo.cache_dir={tmp_path / 'demo'}",
        "--set", "data.val_fraction=0.34", "--set", "autoencoder.training.warmup_steps=0",
        "--set", "output.log_every_n_steps=1",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "work").glob("factors-*") if p.is_dir())
    assert runs == ["factors-4-2-2-steps-seed-0", "factors-4-2-2-steps-seed-7", "factors-4-2-4-steps-seed-0",
                    "factors-4-2-4-steps-seed-7"]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [(row["steps"], row["seed"]) for row in saved] == [(2, 0), (4, 0), (2, 7), (4, 7)]
    psnr = {(row["steps"], row["seed"]): row["report"]["summary"]["autoencoder_psnr"]["mean"] for row in saved}
    assert psnr[(4, 0)] != psnr[(4, 7)] and psnr[(2, 0)] != psnr[(4, 0)]
    report = out.read_text()
    assert report.startswith("# How reconstruction quality grows with training")
    rows = [line for line in report.splitlines() if line.startswith("| [4,2] |")]
    assert [row.split(" | ")[1] for row in rows] == ["2", "4"]
    mean_4 = (psnr[(4, 0)] + psnr[(4, 7)]) / 2
    low, high = sorted([psnr[(4, 0)], psnr[(4, 7)]])
    assert f"{mean_4:.2f} ({low:.2f}-{high:.2f})" in rows[1]
    assert f"{mean_4 - (psnr[(2, 0)] + psnr[(2, 7)]) / 2:+.2f} |" in rows[1]  # bought since the 2-step budget
    assert "| trilinear at equal values |" in report
    chart = tmp_path / "docs" / "quality-steps-panels" / "learning-curve-4-2.png"
    assert chart.is_file() and "(quality-steps-panels/learning-curve-4-2.png)" in report
    from PIL import Image

    pixels = np.asarray(Image.open(chart).convert("RGB"))
    assert (pixels != 255).any(axis=2).mean() > 0.02  # axes, lines and labels drawn, not a blank canvas
    assert (tmp_path / "docs" / "quality-steps-panels" / "4-2-4-steps.png").is_file()
