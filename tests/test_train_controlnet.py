"""train-controlnet on tiny CPU models: it starts from the LDM's own predictions, trains from the latent cache or on
the fly, resumes bit for bit after a stop signal, runs under torchrun with two processes, and sample --mask writes
volumes in the mask's space; label maps and configs that do not fit are refused before anything trains."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from signal_hook import TEST_SIGNAL_ENV
from helpers import (check_mlflow_run, conditional_raw, differences, run_torchrun, save_autoencoder,
                     write_conditional_data)

from monai_diffusion import train_controlnet as recipe
from monai_diffusion.conditioning import Denoiser, control_size, read_control
from monai_diffusion.config import apply_overrides, config_from_dict, save_config
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.engine.loop import TrainingStopped
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.generation import generate_volume, load_ldm, load_ldm_checkpoint, sample
from monai_diffusion.networks.builders import build_scheduler
from monai_diffusion.steps import build_controlnet_training
from monai_diffusion.train_ldm import train as train_ldm

CONTROLNET_KEYS = {
    "kind", "controlnet", "ema", "optimizer", "scaler", "lr_scheduler", "step", "epoch", "batches_in_epoch", "rng",
    "weights_sha256", "config", "ldm_checkpoint", "ldm_hash", "latent_shape", "format_version",
}


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    """Six blob volumes with label maps, an autoencoder and a conditional LDM (2 steps) trained on them."""
    root = tmp_path_factory.mktemp("controlnet")
    datalist = write_conditional_data(root / "data", count=6)
    config = config_from_dict(apply_overrides(conditional_raw(datalist, root / "out"), ["ldm.training.max_steps=2"]))
    save_autoencoder(config, root / "out" / "autoencoder-1" / "checkpoints" / "best.pt")
    return root, datalist, train_ldm(config)


@pytest.fixture
def setup(ldm_run, tmp_path):
    """A fresh output folder holding the trained LDM's runs; returns overrides -> Config."""
    root, datalist, ldm = ldm_run
    shutil.copytree(root / "out", tmp_path / "out", ignore=shutil.ignore_patterns("controlnet-*"))
    run = tmp_path / "out" / ldm.name  # its checkpoint names the original autoencoder, still where it says

    def make(*overrides: str):
        raw = apply_overrides(conditional_raw(datalist, tmp_path / "out"), [f"controlnet.ldm_checkpoint={run}",
                                                                             *overrides])
        return config_from_dict(raw)

    return make


def test_the_untrained_controlnet_leaves_the_ldms_predictions_as_they_are(setup):
    """It copies the UNet's encoder and its output convolutions start at zero: at step 0 the LDM samples as before."""
    config = setup()
    device, precision = torch.device("cpu"), resolve_precision(False, torch.device("cpu"))
    ldm = load_ldm(load_ldm_checkpoint(config.controlnet.ldm_checkpoint), config, device)
    parts = build_controlnet_training(config, ldm.trained, ldm.unet, ldm.latent_shape, device=device,
                                      precision=precision, max_steps=1, encoder=ldm.encoder)
    unet_weights = ldm.unet.state_dict()
    shared = [key for key in parts.controlnet.state_dict() if key in unet_weights]
    assert any(key.startswith("down_blocks.") for key in shared) and "time_embed.0.weight" in shared
    assert all(torch.equal(parts.controlnet.state_dict()[key], unet_weights[key]) for key in shared)

    size = control_size(ldm.latent_shape[1:], config.controlnet.conditioning_embedding_num_channels)
    control, _ = read_control(Path(config.data.datalist).parent / "v0_seg.nii.gz", config.data, 3, size)
    condition = ldm.encoder.encode([{"radius": 0.5, "shape": "a"}])
    scheduler = build_scheduler(ldm.trained.ldm.scheduler, "ddpm", (2, 8, 8, 8))

    def generate(denoiser) -> torch.Tensor:
        return generate_volume(denoiser, ldm.autoencoder, scheduler=scheduler, kind="ddpm",
                               latent_shape=ldm.latent_shape, scale_factor=ldm.scale_factor,
                               sampling=config.ldm.sampling, num_steps=2, value_range=None, device=device,
                               generator=torch.Generator().manual_seed(0))

    plain = generate(Denoiser(ldm.unet, condition, 2.0))
    steered = generate(Denoiser(ldm.unet, condition, 2.0, parts.controlnet.eval(), control=control[None]))
    torch.testing.assert_close(steered, plain)


