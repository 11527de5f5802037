"""train-autoencoder: real training steps on real NIfTI files, through the CLI and in-process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_diffusion import steps, train_autoencoder
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.networks.autoencoderkl import AutoencoderKL
from monai_diffusion.networks.builders import build_autoencoder

from helpers import tiny_config_dict, write_hub, write_volumes

ROOT = Path(__file__).resolve().parents[1]


def make_config(data_dir: Path, output_dir: Path, *overrides: str):
    return config_from_dict(apply_overrides(tiny_config_dict(data_dir, output_dir), list(overrides)))


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_cli_fast_dev_run_writes_checkpoint_logs_and_panel(tiny_config_file, tmp_path):
    result = run_cli("-m", "monai_diffusion.cli", "train-autoencoder", "--config", str(tiny_config_file),
                     "--set", "fast_dev_run=true", "--set", "output.run_name=dev")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "dev"
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["kind"] == "autoencoder" and checkpoint["step"] == 2
    assert set(checkpoint) >= {"autoencoder", "optimizer_g", "scaler_g", "lr_scheduler_g", "rng", "config", "epoch"}
    assert checkpoint["config"]["autoencoder"]["downsample_factors"] == [2]
    assert list((run / "images").glob("reconstruction-step*.png"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    assert "effective batch size 1" in result.stderr


def test_file_path_entry_point_runs():
    result = run_cli("monai_diffusion/train_autoencoder.py", "--help")
    assert result.returncode == 0 and "--resume" in result.stdout


def test_invalid_config_exits_2_listing_every_problem(tiny_config_file):
    result = run_cli("-m", "monai_diffusion.train_autoencoder", "--config", str(tiny_config_file),
                     "--set", "autoencoder.downsample_factors=[3]", "--set", "autoencoder.latnt_channels=4")
    assert result.returncode == 2
    assert "autoencoder.latnt_channels: unknown key (did you mean 'autoencoder.latent_channels'?)" in result.stderr
    assert "axis 0 size 16 is not divisible by the total factor 3" in result.stderr


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["autoencoder"]


def test_accumulation_matches_one_large_batch(tmp_path, monkeypatch):
    """k micro-batches of b accumulate to the same update as one batch of k*b (adversarial off)."""
    data = tmp_path / "two"
    write_volumes(data, 2)
    # The latent sample draws noise whose stream depends on the batch split; use the mean to compare updates.
    monkeypatch.setattr(AutoencoderKL, "sampling", lambda self, mu, sigma: mu)
    # SGD makes the weight change proportional to the gradient; Adam's first step is ~lr * sign(grad),
    # which turns rounding noise in near-zero gradients into full-size differences.
    monkeypatch.setattr(steps, "build_optimizer",
                        lambda params, lr, weight_decay, eps: torch.optim.SGD(params, lr=lr))
    common = ["data.val_fraction=0", "autoencoder.training.max_steps=1", "autoencoder.training.grad_clip=null",
              "autoencoder.training.kl_weight=0.01"]
    one_batch = train_autoencoder.train(make_config(data, tmp_path / "a", *common, "output.run_name=a",
                                                    "autoencoder.training.batch_size=2"))
    accumulated = train_autoencoder.train(make_config(
        data, tmp_path / "b", *common, "output.run_name=b", "autoencoder.training.batch_size=1",
        "autoencoder.training.gradient_accumulation_steps=2"))
    a, b = final_weights(one_batch), final_weights(accumulated)
    assert a.keys() == b.keys()
    mismatched = [key for key in a if not torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7)]
    assert not mismatched, mismatched
    # ...and the step really moved the weights: compare with the initial ones (the recipe seeds, then builds).
    config = make_config(data, tmp_path / "a", *common)
    torch.manual_seed(config.seed)
    initial = build_autoencoder(config.autoencoder).state_dict()
    moved = [key for key in a if not torch.equal(a[key], initial[key])]
    assert len(moved) > len(a) // 2


def test_resume_mid_epoch_gives_the_same_weights_as_a_straight_run(tmp_path, nifti_folder):
    """k steps + resume + (n-k) steps == n steps straight, discriminator and RNG included (CPU, fp32)."""
    settings = ["autoencoder.training.adv_weight=0.1", "autoencoder.training.adv_start_step=1",
                "autoencoder.training.max_epochs=3"]
    straight = train_autoencoder.train(make_config(nifti_folder, tmp_path / "s", *settings,
                                                   "autoencoder.training.max_steps=5", "output.run_name=s"))
    first = train_autoencoder.train(make_config(nifti_folder, tmp_path / "r", *settings,
                                                "autoencoder.training.max_steps=2", "output.run_name=r"))
    assert load_checkpoint(first / "checkpoints" / "last.pt")["batches_in_epoch"] == 2  # stopped mid-epoch
    resumed = train_autoencoder.train(make_config(nifti_folder, tmp_path / "r", *settings,
                                                  "autoencoder.training.max_steps=5", "output.run_name=r"),
                                      resume="auto")
    assert resumed == first
    a, b = load_checkpoint(straight / "checkpoints" / "last.pt"), load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 5
    for part in ("autoencoder", "discriminator"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-6, msg=f"{part}.{key}")


def test_a_schedule_in_epochs_advances_once_per_finished_epoch(tmp_path, nifti_folder):
    """MAISI's per-epoch warm-up as MultiStepLR from lr/100, gamma 10 at epochs [1, 2]: both optimizers follow it."""
    run = train_autoencoder.train(make_config(
        nifti_folder, tmp_path, "autoencoder.training.max_epochs=2", "autoencoder.training.lr=1e-6",
        "autoencoder.training.disc_lr=1e-6", "autoencoder.training.adv_weight=0.1",
        "autoencoder.training.lr_schedule=multistep", "autoencoder.training.lr_milestones=[1,2]",
        "autoencoder.training.lr_gamma=10", "autoencoder.training.lr_schedule_interval=epoch"))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["lr_scheduler_g"]["last_epoch"] == state["lr_scheduler_d"]["last_epoch"] == 2
    for optimizer in ("optimizer_g", "optimizer_d"):
        assert state[optimizer]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_resume_refuses_a_different_architecture_listing_both_values(tmp_path, nifti_folder):
    run = train_autoencoder.train(make_config(nifti_folder, tmp_path, "autoencoder.training.max_steps=1"))
    changed = make_config(nifti_folder, tmp_path, "autoencoder.latent_channels=3", "autoencoder.training.max_steps=2")
    with pytest.raises(ValueError, match=r"autoencoder.latent_channels: checkpoint 2, config 3"):
        train_autoencoder.train(changed, resume=str(run))


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path, nifti_folder):
    with pytest.raises(ValueError, match="no checkpoint"):
        train_autoencoder.train(make_config(nifti_folder, tmp_path, "autoencoder.training.max_steps=1"), resume="true")


