"""The validate command and tools/test_downsample_factors.py, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from monai_diffusion.config import load_config
from monai_diffusion.networks import AutoencoderKL
from monai_diffusion.validate import summarise

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})


def test_validate_prints_the_summary_of_a_valid_preset():
    result = run("-m", "monai_diffusion.cli", "validate", "--config", "config/examples/ldm_config_8x_downsample.yaml")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "config is valid" in out
    assert "per level (per axis): [4, 4, 4] x [2, 2, 2]" in out
    assert "total per axis: [8, 8, 8]" in out
    assert "latent shape  [4, 32, 32, 8]" in out
    assert "4,194,304 -> 32,768 elements (128.0x)" in out
    assert "float32 image 16.00 MiB" in out


def test_validate_names_a_discriminator_too_deep_for_the_volume():
    """16^3 with the default 3-layer discriminator used to pass and fail at the first step inside PyTorch."""
    result = run("-m", "monai_diffusion.cli", "validate", "--set", "data.voxel_size=[16,16,16]")
    assert result.returncode == 2, result.stdout
    assert ("autoencoder.training.disc_num_layers / data.voxel_size: a 3-layer patch discriminator needs every axis "
            ">= 24 (3 x 2^3), and the autoencoder trains at 16x16x16; the largest depth that fits is 2") in result.stderr


def test_validate_summary_shows_each_stages_volume_and_precision():
    config = load_config(None, ["data.voxel_size=[32,32,32]", "autoencoder.training.voxel_size=[48,48,40]",
                                "autoencoder.training.patch_size=[16,16,16]", "autoencoder.training.disc_num_layers=2",
                                "ldm.training.mixed_precision=fp16"])
    text = summarise(config)
    assert ("stages        autoencoder volume [48, 48, 40] (trains on [16, 16, 16] patches) mixed_precision=False;  "
            "LDM volume [32, 32, 32] mixed_precision=fp16") in text
    assert "latent shape  [3, 8, 8, 8]" in text  # the LDM's latent, at data.voxel_size


def test_validate_exits_2_with_every_problem():
    result = run("-m", "monai_diffusion.cli", "validate", "--config", "config/ldm_config.yaml",
                 "--set", "autoencoder.downsample_factors=[4, 2, 2]", "--set", "device.mixed_precison=true",
                 "--set", "autoencoder.training.batch_size=0")
    assert result.returncode == 2
    err = result.stderr
    assert "3 problem(s)" in err
    assert "device.mixed_precison: unknown key (did you mean 'device.mixed_precision'?)" in err
    assert "autoencoder.training.batch_size" in err
    assert "autoencoder.downsample_factors: expected 2 entries" in err


def test_downsample_factor_scenarios_all_pass_at_a_small_size():
    result = run("tools/test_downsample_factors.py", "--size", "32", "32", "16")
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "11 passed, 0 failed" in out
    assert "Test 2: 8x downsampling - recommended" in out
    assert "expected latent   (4, 4, 2)" in out  # 32x32x16 at 8x
    assert "rejected as it must be" in out
    assert "state dict loads strictly" in out
    assert "input 0.062 MiB (float32)" in out  # 32*32*16 float32 = 64 KiB


def test_downsample_factor_tool_gives_the_seed_size_analysis_and_runs_small_by_default():
    result = run("tools/test_downsample_factors.py")
    assert result.returncode == 0, result.stdout[-3000:]
    test_2 = result.stdout.split("Test 2:")[1].split("Test 3:")[0]
    assert "at 256x256x64 (shapes from the network's arithmetic, nothing runs)" in test_2
    assert "expected latent   (32, 32, 8)" in test_2 and "actual latent     (32, 32, 8)" in test_2
    network = AutoencoderKL(3, channels=(16, 32, 64), downsample_factors=[4, 2], latent_channels=3, num_res_blocks=1,
                            attention_levels=(False,) * 3, norm_num_groups=8)
    assert f"parameters        {sum(p.numel() for p in network.parameters()):,}" in test_2
    assert "input 16.000 MiB (float32)" in test_2  # 256*256*64 float32
    assert "forward/backward at 64x64x32" in test_2 and "expected latent   (8, 8, 4)" in test_2
    assert "11 passed, 0 failed" in result.stdout


def test_downsample_factor_tool_checks_a_user_config():
    ok = run("tools/test_downsample_factors.py", "--config", "config/examples/tier_40gb.yaml", "--size", "32", "32", "16")
    assert ok.returncode == 0 and "total factor      16x16x16" in ok.stdout
    bad = run("tools/test_downsample_factors.py", "--config", "config/examples/tier_40gb.yaml",
              "--set", "data.voxel_size=[500,512,128]")
    assert bad.returncode == 1 and "axis 0 size 500 is not divisible by the total factor 16" in bad.stdout
