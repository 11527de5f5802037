"""train-autoencoder: real training steps on real NIfTI files, through the CLI and in-process."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from monai_diffusion import latents, steps, train_autoencoder
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.engine.checkpoint import load_checkpoint, weights_digest
from monai_diffusion.engine.loop import TrainingStopped
from monai_diffusion.networks.autoencoderkl import AutoencoderKL
from monai_diffusion.networks.builders import build_autoencoder

from signal_hook import TEST_SIGNAL_ENV
from helpers import (check_mlflow_run, differences, free_port, record_compiles, run_python, run_torchrun,
                     tiny_config_dict, write_hub, write_volumes)

ROOT = Path(__file__).resolve().parents[1]


def make_config(data_dir: Path, output_dir: Path, *overrides: str):
    return config_from_dict(apply_overrides(tiny_config_dict(data_dir, output_dir), list(overrides)))


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return run_python(*args, env_extra=env_extra)


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


def test_mlflow_gets_the_config_every_scalar_the_panels_and_the_checkpoints(nifti_folder, tmp_path):
    pytest.importorskip("mlflow")
    config = make_config(nifti_folder, tmp_path, "output.loggers=[tensorboard, mlflow]",
                         "autoencoder.training.max_steps=2")
    run = train_autoencoder.train(config)
    client, tracked = check_mlflow_run(run, config, "autoencoder")
    assert tracked.data.params["autoencoder.downsample_factors"] == "[2]"
    assert {"train/recon_l1", "train/kl", "train/lr", "val/l1", "val/psnr", "val/ssim"} <= set(tracked.data.metrics)
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "train/recon_l1")] == [1, 2]
    assert tracked.data.tags["best_checkpoint"] == str((run / "checkpoints" / "best.pt").resolve())
    # The panel the run folder keeps, as an artifact.
    [panel] = client.list_artifacts(tracked.info.run_id, "val")
    assert panel.path == "val/reconstruction-step00000002.png"
    assert (run / "images" / "reconstruction-step00000002.png").is_file()


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


def test_torchrun_two_cpu_processes_gloo(tiny_config_file, tmp_path):
    result = run_torchrun(
        "monai_diffusion.train_autoencoder", "--config", str(tiny_config_file),
        "--set", "autoencoder.training.max_steps=2", "--set", "autoencoder.training.max_epochs=3",
        "--set", "autoencoder.training.gradient_accumulation_steps=2", "--set", "output.run_name=ddp",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size 4 (batch 1 x accumulation 2 x 2 process(es))" in result.stderr
    checkpoint = load_checkpoint(tmp_path / "runs" / "ddp" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 2



def test_compiled_training_saves_plain_networks_and_resumes_either_way(tmp_path, nifti_folder, monkeypatch):
    compiles = record_compiles(monkeypatch)
    common = ("autoencoder.training.adv_weight=0.1", "autoencoder.training.max_epochs=3",
              "autoencoder.training.use_gradient_checkpointing=true")
    run = train_autoencoder.train(make_config(nifti_folder, tmp_path, *common, "autoencoder.training.max_steps=4",
                                              "device.compile=true", "device.compile_mode=max-autotune"))
    # The autoencoder and the discriminator, each traced while training.
    assert [mode for mode, _ in compiles] == ["max-autotune"] * 2 and all(graphs for _, graphs in compiles)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    for network in ("autoencoder", "discriminator"):
        assert not [key for key in state[network] if "_orig_mod" in key or key.startswith("module.")]
    plain = build_autoencoder(make_config(nifti_folder, tmp_path).autoencoder)
    plain.load_state_dict(state["autoencoder"])  # loads into a network that was never compiled

    # A compiled run resumes without compile, and a plain run with it.
    resumed = train_autoencoder.train(make_config(nifti_folder, tmp_path, *common, "autoencoder.training.max_steps=6"),
                                      resume=str(run))
    assert resumed == run and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 6 and len(compiles) == 2
    again = train_autoencoder.train(make_config(nifti_folder, tmp_path, *common, "autoencoder.training.max_steps=8",
                                                "device.compile=true"), resume=str(run))
    assert load_checkpoint(again / "checkpoints" / "last.pt")["step"] == 8
    assert [mode for mode, _ in compiles] == ["max-autotune"] * 2 + ["default"] * 2

def test_patch_training_validates_whole_volumes_window_by_window(tmp_path, nifti_folder, monkeypatch):
    """Foreground-weighted 8^3 patches of the 16^3 volumes for training; validation reconstructs the whole volumes
    through MONAI's sliding window at the patch size (evaluate does the same by default)."""
    micro, windows = [], []
    original_step, original_window = steps.autoencoder_micro_step, latents.sliding_window_inference

    def step(parts, images, *args, **kwargs):
        micro.append(tuple(images.shape))
        return original_step(parts, images, *args, **kwargs)

    def window(inputs, roi_size, *args, **kwargs):
        windows.append((tuple(inputs.shape), list(roi_size)))
        return original_window(inputs, roi_size, *args, **kwargs)

    monkeypatch.setattr(steps, "autoencoder_micro_step", step)
    monkeypatch.setattr(latents, "sliding_window_inference", window)
    run = train_autoencoder.train(make_config(
        nifti_folder, tmp_path, "autoencoder.training.patch_size=[8,8,8]", "autoencoder.training.max_steps=2",
        "autoencoder.training.patch_foreground_ratio=0.5"))
    assert micro == [(1, 1, 8, 8, 8)] * 2
    assert windows == [((1, 1, 16, 16, 16), [8, 8, 8])]  # the one validation volume, whole, in 8^3 windows
    assert load_checkpoint(run / "checkpoints" / "last.pt")["best_val_l1"] < 1

