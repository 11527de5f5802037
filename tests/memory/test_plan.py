"""The memory planner: probe sizes, the change it proposes, what a prediction contains, its accuracy against the
harness, and a step it cannot measure."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from monai_diffusion import steps
from monai_diffusion.config.loading import load_config
from monai_diffusion.config.stages import downsampling, step_config
from monai_diffusion.engine.precision import precision_name
from monai_diffusion.memory import plan
from monai_diffusion.memory.plan import Planner, Prediction, at_size, make_plan, parse_memory, probe_size
from monai_diffusion.memory.probe import Options, run_measurement
from monai_diffusion.networks.builders import build_autoencoder, build_discriminator


def test_parse_memory():
    assert parse_memory("24GB") == 24 * 1024
    assert parse_memory("24 GiB") == 24 * 1024
    assert parse_memory("800MB") == 800
    assert parse_memory("1.5") == 1.5 * 1024
    with pytest.raises(ValueError):
        parse_memory("lots")


@pytest.mark.parametrize("factors, size", [([4, 2], (128, 128, 64)), ([[8, 8, 4], 2], (512, 512, 128)),
                                           ([2, 2], (256, 256, 64))])
def test_probe_size_is_smaller_and_divisible(factors, size):
    config = load_config(None, [f"data.voxel_size={list(size)}", f"autoencoder.downsample_factors={factors}",
                                "autoencoder.training.adv_weight=0"])
    probe = probe_size(config, "autoencoder", probe_voxels=2**18)
    total = downsampling(config).total
    assert 2**16 < math.prod(probe) <= 2**18
    assert all(s % f == 0 and s <= full for s, f, full in zip(probe, total, size))
    assert probe_size(at_size(config, (32, 32, 16)), "autoencoder", 2**18) == (32, 32, 16)
    assert probe_size(config, "ldm", 2**18) == size  # latents are small: the LDM step is measured at full size


class FakePlanner(Planner):
    """Predictions from a formula instead of probes: checks the search, not the measurement."""

    def __init__(self) -> None:
        super().__init__("cpu", "cuda")
        self.seen = []

    def _predict(self, config, stage):
        self.seen.append((config, stage))
        t = config.autoencoder.training
        voxels = math.prod(config.data.voxel_size) * t.batch_size
        total = math.prod(downsampling(config).total)
        amp = precision_name(config.device.mixed_precision, "cuda") != "fp32"
        per_voxel = (600 if t.use_gradient_checkpointing else 1600) * (0.6 if amp else 1.0)
        peak = voxels / 2**20 * per_voxel * (1.2 if total <= 64 else 1.0)
        if stage == "ldm":
            peak = 100.0
        return Prediction(peak, 0.0, peak, 1.0, measured_on="fake")


def _config(*overrides):
    return load_config(None, ["data.voxel_size=[256,256,64]", "autoencoder.num_channels=[16,32,64]",
                              "autoencoder.training.adv_weight=0", *overrides])


def test_plan_fits_without_change():
    result = make_plan(_config(), parse_memory("24GB"), FakePlanner())
    assert result.fits and not result.change and not result.errors


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


def test_plan_proposes_smaller_patches_before_factors_and_patches_after_them():
    class PatchAware(FakePlanner):  # the formula at what the step trains on, as the real planner measures
        def _predict(self, config, stage):
            return super()._predict(step_config(config, "autoencoder" if stage == "autoencoder" else "ldm"), stage)

    on_patches = _config("autoencoder.training.use_gradient_checkpointing=true", "device.mixed_precision=true",
                         "autoencoder.training.patch_size=[256,256,64]", "autoencoder.downsample_factors=[2,2]")
    result = make_plan(on_patches, 2.5 * 1024, PatchAware())
    assert result.change == ["autoencoder.training.patch_size=[128,256,64]"]
    assert "(the autoencoder on 256x256x64 patches)" in plan.describe(on_patches, result, "cfg.yaml")
    assert "validation and evaluate reconstruct whole volumes window by window" in result.change_note
    # A whole-volume config is offered stronger factors first, patches when nothing else is left.
    proposals = [" ".join(o) for o, _ in plan.candidates(_config("autoencoder.downsample_factors=[2,2]"), "cuda")]
    factors = max(i for i, o in enumerate(proposals) if "downsample_factors" in o)
    patches = [i for i, o in enumerate(proposals) if "patch_size" in o]
    assert patches and min(patches) > factors
    assert proposals[patches[0]].endswith("autoencoder.training.patch_size=[128,256,64]")

def test_each_stage_is_planned_at_what_it_trains_on(monkeypatch):
    """The autoencoder's patches, volume and precision of its own; the LDM's precision of its own; and the amp
    proposal names the key that decides the autoencoder's precision."""
    measured = []

    def fake_predict(config, stage, *args, **kwargs):
        measured.append((stage, config.data.voxel_size, config.device.mixed_precision))
        return Prediction(1.0, 0.0, 1.0, 1.0, measured_on="fake")

    monkeypatch.setattr(plan, "predict", fake_predict)
    config = _config("autoencoder.training.voxel_size=[128,128,64]", "autoencoder.training.patch_size=[64,64,32]",
                     "autoencoder.training.mixed_precision=false", "ldm.training.mixed_precision=fp16",
                     "device.mixed_precision=bf16")
    planner = Planner("cpu", "cpu")
    planner.autoencoder(config), planner.ldm(config)
    assert measured == [("autoencoder", [64, 64, 32], False), ("ldm", [256, 256, 64], "fp16")]
    proposals = [o for o, _ in plan.candidates(config, "cuda")]
    assert ["autoencoder.training.mixed_precision=true"] in proposals
    assert not any("device.mixed_precision=true" in o for o in proposals)


