"""Latent helpers: autoencoder fingerprint, cache keying and reuse, scale factor, tiled decoding, AE loading."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import old_layout, save_autoencoder
import torch

from monai_diffusion import latents
from monai_diffusion.config import config_from_dict
from monai_diffusion.data import build_transforms
from monai_diffusion.data.transforms import deterministic_settings
from monai_diffusion.engine.checkpoint import CheckpointError, save_checkpoint
from monai_diffusion.latents import (
    LatentDataset,
    build_latent_cache,
    cache_key,
    compute_scale_factor,
    load_autoencoder,
    load_cache_entry,
    resolve_autoencoder_checkpoint,
    resolve_tile_size,
    state_dict_hash,
    tiled_decode,
)
from monai_diffusion.networks.builders import build_autoencoder

AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def write_volumes(folder: Path, count: int, shape=(18, 16, 14)) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"vol{index}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), AFFINE), path)
        paths.append({"image": str(path)})
    return paths


def tiny_config(tmp_path: Path, **autoencoder):
    return config_from_dict(
        {
            "data": {"source": "folder", "data_dir": str(tmp_path / "data"), "voxel_size": [16, 16, 16], "cache": "none"},
            "autoencoder": {
                "num_channels": [8, 8],
                "norm_num_groups": 4,
                "latent_channels": 2,
                "downsample_factors": [2],
                "attention_levels": [False, False],
                "with_encoder_nonlocal_attn": False,
                "with_decoder_nonlocal_attn": False,
                **autoencoder,
            },
            "ldm": {"unet": {"num_channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8,
                             "num_head_channels": 8}},
            "device": {"device": "cpu"},
            "output": {"output_dir": str(tmp_path / "out")},
        }
    )




@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------ fingerprints


def test_state_dict_hash_follows_weights_only():
    model = torch.nn.Conv3d(2, 3, 3)
    state = model.state_dict()
    same = {k: v.clone() for k, v in state.items()}
    assert state_dict_hash(state) == state_dict_hash(same)
    same["weight"][0, 0, 0, 0, 0] += 1e-3
    assert state_dict_hash(state) != state_dict_hash(same)
    # Any dtype hashes (bf16 has no numpy equivalent).
    assert len(state_dict_hash({k: v.bfloat16() for k, v in state.items()})) == 16


def test_cache_key_changes_with_autoencoder_transforms_and_precision(tmp_path):
    config = tiny_config(tmp_path)
    settings = deterministic_settings(config.data)
    key = cache_key("aaaa", settings, "fp32")
    assert key == cache_key("aaaa", deterministic_settings(config.data), "fp32")
    assert key != cache_key("bbbb", settings, "fp32")
    assert key != cache_key("aaaa", settings, "bf16")
    other = config.model_copy(deep=True)
    other.data.voxel_size = [16, 16, 8]
    assert key != cache_key("aaaa", deterministic_settings(other.data), "fp32")
    other = config.model_copy(deep=True)
    other.data.intensity.upper = 99.0
    assert key != cache_key("aaaa", deterministic_settings(other.data), "fp32")
    # Augmentation does not enter the cache (it is not applied to cached latents).
    other = config.model_copy(deep=True)
    other.data.augment.flip_prob = 0.5
    assert key == cache_key("aaaa", deterministic_settings(other.data), "fp32")


# ------------------------------------------------------------------------------------------------- the cache


def test_cache_is_built_once_reused_and_refreshed_per_file(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    items = write_volumes(tmp_path / "data", 3)
    autoencoder = build_autoencoder(config.autoencoder, 3).eval()
    transform = build_transforms(config.data, train=False)
    calls = []
    original = latents.encode_volume
    monkeypatch.setattr(latents, "encode_volume", lambda *a, **k: calls.append(1) or original(*a, **k))

    folder = tmp_path / "cache" / "key"
    first = build_latent_cache(autoencoder, items, transform, folder, device=torch.device("cpu"), describe={"a": 1})
    assert first.encoded == 3 and len(calls) == 3
    assert [p.parent for p in first.files] == [folder] * 3 and all(p.is_file() for p in first.files)
    assert (folder / "cache.json").is_file()
    assert not list(folder.glob(".*tmp"))  # atomic writes leave no temp files
    mtimes = [p.stat().st_mtime_ns for p in first.files]

    second = build_latent_cache(autoencoder, items, transform, folder, device=torch.device("cpu"))
    assert second.encoded == 0 and len(calls) == 3
    assert second.files == first.files
    assert [p.stat().st_mtime_ns for p in second.files] == mtimes

    # An edited volume gets a new entry; the others are reused.
    path = Path(items[1]["image"])
    nib.save(nib.Nifti1Image(np.random.default_rng(5).random((18, 16, 14)).astype(np.float32), AFFINE), path)
    os.utime(path, ns=(mtimes[1] + 10**9, mtimes[1] + 10**9))
    third = build_latent_cache(autoencoder, items, transform, folder, device=torch.device("cpu"))
    assert third.encoded == 1 and len(calls) == 4
    assert third.files[0] == first.files[0] and third.files[1] != first.files[1]


def test_cache_entries_hold_posterior_and_affine(tmp_path):
    config = tiny_config(tmp_path)
    items = write_volumes(tmp_path / "data", 2)
    autoencoder = build_autoencoder(config.autoencoder, 3).eval()
    transform = build_transforms(config.data, train=False)
    result = build_latent_cache(autoencoder, items, transform, tmp_path / "c", device=torch.device("cpu"))
    entry = load_cache_entry(result.files[0])  # a weights_only load: plain tensors only
    assert entry["mu"].shape == entry["sigma"].shape == (2, 8, 8, 8)
    assert type(entry["mu"]) is torch.Tensor and entry["mu"].dtype == torch.float32
    assert bool((entry["sigma"] > 0).all())
    expected_mu, expected_sigma = autoencoder.encode(transform(dict(items[0]))["image"].unsqueeze(0))
    torch.testing.assert_close(entry["mu"], expected_mu[0].as_subclass(torch.Tensor).detach())
    expected_affine = torch.as_tensor(transform(dict(items[0]))["image"].affine, dtype=torch.float64)
    torch.testing.assert_close(entry["affine"], expected_affine.as_subclass(torch.Tensor))
    assert entry["image"] == items[0]["image"]
    sample = LatentDataset(result.files)[1]
    assert set(sample) == {"mu", "sigma"} and sample["mu"].shape == (2, 8, 8, 8)


# --------------------------------------------------------------------------------------------- scale factor


def test_scale_factor_is_one_over_std_reproducible_and_leaves_global_rng_alone():
    pairs = [(torch.full((2, 8, 8, 8), 3.0), torch.full((2, 8, 8, 8), 2.0)) for _ in range(4)]
    state = torch.get_rng_state()
    factor = compute_scale_factor(pairs, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert factor == pytest.approx(0.5, rel=0.05)  # std of 3 + 2 * eps is 2
    assert compute_scale_factor(pairs, seed=1) == factor
    with pytest.raises(ValueError, match="standard deviation"):
        compute_scale_factor([(torch.ones(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))])
    with pytest.raises(ValueError, match="no latents"):
        compute_scale_factor([])


# ------------------------------------------------------------------------------------------------- decoding


class PointwiseDecoder(torch.nn.Module):
    """decode = 1x1 conv then x2 nearest upsampling: no spatial context, so windows cannot differ from the whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.conv(z), scale_factor=2, mode="nearest")