def test_trains_from_the_latent_cache_and_samples_in_the_masks_space(setup, tmp_path, caplog):
    config = setup()
    run = recipe.train(config)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert set(state) == CONTROLNET_KEYS and state["kind"] == "controlnet" and state["step"] == 1
    assert state["ldm_hash"] == load_ldm(load_ldm_checkpoint(config.controlnet.ldm_checkpoint), config,
                                         torch.device("cpu")).weights_hash
    assert (run / "samples" / "sample-step00000001.nii.gz").is_file()
    # The LDM's latent cache is the one it uses: nothing encoded again.
    assert "all 6 volume(s) already encoded" in caplog.text
    assert len(list((tmp_path / "out" / "latent_cache").iterdir())) == 1

    # A label map elsewhere in the world: the sample lies where the map does.
    data = Path(config.data.datalist).parent
    moved = nib.load(str(data / "v1_seg.nii.gz"))
    affine = moved.affine.copy()
    affine[:3, 3] += [30.0, -7.0, 4.5]
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), affine), tmp_path / "moved_seg.nii.gz")
    out = tmp_path / "gen"
    (path,) = sample(config, checkpoint=run, mask=tmp_path / "moved_seg.nii.gz", out=out,
                     conditions=[{"radius": 0.6, "shape": "b"}], guidance=2.0)
    assert path.name == "sample-000_seed3_radius-0.6_shape-b_mask-moved_seg.nii.gz"
    _, expected = read_control(tmp_path / "moved_seg.nii.gz", config.data, 3, (16, 16, 16))
    np.testing.assert_allclose(nib.load(str(path)).affine, expected.numpy(), atol=1e-5)
    assert not np.allclose(nib.load(str(path)).affine, state_affine(config))
    with open(out / "samples.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["mask"] == str(tmp_path / "moved_seg.nii.gz") and row["radius"] == "0.6"
    assert "mask=moved_seg.nii.gz" in nib.load(str(path)).header["descrip"].item().decode()

    # A mask needs a ControlNet, and a ControlNet a mask.
    with pytest.raises(ValueError, match="--mask needs a ControlNet checkpoint"):
        sample(config, checkpoint=config.controlnet.ldm_checkpoint, mask=tmp_path / "moved_seg.nii.gz", out=out)
    with pytest.raises(ValueError, match="is a ControlNet checkpoint: it samples with --mask"):
        sample(config, checkpoint=run, out=out)


def state_affine(config) -> np.ndarray:
    return load_checkpoint(Path(config.controlnet.ldm_checkpoint) / "checkpoints" / "last.pt")["affine"].numpy()


def test_mlflow_gets_the_config_every_scalar_the_sample_panel_and_the_checkpoint(setup):
    pytest.importorskip("mlflow")
    config = setup("output.loggers=[tensorboard, mlflow]", "output.mlflow_experiment_name=steering")
    run = recipe.train(config)
    client, tracked = check_mlflow_run(run, config, experiment="steering")
    assert "train/loss" in tracked.data.metrics
    assert [a.path for a in client.list_artifacts(tracked.info.run_id, "val")] == ["val/sample-step00000001.png"]


def test_trains_on_the_fly_with_the_label_maps_moving_with_their_augmented_images(setup):
    run = recipe.train(setup("controlnet.training.cache_latents=false", "data.augment.flip_prob=0.5",
                             "data.augment.affine_prob=0.5"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1


def test_a_stop_signal_then_resume_is_bit_exact(setup, tmp_path, monkeypatch):
    # 6 pairs, batch 2: 3 steps per epoch; 4 steps with accumulation 1, stopped before the third micro-batch.
    options = ["controlnet.training.max_steps=4", "controlnet.training.warmup_steps=2"]
    straight = recipe.train(setup(*options))
    reference = {p.name: load_checkpoint(p) for p in (straight / "checkpoints").glob("*.pt")}
    straight.rename(tmp_path / "straight")

    monkeypatch.setenv(TEST_SIGNAL_ENV, "SIGTERM:2")
    with pytest.raises(TrainingStopped) as stopped:
        recipe.train(setup(*options))
    assert stopped.value.step == 3  # the epoch's last step: it saves the epoch's checkpoints, then stops
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    run = recipe.train(setup(*options), resume="auto")
    resumed = {p.name: load_checkpoint(p) for p in (run / "checkpoints").glob("*.pt")}
    assert resumed.keys() == reference.keys()
    for name in reference:
        reference[name].pop("config"), resumed[name].pop("config")
    assert differences(reference, resumed) == []


def test_torchrun_two_cpu_processes(setup, tmp_path):
    config_file = tmp_path / "controlnet.yaml"
    save_config(setup("controlnet.training.max_steps=2", "controlnet.training.batch_size=1"), config_file)
    result = run_torchrun("monai_diffusion.train_controlnet", "--config", str(config_file), "--set", "output.run_name=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size 2 (batch 1 x accumulation 1 x 2 process(es))" in result.stderr
    state = load_checkpoint(tmp_path / "out" / "ddp" / "checkpoints" / "last.pt")
    assert state["step"] == 2 and len(set(state["weights_sha256"])) == 1  # both replicas agree
    assert (tmp_path / "out" / "ddp" / "samples" / "sample-step00000002.nii.gz").is_file()


def test_what_does_not_fit_is_refused_before_a_run_folder_exists(setup, tmp_path):
    with pytest.raises(ValueError, match="data.mask_key: train-controlnet learns from label maps"):
        recipe.train(setup("data.mask_key=null"))
    with pytest.raises(ValueError, match=r"holds labels 0\.\.2, outside 0\.\.1"):
        recipe.train(setup("controlnet.num_labels=2"))
    with pytest.raises(ValueError) as info:
        recipe.train(setup("ldm.unet.num_channels=[16,16]", "ldm.unet.norm_num_groups=8"))
    assert "ldm.unet.num_channels: checkpoint [8, 16], config [16, 16]" in str(info.value)
    assert "The config must describe the LDM the ControlNet steers" in str(info.value)
    assert not list((tmp_path / "out").glob("controlnet-*"))
