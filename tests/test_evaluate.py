"""evaluate: a tiny trained autoencoder and LDM scored on real files, with the baseline, CSV, panels, and FID by
protocol beside its real-vs-real floor (networks in the released layout, saved by the test: no download)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_diffusion import evaluate as evaluation
from monai_diffusion import train_autoencoder, train_ldm
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.data import build_transforms, list_volumes
from monai_diffusion.metrics import ms_ssim_scales, resampling_size

from helpers import save_feature_weights, tiny_config_dict, write_volumes

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

@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Both protocols' networks with random weights, narrow, saved as the released files are."""
    return save_feature_weights(tmp_path_factory.mktemp("weights"))


def test_ldm_reports_each_protocol_beside_its_real_vs_real_floor(runs, weight_files, tmp_path):
    config, _, run = runs
    out = tmp_path / "ldm"
    assert evaluation.main([str(run), "-n", "3", "--seed", "1", "--fid", "medicalnet", "radimagenet-2.5d",
                            "--fid-weights", f"medicalnet={weight_files['medicalnet']}",
                            "--fid-weights", f"radimagenet-2.5d={weight_files['radimagenet-2.5d']}",
                            "--out", str(out)]) == 0
    report = json.loads((out / "summary.json").read_text())
    # 3 samples against 3 real volumes (half B); the floor: 3 other real volumes (half A) against B.
    assert report["num_samples"] == 3 and report["num_real"] == 6 and report["n"] == 3
    assert len(list((out / "samples").glob("sample-*.nii.gz"))) == 3 and (out / "samples.png").is_file()
    medicalnet, radimagenet = report["fid"]["medicalnet"], report["fid"]["radimagenet-2.5d"]
    for name, entry in report["fid"].items():
        assert entry["weights"] == str(weight_files[name]) and entry["weights_source"] == "--fid-weights"
        assert entry["sha256"] == hashlib.sha256(weight_files[name].read_bytes()).hexdigest()
        assert entry["n_generated"] == entry["n_real"] == 3 and entry["protocol"] == name
        assert math.isfinite(entry["fid"]) and math.isfinite(entry["fid_floor"])
    assert medicalnet["scale"] == 1000 and radimagenet["scale"] == 1
    assert medicalnet["feature_dim"] == 32 and medicalnet["samples_per_set"] == 3 and medicalnet["planes"] is None
    # 2.5D: 7 central slices of 16 per plane and volume; FID per plane, the protocol's figure their mean.
    assert radimagenet["feature_dim"] == 128 and radimagenet["samples_per_set"] == 21
    planes = radimagenet["planes"]
    assert list(planes) == ["xy", "yz", "zx"]
    assert radimagenet["fid"] == pytest.approx(sum(p["fid"] for p in planes.values()) / 3)
    assert radimagenet["fid_floor"] == pytest.approx(sum(p["fid_floor"] for p in planes.values()) / 3)
    assert "percentile" in radimagenet["intensity"] and radimagenet["center_slices_ratio"] == 0.4
    assert math.isfinite(report["mmd"]) and math.isfinite(report["mmd_floor"])
    assert report["diversity_ratio"] == pytest.approx(report["diversity_ms_ssim_samples"]
                                                      / report["diversity_ms_ssim_real"])
    assert any("below 100" in warning for warning in report["warnings"])
    assert any("medicalnet: 3 volumes per set for 32 features" in warning for warning in report["warnings"])

    # The table reads "model X, real-vs-real floor Y, n = Z"; the weights are named with their hash.
    table = (out / "summary.md").read_text()
    assert "| measure | model: generated vs real half B | real-vs-real floor: half A vs half B | n per set |" in table
    assert (f"| FID medicalnet (MedicalNet 3D ResNet-10 (23 datasets), x 10^3) | {medicalnet['fid'] * 1000:.4g} | "
            f"{medicalnet['fid_floor'] * 1000:.4g} | 3 |") in table
    assert f"| MMD (voxels) | {report['mmd']:.4g} | {report['mmd_floor']:.4g} | 3 |" in table
    assert medicalnet["sha256"] in table and "**Warning:** n = 3 volumes per set, below 100" in table
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"eval/fid_medicalnet", "eval/fid_medicalnet_floor", "eval/fid_radimagenet-2.5d_xy_floor",
            "eval/mmd_floor", "eval/diversity_ratio"} <= set(events.Tags()["scalars"])


