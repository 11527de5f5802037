"""export --format bundle: a MONAI bundle whose ``python -m monai.bundle run`` writes the volumes ``sample`` writes
(unconditional; conditional with a ControlNet; MAISI's UNet at a spacing and modality, alone and with MAISI's
ControlNet), whose metadata MONAI's ``verify_metadata`` accepts, and the errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import conditional_raw, maisi_unet_raw, save_autoencoder, write_conditional_data

from monai_diffusion import export, sample
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.generation import ema_weights
from monai_diffusion.train_controlnet import train as train_controlnet
from monai_diffusion.train_ldm import train as train_ldm

# Voxels of 1.5 x 2 x 2.5 mm with the first two axes flipped: the samples carry the reoriented training affine.
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])

# The rules of MONAI's bundle metadata schema (meta_schema_20240725.json, the one the bundle's "schema" names),
# written out here: verify_metadata downloads the schema unless a file is at --filepath, and the tests run offline.
TENSOR = {
    "type": "object",
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
    "properties": {
        "type": {"type": "string"}, "format": {"type": "string"}, "num_channels": {"type": "integer"},
        "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}}, "dtype": {"type": "string"},
        "value_range": {"type": "array", "items": {"type": "number"}}, "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object"},
    },
}
ARGUMENT = {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, TENSOR]}
NETWORK_IO = {
    "type": "object",
    "required": ["inputs", "outputs"],
    "properties": {part: {"type": "object", "patternProperties": {"^.+$": ARGUMENT}}
                   for part in ("inputs", "outputs", "post_processed_outputs")},
}
METADATA_RULES = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "type": "object",
    "properties": {
        **{key: {"type": "string"} for key in (
            "schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
            "copyright", "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
            "intended_use")},
        **{key: {"type": "object"} for key in ("changelog", "required_packages_version", "eval_metrics",
                                               "supported_apps")},
        "references": {"type": "array", "items": {"type": "string"}},
        "network_data_format": NETWORK_IO,
    },
    "patternProperties": {"^[_a-zA-Z0-9]+_data_format$": NETWORK_IO},
    "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"],
}


def run_python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd`` with this checkout first on the path (the bundle imports monai_diffusion)."""
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def max_difference(first: Path, second: Path) -> float:
    """The largest voxel difference between the same-named NIfTI files of two folders (which must name the same
    files), after checking their affines agree."""
    names = sorted(p.name for p in first.glob("*.nii.gz"))
    assert names and names == sorted(p.name for p in second.glob("*.nii.gz"))
    largest = 0.0
    for name in names:
        (a, affine_a), (b, affine_b) = read(first / name), read(second / name)
        assert a.shape == b.shape and a.std() > 0
        np.testing.assert_array_equal(affine_a, affine_b)
        largest = max(largest, float(np.abs(a - b).max()))
    return largest


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    """An unconditional LDM (DDPM, 2 steps, EMA; 2 samples by default) on three small volumes, with an evaluation
    summary in its run folder as ``evaluate`` writes it."""
    root = tmp_path_factory.mktemp("export")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        volume = rng.random((18, 16, 14)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, AFFINE), root / "data" / f"v{index}.nii.gz")
    config = config_from_dict({
        "data": {"source": "folder", "data_dir": str(root / "data"), "voxel_size": [16, 16, 16], "cache": "none",
                 "val_fraction": 0.0},
        "autoencoder": {"num_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2, "downsample_factors": [2],
                        "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False, "training": {"disc_num_layers": 2}},
        "ldm": {"unet": {"num_channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                         "num_head_channels": 8},
                "scheduler": {"type": "ddpm", "num_train_timesteps": 100},
                "training": {"batch_size": 1, "max_epochs": None, "max_steps": 2, "val_every_n_epochs": 100,
                             "ema_decay": 0.5, "scale_factor_volumes": 2},
                "sampling": {"num_inference_steps": 3, "num_samples": 2}},
        "device": {"device": "cpu"},
        "output": {"output_dir": str(root / "out")},
        "seed": 5,
    })
    save_autoencoder(config, root / "out" / "autoencoder-1" / "checkpoints" / "best.pt")
    run = train_ldm(config)
    (run / "evaluation").mkdir()
    (run / "evaluation" / "summary.json").write_text(json.dumps({
        "kind": "ldm", "checkpoint_step": 2, "num_samples": 4, "num_real": 3, "seed": 0, "ms_ssim_scales": 2,
        "diversity_ms_ssim_samples": 0.25, "diversity_ms_ssim_real": 0.5, "mmd": 0.125, "fid_network": "none",
        "fid": None}))
    return root, run


def test_the_bundle_generates_the_volumes_sample_does_and_its_metadata_verifies(ldm_run, tmp_path):
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire (the test extra)")
    pytest.importorskip("jsonschema", reason="verify_metadata needs jsonschema (the test extra)")
    _, run = ldm_run
    bundle = tmp_path / "bundle"
    assert export.main([str(run), "--format", "bundle", str(bundle), "--authors", "the tests"]) == 0
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/logging.conf", "configs/metadata.json", "docs/README.md",
        "docs/evaluation_ldm.json", "docs/training_config.yaml", "models/autoencoder.pt", "models/model.pt"]

    # The bundle's defaults are the run's own: the samples of `sample --config <run>/config.yaml`.
    run_python("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", cwd=bundle)
    assert sample.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run),
                        "--out", str(tmp_path / "sampled")]) == 0
    assert sorted(p.name for p in (bundle / "output").glob("*.nii.gz")) == ["sample-000.nii.gz", "sample-001.nii.gz"]
    assert max_difference(bundle / "output", tmp_path / "sampled") == 0.0

    (tmp_path / "schema.json").write_text(json.dumps(METADATA_RULES))
    verified = run_python("-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
                          "--filepath", str(tmp_path / "schema.json"), cwd=bundle)
    assert "metadata is verified with no error" in verified.stdout + verified.stderr

    # The UNet's weights are the run's EMA weights; the metadata says what the bundle needs and how it scored.
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(weights[key], value) for key, value in ema_weights(state["ema"]).items())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert {"monai-diffusion", "nibabel", "fire"} <= set(meta["required_packages_version"])
    assert meta["eval_metrics"] == {"ldm_diversity_ms_ssim_samples": 0.25, "ldm_diversity_ms_ssim_real": 0.5,
                                    "ldm_mmd": 0.125}
    assert meta["network_data_format"]["inputs"]["x"]["spatial_shape"] == [8, 8, 8]
    assert meta["authors"] == "the tests" and "conditioning" not in meta
    text = (bundle / "docs" / "README.md").read_text()
    assert "2 optimizer steps" in text and "| MMD real vs generated | 0.125 |" in text and "EMA (decay 0.5)" in text


