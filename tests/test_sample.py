"""sample: every scheduler, NIfTI affine of the training data, seeded reproducibility, EMA weights, tiled
decoding, the command line in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import record_compiles

from monai_diffusion import sample as sampler
from monai_diffusion.config import config_from_dict, save_config
from monai_diffusion.data import build_transforms
from monai_diffusion.engine.checkpoint import load_checkpoint, save_checkpoint
from monai_diffusion.networks.builders import build_autoencoder
from monai_diffusion.train_ldm import train

ROOT = Path(__file__).resolve().parents[1]
# Voxels of 1.5 x 2 x 2.5 mm with the first two axes flipped (an LPS-like file): reoriented to RAS for training.
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def tiny_raw(root: Path, scheduler: str) -> dict:
    return {
        "data": {"source": "folder", "data_dir": str(root / "data"), "voxel_size": [16, 16, 16], "cache": "none",
                 "val_fraction": 0.0},
        "autoencoder": {"num_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2, "downsample_factors": [2],
                        "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "ldm": {
            "unet": {"num_channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                     "num_head_channels": 8},
            "scheduler": {"type": scheduler, "num_train_timesteps": 100},
            "training": {"batch_size": 1, "max_epochs": None, "max_steps": 2, "val_every_n_epochs": 100,
                         "ema_decay": 0.5, "scale_factor_volumes": 2},
            "sampling": {"num_inference_steps": 3},
        },
        "device": {"device": "cpu"},
        "output": {"output_dir": str(root / f"out-{scheduler}")},
        "seed": 5,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DDPM- and an rflow-trained LDM (2 steps each) on three small volumes; scheduler -> (config, checkpoint)."""
    root = tmp_path_factory.mktemp("sample")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        volume = rng.random((18, 16, 14)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, AFFINE), root / "data" / f"vol{index}.nii.gz")
    runs = {}
    for scheduler in ("ddpm", "rflow"):
        config = config_from_dict(tiny_raw(root, scheduler))
        torch.manual_seed(0)
        autoencoder = build_autoencoder(config.autoencoder, 3)
        save_checkpoint(root / f"out-{scheduler}" / "autoencoder-1" / "checkpoints" / "best.pt",
                        {"kind": "autoencoder", "autoencoder": autoencoder.state_dict(),
                         "config": config.model_dump(mode="json"), "step": 0, "epoch": 0})
        run = train(config)
        runs[scheduler] = (config, run / "checkpoints" / "last.pt")
    runs["ddim"] = runs["ddpm"]
    runs["root"] = root
    return runs


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "rflow"])
def test_each_scheduler_samples_a_volume_of_the_configured_shape(trained, tmp_path, kind):
    config, _ = trained[kind]
    paths = sampler.sample(config, num_samples=1, steps=3, scheduler_kind=kind, out=tmp_path)
    assert paths == [tmp_path / "sample-000.nii.gz"]
    volume = read(paths[0])
    assert volume.shape == (16, 16, 16) and volume.dtype == np.float32
    assert np.isfinite(volume).all() and volume.min() >= 0.0 and volume.max() <= 1.0  # clipped to [b_min, b_max]
    assert volume.std() > 0
    assert (tmp_path / "sample-000.png").is_file()


def test_nifti_affine_matches_the_training_data(trained, tmp_path):
    config, checkpoint = trained["ddpm"]
    path = sampler.sample(config, num_samples=1, steps=2, out=tmp_path)[0]
    image = nib.load(str(path))
    item = {"image": str(trained["root"] / "data" / "vol0.nii.gz")}
    expected = build_transforms(config.data, train=False)(item)["image"].affine.numpy()
    np.testing.assert_allclose(image.affine, expected, atol=1e-5)
    np.testing.assert_allclose(image.header.get_zooms(), (1.5, 2.0, 2.5), atol=1e-6)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(load_checkpoint(checkpoint)["affine"].numpy(), expected, atol=1e-6)