def test_the_floor_is_zero_for_identical_halves_and_grows_when_one_half_is_corrupted(runs, weight_files, tmp_path):
    config, _, run = runs
    training, _ = list_volumes(config.data, config.seed)
    real = [str(item["image"]) for item in training[:3]]
    (tmp_path / "noisy").mkdir()
    rng = np.random.default_rng(1)
    for path in real:
        image = nib.load(path)
        noisy = image.get_fdata().astype(np.float32) + rng.normal(0, 40, image.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(noisy, image.affine), tmp_path / "noisy" / Path(path).name)
    reports = {}
    for name, half_a in (("identical", real), ("corrupted", [str(tmp_path / "noisy" / Path(p).name) for p in real])):
        datalist = tmp_path / f"{name}.json"  # half A, then half B: the same three real volumes
        datalist.write_text(json.dumps({"training": [{"image": path} for path in half_a + real]}))
        reports[name] = evaluation.evaluate(run, data=datalist, num_samples=3, seed=1,
                                            fid=["medicalnet", "radimagenet-2.5d"], fid_weights=weight_files,
                                            out=tmp_path / name)
    identical, corrupted = reports["identical"], reports["corrupted"]
    for protocol in ("medicalnet", "radimagenet-2.5d"):
        assert identical["fid"][protocol]["fid_floor"] == pytest.approx(0, abs=1e-6)
        assert corrupted["fid"][protocol]["fid_floor"] > 0.05
        # The model's figure is against half B, the same either way.
        assert corrupted["fid"][protocol]["fid"] == pytest.approx(identical["fid"][protocol]["fid"])
    # MONAI's MMD is the unbiased estimate: 0 in expectation for independent halves, but for one set against
    # itself it is -2/n of the summed voxel variances (each volume's similarity to itself counts only across sets).
    b = torch.stack([torch.as_tensor(v).flatten() for v in _real_volumes(config, real)]).double()
    centred = b - b.mean(0)
    assert identical["mmd_floor"] == pytest.approx(float(-2 * (centred**2).sum() / (3 * 2)), rel=1e-3)
    assert corrupted["mmd_floor"] > 0 > identical["mmd_floor"]


def _real_volumes(config, paths: list[str]) -> list[torch.Tensor]:
    return [image for _, image in evaluation.load_volumes([{"image": p} for p in paths], config)]


def test_a_torch_export_file_of_your_own_and_the_old_fid_network_option(runs, tmp_path, caplog):
    _, _, run = runs
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv3d(6, 4, 3))
    feature_file = tmp_path / "features.pt2"
    torch.export.save(torch.export.export(network, (torch.zeros(1, 1, 16, 16, 16),)), feature_file)

    report = evaluation.evaluate(run, num_samples=2, seed=1, fid=[str(feature_file)], out=tmp_path / "new")
    entry = report["fid"]["features.pt2"]
    assert entry["feature_dim"] == 4 and entry["weights"] == str(feature_file) and entry["scale"] == 1
    assert math.isfinite(entry["fid"]) and math.isfinite(entry["fid_floor"])
    assert evaluation.main([str(run), "-n", "2", "--seed", "1", "--fid-network", str(feature_file),
                            "--out", str(tmp_path / "old")]) == 0
    assert "--fid-network is replaced by --fid" in caplog.text
    old = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert old["fid"]["features.pt2"]["fid"] == pytest.approx(entry["fid"])
    assert evaluation.FID_NETWORK_NAMES["medicalnet_resnet10_23datasets"] == "medicalnet"


def test_errors_name_what_is_wrong(runs, tmp_path):
    _, autoencoder_run, ldm_run = runs
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        evaluation.evaluate(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="--data .*no such folder or datalist"):
        evaluation.evaluate(autoencoder_run, data=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="--fid bogus: expected one of medicalnet, "):
        evaluation.evaluate(ldm_run, num_samples=2, fid=["bogus"], out=tmp_path / "x")
    with pytest.raises(ValueError, match="--fid-weights radimagenet-2.5d: not among --fid's protocols \\(none\\)"):
        evaluation.evaluate(ldm_run, fid=["none"], fid_weights={"radimagenet-2.5d": Path("x.pth")})
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluation.evaluate(ldm_run, num_samples=1, fid=["none"], out=tmp_path / "y")
    write_volumes(tmp_path / "three", 3)
    with pytest.raises(ValueError, match="Only 3 real volume\\(s\\) .* two halves of at least 2; pass --data with"):
        evaluation.evaluate(ldm_run, data=tmp_path / "three", fid=["none"], out=tmp_path / "z")


def test_fewer_real_volumes_than_twice_the_samples_shrink_n_and_say_so(runs, tmp_path):
    _, _, run = runs
    write_volumes(tmp_path / "five", 5, seed=3)
    report = evaluation.evaluate(run, data=tmp_path / "five", num_samples=4, fid=["none"], out=tmp_path / "out")
    assert report["num_samples"] == 4 and report["num_real"] == 5 and report["n"] == 2 and report["fid"] == {}
    assert report["notes"] == ["only 5 real volumes for 4 samples: n = 2 per set (n generated against n real needs "
                               "2n real volumes for the floor)"]
    assert "| FID | not computed (--fid none) | | |" in (tmp_path / "out" / "summary.md").read_text()