@pytest.mark.parametrize("tile, overlap", [((4, 4, 4), 0.25), ((3, 5, 8), 0.5), ((8, 8, 8), 0.0), (None, 0.25)])
def test_tiled_decode_places_zoomed_windows_exactly(tile, overlap):
    # MONAI's sliding_window_inference sees the predictor's windows are 2x its input windows and writes each
    # to the 2x position: for a context-free decoder tiled and whole decoding agree everywhere.
    model = PointwiseDecoder()
    z = torch.randn(1, 2, 8, 10, 8)
    with torch.no_grad():
        full = model.decode(z)
        tiled = tiled_decode(model, z, tile, overlap)
    assert tiled.shape == full.shape == (1, 1, 16, 20, 16)
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-5)


def test_tiled_decode_close_to_full_decode_on_tiny_autoencoder(tmp_path):
    config = tiny_config(tmp_path, num_channels=[8, 16], norm_num_groups=8)
    autoencoder = build_autoencoder(config.autoencoder, 3).eval()
    z = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        full = autoencoder.decode(z)
        whole = tiled_decode(autoencoder, z, (16, 16, 16))
        tiled = tiled_decode(autoencoder, z, (12, 12, 12), overlap=0.5)
    torch.testing.assert_close(whole, full, atol=1e-5, rtol=1e-5)  # one window = the whole decode
    assert tiled.shape == full.shape == (1, 1, 32, 32, 32)
    # Away from the volume border; GroupNorm statistics per window make it close, not equal.
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    error = (tiled[inner] - full[inner]).abs().mean() / full[inner].std()
    correlation = torch.corrcoef(torch.stack([tiled[inner].flatten(), full[inner].flatten()]))[0, 1]
    assert error < 0.25 and correlation > 0.95, (float(error), float(correlation))


def test_resolve_tile_size():
    assert resolve_tile_size((16, 10, 7), None) == (8, 5, 4)
    assert resolve_tile_size((16, 10, 7), [4, 20, 7]) == (4, 10, 7)
    with pytest.raises(ValueError, match="tile_size"):
        resolve_tile_size((16, 10, 7), [4, 4])


