"""The evidence that conditioning works (docs/conditioning.md): the study's measures, and the study itself (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "conditioning_study.py"


def study_module():
    spec = importlib.util.spec_from_file_location("conditioning_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_studys_measures():
    study = study_module()
    assert study.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # ranks, not values
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert study.slope([0.8, 1.0, 1.2], [1.0, 2.0, 3.0]) == pytest.approx(5.0)
    a = torch.zeros(4, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[:2], b[1:3] = True, True
    assert study.dice(a, b) == pytest.approx(0.5) and study.dice(a, a) == 1.0
    summary = study.covariate_summary([0.8, 0.8, 1.0, 1.2, 1.2], [1.0, 3.0, 5.0, 7.0, 9.0])
    assert summary["spearman"] == pytest.approx(9 / 90 ** 0.5, abs=1e-3)  # tied ranks: Pearson on 1.5, 1.5, 3, 4.5, 4.5
    assert (summary["mean_ml_lowest_levels"], summary["mean_ml_highest_levels"]) == (3.0, 7.0)


@pytest.mark.slow
def test_the_covariate_guidance_and_label_maps_measurably_steer_the_samples(tmp_path):
    """The study of docs/conditioning.md, with its default settings (about half an hour on 2 CPU cores)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "study"),
         "--set", f"data.demo.cache_dir={tmp_path / 'demo'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
        env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    covariate, masks = study["covariate"], study["masks"]
    guided, plain, null = covariate["guidance 3"], covariate["guidance 1"], covariate["null condition"]
    # Larger brain_scale, larger brains; guidance follows it more closely; the null condition does not follow it.
    assert guided["spearman"] > plain["spearman"] > 0.5
    assert guided["slope_ml_per_0.1"] > plain["slope_ml_per_0.1"] > 2 * abs(null["slope_ml_per_0.1"])
    assert guided["mean_ml_highest_levels"] > guided["mean_ml_lowest_levels"] * 1.8
    # Held-out label maps: the ControlNet's samples overlap their maps more than the LDM's unconditioned ones.
    assert masks["ControlNet (mask)"]["mean_dice"] > masks["LDM, null condition"]["mean_dice"]
    assert masks["ControlNet (mask)"]["volume_spearman"] > 0.5