def test_a_step_that_cannot_be_measured_gives_no_verdict():
    class Failing(FakePlanner):
        def _predict(self, config, stage):
            if stage == "ldm":
                return plan.failed("exit code 1: ZeroDivisionError", [])
            return super()._predict(config, stage)

    result = make_plan(_config(), parse_memory("24GB"), Failing())
    assert result.fits is None and result.errors == ["LDM training step: exit code 1: ZeroDivisionError"]
    text = plan.describe(_config(), result, "cfg.yaml")
    assert "could not be measured: exit code 1: ZeroDivisionError" in text and "fits." not in text


# ----------------------------------------------------------------------------------------- real measurements

TINY = ["data.voxel_size=[32,32,16]", "autoencoder.num_channels=[8,16]", "autoencoder.norm_num_groups=8",
        "autoencoder.downsample_factors=[2]", "autoencoder.training.disc_channels=8",
        "autoencoder.training.disc_num_layers=2", "ldm.unet.num_channels=[8,16]", "ldm.unet.norm_num_groups=8",
        "ldm.unet.num_head_channels=8", "ldm.unet.attention_levels=[false,true]", "ldm.training.batch_size=1"]


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def test_prediction_includes_weights_gradients_and_optimizer_state():
    """The state part of a prediction is what AdamW training keeps: 16 bytes per trained parameter (weights,
    gradients, two moments) and the step counters, counted on the networks the config builds."""
    config = load_config(None, TINY)
    prediction = Planner("cpu", "cpu").autoencoder(config)
    assert prediction.error is None, prediction.error
    tensors = [p for net in (build_autoencoder(config.autoencoder), build_discriminator(config.autoencoder))
               for p in net.parameters()]
    expected_mib = (16 * sum(p.numel() for p in tensors) + 4 * len(tensors)) / 2**20
    assert prediction.state_mib == pytest.approx(expected_mib, rel=0.01, abs=0.1)
    assert prediction.peak_mib == pytest.approx(prediction.state_mib + prediction.activations_mib)
    assert prediction.activations_mib > 0