def test_same_seed_gives_identical_samples(trained, tmp_path):
    config, _ = trained["ddpm"]
    first = sampler.sample(config, num_samples=2, steps=3, seed=7, out=tmp_path / "a")
    again = sampler.sample(config, num_samples=1, steps=3, seed=7, out=tmp_path / "b")
    other = sampler.sample(config, num_samples=1, steps=3, seed=8, out=tmp_path / "c")
    np.testing.assert_array_equal(read(first[0]), read(again[0]))  # sample i does not depend on --num-samples
    assert not np.array_equal(read(first[0]), read(first[1]))
    assert not np.array_equal(read(first[0]), read(other[0]))


def test_sampling_uses_the_ema_weights(trained, tmp_path):
    config, checkpoint = trained["ddpm"]
    state = load_checkpoint(checkpoint)
    state.pop("format_version")
    raw = {**state, "ema": None}
    as_ema = {**state, "ema": {**{f"module.{k}": v for k, v in state["unet"].items()}, "n_averaged": torch.tensor(1)}}
    save_checkpoint(tmp_path / "raw.pt", raw)
    save_checkpoint(tmp_path / "as_ema.pt", as_ema)
    with_ema = read(sampler.sample(config, 1, 2, seed=1, out=tmp_path / "ema", checkpoint=checkpoint)[0])
    without = read(sampler.sample(config, 1, 2, seed=1, out=tmp_path / "raw", checkpoint=tmp_path / "raw.pt")[0])
    unet_as_ema = read(sampler.sample(config, 1, 2, seed=1, out=tmp_path / "as", checkpoint=tmp_path / "as_ema.pt")[0])
    assert not np.array_equal(with_ema, without)
    np.testing.assert_array_equal(without, unet_as_ema)


def test_tiled_decode_sampling(trained, tmp_path):
    config, _ = trained["ddpm"]
    config = config.model_copy(deep=True)
    whole = read(sampler.sample(config, 1, 2, seed=2, out=tmp_path / "whole")[0])
    config.ldm.sampling.tiled_decode = True
    config.ldm.sampling.tile_size = [6, 6, 6]
    config.ldm.sampling.tile_overlap = 0.5
    tiled = read(sampler.sample(config, 1, 2, seed=2, out=tmp_path / "tiled")[0])
    assert tiled.shape == whole.shape == (16, 16, 16) and np.isfinite(tiled).all()
    # Tiles of 6^3 latent voxels see less context at their borders than the whole decode, so the two differ a little
    # (more for a barely trained decoder); they must differ far less than another seed's sample does.
    config.ldm.sampling.tiled_decode = False
    other = read(sampler.sample(config, 1, 2, seed=3, out=tmp_path / "other")[0])
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.8
    assert np.abs(tiled - whole).mean() < 0.5 * np.abs(other - whole).mean()


def test_compiled_sampling_compiles_the_unet_and_the_decoder(trained, tmp_path, monkeypatch):
    config, _ = trained["ddpm"]
    plain = read(sampler.sample(config, 1, 2, seed=3, out=tmp_path / "plain")[0])
    compiles = record_compiles(monkeypatch)
    config = config.model_copy(deep=True)
    config.device.compile, config.device.compile_mode = True, "reduce-overhead"
    compiled = read(sampler.sample(config, 1, 2, seed=3, out=tmp_path / "compiled")[0])
    assert [mode for mode, _ in compiles] == ["reduce-overhead"] * 2 and all(graphs for _, graphs in compiles)
    np.testing.assert_allclose(compiled, plain, atol=1e-5)

