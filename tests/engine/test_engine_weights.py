"""engine/weights.py: a network's weights from this tool's checkpoints, plain MONAI state dicts in either key layout
and MAISI-style files; strict loading lists what differs, non-strict loading loads what fits and says what it left."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import old_layout
from monai.networks.nets import ControlNet, DiffusionModelUNet

from monai_diffusion.config.schema import AutoencoderConfig
from monai_diffusion.engine.checkpoint import CheckpointError, save_checkpoint
from monai_diffusion.engine.ema import build_ema
from monai_diffusion.engine.weights import init_network, load_weights, match_weights, read_weights
from monai_diffusion.networks.builders import build_autoencoder


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights no freshly built network has by chance."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.1)
    return module


def unet(**kwargs) -> DiffusionModelUNet:
    return DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                              norm_num_groups=8, **kwargs)


def autoencoder(**kwargs):
    return build_autoencoder(AutoencoderConfig(num_channels=[8, 8], norm_num_groups=4, latent_channels=2,
                                               attention_levels=[False, True], **kwargs), 3)


def same_weights(network: torch.nn.Module, expected: dict) -> None:
    state = network.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_each_layout_is_read_from_where_it_keeps_the_weights(tmp_path):
    trained = randomised(unet()).state_dict()
    torch.save(trained, tmp_path / "model.pt")
    found = read_weights(tmp_path / "model.pt", "ldm", what="ldm.training.init_checkpoint")
    assert found.layout == "plain state dict" and found.scale_factor is None and found.checkpoint is None

    # MAISI's diffusion file: the UNet under unet_state_dict, its scale factor (a tensor) and bookkeeping beside it.
    torch.save({"epoch": 3, "loss": 0.1, "num_train_timesteps": 1000, "scale_factor": torch.tensor(1.25),
                "unet_state_dict": trained}, tmp_path / "diff_unet_3d_rflow-ct.pt")
    found = read_weights(tmp_path / "diff_unet_3d_rflow-ct.pt", "ldm", what="ldm.training.init_checkpoint")
    assert found.layout == "MAISI-style file, its 'unet_state_dict'" and found.scale_factor == 1.25
    assert found.weights.keys() == trained.keys()
    # MAISI's ControlNet file; its autoencoder read either plain or under unet_state_dict.
    torch.save({"epoch": 1, "loss": torch.tensor(0.2), "controlnet_state_dict": trained}, tmp_path / "cn.pt")
    assert read_weights(tmp_path / "cn.pt", "controlnet", what="x").layout == "MAISI-style file, its " \
        "'controlnet_state_dict'"
    assert read_weights(tmp_path / "diff_unet_3d_rflow-ct.pt", "autoencoder", what="x").weights.keys() == trained.keys()

    # A ControlNet's file is no UNet's: the error names the key, the file and what it holds.
    with pytest.raises(CheckpointError, match=r"ldm.training.init_checkpoint: .*cn.pt is not a monai-diffusion "
                                              r"checkpoint nor a diffusion UNet's weights.*'unet_state_dict'.*"
                                              r"controlnet_state_dict"):
        read_weights(tmp_path / "cn.pt", "ldm", what="ldm.training.init_checkpoint")


def test_an_ldm_checkpoint_gives_its_ema_weights_and_scale_factor(tmp_path):
    network = randomised(unet())
    ema = build_ema(network, 0.5)
    ema.update_parameters(network)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)  # the raw weights move on, the average stays behind
    run = tmp_path / "ldm-1"
    save_checkpoint(run / "checkpoints" / "last.pt", {"kind": "ldm", "unet": network.state_dict(),
                                                      "ema": ema.state_dict(), "scale_factor": 0.8, "step": 7})
    found = read_weights(run, "ldm", what="ldm.training.init_checkpoint")  # a run folder: its checkpoint
    assert found.path == run / "checkpoints" / "last.pt" and found.scale_factor == 0.8
    assert "EMA" in found.layout and found.checkpoint["step"] == 7
    fresh = unet()
    load_weights(fresh, found, strict=True, what="x", kind="ldm", remedy="")
    same_weights(fresh, ema.module.state_dict())

    save_checkpoint(tmp_path / "raw.pt", {"kind": "ldm", "unet": network.state_dict(), "ema": None,
                                          "scale_factor": 0.8})
    found = read_weights(tmp_path / "raw.pt", "ldm", what="x")
    assert "no EMA saved" in found.layout and found.weights is not None
    with pytest.raises(ValueError, match=r"raw.pt is not an autoencoder checkpoint \(kind='ldm'\)"):
        read_weights(tmp_path / "raw.pt", "autoencoder", what="autoencoder.training.init_checkpoint")


def test_monai_generative_names_load_as_monai_renames_them(tmp_path):
    """The old layout of a conditional UNet (self- and cross-attention, upsampling conv) and of an autoencoder whose
    attention blocks had no output projection (identity) gives what MONAI's own load_old_state_dict gives."""
    for build in (lambda: unet(with_conditioning=True, cross_attention_dim=4), unet,
                  lambda: autoencoder(with_encoder_nonlocal_attn=True)):
        trained = randomised(build()).state_dict()
        for with_proj_attn in (True, False) if build is not unet else (True,):
            old = old_layout(trained, with_proj_attn=with_proj_attn)
            assert not set(old) <= set(trained)
            reference = build()
            reference.load_old_state_dict(dict(old))
            torch.save(old, tmp_path / "old.pt")
            found = read_weights(tmp_path / "old.pt", "autoencoder", what="x")
            network = build()
            report = load_weights(network, found, strict=True, what="x", kind="autoencoder", remedy="")
            same_weights(network, reference.state_dict())
            assert report.complete and report.renamed > 0 and report.loaded == report.total


