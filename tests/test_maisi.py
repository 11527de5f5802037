"""MAISI's networks through every command, on CPU at a tiny size: AutoencoderKlMaisi trained on patches (and planned),
then frozen under train-ldm (latent cache, scale factor, tiled decoding), sample and evaluate with the trilinear
baseline; DiffusionModelUNetMaisi with each volume's spacing and modality under train-ldm and sample, and
ControlNetMaisi beside it under train-controlnet (their export as a bundle: tests/test_export.py)."""

from __future__ import annotations

import csv
import functools
import json

import nibabel as nib
import pytest
import torch
import yaml
from helpers import MAISI_AE, maisi_unet_raw, save_autoencoder, tiny_config_dict, write_volumes
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from monai_diffusion.cli import main
from monai_diffusion.conditioning import ConditionEncoder
from monai_diffusion.config import config_from_dict, load_config
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.memory import plan
from monai_diffusion.memory.probe import Options, measure, run_measurement
from monai_diffusion.networks.builders import build_autoencoder, build_unet

# MAISI's VAE (helpers.MAISI_AE): 24^3 autoencoder volumes cut into 16^3 patches, split in two slabs along axis 1 as
# MAISI's released network is; the LDM works on 16^3 volumes (4^3 latents).


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


# ----------------------------------------------------------------------------------------- MAISI's UNet


@pytest.fixture
def maisi_unet_run(tmp_path):
    """A datalist whose entries carry a modality (MAISI's vocabulary), covariates and label maps; MAISI's VAE (an
    untrained checkpoint) and MAISI's UNet with its spacing input and the modality from the datalist field."""
    raw = maisi_unet_raw(tmp_path, max_steps=2)
    path = tmp_path / "maisi.yaml"
    path.write_text(yaml.safe_dump(raw))
    save_autoencoder(config_from_dict(raw), tmp_path / "out" / "autoencoder-1" / "checkpoints" / "best.pt")
    return path


def test_maisis_unet_takes_each_volumes_spacing_and_modality_and_sample_requires_them(maisi_unet_run, tmp_path,
                                                                                     monkeypatch):
    seen = []
    original = DiffusionModelUNetMaisi.forward

    def record(self, x, timesteps, *args, **kwargs):
        seen.append((kwargs["spacing_tensor"].tolist(), kwargs["class_labels"].tolist()))
        return original(self, x, timesteps, *args, **kwargs)

    monkeypatch.setattr(DiffusionModelUNetMaisi, "forward", record)
    assert main(["train-ldm", "--config", str(maisi_unet_run)]) == 0
    (run,) = (tmp_path / "out").glob("ldm-*")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    maisi = state["conditioning"]["maisi"]
    assert maisi["spacing"] and maisi["modality_key"] == "modality" and maisi["modality"] in ("ct", "mri_t1")
    assert maisi["modalities"]["ct"] == 1 and maisi["modalities"]["mri_t1"] == 9  # MAISI's modality_mapping.json
    assert state["unet"]["class_embedding.weight"].shape[0] == 128 and "spacing_layer.0.weight" in state["unet"]
    # Training: each volume's spacing (1.5 mm, x100 as MAISI feeds it); codes 1 and 9, or MAISI's dropout to 0 / 8.
    training = seen[:4]
    assert {value for spacing, _ in training for row in spacing for value in row} == {150.0}
    assert {code for _, codes in training for code in codes} <= {0, 1, 8, 9}

    seen.clear()
    out = tmp_path / "generated"
    assert main(["sample", "--checkpoint", str(run), "-n", "1", "--steps", "2", "--spacing", "1", "1", "2",
                 "--modality", "mri", "--guidance", "2", "--out", str(out)]) == 0
    (nifti,) = out.glob("*.nii.gz")
    assert nifti.name == "sample-000_seed42_voxel_spacing-1x1x2_modality-mri.nii.gz"
    assert nib.load(nifti).header.get_zooms() == (1.0, 1.0, 2.0)  # written at the spacing it was generated at
    # Guided: the unconditional half is MAISI's null modality 0, with the same spacing; the covariates' null condition.
    assert seen[0] == ([[100.0, 100.0, 200.0]] * 2, [0, 8])
    rows = list(csv.DictReader((out / "samples.csv").read_text().splitlines()))
    assert (rows[0]["voxel_spacing"], rows[0]["modality"], rows[0]["guidance"]) == ("1x1x2", "mri", "2.0")

    default = tmp_path / "default"
    assert main(["sample", "--checkpoint", str(run), "-n", "1", "--steps", "2", "--out", str(default)]) == 0
    (nifti,) = default.glob("*.nii.gz")
    assert f"voxel_spacing-1.5x1.5x1.5_modality-{maisi['modality']}" in nifti.name  # the run's defaults

    assert main(["sample", "--checkpoint", str(run), "-n", "1", "--modality", "pet"]) == 1