def test_consecutive_nonfinite_losses_stop_the_run_naming_the_step(tmp_path, nifti_folder, monkeypatch):
    monkeypatch.setattr(steps, "kl_loss", lambda mu, sigma: torch.tensor(float("nan")))
    config = make_config(nifti_folder, tmp_path, "autoencoder.training.max_nonfinite_steps=2",
                         "autoencoder.training.max_epochs=2")
    with pytest.raises(RuntimeError, match=r"2 consecutive non-finite losses.*step 1"):
        train_autoencoder.train(config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_gloo(tiny_config_file, tmp_path):
    result = run_cli(
        "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "monai_diffusion.train_autoencoder", "--config", str(tiny_config_file),
        "--set", "autoencoder.training.max_steps=2", "--set", "autoencoder.training.max_epochs=3",
        "--set", "autoencoder.training.gradient_accumulation_steps=2",
        "--set", "output.run_name=ddp",
        env_extra={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size 4 (batch 1 x accumulation 2 x 2 process(es))" in result.stderr
    checkpoint = load_checkpoint(tmp_path / "runs" / "ddp" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu(tmp_path, nifti_folder, precision):
    """bf16 autocast, and fp16 with a GradScaler per optimizer (adversarial on, so both scalers run)."""
    run = train_autoencoder.train(make_config(
        nifti_folder, tmp_path, f"device.mixed_precision={precision}", "autoencoder.training.max_steps=2",
        "autoencoder.training.adv_weight=0.1"))
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["autoencoder"].values() if v.is_floating_point())
    if precision == "fp16":
        assert checkpoint["scaler_g"] and checkpoint["scaler_d"]  # both scalers were used and saved


def test_perceptual_loss_without_local_weights_says_how_to_provide_them(tmp_path, nifti_folder):
    config = make_config(nifti_folder, tmp_path, "autoencoder.training.use_perceptual_loss=true",
                         f"autoencoder.training.perceptual_weights={tmp_path / 'empty-hub'}")
    with pytest.raises(FileNotFoundError, match=r"(?s)no weights for perceptual network 'squeeze'.*Either run once "
                       r"where the internet is reachable.*perceptual_weights to it \(offline"):
        train_autoencoder.train(config)


def test_perceptual_loss_trains_from_an_offline_hub_folder(tmp_path, nifti_folder):
    hub = write_hub(tmp_path / "hub")
    hub_before = torch.hub.get_dir()
    run = train_autoencoder.train(make_config(
        nifti_folder, tmp_path, "autoencoder.training.use_perceptual_loss=true", "autoencoder.training.max_steps=2",
        "autoencoder.training.perceptual_network=medicalnet_resnet10_23datasets",
        f"autoencoder.training.perceptual_weights={hub}"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert torch.hub.get_dir() == hub_before  # the offline folder does not stick as torch hub's folder


def test_perceptual_loss_uses_torch_hubs_own_folder_once_filled(tmp_path, nifti_folder, monkeypatch):
    """perceptual_weights unset: MONAI loads from torch hub's folder ($TORCH_HOME/hub), filled on first use."""
    write_hub(tmp_path / "torch-home" / "hub")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    run = train_autoencoder.train(make_config(
        nifti_folder, tmp_path, "autoencoder.training.use_perceptual_loss=true", "autoencoder.training.max_steps=1",
        "autoencoder.training.perceptual_network=medicalnet_resnet10_23datasets"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1


def test_perceptual_loss_download_failure_says_both_ways(tmp_path, nifti_folder, monkeypatch):
    from urllib.error import URLError

    def no_network(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setattr(torch.hub, "load", no_network)
    config = make_config(nifti_folder, tmp_path, "autoencoder.training.use_perceptual_loss=true",
                         "autoencoder.training.perceptual_network=medicalnet_resnet10_23datasets")
    with pytest.raises(FileNotFoundError, match=r"(?s)could not get the weights.*URLError.*Either run once where the "
                       r"internet is reachable.*empty-home.*set autoencoder.training.perceptual_weights"):
        train_autoencoder.train(config)
    assert not list((tmp_path / "runs").glob("autoencoder-*/checkpoints/*.pt"))


@pytest.mark.parametrize("kind", ["ssim", "ms_ssim"])
def test_structural_loss_term_is_trained_and_logged(tmp_path, kind):
    """The SSIM / MS-SSIM term joins L1 (on 32^3 volumes MS-SSIM has room for 2 scales)."""
    from monai_diffusion.losses import StructuralLoss

    images = torch.rand(2, 1, 32, 32, 32)
    loss = StructuralLoss(kind, 3, data_range=1.0)
    assert float(loss(images, images)) == pytest.approx(0.0, abs=1e-5)
    noisy = (images + 0.3 * torch.randn_like(images)).requires_grad_(True)
    value = loss(noisy, images)
    value.backward()
    assert float(value.detach()) > 0.1 and noisy.grad.abs().sum() > 0

    folder = tmp_path / "images32"
    write_volumes(folder, 3, shape=(32, 32, 32))
    run = train_autoencoder.train(make_config(
        folder, tmp_path, "data.voxel_size=[32,32,32]", "autoencoder.training.max_steps=2",
        "autoencoder.training.ssim_weight=0.5", f"autoencoder.training.ssim_type={kind}"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert f"train/{kind}" in events.Tags()["scalars"]
