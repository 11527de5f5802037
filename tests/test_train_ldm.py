"""train-ldm on tiny CPU models: latent cache reuse, scale factor, exact resume with EMA, diffusion targets, errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from signal_hook import TEST_SIGNAL_ENV
from helpers import (SUBPROCESS_HOOKS, check_mlflow_run, differences, old_layout, record_compiles, run_torchrun,
                     save_autoencoder)
import torch

from monai_diffusion import latents
from monai_diffusion import train_ldm as recipe
from monai_diffusion.diffusion import diffusion_loss
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.config import config_from_dict, save_config
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.engine.loop import TrainingStopped
from monai_diffusion.generation import sample
from monai_diffusion.networks.builders import build_autoencoder, build_scheduler

AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
LDM_KEYS = {
    "kind", "unet", "ema", "optimizer", "scaler", "lr_scheduler", "step", "epoch", "batches_in_epoch", "rng",
    "config", "scale_factor", "autoencoder_checkpoint", "autoencoder_hash", "latent_shape", "affine",
    "weights_sha256", "format_version",
}


def write_volumes(folder: Path, count: int, shape=(18, 16, 14)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), AFFINE), folder / f"vol{index}.nii.gz")


def tiny_raw(tmp_path: Path, scheduler: str = "ddpm", **training) -> dict:
    return {
        "data": {"source": "folder", "data_dir": str(tmp_path / "data"), "voxel_size": [16, 16, 16],
                 "cache": "none", "val_fraction": 0.0},
        "autoencoder": {"num_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2, "downsample_factors": [2],
                        "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "ldm": {
            "unet": {"num_channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                     "num_head_channels": 8},
            "scheduler": {"type": scheduler, "num_train_timesteps": 100},
            "training": {"batch_size": 1, "max_epochs": None, "max_steps": 1, "val_every_n_epochs": 100,
                         "ema_decay": 0.9, "scale_factor_volumes": 2, **training},
            "sampling": {"num_inference_steps": 2},
        },
        "device": {"device": "cpu"},
        "output": {"output_dir": str(tmp_path / "out"), "log_every_n_steps": 1},
        "seed": 3,
    }




@pytest.fixture
def setup(tmp_path):
    """Four volumes and an autoencoder run in <output_dir>; returns a function raw-overrides -> Config."""
    write_volumes(tmp_path / "data", 4)
    base = config_from_dict(tiny_raw(tmp_path))
    save_autoencoder(base, tmp_path / "out" / "autoencoder-1" / "checkpoints" / "best.pt")

    def make(scheduler: str = "ddpm", **training):
        return config_from_dict(tiny_raw(tmp_path, scheduler, **training))

    return make


def count_encodes(monkeypatch) -> list:
    calls = []
    original = latents.encode_volume
    monkeypatch.setattr(latents, "encode_volume", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_cache_built_once_reused_and_rebuilt_for_a_new_autoencoder(setup, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    config = setup()
    run = recipe.train(config)
    caches = sorted((tmp_path / "out" / "latent_cache").iterdir())
    assert len(calls) == 4 and len(caches) == 1 and len(list(caches[0].glob("*.pt"))) == 4
    mtimes = {p: p.stat().st_mtime_ns for p in caches[0].glob("*.pt")}
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert set(state) == LDM_KEYS and state["kind"] == "ldm" and state["step"] == 1
    assert state["latent_shape"] == [2, 8, 8, 8]
    assert state["autoencoder_checkpoint"] == str(tmp_path / "out/autoencoder-1/checkpoints/best.pt")
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").iterdir())
    assert (run / "samples" / "sample-step00000001.nii.gz").is_file()
    assert (run / "samples" / "sample-step00000001.png").is_file()

    recipe.train(setup())  # a second run: nothing to encode, files untouched
    assert len(calls) == 4
    assert {p: p.stat().st_mtime_ns for p in caches[0].glob("*.pt")} == mtimes

    # A newer autoencoder (other weights) -> a new cache, every volume encoded again.
    save_autoencoder(config, tmp_path / "out" / "autoencoder-2" / "checkpoints" / "best.pt", seed=1)
    run = recipe.train(setup())
    assert len(calls) == 8 and len(list((tmp_path / "out" / "latent_cache").iterdir())) == 2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["autoencoder_checkpoint"].endswith("autoencoder-2/checkpoints/best.pt")


def test_mlflow_gets_the_config_every_scalar_the_sample_panel_and_the_checkpoint(setup):
    pytest.importorskip("mlflow")
    config = setup()
    config.output.loggers = ["tensorboard", "mlflow"]
    run = recipe.train(config)
    client, tracked = check_mlflow_run(run, config, "ldm")
    assert {"latent/scale_factor", "train/loss", "val/sample_mean"} <= set(tracked.data.metrics)
    assert [a.path for a in client.list_artifacts(tracked.info.run_id, "val")] == ["val/sample-step00000001.png"]


def test_exact_resume_with_ema_and_stored_scale_factor(setup, tmp_path, monkeypatch):
    # 4 volumes, batch 1, accumulation 2: 2 optimizer steps per epoch. 3 steps straight vs 1 (stops mid-epoch 1)
    # + resume to 3 (crossing into epoch 2), with warm-up so the LR schedule's position matters too.
    common = dict(gradient_accumulation_steps=2, warmup_steps=3, ema_decay=0.5)
    straight = recipe.train(setup(max_steps=3, **common))
    reference = load_checkpoint(straight / "checkpoints" / "last.pt")

    for run in (tmp_path / "out").glob("ldm-*"):  # keep the straight run out of --resume auto's reach
        run.rename(tmp_path / f"straight-{run.name}")
    first = recipe.train(setup(max_steps=1, **common))
    partial = load_checkpoint(first / "checkpoints" / "last.pt")
    assert (partial["step"], partial["epoch"], partial["batches_in_epoch"]) == (1, 0, 2)
    assert partial["scale_factor"] == reference["scale_factor"]

    # The scale factor must come from the checkpoint, even when the data would now give another value.
    def refuse(*args, **kwargs):
        raise AssertionError("scale factor recomputed on resume")

    monkeypatch.setattr(recipe, "compute_scale_factor", refuse)
    resumed_dir = recipe.train(setup(max_steps=3, **common), resume="auto")
    assert resumed_dir == first
    resumed = load_checkpoint(resumed_dir / "checkpoints" / "last.pt")
    assert resumed["step"] == 3 and resumed["scale_factor"] == partial["scale_factor"]
    for key in ("unet", "ema"):
        assert resumed[key].keys() == reference[key].keys()
        for name, value in reference[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=1e-6, atol=1e-7, msg=f"{key}.{name}")
    assert int(resumed["ema"]["n_averaged"]) == 3
    # The EMA really differs from the raw weights (it is not a copy).
    assert any(not torch.equal(resumed["ema"][f"module.{k}"], v) for k, v in resumed["unet"].items())
    assert resumed["lr_scheduler"] == reference["lr_scheduler"]


def test_on_the_fly_encoding_trains_without_a_cache(setup, tmp_path):
    run = recipe.train(setup(cache_latents=False))
    assert not (tmp_path / "out" / "latent_cache").exists()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 1 and math.isfinite(state["scale_factor"]) and state["affine"].shape == (4, 4)


def test_a_schedule_in_epochs_advances_once_per_finished_epoch(setup):
    """MultiStepLR with milestones in epochs (MONAI's tutorial: [100, 1000]): 2 epochs of 4 steps, milestone 1."""
    run = recipe.train(setup(max_steps=None, max_epochs=2, lr=0.01, lr_schedule="multistep", lr_milestones=[1],
                             lr_schedule_interval="epoch"))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["lr_scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)


# ---------------------------------------------------------------------------------------------------- errors


def test_a_screening_failure_leaves_no_run_folder(setup, tmp_path):
    (tmp_path / "data" / "vol9.nii.gz").write_bytes(b"not a NIfTI file")
    with pytest.raises(ValueError, match="vol9.nii.gz"):
        recipe.train(setup())
    assert not list((tmp_path / "out").glob("ldm-*"))


def test_mismatched_autoencoder_checkpoint_is_a_clear_error(setup, tmp_path, caplog):
    other = config_from_dict({**tiny_raw(tmp_path), "autoencoder": {**tiny_raw(tmp_path)["autoencoder"], "latent_channels": 3}})
    path = save_autoencoder(other, tmp_path / "ae3.pt")
    config = setup()
    config.ldm.autoencoder_checkpoint = path
    with pytest.raises(ValueError) as info:
        recipe.train(config)
    assert str(path) in str(info.value)
    assert "autoencoder.latent_channels: checkpoint 3, config 2" in str(info.value)

    argv = ["--set", f"data.data_dir={tmp_path / 'data'}"]
    for key, value in (("data.source", "folder"), ("data.voxel_size", "[16,16,16]"),
                       ("output.output_dir", tmp_path / "empty"), ("device.device", "cpu")):
        argv += ["--set", f"{key}={value}"]
    assert recipe.main(argv) == 1  # no autoencoder anywhere: an error message, exit status 1
    assert "No autoencoder checkpoint" in caplog.text and "autoencoder-*/checkpoints/best.pt" in caplog.text
    assert not list((tmp_path / "empty").glob("ldm-*"))  # a failed start leaves no run folder behind


def test_trains_and_samples_from_a_bundle_state_dict(setup, tmp_path):
    """A bare state dict in MONAI Generative's key layout (as the BraTS bundle releases its autoencoder) is
    enough to train the LDM on, and the LDM samples with it."""
    config = setup()
    torch.manual_seed(5)
    weights = build_autoencoder(config.autoencoder, 3).state_dict()
    old = old_layout(weights)
    assert set(old) != set(weights)  # the upsampling convolutions carry their old names
    torch.save(old, tmp_path / "model_autoencoder.pt")
    config.ldm.autoencoder_checkpoint = tmp_path / "model_autoencoder.pt"
    run = recipe.train(config)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 1 and state["autoencoder_hash"] == latents.state_dict_hash(weights)
    written = sample(config, num_samples=1, steps=2, checkpoint=run)
    assert len(written) == 1 and written[0].is_file()


def test_compiled_training_saves_the_plain_unet_and_its_ema(setup, monkeypatch):
    compiles = record_compiles(monkeypatch)
    config = setup(max_steps=2)
    config.device.compile = True
    run = recipe.train(config)
    assert [mode for mode, _ in compiles] == ["default"] and compiles[0][1]  # the UNet, traced while training
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert not [key for key in (*state["unet"], *state["ema"]) if "_orig_mod" in key]
    assert state["ema"]["n_averaged"].item() == 2
    config.device.compile = False
    recipe.train(setup(max_steps=3), resume=str(run))  # resumes without compile
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3

def test_an_autoencoder_trained_on_patches_gives_whole_volume_latents(setup):
    config = setup()
    config.autoencoder.training.patch_size = [8, 8, 8]
    state = load_checkpoint(recipe.train(config) / "checkpoints" / "last.pt")
    assert state["latent_shape"] == [2, 8, 8, 8]  # the 16^3 volume at factor 2, not an 8^3 patch's 4^3

def test_resume_refuses_a_changed_autoencoder(setup, tmp_path):
    config = setup()
    recipe.train(config)
    save_autoencoder(config, tmp_path / "out" / "autoencoder-1" / "checkpoints" / "best.pt", seed=7)
    with pytest.raises(ValueError, match="trained on latents of"):
        recipe.train(setup(max_steps=2), resume="true")


def test_latent_must_fit_the_unet_levels(tmp_path):
    # The config rule is the one check (the recipe does not repeat it). 16^3 at factor 2: an 8x8x8 latent.
    raw = tiny_raw(tmp_path)
    raw["ldm"]["unet"] |= {"num_channels": [8, 8, 16, 16], "attention_levels": [False] * 4}
    config_from_dict(raw)  # a 4-level UNet halves 3 times: 8 divides by 8
    raw["ldm"]["unet"] |= {"num_channels": [8, 8, 16], "attention_levels": [False] * 3}
    raw["data"]["voxel_size"] = [16, 12, 16]
    with pytest.raises(ValueError, match=r"ldm.unet.num_channels: the latent is \[8, 6, 8\].*divisible by 4"):
        config_from_dict(raw)


# ------------------------------------------------------------------------------------------ training targets


class Recorder(torch.nn.Module):
    """Stands in for the UNet: returns zeros and records its inputs, so the loss is mean(target ** 2)."""

    def forward(self, x, timesteps):
        self.x, self.timesteps = x, timesteps
        return torch.zeros_like(x)


@pytest.mark.parametrize("kind, prediction", [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("ddim", "sample"),
                                              ("rflow", None)])
def test_diffusion_loss_targets(setup, kind, prediction):
    config = setup(kind)
    if prediction:
        config.ldm.scheduler.prediction_type = prediction
    scheduler = build_scheduler(config.ldm.scheduler, kind, (2, 8, 8, 8))
    precision = resolve_precision(False, torch.device("cpu"))
    z = torch.randn(2, 2, 8, 8, 8)
    model = Recorder()
    torch.manual_seed(11)
    loss = diffusion_loss(model, scheduler, kind, z, precision=precision)
    torch.manual_seed(11)  # replay the same draws to build the expected target
    noise = torch.randn_like(z)
    if kind == "rflow":
        timesteps = scheduler.sample_timesteps(z)
        target = z - noise
    else:
        timesteps = torch.randint(0, 100, (2,))
        target = {"epsilon": noise, "sample": z, "v_prediction": scheduler.get_velocity(z, noise, timesteps)}[prediction]
    torch.testing.assert_close(model.timesteps.float(), timesteps.float())
    torch.testing.assert_close(model.x, scheduler.add_noise(z, noise, timesteps))
    torch.testing.assert_close(loss, (target**2).mean())


def test_rflow_velocity_target_is_monai_convention(setup):
    # With the exact velocity z - noise, one RFlowScheduler.step from t to 0 lands on the data: the target we
    # train on is the one MONAI's sampler integrates.
    scheduler = build_scheduler(setup("rflow").ldm.scheduler, "rflow", (2, 8, 8, 8))
    scheduler.set_timesteps(10, input_img_size_numel=512)
    z, noise = torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 8, 8, 8)
    t = scheduler.timesteps[3]
    noisy = scheduler.add_noise(z, noise, t.reshape(1))
    stepped, _ = scheduler.step(z - noise, t, noisy, torch.tensor(0))
    torch.testing.assert_close(stepped, z, atol=1e-5, rtol=1e-5)


def test_torchrun_two_cpu_processes_share_the_encoding(setup, tmp_path):
    """Each rank encodes its half of the volumes, waits at the barrier, then both train from the whole cache."""
    config_file = tmp_path / "ldm.yaml"
    save_config(setup(max_steps=2), config_file)
    result = run_torchrun("monai_diffusion.train_ldm", "--config", str(config_file), "--set", "output.run_name=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoding 2 of 4 volume(s) on rank 0" in result.stderr
    assert "effective batch size 2 (batch 1 x accumulation 1 x 2 process(es))" in result.stderr
    (cache,) = (tmp_path / "out" / "latent_cache").iterdir()
    assert len(list(cache.glob("*.pt"))) == 4
    state = load_checkpoint(tmp_path / "out" / "ddp" / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["ema"] is not None
    assert (tmp_path / "out" / "ddp" / "samples" / "sample-step00000002.nii.gz").is_file()


# ------------------------------------------------------------------ SIGINT / SIGTERM: stop at a step boundary, resume

ROOT = Path(__file__).resolve().parents[1]
# 4 volumes, batch 1, accumulation 2: 2 optimizer steps per epoch; 5 steps over 3 epochs with warm-up and EMA.
STOP_TRAINING = dict(gradient_accumulation_steps=2, warmup_steps=3, ema_decay=0.5, max_steps=5)


def checkpoints(run: Path) -> dict[str, dict]:
    """Every checkpoint of a run by name, without the config (it names the run's own folders)."""
    return {path.name: {k: v for k, v in load_checkpoint(path).items() if k != "config"}
            for path in sorted((run / "checkpoints").glob("*.pt"))}


@pytest.mark.parametrize("signal_name, micro_batch, step, position", [
    ("SIGTERM", 1, 1, (0, 2)),  # during step 1's second micro-batch
    ("SIGINT", 3, 2, (1, 0)),   # during the step that ends epoch 1: it saves the epoch's checkpoints, then stops
    ("SIGTERM", 4, 3, (1, 2)),  # before step 3's first micro-batch: step 3 still completes
])
def test_a_stop_signal_saves_the_last_step_and_resume_is_bit_exact(setup, tmp_path, monkeypatch, signal_name,
                                                                   micro_batch, step, position):
    straight = checkpoints(recipe.train(setup(**STOP_TRAINING)))
    for run in (tmp_path / "out").glob("ldm-*"):  # keep the straight run out of --resume auto's reach
        run.rename(tmp_path / f"straight-{run.name}")

    monkeypatch.setenv(TEST_SIGNAL_ENV, f"{signal_name}:{micro_batch}")
    with pytest.raises(TrainingStopped) as stopped:
        recipe.train(setup(**STOP_TRAINING))
    assert stopped.value.step == step and stopped.value.exit_code == 128 + signal.Signals[signal_name]
    partial = load_checkpoint(stopped.value.checkpoint)
    assert (partial["step"], partial["epoch"], partial["batches_in_epoch"]) == (step, *position)

    monkeypatch.delenv(TEST_SIGNAL_ENV)
    run = recipe.train(setup(**STOP_TRAINING), resume="auto")
    assert run == stopped.value.checkpoint.parent.parent
    resumed = checkpoints(run)
    assert resumed.keys() == straight.keys()
    assert differences(straight, resumed) == []  # UNet, EMA, optimizer, scaler, LR schedule, RNG, scale factor


def test_sigterm_on_the_command_line_then_resume_auto_matches_a_straight_run(setup, tmp_path):
    """A scheduler's SIGTERM during the step that crosses into epoch 2 (the test hook): the command ends with 143
    and one line, and --resume auto finishes it bit-identically to a straight run."""
    config_file = tmp_path / "ldm.yaml"
    save_config(setup(**STOP_TRAINING), config_file)
    command = [sys.executable, "-m", "monai_diffusion.cli", "train-ldm", "--config", str(config_file)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(SUBPROCESS_HOOKS)}

    def run(name: str, *extra: str, signal_at: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*command, "--set", f"output.run_name={name}", *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env | ({TEST_SIGNAL_ENV: signal_at} if signal_at else {}))

    stopped = run("r", signal_at="SIGTERM:3")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    checkpoint = tmp_path / "out" / "r" / "checkpoints" / "last.pt"
    assert stopped.stderr.strip().splitlines()[-1].endswith(
        f"W stopped by SIGTERM after optimizer step 2: {checkpoint} holds that step; continue with --resume auto "
        f"(or --resume {checkpoint.parent.parent})")
    for name, extra in (("r", ["--resume", "auto"]), ("s", [])):
        finished = run(name, *extra)
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert differences(checkpoints(tmp_path / "out" / "s"), checkpoints(checkpoint.parent.parent)) == []