# ------------------------------------------------------------------------------------------- the autoencoder


def test_resolve_autoencoder_checkpoint_prefers_newest_best(tmp_path):
    config = tiny_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"autoencoder-\*/checkpoints/best.pt"):
        resolve_autoencoder_checkpoint(config)
    out = tmp_path / "out"
    last = save_autoencoder(config, out / "autoencoder-1/checkpoints/last.pt")
    assert resolve_autoencoder_checkpoint(config) == last
    best = save_autoencoder(config, out / "autoencoder-1/checkpoints/best.pt")
    assert resolve_autoencoder_checkpoint(config) == best
    newer = save_autoencoder(config, out / "autoencoder-2/checkpoints/best.pt")
    os.utime(newer, (best.stat().st_mtime + 5, best.stat().st_mtime + 5))
    assert resolve_autoencoder_checkpoint(config) == newer

    config.ldm.autoencoder_checkpoint = out / "autoencoder-1"
    assert resolve_autoencoder_checkpoint(config) == best
    config.ldm.autoencoder_checkpoint = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        resolve_autoencoder_checkpoint(config)


def test_load_autoencoder_is_frozen_and_checks_the_config(tmp_path):
    config = tiny_config(tmp_path)
    path = save_autoencoder(config, tmp_path / "ae.pt")
    model, digest = load_autoencoder(path, config, torch.device("cpu"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert digest == state_dict_hash(torch.load(path, weights_only=True)["autoencoder"])

    other = tiny_config(tmp_path, latent_channels=3)
    with pytest.raises(ValueError) as info:
        load_autoencoder(path, other, torch.device("cpu"))
    message = str(info.value)
    assert str(path) in message and "autoencoder.latent_channels: checkpoint 2, config 3" in message

    save_checkpoint(tmp_path / "ldm.pt", {"kind": "ldm"})
    with pytest.raises(ValueError, match="not an autoencoder checkpoint"):
        load_autoencoder(tmp_path / "ldm.pt", config, torch.device("cpu"))


def test_plain_state_dict_in_the_old_key_layout_is_an_autoencoder_checkpoint(tmp_path):
    """ldm.autoencoder_checkpoint may name a bare state dict as MONAI's bundles ship it (the BraTS bundle's
    model_autoencoder.pt, MONAI Generative's key layout): the config's autoencoder gets exactly its weights."""
    config = tiny_config(tmp_path, with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True)
    trained = build_autoencoder(config.autoencoder, 3)
    for parameter in trained.parameters():  # weights no fresh model has by chance
        torch.nn.init.normal_(parameter, std=0.1)
    old = old_layout(trained.state_dict())
    assert any(".proj_attn." in key for key in old) and not set(old) <= set(trained.state_dict())
    path = tmp_path / "model_autoencoder.pt"
    torch.save(old, path)
    config.ldm.autoencoder_checkpoint = path

    model, digest = load_autoencoder(resolve_autoencoder_checkpoint(config), config, torch.device("cpu"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert digest == state_dict_hash(trained.state_dict())
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(image)[0], trained.eval().encode(image)[0])

    # Today's layout loads the same way, and to the same fingerprint.
    torch.save(trained.state_dict(), tmp_path / "new_layout.pt")
    assert load_autoencoder(tmp_path / "new_layout.pt", config, torch.device("cpu"))[1] == digest

    # A state dict of another network is refused, naming the file and the section to fix.
    other = tiny_config(tmp_path, with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True, latent_channels=3)
    with pytest.raises(ValueError, match=r"model_autoencoder.pt does not fit the autoencoder .*plain state dict"):
        load_autoencoder(path, other, torch.device("cpu"))
    # Anything else that is not a checkpoint stays an error about the checkpoint.
    torch.save({"epoch": 3}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a monai-diffusion checkpoint"):
        load_autoencoder(tmp_path / "foreign.pt", config, torch.device("cpu"))


def test_a_checkpoint_from_before_a_shape_key_existed_reads_it_as_its_default(tmp_path):
    """Checkpoints written before autoencoder.include_fc existed were built with an output projection: they load
    where the config keeps the default, and are refused where it does not."""
    config = tiny_config(tmp_path, with_encoder_nonlocal_attn=True)
    path = save_autoencoder(config, tmp_path / "ae.pt")
    state = torch.load(path, weights_only=True)
    del state["config"]["autoencoder"]["include_fc"], state["config"]["autoencoder"]["use_combined_linear"]
    save_checkpoint(path, state)
    load_autoencoder(path, config, torch.device("cpu"))
    with pytest.raises(ValueError, match="autoencoder.include_fc: checkpoint true, config false"):
        load_autoencoder(path, tiny_config(tmp_path, with_encoder_nonlocal_attn=True, include_fc=False),
                         torch.device("cpu"))