def test_spacing_and_modality_are_refused_for_monais_unet(maisi_unet_run, tmp_path, caplog):
    config = load_config(maisi_unet_run)
    raw = config.model_dump(mode="json")
    raw["ldm"]["unet"] = {k: v for k, v in raw["ldm"]["unet"].items() if k not in ("architecture", "modality_key")}
    raw["ldm"]["training"]["max_steps"] = 1
    maisi_unet_run.write_text(yaml.safe_dump(raw))
    assert main(["train-ldm", "--config", str(maisi_unet_run)]) == 0
    (run,) = (tmp_path / "out").glob("ldm-*")
    assert main(["sample", "--checkpoint", str(run), "-n", "1", "--steps", "1", "--modality", "ct"]) == 1
    assert "--modality: the LDM" in caplog.text and "only MAISI's UNet" in caplog.text


def test_train_controlnet_builds_maisis_controlnet_beside_maisis_unet(maisi_unet_run, tmp_path):
    assert main(["train-ldm", "--config", str(maisi_unet_run)]) == 0
    assert main(["train-controlnet", "--config", str(maisi_unet_run)]) == 0
    (run,) = (tmp_path / "out").glob("controlnet-*")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["controlnet"]["class_embedding.weight"].shape[0] == 128  # the modality, not the spacing
    assert not any("spacing" in key for key in state["controlnet"])
    assert list((run / "samples").glob("sample-step*.nii.gz"))
    mask = tmp_path / "data" / "v0_seg.nii.gz"
    assert main(["sample", "--checkpoint", str(run), "-n", "1", "--steps", "2", "--mask", str(mask),
                 "--condition", "radius=0.5", "--condition", "shape=a", "--modality", "ct",
                 "--out", str(tmp_path / "controlled")]) == 0
    (nifti,) = (tmp_path / "controlled").glob("*.nii.gz")
    assert "voxel_spacing-1.5x1.5x1.5_modality-ct_mask-v0_seg" in nifti.name  # the map's spacing


@pytest.mark.parametrize("stage", ["ldm", "controlnet"])
def test_the_memory_probe_measures_maisis_unet_and_controlnet_steps(maisi_unet_run, stage):
    """benchmark and plan measure the step that trains: batches with each volume's spacing and modality."""
    record = measure(load_config(maisi_unet_run), Options(stage=stage, device="cpu", steps=1, warmup=0))
    assert record["latent_shape"] == [4, 4, 4] and record["params"] > 0


def test_fine_tuning_starts_from_files_in_maisis_release_layout(maisi_unet_run, tmp_path):
    """NV-Generate-CTMR ships its VAE as a plain state dict (autoencoder_v1.pt) and its UNet and ControlNet inside
    dicts (diff_unet_3d_rflow-ct.pt: unet_state_dict, scale_factor, ...; controlnet_state_dict): MAISI's networks
    built from the config read them as they are, and the fine-tuned model samples with a spacing and modality."""
    config = load_config(maisi_unet_run)
    torch.manual_seed(1)
    vae = build_autoencoder(config.autoencoder)
    torch.save(vae.state_dict(), tmp_path / "autoencoder_v1.pt")
    unet = build_unet(config.ldm, 4, 3, ConditionEncoder.placeholder(config).unet_arguments())
    assert type(vae) is AutoencoderKlMaisi and type(unet) is DiffusionModelUNetMaisi
    torch.save({"epoch": 1000, "loss": 0.1, "num_train_timesteps": 1000, "scale_factor": torch.tensor(1.25),
                "unet_state_dict": unet.state_dict()}, tmp_path / "diff_unet_3d_rflow-ct.pt")
    released = ["--set", f"ldm.autoencoder_checkpoint={tmp_path / 'autoencoder_v1.pt'}",
                "--set", f"ldm.training.init_checkpoint={tmp_path / 'diff_unet_3d_rflow-ct.pt'}",
                "--set", "ldm.training.scale_factor=1.25", "--set", "ldm.training.lr=1e-12"]
    assert main(["train-ldm", "--config", str(maisi_unet_run), *released]) == 0
    (run,) = (tmp_path / "out").glob("ldm-*")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["scale_factor"] == 1.25
    assert torch.allclose(state["unet"]["spacing_layer.0.weight"], unet.state_dict()["spacing_layer.0.weight"])
    assert main(["sample", "--checkpoint", str(run), "-n", "1", "--steps", "2", "--spacing", "1.5", "1.5", "2",
                 "--modality", "ct", "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.nii.gz"))) == 1