def test_monai_controlnet_names_from_monai_generative_are_renamed():
    arguments = dict(spatial_dims=3, in_channels=2, channels=(8, 16), attention_levels=(False, True),
                     num_res_blocks=1, num_head_channels=8, norm_num_groups=8, conditioning_embedding_in_channels=2,
                     conditioning_embedding_num_channels=(8, 16), with_conditioning=True, cross_attention_dim=4)
    trained = randomised(ControlNet(**arguments)).state_dict()
    matched, report = match_weights(ControlNet(**arguments).state_dict(), old_layout(trained))
    assert report.complete and report.renamed > 0
    for key, value in trained.items():
        assert torch.equal(matched[key], value), key


def test_a_strict_load_lists_the_first_differing_keys_with_both_shapes(tmp_path):
    torch.save(randomised(unet()).state_dict(), tmp_path / "other.pt")
    wider = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(16, 16),
                               attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                               norm_num_groups=8)
    before = {key: value.clone() for key, value in wider.state_dict().items()}
    with pytest.raises(ValueError) as info:
        init_network(wider, tmp_path / "other.pt", kind="ldm", strict=True, section="ldm.training")
    message = str(info.value)
    assert message.startswith(f"ldm.training.init_checkpoint: {tmp_path / 'other.pt'} does not fit the diffusion "
                              "UNet the config builds (plain state dict;")
    assert "tensor(s) of another shape: conv_in.conv.weight: file [8, 2, 3, 3, 3], network [16, 2, 3, 3, 3]" \
        in message
    assert "(and " in message and "more)" in message  # only the first few are named
    assert "ldm.training.init_strict: false" in message
    same_weights(wider, before)  # nothing was loaded


def test_a_non_strict_load_takes_what_fits_and_says_what_it_left(tmp_path, caplog):
    """A UNet file loaded into one with another attention layout: the shared tensors load, the file's attention
    weights are left out, the network's own stay as built; the log names both."""
    source = randomised(unet()).state_dict()
    torch.save({"unet_state_dict": source, "scale_factor": 2.0}, tmp_path / "maisi.pt")
    network = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16),
                                 attention_levels=(True, False), num_res_blocks=1, num_head_channels=8,
                                 norm_num_groups=8)
    built = {key: value.clone() for key, value in network.state_dict().items()}
    caplog.set_level(logging.INFO, logger="monai_diffusion")
    found = init_network(network, tmp_path / "maisi.pt", kind="ldm", strict=False, section="ldm.training")
    assert found.scale_factor == 2.0
    state = network.state_dict()
    shared = [key for key in state if key in source and source[key].shape == state[key].shape]
    assert shared and all(torch.equal(state[key], source[key]) for key in shared)
    assert all(torch.equal(state[key], built[key]) for key in state if key not in source)
    assert "ldm.training.init_checkpoint: the diffusion UNet starts from" in caplog.text
    assert "tensor(s) of the network not in the file: down_blocks.0.attentions.0.norm.weight" in caplog.text
    assert "tensor(s) of the file with no place in the network: down_blocks.1.attentions.0.norm.weight" in caplog.text
    assert "(init_strict false)" in caplog.text

    # Even non-strict, a file none of whose tensors fit is refused: it is the wrong file.
    torch.save({"unet_state_dict": {"other.weight": torch.zeros(2)}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"0 of \d+ tensors match"):
        init_network(network, tmp_path / "wrong.pt", kind="ldm", strict=False, section="ldm.training")


def test_files_that_hold_no_weights_are_refused_naming_the_file(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign.pt is not a monai-diffusion checkpoint nor an? .*\['epoch'\]"):
        read_weights(tmp_path / "foreign.pt", "controlnet", what="controlnet.training.init_checkpoint")
    with pytest.raises(FileNotFoundError, match="autoencoder.training.init_checkpoint: no checkpoint file"):
        read_weights(tmp_path / "nowhere.pt", "autoencoder", what="autoencoder.training.init_checkpoint")