def test_export_refuses_a_folder_in_use_and_a_controlnet_as_the_run(ldm_run, tmp_path, caplog):
    _, run = ldm_run
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    assert export.main([str(run), "--format", "bundle", str(tmp_path / "used")]) == 1
    assert "exists and is not empty" in caplog.text and (tmp_path / "used" / "file").is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # nothing left behind
    with pytest.raises(SystemExit):
        export.main([str(run), str(tmp_path / "b")])  # --format is required


@pytest.fixture(scope="module")
def controlnet_run(tmp_path_factory):
    """A conditional LDM (radius, shape; 1 step) and a ControlNet (1 step) trained on it."""
    root = tmp_path_factory.mktemp("export-controlnet")
    datalist = write_conditional_data(root / "data", count=4)
    raw = conditional_raw(datalist, root / "out")
    config = config_from_dict(raw)
    save_autoencoder(config, root / "out" / "autoencoder-1" / "checkpoints" / "best.pt")
    ldm = train_ldm(config)
    controlnet = train_controlnet(config_from_dict(apply_overrides(raw, [f"controlnet.ldm_checkpoint={ldm}"])))
    return root, ldm, controlnet


def test_a_conditional_bundle_with_its_controlnet_follows_conditions_and_mask_as_sample_does(controlnet_run,
                                                                                              tmp_path):
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire (the test extra)")
    root, ldm, controlnet = controlnet_run
    bundle = export.export_bundle(ldm, tmp_path / "bundle", controlnet=controlnet)
    mask = root / "data" / "v1_seg.nii.gz"
    run_python("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--seed", "7",
               "--num_inference_steps", "2", "--guidance_scale", "2", "--mask", str(mask),
               "--conditions", "{'radius': 0.5, 'shape': 'a'}", "--num_samples", "2", "--output_dir", "generated",
               cwd=bundle)
    assert sample.main(["--checkpoint", str(controlnet), "--set", "device.device=cpu", "--seed", "7", "--steps", "2",
                        "--guidance", "2", "--mask", str(mask), "--condition", "radius=0.5", "--condition", "shape=a",
                        "-n", "2", "--out", str(tmp_path / "sampled")]) == 0
    assert max_difference(bundle / "generated", tmp_path / "sampled") == 0.0
    with open(bundle / "generated" / "samples.csv") as a, open(tmp_path / "sampled" / "samples.csv") as b:
        assert list(csv.DictReader(a)) == list(csv.DictReader(b))

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(meta, METADATA_RULES)
    assert [(c["name"], c.get("categories")) for c in meta["conditioning"]["conditions"]] == [
        ("radius", None), ("shape", ["a", "b"])]
    assert meta["controlnet_data_format"]["inputs"]["controlnet_cond"]["num_channels"] == 2  # labels 1 and 2
    assert set(meta["network_data_format"]["inputs"]) == {"x", "timesteps", "context"}


