"""Starting a stage from weights made elsewhere (``*.training.init_checkpoint``): each stage takes this tool's run
folders, plain MONAI state dicts in either key layout and MAISI-style files, trains one real step from them with a
fresh optimizer at step 0, refuses a file of another shape (or with ``init_strict: false`` loads what fits), and a
resumed run does not read the file. ``ldm.autoencoder_checkpoint`` takes a MAISI-style autoencoder file too."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (conditional_raw, old_layout, run_python, save_autoencoder, tiny_config_dict,
                     write_conditional_data, write_volumes)

from monai_diffusion import train_autoencoder, train_controlnet, train_ldm
from monai_diffusion.config import ConfigError, apply_overrides, config_from_dict
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.engine.ema import ema_weights
from monai_diffusion.latents import state_dict_hash
from monai_diffusion.networks.builders import build_autoencoder, build_unet

# Adam moves every weight by about lr per step: with this rate one step leaves the starting weights as they were,
# to well within the tolerance below, while any other start differs by far more.
STILL = "1e-9"


def randomised(state: dict, seed: int = 0) -> dict:
    """``state`` with weights no freshly built network has by chance."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) * 0.1 for key, value in state.items()}


def started_from(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value.float(), rtol=0, atol=1e-6, msg=key)


def save_in_layout(state: dict, layout: str, path: Path, wrapper: str = "unet_state_dict", **beside) -> Path:
    """``state`` as a plain state dict (``plain``), in MONAI Generative's names (``old``) or inside a MAISI-style
    dict with its bookkeeping (``maisi``)."""
    content = {"plain": state, "old": old_layout(state)}.get(layout)
    if layout == "maisi":
        content = {"epoch": 5, "loss": 0.25, wrapper: state, **beside}
    torch.save(content, path)
    return path


# --------------------------------------------------------------------------------------------- autoencoder


def ae_config(data_dir: Path, output_dir: Path, *overrides: str):
    return config_from_dict(apply_overrides(tiny_config_dict(data_dir, output_dir), [
        "autoencoder.training.max_steps=1", "autoencoder.training.max_epochs=null", *overrides]))


@pytest.mark.parametrize("layout", ["ours", "plain", "old", "maisi"])
def test_the_autoencoder_starts_from_weights_in_each_layout(tmp_path, nifti_folder, layout):
    out = tmp_path / "out"
    if layout == "ours":  # a run folder of this tool: its checkpoint's autoencoder
        source = train_autoencoder.train(ae_config(nifti_folder, out, "output.run_name=first"))
        expected = load_checkpoint(source / "checkpoints" / "last.pt")["autoencoder"]
    else:
        config = ae_config(nifti_folder, out)
        expected = randomised(build_autoencoder(config.autoencoder, 3).state_dict())
        source = save_in_layout(expected, layout, tmp_path / "autoencoder.pt")
        assert layout != "old" or any(".proj_attn." in key for key in torch.load(source))

    run = train_autoencoder.train(ae_config(nifti_folder, out, f"autoencoder.training.init_checkpoint={source}",
                                            f"autoencoder.training.lr={STILL}", "output.run_name=second"))
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 1  # a new run from step 0, with its own optimizer
    assert all(state["step"] == 1 for state in checkpoint["optimizer_g"]["state"].values())
    started_from(checkpoint["autoencoder"], expected)


def test_a_file_of_another_shape_stops_the_run_before_it_starts(tmp_path, nifti_folder):
    other = ae_config(nifti_folder, tmp_path / "out", "autoencoder.latent_channels=3")
    source = save_in_layout(build_autoencoder(other.autoencoder, 3).state_dict(), "maisi", tmp_path / "ae.pt")
    with pytest.raises(ValueError) as info:
        train_autoencoder.train(ae_config(nifti_folder, tmp_path / "out",
                                          f"autoencoder.training.init_checkpoint={source}"))
    message = str(info.value)
    assert f"autoencoder.training.init_checkpoint: {source} does not fit the autoencoder the config builds " \
           "(MAISI-style file, its 'unet_state_dict';" in message
    assert "tensor(s) of another shape: encoder.blocks." in message
    assert "quant_conv_mu.conv.weight: file [3, 3, 1, 1, 1], network [2, 2, 1, 1, 1]" in message
    assert not list((tmp_path / "out").glob("autoencoder-*"))  # a failed start leaves no run folder