def test_ldm_head_channels_with_zero_at_levels_without_attention(capsys):
    """MONAI's tutorial configs set num_head_channels to 0 where a level has no attention: the real UNet is built
    and measured (the planner once divided by the first entry and printed "fits." without the LDM step)."""
    code = plan.main(sets(TINY + ["ldm.unet.num_head_channels=[0,8]"])
                     + ["--gpu-memory", "64GB", "--target", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "could not be measured" not in out and "fits." in out
    assert "LDM training step (from cached latents)" in out and "GiB" in out.split("LDM training step")[1]


def test_a_step_that_cannot_be_built_is_an_error_naming_it(tmp_path, capsys):
    """MedicalNet comes from torch hub with its architecture: without the hub folder there is nothing to measure."""
    code = plan.main(sets(TINY + ["autoencoder.training.use_perceptual_loss=true",
                                  "autoencoder.training.perceptual_network=medicalnet_resnet10_23datasets",
                                  f"autoencoder.training.perceptual_weights={tmp_path}"])
                     + ["--gpu-memory", "64GB", "--target", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    assert "autoencoder training step  could not be measured" in captured.out
    assert "'medicalnet_resnet10_23datasets' cannot be built with random weights" in captured.out
    assert "fits." not in captured.out
    assert "error: could not measure the autoencoder training step" in captured.err


class StandInPerceptual(torch.nn.Module):
    """A small trainable-shaped network in place of a 2D perceptual one (lpips and torchvision are not installed
    for the tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)

    def forward(self, reconstruction, images):
        return (self.conv(reconstruction) - self.conv(images)).abs().mean()


def test_offline_the_perceptual_network_is_measured_with_random_weights(tmp_path, monkeypatch, capsys):
    """On a machine without internet (a compute node) and no weights in torch hub's folder, plan measures the
    perceptual network's architecture with random weights, says so, and gives its verdict."""
    built = []

    def perceptual(training, spatial_dims=3, random_weights=False):
        built.append(random_weights)
        if not random_weights:
            raise FileNotFoundError("could not get the weights (no internet)")
        return StandInPerceptual()

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub folder: no weights at hand
    monkeypatch.setattr(steps, "build_perceptual_loss", perceptual)
    # Measured in this process, where the stand-in is.
    monkeypatch.setattr(plan, "run_measurement", functools.partial(run_measurement, in_process=True))
    code = plan.main(sets(TINY + ["autoencoder.training.use_perceptual_loss=true"])
                     + ["--gpu-memory", "64GB", "--target", "cpu", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert built == [True]
    assert ("the perceptual network (squeeze) with random weights: its pretrained ones are not on this machine, and "
            "the memory does not depend on their values") in out
    assert "could not be measured" not in out and "fits." in out

    built.clear()
    weights = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"  # the weights at hand: used
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    code = plan.main(sets(TINY + ["autoencoder.training.use_perceptual_loss=true"])
                     + ["--gpu-memory", "64GB", "--target", "cpu", "--device", "cpu"])
    assert code == 1 and built == [False]  # the stand-in refuses pretrained weights: the real path was taken
    assert "with random weights" not in capsys.readouterr().out


def test_offline_plan_with_a_real_2d_perceptual_network(tmp_path, capsys):
    """The same with the real squeeze network (where lpips and torchvision are installed), each probe in its own
    process as plan runs them."""
    pytest.importorskip("lpips")
    pytest.importorskip("torchvision")
    code = plan.main(sets(["data.voxel_size=[48,48,48]", *TINY[1:], "autoencoder.training.use_perceptual_loss=true",
                           f"autoencoder.training.perceptual_weights={tmp_path}"])
                     + ["--gpu-memory", "64GB", "--target", "cpu", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "the perceptual network (squeeze) with random weights" in out and "fits." in out


# With checkpointing, a tiny volume's peak is dominated by size-independent buffers (the slab-wise units'
# scratch), so proportional scaling from a half-size probe over-predicts by ~30-50% at 64x64x32: the
# checkpointing cases are checked at the issue's size in the slow test below, where the planner lands
# within 15%.
@pytest.mark.parametrize("checkpointing", [False])
def test_prediction_within_25_percent_of_the_harness(checkpointing):
    """A probe at a reduced size, scaled up, against the harness run at the full (small) size."""
    config = _config("data.voxel_size=[64,64,32]", "autoencoder.downsample_factors=[4,2]",
                     f"autoencoder.training.use_gradient_checkpointing={str(checkpointing).lower()}")
    predicted = plan.predict(config, "autoencoder", "cpu", probe_voxels=2**16)
    assert predicted.error is None
    assert len(predicted.probes) == 1 and math.prod(predicted.probes[0]["size"]) <= 64 * 64 * 32 / 2
    measured = run_measurement(config, Options(device="cpu", steps=2, warmup=1))
    assert "error" not in measured
    activations = measured["peak_mb"] - measured["gradients_mb"]
    error = abs(predicted.activations_mib - activations) / activations
    assert error <= 0.25, (predicted.activations_mib, activations)
    assert predicted.state_mib == pytest.approx(measured["state_mb"], rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("factors, checkpointing", [([2, 2], False), ([4, 2], False), ([4, 2], True),
                                                    ([8, 2], False), ([8, 2], True)])
def test_prediction_within_25_percent_at_the_issue_setting(factors, checkpointing):
    """The issue's CPU setting, 128x128x64 (minutes per case)."""
    config = _config("data.voxel_size=[128,128,64]", f"autoencoder.downsample_factors={factors}",
                     "autoencoder.attention_levels=[false,false,true]",
                     f"autoencoder.training.use_gradient_checkpointing={str(checkpointing).lower()}")
    predicted = plan.predict(config, "autoencoder", "cpu")
    measured = run_measurement(config, Options(device="cpu", threads=1, steps=2, warmup=1))
    activations = measured["peak_mb"] - measured["gradients_mb"]
    error = abs(predicted.activations_mib - activations) / activations
    assert error <= 0.25, (predicted.activations_mib, activations)
