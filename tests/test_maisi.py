"""MAISI's networks through every command, on CPU at a tiny size: AutoencoderKlMaisi trained on patches (and planned),
then frozen under train-ldm (latent cache, scale factor, tiled decoding), sample and evaluate with the trilinear
baseline."""

from __future__ import annotations

import functools
import json

import pytest
import yaml
from helpers import tiny_config_dict, write_volumes

from monai_diffusion.cli import main
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.memory import plan
from monai_diffusion.memory.probe import run_measurement

# MAISI's VAE at its depth (3 levels: 4x) and a tiny width; 24^3 autoencoder volumes cut into 16^3 patches, split in
# two slabs along axis 1 as MAISI's released network is; the LDM works on 16^3 volumes (4^3 latents).
MAISI_AE = {"architecture": "maisi", "num_channels": [8, 8, 16], "norm_num_groups": 4, "latent_channels": 4,
            "downsample_factors": None, "attention_levels": [False, False, False],
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "num_splits": 2, "dim_split": 1}


@pytest.fixture
def maisi_config(tmp_path):
    write_volumes(tmp_path / "images", 5)
    raw = tiny_config_dict(tmp_path / "images", tmp_path / "runs")
    raw["autoencoder"] |= MAISI_AE
    raw["autoencoder"]["training"] |= {"voxel_size": [32, 32, 32], "patch_size": [16, 32, 16]}
    raw["data"]["voxel_size"] = [16, 32, 16]
    raw["ldm"]["training"] = {"batch_size": 2, "max_epochs": None, "max_steps": 2, "val_every_n_epochs": 1,
                              "scale_factor_volumes": 2}
    raw["ldm"]["sampling"] = {"num_inference_steps": 2, "tiled_decode": True, "tile_size": [2, 8, 2]}
    path = tmp_path / "maisi.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_maisis_autoencoder_trains_on_patches_then_serves_the_ldm_sample_and_evaluate(maisi_config, tmp_path):
    assert main(["train-autoencoder", "--config", str(maisi_config)]) == 0
    (ae_run,) = (tmp_path / "runs").glob("autoencoder-*")
    state = load_checkpoint(ae_run / "checkpoints" / "last.pt")
    assert "encoder.blocks.1.conv1.conv.conv.weight" in state["autoencoder"]  # MAISI's layout (MaisiConvolution)
    assert list((ae_run / "images").glob("reconstruction-*.png"))  # whole volumes, window by window

    assert main(["train-ldm", "--config", str(maisi_config)]) == 0
    (ldm_run,) = (tmp_path / "runs").glob("ldm-*")
    state = load_checkpoint(ldm_run / "checkpoints" / "last.pt")
    assert state["latent_shape"] == [4, 4, 8, 4]  # 4x
    assert state["scale_factor"] > 0 and state["autoencoder_checkpoint"].startswith(str(ae_run))
    (cache,) = (tmp_path / "runs" / "latent_cache").iterdir()
    assert len(list(cache.glob("*.pt"))) == 4  # the training split, encoded once
    assert list((ldm_run / "samples").glob("sample-step*.nii.gz"))  # decoded window by window

    assert main(["sample", "--checkpoint", str(ldm_run), "-n", "1", "--steps", "2"]) == 0
    assert (ldm_run / "generated" / "sample-000.nii.gz").is_file()

    assert main(["evaluate", str(ae_run), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert report["latent_shape"] == [4, 8, 8, 8] and report["tile_size"] == [16, 32, 16]
    assert {"autoencoder_psnr", "trilinear_psnr"} <= set(report["summary"])


def test_plan_measures_maisis_autoencoder_at_sizes_its_slabs_allow(maisi_config, monkeypatch, capsys):
    monkeypatch.setattr(plan, "run_measurement", functools.partial(run_measurement, in_process=True))
    code = plan.main(["--config", str(maisi_config), "--gpu-memory", "64GB", "--target", "cpu", "--device", "cpu",
                      "--probe-voxels", "4096"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "could not be measured" not in out and "fits." in out