def test_init_strict_false_trains_from_what_fits_and_logs_the_rest(tmp_path, nifti_folder, caplog):
    other = ae_config(nifti_folder, tmp_path / "out", "autoencoder.latent_channels=3")
    expected = randomised(build_autoencoder(other.autoencoder, 3).state_dict())
    source = save_in_layout(expected, "plain", tmp_path / "ae.pt")
    caplog.set_level(logging.INFO, logger="monai_diffusion")
    run = train_autoencoder.train(ae_config(nifti_folder, tmp_path / "out", f"autoencoder.training.lr={STILL}",
                                            f"autoencoder.training.init_checkpoint={source}",
                                            "autoencoder.training.init_strict=false"))
    weights = load_checkpoint(run / "checkpoints" / "last.pt")["autoencoder"]
    fits = [key for key in weights if weights[key].shape == expected[key].shape]
    assert len(fits) < len(weights)
    started_from({key: weights[key] for key in fits}, {key: expected[key] for key in fits})
    assert "(init_strict false):" in caplog.text
    assert f"the autoencoder starts from {source} (plain state dict): {len(fits)} of {len(weights)} tensors" \
        in caplog.text
    assert f"{len(weights) - len(fits)} tensor(s) of another shape: " in caplog.text
    assert "quant_conv_mu.conv.weight: file [3, 3, 1, 1, 1], network [2, 2, 1, 1, 1]" in caplog.text


def test_a_resumed_run_does_not_read_the_init_checkpoint(tmp_path, nifti_folder, caplog):
    config = ae_config(nifti_folder, tmp_path / "out")
    source = save_in_layout(randomised(build_autoencoder(config.autoencoder, 3).state_dict()), "plain",
                            tmp_path / "ae.pt")
    first = train_autoencoder.train(ae_config(nifti_folder, tmp_path / "out",
                                              f"autoencoder.training.init_checkpoint={source}"))
    step_one = load_checkpoint(first / "checkpoints" / "last.pt")
    source.unlink()  # were it read, the run would stop: the file is gone
    caplog.set_level(logging.INFO, logger="monai_diffusion")
    resumed = train_autoencoder.train(ae_config(nifti_folder, tmp_path / "out", "autoencoder.training.max_steps=2",
                                                f"autoencoder.training.init_checkpoint={source}"), resume="auto")
    assert resumed == first and load_checkpoint(first / "checkpoints" / "last.pt")["step"] == 2
    assert f"autoencoder.training.init_checkpoint ({source}) is not read: the run resumes with its checkpoint's " \
           "weights" in caplog.text
    assert step_one["step"] == 1


def test_the_cli_starts_from_a_maisi_style_file(tiny_config_file, tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path, tmp_path))
    source = save_in_layout(build_autoencoder(config.autoencoder, 3).state_dict(), "maisi", tmp_path / "vae.pt")
    result = run_python("-m", "monai_diffusion.cli", "train-autoencoder", "--config", str(tiny_config_file),
                        "--set", f"autoencoder.training.init_checkpoint={source}",
                        "--set", "autoencoder.training.max_steps=1", "--set", "output.run_name=init")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"autoencoder.training.init_checkpoint: the autoencoder starts from {source} (MAISI-style file, its "
            "'unet_state_dict')") in result.stderr
    assert load_checkpoint(tmp_path / "runs" / "init" / "checkpoints" / "last.pt")["step"] == 1


def test_init_strict_is_only_read_with_an_init_checkpoint(tmp_path):
    raw = tiny_config_dict(tmp_path, tmp_path)
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides(raw, ["ldm.training.init_strict=false",
                                               "controlnet.training.scale_factor=0.5"]))
    assert "ldm.training.init_strict: only read with ldm.training.init_checkpoint" in str(info.value)
    assert "controlnet.training.scale_factor: not read" in str(info.value)


# ----------------------------------------------------------------------------------------------------- LDM