def test_errors(trained, tmp_path, caplog):
    config, checkpoint = trained["ddpm"]
    with pytest.raises(ValueError, match="Cannot sample with 'rflow' a model trained with 'ddpm'"):
        sampler.sample(config, 1, 2, scheduler_kind="rflow", out=tmp_path)
    empty = config.model_copy(deep=True)
    empty.output.output_dir = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=r"ldm-\*/checkpoints/last.pt"):
        sampler.sample(empty, 1, 2)
    assert sampler.main(["--set", f"output.output_dir={tmp_path / 'nothing'}", "--set", "device.device=cpu"]) == 1
    assert "No LDM checkpoint" in caplog.text

    # The autoencoder was replaced after training: its latents no longer match the LDM.
    state = load_checkpoint(checkpoint)
    state.pop("format_version")
    fake_ae = tmp_path / "ae.pt"
    torch.manual_seed(9)
    save_checkpoint(fake_ae, {"kind": "autoencoder", "config": state["config"],
                              "autoencoder": build_autoencoder(config.autoencoder, 3).state_dict()})
    save_checkpoint(tmp_path / "moved.pt", {**state, "autoencoder_checkpoint": str(fake_ae)})
    with pytest.raises(ValueError, match="trained on latents of"):
        sampler.sample(config, 1, 2, checkpoint=tmp_path / "moved.pt")


def test_command_line_in_a_subprocess(trained, tmp_path):
    config, _ = trained["rflow"]
    config_file = tmp_path / "config.yaml"
    save_config(config, config_file)
    out = tmp_path / "generated"
    result = subprocess.run(
        [sys.executable, "-m", "monai_diffusion.sample", "--config", str(config_file), "--num-samples", "2",
         "--steps", "2", "--seed", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for index in range(2):
        assert (out / f"sample-{index:03d}.nii.gz").is_file() and (out / f"sample-{index:03d}.png").is_file()
    assert read(out / "sample-000.nii.gz").shape == (16, 16, 16)


def test_a_config_with_other_network_shapes_is_refused_listing_both_values(trained, tmp_path, caplog):
    config, checkpoint = trained["ddpm"]
    raw = config.model_dump(mode="json")
    raw["autoencoder"]["latent_channels"] = 3
    raw["ldm"]["unet"]["num_channels"] = [16, 32]
    config_file = tmp_path / "other.yaml"
    save_config(config_from_dict(raw), config_file)
    common = ["--checkpoint", str(checkpoint), "--num-samples", "1", "--steps", "2", "--out", str(tmp_path / "out")]

    assert sampler.main(["--config", str(config_file), *common]) == 1
    assert f"The checkpoint {checkpoint} was trained with a different model shape (2 key(s))" in caplog.text
    assert "autoencoder.latent_channels: checkpoint 2, config 3" in caplog.text
    assert "ldm.unet.num_channels: checkpoint [8, 16], config [16, 32]" in caplog.text
    assert f"pass --checkpoint {checkpoint} without --config" in caplog.text
    caplog.clear()
    # A --set is compared on the shape keys it names; other --set keys (the device) are fine.
    assert sampler.main(["--set", "autoencoder.latent_channels=3", "--set", "device.device=cpu", *common]) == 1
    assert "autoencoder.latent_channels: checkpoint 2, config 3" in caplog.text
    assert not (tmp_path / "out").exists()

    # The checkpoint's own settings: --checkpoint without --config samples, its own config file too.
    assert sampler.main(["--set", "device.device=cpu", *common]) == 0
    assert sampler.main(["--config", str(checkpoint.parent.parent / "config.yaml"), *common]) == 0
    assert (tmp_path / "out" / "sample-000.nii.gz").is_file()


def test_keys_to_match_follow_the_command_line():
    from monai_diffusion.networks.builders import LDM_SHAPE_KEYS

    assert sampler.keys_to_match("my.yaml", []) == LDM_SHAPE_KEYS
    assert sampler.keys_to_match(None, ["device.device=cpu", "ldm.sampling.num_inference_steps=5"]) == []
    named = sampler.keys_to_match(None, ["ldm.unet={num_channels: [8, 16]}", "data.voxel_size=[8,8,8]"])
    assert named[:6] == ["data.voxel_size", "ldm.unet.num_channels", "ldm.unet.attention_levels",
                         "ldm.unet.num_res_blocks", "ldm.unet.num_head_channels", "ldm.unet.norm_num_groups"]
    assert named == [key for key in LDM_SHAPE_KEYS if key == "data.voxel_size" or key.startswith("ldm.unet.")]