def test_a_controlnet_is_exported_with_the_ldm_it_was_trained_on(controlnet_run, ldm_run, tmp_path):
    _, ldm, controlnet = controlnet_run
    with pytest.raises(ValueError, match="is a ControlNet checkpoint; export the LDM it steers with it"):
        export.export_bundle(controlnet, tmp_path / "a")
    _, other_ldm = ldm_run
    with pytest.raises(ValueError, match="was trained on other LDM weights"):
        export.export_bundle(other_ldm, tmp_path / "b", controlnet=controlnet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------- MAISI's UNet


@pytest.fixture(scope="module")
def maisi_runs(tmp_path_factory):
    """An LDM with MAISI's UNet (its spacing input; the modality from each entry's `modality` field, ct or mri_t1;
    the covariates radius and shape) over MAISI's VAE, and MAISI's ControlNet trained on it (1 step each)."""
    root = tmp_path_factory.mktemp("export-maisi")
    raw = maisi_unet_raw(root)
    config = config_from_dict(raw)
    save_autoencoder(config, root / "out" / "autoencoder-1" / "checkpoints" / "best.pt")
    ldm = train_ldm(config)
    controlnet = train_controlnet(config_from_dict(apply_overrides(raw, [f"controlnet.ldm_checkpoint={ldm}"])))
    return root, ldm, controlnet


def same_manifests(first: Path, second: Path) -> bool:
    with open(first / "samples.csv") as a, open(second / "samples.csv") as b:
        return list(csv.DictReader(a)) == list(csv.DictReader(b))


def test_a_bundle_of_maisis_unet_generates_at_a_spacing_and_modality_as_sample_does(maisi_runs, tmp_path):
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire (the test extra)")
    _, ldm, _ = maisi_runs
    bundle = export.export_bundle(ldm, tmp_path / "bundle")
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    maisi = load_checkpoint(ldm / "checkpoints" / "last.pt")["conditioning"]["maisi"]
    # Their defaults are the run's, as sample's: the training data's spacing, the training split's modality.
    assert inference["spacing"] == [1.5, 1.5, 1.5] and inference["modality"] == maisi["modality"]
    assert inference["network_def"]["_target_"].endswith("DiffusionModelUNetMaisi")
    assert inference["network_def"]["use_flash_attention"] == "$torch.cuda.is_available()"

    run_python("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--seed", "7",
               "--num_samples", "2", "--num_inference_steps", "2", "--spacing", "[1, 1, 2]", "--modality", "mri",
               "--guidance_scale", "2", "--output_dir", "generated", cwd=bundle)
    assert sample.main(["--checkpoint", str(ldm), "--set", "device.device=cpu", "--seed", "7", "-n", "2", "--steps",
                        "2", "--spacing", "1", "1", "2", "--modality", "mri", "--guidance", "2",
                        "--out", str(tmp_path / "sampled")]) == 0
    difference = max_difference(bundle / "generated", tmp_path / "sampled")
    print(f"MAISI's UNet, bundle vs sample: largest voxel difference {difference}")
    assert difference == 0.0
    assert sorted(p.name for p in (bundle / "generated").glob("*.nii.gz")) == [
        f"sample-00{i}_seed7_voxel_spacing-1x1x2_modality-mri.nii.gz" for i in range(2)]
    (first, *_) = (bundle / "generated").glob("*.nii.gz")
    assert nib.load(first).header.get_zooms() == (1.0, 1.0, 2.0)  # written at the spacing it was generated at
    assert same_manifests(bundle / "generated", tmp_path / "sampled")

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(meta, METADATA_RULES)
    conditions = {c["name"]: c for c in meta["conditioning"]["conditions"]}
    assert list(conditions) == ["radius", "shape", "voxel_spacing", "modality"]
    assert conditions["voxel_spacing"]["default"] == [1.5, 1.5, 1.5] and conditions["voxel_spacing"]["unit"] == "mm"
    assert conditions["modality"]["codes"]["mri"] == 8 and conditions["modality"]["default"] == maisi["modality"]
    assert {"spacing_tensor", "class_labels", "context"} <= set(meta["network_data_format"]["inputs"])
    text = (bundle / "docs" / "README.md").read_text()
    assert "DiffusionModelUNetMaisi" in text and "AutoencoderKlMaisi" in text and "`modality`" in text


def test_a_bundle_of_maisis_unet_with_its_controlnet_follows_a_mask_as_sample_does(maisi_runs, tmp_path):
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire (the test extra)")
    root, ldm, controlnet = maisi_runs
    bundle = export.export_bundle(ldm, tmp_path / "bundle", controlnet=controlnet)
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["spacing"] is None  # the label map's, as sample takes it
    assert inference["controlnet_def"]["_target_"].endswith("ControlNetMaisi")
    mask = root / "data" / "v1_seg.nii.gz"
    run_python("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--seed", "3",
               "--num_inference_steps", "2", "--mask", str(mask), "--conditions", "{'radius': 0.5, 'shape': 'a'}",
               "--modality", "ct", "--output_dir", "generated", cwd=bundle)
    assert sample.main(["--checkpoint", str(controlnet), "--set", "device.device=cpu", "--seed", "3", "--steps", "2",
                        "--mask", str(mask), "--condition", "radius=0.5", "--condition", "shape=a", "--modality", "ct",
                        "--out", str(tmp_path / "sampled")]) == 0
    difference = max_difference(bundle / "generated", tmp_path / "sampled")
    print(f"MAISI's UNet and ControlNet, bundle vs sample: largest voxel difference {difference}")
    assert difference == 0.0
    assert same_manifests(bundle / "generated", tmp_path / "sampled")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    controlnet_inputs = meta["controlnet_data_format"]["inputs"]
    assert "class_labels" in controlnet_inputs and "spacing_tensor" not in controlnet_inputs  # the modality only


def test_the_metadata_carries_each_fid_protocol_with_its_floor_and_reads_an_older_report():
    report = {"kind": "ldm", "diversity_ms_ssim_samples": 0.25, "diversity_ms_ssim_real": 0.5, "diversity_ratio": 0.5,
              "mmd": 0.125, "mmd_floor": -0.5, "fid": {"medicalnet": {"fid": 0.002, "fid_floor": 0.001},
                                                      "radimagenet-2.5d": {"fid": 4.0, "fid_floor": 1.5}}}
    assert export.eval_metrics(report, None) == {
        "ldm_diversity_ms_ssim_samples": 0.25, "ldm_diversity_ms_ssim_real": 0.5, "ldm_diversity_ratio": 0.5,
        "ldm_mmd": 0.125, "ldm_mmd_floor": -0.5, "ldm_fid_medicalnet": 0.002, "ldm_fid_medicalnet_floor": 0.001,
        "ldm_fid_radimagenet-2.5d": 4.0, "ldm_fid_radimagenet-2.5d_floor": 1.5}
    # Written before FID had protocols: one number and the network's name, no floor.
    older = {"kind": "ldm", "mmd": 0.125, "fid": 3.0, "fid_network": "medicalnet_resnet10_23datasets"}
    assert export.eval_metrics(older, None) == {"ldm_mmd": 0.125, "ldm_fid_medicalnet_resnet10_23datasets": 3.0}