def ldm_raw(tmp_path: Path, *overrides: str) -> dict:
    raw = {
        "data": {"source": "folder", "data_dir": str(tmp_path / "data"), "voxel_size": [16, 16, 16],
                 "cache": "none", "val_fraction": 0.0},
        "autoencoder": {"num_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2, "downsample_factors": [2],
                        "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "ldm": {
            "autoencoder_checkpoint": str(tmp_path / "autoencoder_v1.pt"),
            "unet": {"num_channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                     "num_head_channels": 8},
            "scheduler": {"type": "rflow", "num_train_timesteps": 100},
            "training": {"batch_size": 1, "max_epochs": None, "max_steps": 1, "val_every_n_epochs": 100,
                         "ema_decay": 0.5, "scale_factor_volumes": 2},
            "sampling": {"num_inference_steps": 2},
        },
        "device": {"device": "cpu"},
        "output": {"output_dir": str(tmp_path / "out"), "log_every_n_steps": 1},
        "seed": 3,
    }
    return apply_overrides(raw, list(overrides))


@pytest.fixture
def ldm_setup(tmp_path):
    """Volumes and MAISI's way of shipping an autoencoder (its state dict under unet_state_dict) as
    ldm.autoencoder_checkpoint; returns overrides -> Config, and the autoencoder's weights."""
    write_volumes(tmp_path / "data", 3)
    config = config_from_dict(ldm_raw(tmp_path))
    weights = randomised(build_autoencoder(config.autoencoder, 3).state_dict(), seed=1)
    save_in_layout(weights, "maisi", tmp_path / "autoencoder_v1.pt")
    return (lambda *overrides: config_from_dict(ldm_raw(tmp_path, *overrides))), weights


@pytest.mark.parametrize("layout", ["ours", "plain", "old", "maisi"])
def test_the_ldm_starts_from_weights_in_each_layout(ldm_setup, tmp_path, layout, caplog):
    make, autoencoder_weights = ldm_setup
    caplog.set_level(logging.INFO, logger="monai_diffusion")
    if layout == "ours":  # an LDM run folder: its EMA weights, which differ from its raw ones after two steps
        source = train_ldm.train(make("ldm.training.max_steps=2", "output.run_name=first"))
        state = load_checkpoint(source / "checkpoints" / "last.pt")
        expected = ema_weights(state["ema"])
        assert any(not torch.equal(expected[key], state["unet"][key]) for key in expected)
    else:
        expected = randomised(build_unet(make().ldm, 2, 3).state_dict())
        source = save_in_layout(expected, layout, tmp_path / "diff_unet_3d_rflow-ct.pt",
                                scale_factor=torch.tensor(0.75))
    given = ["ldm.training.scale_factor=0.5"] if layout == "plain" else []

    run = train_ldm.train(make(f"ldm.training.init_checkpoint={source}", f"ldm.training.lr={STILL}", *given,
                               "output.run_name=second"))
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 1
    assert all(state["step"] == 1 for state in checkpoint["optimizer"]["state"].values())
    started_from(checkpoint["unet"], expected)
    started_from(ema_weights(checkpoint["ema"]), expected)
    # ldm.autoencoder_checkpoint read MAISI's layout, and the LDM records that autoencoder's digest.
    assert checkpoint["autoencoder_hash"] == state_dict_hash(autoencoder_weights)
    if layout == "plain":
        assert checkpoint["scale_factor"] == 0.5
    if layout == "maisi":
        assert (f"ldm.training.init_checkpoint: {source} was trained on latents scaled by 0.75; this run scales by "
                f"{checkpoint['scale_factor']:.8g} (computed; set ldm.training.scale_factor: 0.75 to keep the "
                "file's)") in caplog.text


# ----------------------------------------------------------------------------------------------- ControlNet


@pytest.fixture(scope="module")
def controlnet_setup(tmp_path_factory):
    """Blob volumes with label maps, an autoencoder and a conditional LDM trained one step on them."""
    root = tmp_path_factory.mktemp("init_controlnet")
    datalist = write_conditional_data(root / "data", count=4)
    config = config_from_dict(conditional_raw(datalist, root / "out"))
    save_autoencoder(config, root / "out" / "autoencoder-1" / "checkpoints" / "best.pt")
    return root, datalist, train_ldm.train(config)


def test_the_controlnet_starts_from_a_run_folder_or_a_maisi_style_file(controlnet_setup, tmp_path):
    root, datalist, ldm = controlnet_setup
    shutil.copytree(root / "out", tmp_path / "out", ignore=shutil.ignore_patterns("controlnet-*"))

    def make(*overrides: str):
        raw = conditional_raw(datalist, tmp_path / "out")
        return config_from_dict(apply_overrides(raw, [f"controlnet.ldm_checkpoint={tmp_path / 'out' / ldm.name}",
                                                      *overrides]))

    first = train_controlnet.train(make("output.run_name=first", "controlnet.training.max_steps=2"))
    ours = ema_weights(load_checkpoint(first / "checkpoints" / "last.pt")["ema"])
    maisi = save_in_layout(randomised(ours), "maisi", tmp_path / "controlnet_3d_rflow-ct.pt",
                           wrapper="controlnet_state_dict")
    for name, source, expected in (("second", first, ours), ("third", maisi, randomised(ours))):
        run = train_controlnet.train(make(f"controlnet.training.init_checkpoint={source}",
                                          f"controlnet.training.lr={STILL}", f"output.run_name={name}"))
        checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
        assert checkpoint["step"] == 1
        started_from(checkpoint["controlnet"], expected)
