"""evaluate: a tiny trained autoencoder and LDM scored on real files, with the baseline, CSV, panels and FID."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_diffusion import evaluate as evaluation
from monai_diffusion import train_autoencoder, train_ldm
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.data import build_transforms, list_volumes
from monai_diffusion.metrics import ms_ssim_scales, resampling_size

from helpers import tiny_config_dict, write_volumes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An autoencoder (3 steps) and an LDM on top of it (2 steps), trained on 8 real NIfTI volumes of 16^3."""
    root = tmp_path_factory.mktemp("evaluate")
    write_volumes(root / "images", 8)
    raw = apply_overrides(tiny_config_dict(root / "images", root / "runs"), [
        "data.val_fraction=0.25", "autoencoder.training.max_steps=3", "autoencoder.training.max_epochs=3",
        "ldm.training.max_steps=2", "ldm.training.max_epochs=2", "ldm.training.scale_factor_volumes=2",
        "ldm.sampling.num_inference_steps=2", "ldm.training.val_every_n_epochs=100",
    ])
    config = config_from_dict(raw)
    torch.manual_seed(0)
    autoencoder_run = train_autoencoder.train(config)
    ldm_run = train_ldm.train(config)
    return config, autoencoder_run, ldm_run


def test_autoencoder_cli_scores_every_held_out_volume_beside_the_trilinear_baseline(runs):
    config, run, _ = runs
    result = subprocess.run([sys.executable, "-m", "monai_diffusion.cli", "evaluate", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run / "evaluation"
    with open(out / "reconstruction.csv") as handle:
        rows = list(csv.DictReader(handle))
    _, validation = list_volumes(config.data, config.seed)
    assert sorted(row["volume"] for row in rows) == sorted(str(item["image"]) for item in validation)
    for prefix in ("autoencoder", "trilinear"):
        for metric in ("l1", "psnr", "ssim", "ms_ssim"):
            assert all(math.isfinite(float(row[f"{prefix}_{metric}"])) for row in rows)

    # The baseline is plain trilinear resampling through a grid with as many values as the latent (2 x 8^3).
    report = json.loads((out / "summary.json").read_text())
    assert report["latent_values"] == 2 * 8**3 and report["trilinear_grid"] == list(resampling_size((16,) * 3, 1024))
    assert report["ms_ssim_scales"] == ms_ssim_scales((16, 16, 16)) == 1
    image = build_transforms(config.data, train=False)(dict(validation[0]))["image"].as_tensor()[None]
    small = F.interpolate(image, size=report["trilinear_grid"], mode="trilinear", align_corners=False)
    back = F.interpolate(small, size=(16, 16, 16), mode="trilinear", align_corners=False)
    expected_psnr = 10 * math.log10(1.0 / float(F.mse_loss(back, image)))
    row = next(r for r in rows if r["volume"] == str(validation[0]["image"]))
    assert float(row["trilinear_psnr"]) == pytest.approx(expected_psnr, abs=1e-3)

    mean_psnr = sum(float(r["autoencoder_psnr"]) for r in rows) / len(rows)
    assert report["summary"]["autoencoder_psnr"]["mean"] == pytest.approx(mean_psnr, abs=1e-6)
    assert "| PSNR (dB) |" in (out / "summary.md").read_text() and "| PSNR (dB) |" in result.stderr
    assert (out / "reconstruction-best.png").is_file() and (out / "reconstruction-worst.png").is_file()
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"eval/autoencoder_psnr", "eval/trilinear_ssim"} <= set(events.Tags()["scalars"])


def test_autoencoder_on_a_folder_window_by_window(runs, tmp_path):
    """--data takes any folder; --tile-size reconstructs in windows (as for volumes too large at once)."""
    _, run, _ = runs
    write_volumes(tmp_path / "other", 3, seed=7)
    whole = evaluation.evaluate(run, data=tmp_path / "other", out=tmp_path / "whole")
    tiled = evaluation.evaluate(run, data=tmp_path / "other", tile_size=[8, 8, 8], out=tmp_path / "tiled")
    assert whole["volumes"] == tiled["volumes"] == 3 and tiled["tile_size"] == [8, 8, 8]
    # The decoder's GroupNorm sees one window at a time: close to, not equal with, the whole volume.
    whole_l1 = whole["summary"]["autoencoder_l1"]["mean"]
    assert tiled["summary"]["autoencoder_l1"]["mean"] == pytest.approx(whole_l1, rel=0.5)
    assert tiled["summary"]["trilinear_l1"] == whole["summary"]["trilinear_l1"]
    with pytest.raises(ValueError, match="not divisible by the total downsampling factor"):
        evaluation.evaluate(run, data=tmp_path / "other", tile_size=[7, 8, 8], out=tmp_path / "bad")


def test_an_autoencoder_trained_on_patches_is_evaluated_window_by_window_at_its_patch_size(runs, tmp_path):
    config, _, _ = runs
    patched = config.model_copy(deep=True)
    patched.autoencoder.training.patch_size = [8, 8, 8]
    patched.autoencoder.training.max_steps = 1
    patched.output.output_dir = tmp_path / "runs"
    run = train_autoencoder.train(patched)
    assert evaluation.evaluate(run, out=tmp_path / "default")["tile_size"] == [8, 8, 8]
    assert evaluation.evaluate(run, tile_size=[16, 16, 8], out=tmp_path / "given")["tile_size"] == [16, 16, 8]

def test_ldm_reports_diversity_mmd_and_fid_with_a_local_feature_network(runs, tmp_path):
    _, _, run = runs
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv3d(6, 4, 3))
    feature_file = tmp_path / "features.pt2"
    torch.export.save(torch.export.export(network, (torch.zeros(1, 1, 16, 16, 16),)), feature_file)

    report = evaluation.evaluate(run, num_samples=3, seed=1, fid_network=str(feature_file), out=tmp_path / "ldm")
    assert report["num_samples"] == 3 and report["num_real"] == 3
    assert 0 < report["diversity_ms_ssim_samples"] <= 1 and 0 < report["diversity_ms_ssim_real"] <= 1
    assert math.isfinite(report["mmd"]) and math.isfinite(report["fid"]) and report["fid"] >= -1e-6
    assert len(list((tmp_path / "ldm" / "samples").glob("sample-*.nii.gz"))) == 3
    assert (tmp_path / "ldm" / "samples.png").is_file()
    saved = json.loads((tmp_path / "ldm" / "summary.json").read_text())
    assert saved["fid"] == pytest.approx(report["fid"])

    # The same features for both sets give FID 0: the metric compares what the network sees.
    feats = evaluation.features(torch.export.load(str(feature_file)).module(), torch.rand(3, 1, 16, 16, 16),
                                torch.device("cpu"))
    assert feats.shape == (3, 4)
    from monai.metrics import FIDMetric

    assert float(FIDMetric()(feats, feats)) == pytest.approx(0.0, abs=1e-4)


def test_errors_name_what_is_wrong(runs, tmp_path):
    _, autoencoder_run, ldm_run = runs
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        evaluation.evaluate(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="--data .*no such folder or datalist"):
        evaluation.evaluate(autoencoder_run, data=tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="--fid-network bogus: neither a file nor"):
        evaluation.evaluate(ldm_run, num_samples=2, fid_network="bogus", out=tmp_path / "x")
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluation.evaluate(ldm_run, num_samples=1, fid_network="none", out=tmp_path / "y")