@pytest.mark.slow  # each rank compiles the autoencoder and the discriminator with inductor: minutes on 2 cores
def test_torchrun_compiled_over_ddp_with_accumulation_keeps_the_replicas_equal(tiny_config_file, tmp_path):
    """torch.compile over DDP, two micro-batches per step (the first under DDP's no_sync), the memory-saving path and
    the adversarial step: both ranks end with the same weights, and the checkpoint holds the plain networks."""
    result = run_torchrun(
        "monai_diffusion.train_autoencoder", "--config", str(tiny_config_file),
        "--set", "autoencoder.training.max_steps=2", "--set", "autoencoder.training.max_epochs=3",
        "--set", "autoencoder.training.gradient_accumulation_steps=2", "--set", "device.compile=true",
        "--set", "autoencoder.training.use_gradient_checkpointing=true", "--set", "autoencoder.training.adv_weight=0.1",
        "--set", "output.run_name=ddp-compiled",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "runs" / "ddp-compiled" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 2
    saved = weights_digest(checkpoint["autoencoder"], checkpoint["discriminator"])
    assert checkpoint["weights_sha256"] == [saved, saved]

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


# ------------------------------------------------------------------ SIGINT / SIGTERM: stop at a step boundary, resume

# 4 training volumes, batch 1, accumulation 2: 4 micro-batches and 2 optimizer steps per epoch; 5 steps over 3
# epochs, the discriminator from step 1, a warm-up: every piece of state a resume must restore moves.
STOP_SETTINGS = ["autoencoder.training.adv_weight=0.1", "autoencoder.training.adv_start_step=1",
                 "autoencoder.training.gradient_accumulation_steps=2", "autoencoder.training.warmup_steps=3",
                 "autoencoder.training.max_epochs=3", "autoencoder.training.max_steps=5"]


def checkpoints(run: Path) -> dict[str, dict]:
    """Every checkpoint of a run by name, without the config (it names the run's own folders)."""
    return {path.name: {k: v for k, v in load_checkpoint(path).items() if k != "config"}
            for path in sorted((run / "checkpoints").glob("*.pt"))}


@pytest.fixture
def python_and_numpy_in_the_loss(monkeypatch):
    """The KL term scaled by draws from Python's and NumPy's global generators: the weights then depend on both
    streams, which a resume must seed and restore like torch's."""
    original = steps.kl_loss
    monkeypatch.setattr(steps, "kl_loss", lambda mu, sigma: original(mu, sigma) * (
        1 + 0.1 * np.random.rand() + 0.1 * random.random()))


@pytest.fixture
def straight_run(tmp_path, nifti_folder, python_and_numpy_in_the_loss):
    return checkpoints(train_autoencoder.train(make_config(nifti_folder, tmp_path / "straight", *STOP_SETTINGS)))


@pytest.mark.parametrize("signal_name, micro_batch, step, position", [
    ("SIGINT", 0, 1, (0, 2)),   # before step 1's first micro-batch: step 1 still completes
    ("SIGTERM", 3, 2, (1, 0)),  # during the step that ends epoch 1: it validates and saves, then stops
    ("SIGINT", 5, 3, (1, 2)),   # between the two micro-batches of step 3
])
def test_a_stop_signal_saves_the_last_step_and_resume_is_bit_exact(tmp_path, nifti_folder, straight_run, monkeypatch,
                                                                   signal_name, micro_batch, step, position):
    config = make_config(nifti_folder, tmp_path / "stopped", *STOP_SETTINGS)
    monkeypatch.setenv(TEST_SIGNAL_ENV, f"{signal_name}:{micro_batch}")
    with pytest.raises(TrainingStopped) as stopped:
        train_autoencoder.train(config)
    assert stopped.value.step == step and stopped.value.exit_code == 128 + signal.Signals[signal_name]
    (run,) = (tmp_path / "stopped").glob("autoencoder-*")
    assert stopped.value.checkpoint == run / "checkpoints" / "last.pt"
    partial = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (partial["step"], partial["epoch"], partial["batches_in_epoch"]) == (step, *position)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back

    monkeypatch.delenv(TEST_SIGNAL_ENV)
    assert train_autoencoder.train(config, resume="auto") == run
    resumed = checkpoints(run)
    assert resumed.keys() == straight_run.keys()  # last, best and the kept step checkpoints
    assert differences(straight_run, resumed) == []  # weights, optimizers, scalers, LR schedules, RNG, position


def test_a_stopped_run_is_killed_in_mlflow_and_its_resume_continues_the_same_run(tmp_path, nifti_folder, monkeypatch):
    pytest.importorskip("mlflow")
    config = make_config(nifti_folder, tmp_path, *STOP_SETTINGS, "output.loggers=[tensorboard, mlflow]")
    monkeypatch.setenv(TEST_SIGNAL_ENV, "SIGTERM:4")  # after optimizer step 2
    with pytest.raises(TrainingStopped):
        train_autoencoder.train(config)
    (run,) = tmp_path.glob("autoencoder-*")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    [stopped] = client.search_runs([client.get_experiment_by_name("train-autoencoder").experiment_id])
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["checkpoint"] == str((run / "checkpoints" / "last.pt").resolve())

    monkeypatch.delenv(TEST_SIGNAL_ENV)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    assert train_autoencoder.train(config, resume="auto") == run
    _, resumed = check_mlflow_run(run, config, "autoencoder")  # the same run, every step's scalars as TensorBoard's
    assert resumed.info.run_id == stopped.info.run_id
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train/recon_l1")] == [1, 2, 3, 4, 5]


def test_a_second_ctrl_c_stops_at_once_and_a_failed_start_leaves_nothing(tmp_path, tiny_config_file, monkeypatch,
                                                                         caplog):
    """Ctrl-C twice during the first step: no checkpoint can hold a half step, so nothing is saved, the new run's
    folder is removed, and the command ends with one line and 130."""
    original = steps.autoencoder_update

    def update_interrupted_again(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(steps, "autoencoder_update", update_interrupted_again)
    monkeypatch.setenv(TEST_SIGNAL_ENV, "SIGINT:0")
    assert train_autoencoder.main(["--config", str(tiny_config_file)]) == 130
    assert "interrupted: stopped at once; nothing saved since the last checkpoint" in caplog.text
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["cache"]  # the screening cache, no run folder
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_on_the_command_line_then_resume_auto_matches_a_straight_run(tmp_path, nifti_folder):
    """Ctrl-C in a terminal: SIGINT to the whole process group (the persistent DataLoader worker too) at an
    arbitrary moment of training. The command ends with 130 and one line; --resume auto finishes bit-identically."""
    settings = [*STOP_SETTINGS, "autoencoder.training.max_steps=12", "autoencoder.training.max_epochs=6",
                "autoencoder.training.val_every_n_epochs=6", "data.num_workers=1"]
    config_file = tmp_path / "stop.yaml"
    config_file.write_text(yaml.safe_dump(apply_overrides(tiny_config_dict(nifti_folder, tmp_path / "runs"), settings)))
    command = [sys.executable, "-m", "monai_diffusion.cli", "train-autoencoder", "--config", str(config_file)]
    log = tmp_path / "stopped.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([*command, "--set", "output.run_name=r"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=stderr, start_new_session=True,
                                   env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 240
        while max(map(int, re.findall(r"step=(\d+)", log.read_text())), default=0) < 2:  # the progress bar
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    run = tmp_path / "runs" / "r"
    assert "Traceback" not in output
    assert output.count("SIGINT: stopping after the current optimizer step") == 1  # the workers stay quiet
    last_line = output.strip().splitlines()[-1]
    assert re.search(rf"W stopped by SIGINT after optimizer step (\d+): {run}/checkpoints/last.pt holds that step; "
                     rf"continue with --resume auto \(or --resume {run}\)$", last_line), last_line
    stopped_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 2 <= stopped_at < 12

    # One thread in every run: a 2-thread convolution sums in another order, and bit-equality needs the same order.
    one_thread = {"OMP_NUM_THREADS": "1"}
    resumed = run_cli(*command[1:], "--set", "output.run_name=r", "--resume", "auto", env_extra=one_thread)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/last.pt (step {stopped_at}," in resumed.stderr
    straight = run_cli(*command[1:], "--set", "output.run_name=s", env_extra=one_thread)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert differences(checkpoints(tmp_path / "runs" / "s"), checkpoints(run)) == []


def test_torchrun_ranks_stop_at_the_same_step(tiny_config_file, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step, and last.pt keeps each rank's RNG."""
    result = run_torchrun(
        "monai_diffusion.train_autoencoder", "--config", str(tiny_config_file),
        *(f"--set={setting}" for setting in STOP_SETTINGS), "--set", "output.run_name=ddp",
        env_extra={TEST_SIGNAL_ENV: "SIGTERM:0:1"},
    )
    # 4 training volumes on 2 ranks: 2 micro-batches per rank and epoch, one optimizer step.
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] stopped by SIGTERM after optimizer step 1:" in result.stderr, result.stderr[-3000:]
    assert f'File "{ROOT / "monai_diffusion"}' not in result.stderr  # no traceback from our code (torchrun has its own)
    checkpoint = load_checkpoint(tmp_path / "runs" / "ddp" / "checkpoints" / "last.pt")
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["batches_in_epoch"]) == (1, 1, 0)
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    assert checkpoint["weights_sha256"][0] == checkpoint["weights_sha256"][1]


@pytest.mark.slow
def test_torchrun_resume_after_a_stop_is_bit_exact(tiny_config_file, tmp_path):
    """Two ranks: stopped mid-epoch on SIGTERM, resumed, equal to a straight run (each rank its own RNG state)."""
    settings = [f"--set={s}" for s in STOP_SETTINGS] + ["--set=autoencoder.training.gradient_accumulation_steps=1"]

    def torchrun(run_name: str, *extra: str, signal_at: str | None = None) -> subprocess.CompletedProcess:
        return run_torchrun("monai_diffusion.train_autoencoder", "--config", str(tiny_config_file), *settings,
                            f"--set=output.run_name={run_name}", *extra,
                            env_extra={TEST_SIGNAL_ENV: signal_at} if signal_at else None)

    stopped = torchrun("r", signal_at="SIGTERM:2:0")  # rank 0, before epoch 2's first micro-batch
    assert "[rank 1] stopped by SIGTERM after optimizer step 3:" in stopped.stderr, stopped.stderr[-3000:]
    partial = load_checkpoint(tmp_path / "runs" / "r" / "checkpoints" / "last.pt")
    assert (partial["step"], partial["epoch"], partial["batches_in_epoch"]) == (3, 1, 1)
    for run_name, extra in (("r", ["--resume=auto"]), ("s", [])):
        finished = torchrun(run_name, *extra)
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert differences(checkpoints(tmp_path / "runs" / "s"), checkpoints(tmp_path / "runs" / "r")) == []


def test_two_nodes_of_one_process_each_finish_with_identical_weights(tiny_config_file, tmp_path):
    """The two-node launch of docs/training.md, both "nodes" on this machine: torchrun --nnodes=2 --node_rank=0|1
    meeting at node 0's address and port, one process each, gloo."""
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = []
    for node_rank in (0, 1):
        log = open(tmp_path / f"node{node_rank}.log", "w")
        nodes.append((log, subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
             "-m", "monai_diffusion.train_autoencoder", "--config", str(tiny_config_file),
             "--set", "autoencoder.training.max_steps=3", "--set", "autoencoder.training.max_epochs=2",
             "--set", "output.run_name=nodes"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
    try:
        codes = [process.wait(timeout=300) for _, process in nodes]
    finally:
        for log, process in nodes:
            log.close()
            if process.poll() is None:
                process.kill()
    outputs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "effective batch size 2 (batch 1 x accumulation 1 x 2 process(es))" in outputs[0]
    checkpoint = load_checkpoint(tmp_path / "runs" / "nodes" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 3
    # Each rank hashed its own weights when the checkpoint was written: rank 0's are the saved ones, rank 1's equal.
    saved = weights_digest(checkpoint["autoencoder"], checkpoint["discriminator"])
    assert checkpoint["weights_sha256"] == [saved, saved]
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])  # seeded per rank


# ------------------------------------------------------------------ no litter: failed starts, killed saves


def bad_data(tmp_path: Path, nifti_folder: Path, kind: str) -> list[str]:
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return [f"data.data_dir={tmp_path / 'empty'}"]
    if kind == "missing datalist entry":
        datalist = tmp_path / "list.json"
        datalist.write_text(json.dumps({"training": [{"image": str(nifti_folder / "vol_00.nii.gz")},
                                                     {"image": str(tmp_path / "gone.nii.gz")}]}))
        return ["data.source=datalist", f"data.datalist={datalist}"]
    (nifti_folder / "vol_99.nii.gz").write_bytes(b"not a NIfTI file")
    return []


@pytest.mark.parametrize("kind", ["empty folder", "missing datalist entry", "bad file"])
def test_a_failed_start_leaves_no_run_folder(tmp_path, nifti_folder, kind):
    config = make_config(nifti_folder, tmp_path / "runs", *bad_data(tmp_path, nifti_folder, kind))
    with pytest.raises((ValueError, FileNotFoundError)):
        train_autoencoder.train(config)
    assert not list((tmp_path / "runs").glob("autoencoder-*"))


def test_a_run_failing_in_its_first_step_leaves_no_run_folder(tmp_path, nifti_folder, monkeypatch):
    monkeypatch.setattr(steps, "kl_loss", lambda mu, sigma: torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="1 consecutive non-finite losses"):
        train_autoencoder.train(make_config(nifti_folder, tmp_path, "autoencoder.training.max_nonfinite_steps=1"))
    assert not list((tmp_path / "runs").glob("autoencoder-*"))


def test_temp_files_of_killed_saves_are_removed_when_the_next_run_or_resume_starts(tmp_path, nifti_folder):
    host = socket.gethostname()
    old = train_autoencoder.train(make_config(nifti_folder, tmp_path, "autoencoder.training.max_steps=1"))
    dead_writer = old / "checkpoints" / f".last.pt.{2**22 + 1}@{host}.{'a' * 32}.tmp"  # beyond any pid: gone
    live_writer = old / "checkpoints" / f".last.pt.{os.getpid()}@{host}.{'b' * 32}.tmp"
    dead_writer.write_bytes(b"partial")
    live_writer.write_bytes(b"being written")

    new = train_autoencoder.train(make_config(nifti_folder, tmp_path, "autoencoder.training.max_steps=1"))
    assert new != old and not dead_writer.exists() and live_writer.exists()
    train_autoencoder.train(make_config(nifti_folder, tmp_path, "autoencoder.training.max_steps=2"),
                            resume=str(old))
    assert not list((old / "checkpoints").glob(".*.tmp"))  # the resumed run owns its folder
    assert load_checkpoint(old / "checkpoints" / "last.pt")["step"] == 2


def test_a_taken_run_name_gets_a_suffix_and_resume_continues_the_newest(tmp_path, nifti_folder):
    settings = ["output.run_name=exp", "autoencoder.training.max_epochs=2"]
    first = train_autoencoder.train(make_config(nifti_folder, tmp_path, *settings, "autoencoder.training.max_steps=1"))
    second = train_autoencoder.train(make_config(nifti_folder, tmp_path, *settings, "autoencoder.training.max_steps=1"))
    assert (first.name, second.name) == ("exp", "exp-2")
    assert train_autoencoder.train(make_config(nifti_folder, tmp_path, *settings, "autoencoder.training.max_steps=2"),
                                   resume="auto") == second
    assert load_checkpoint(first / "checkpoints" / "last.pt")["step"] == 1  # untouched
