"""Test helpers: small real NIfTI volumes on disk and a tiny config that trains in seconds on CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# On the PYTHONPATH of the commands the tests start: installs the stop-signal fixture (signal_hook.py) there.
SUBPROCESS_HOOKS = Path(__file__).resolve().parent / "subprocess_hooks"


def run_python(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, output captured. On a timeout the whole process tree is killed
    (torchrun's workers too, which would otherwise outlive it) and the test fails with the output's end, so a hang
    shows where it stopped."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUBPROCESS_HOOKS), env.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(args[:4])} ... did not finish in {timeout:.0f} s; its output ended with:\n"
                    f"{stdout[-1500:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def free_port() -> int:
    """A TCP port nothing listens on now, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(module: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 -m module *args`` on CPU: two gloo processes, one thread each."""
    return run_python("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                      "-m", module, *args, env_extra={"OMP_NUM_THREADS": "1"} | (env_extra or {}))


def write_volumes(folder: Path, count: int, shape=(20, 20, 20), seed: int = 0) -> list[Path]:
    """Smooth blob volumes (a bright ellipsoid + noise) with a 1.5 mm, non-identity affine."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    paths = []
    for index in range(count):
        radii = rng.uniform(0.4, 0.8, size=3)[:, None, None, None]
        blob = (np.sum((grid / radii) ** 2, axis=0) < 1).astype(np.float32)
        volume = 100 * blob + rng.normal(0, 5, size=shape).astype(np.float32)
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        affine[:3, 3] = [-15, -15, -15]
        path = folder / f"vol_{index:02d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), path)
        paths.append(path)
    return paths


# MAISI's VAE (autoencoder.architecture maisi) at its depth (3 levels: 4x) and a tiny width, in two slabs along axis 1
# as MAISI's released network runs.
MAISI_AE = {"architecture": "maisi", "num_channels": [8, 8, 16], "norm_num_groups": 4, "latent_channels": 4,
            "downsample_factors": None, "attention_levels": [False, False, False],
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "num_splits": 2, "dim_split": 1}


def tiny_config_dict(data_dir: Path, output_dir: Path) -> dict:
    """A whole pipeline small enough for CPU tests: 16^3 volumes, an [8, 16]-channel AE, 8^3 latents."""
    return {
        "data": {"source": "folder", "data_dir": str(data_dir), "voxel_size": [16, 16, 16], "val_fraction": 0.2,
                 "cache": "memory"},
        "autoencoder": {
            "num_channels": [8, 16], "downsample_factors": [2], "latent_channels": 2, "norm_num_groups": 4,
            "training": {"batch_size": 1, "max_epochs": 1, "adv_weight": 0.0, "lr": 1e-3, "disc_channels": 8,
                         "disc_num_layers": 2},
        },
        "ldm": {"unet": {"num_channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8,
                         "norm_num_groups": 8},
                "scheduler": {"num_train_timesteps": 100}},
        "device": {"device": "cpu"},
        "output": {"output_dir": str(output_dir), "log_every_n_steps": 1},
    }


def differences(a, b, where: str = "") -> list[str]:
    """Where two checkpoint values differ, bit for bit (tensors with torch.equal, the rest with ==)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for index, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{index}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def save_autoencoder(config, path: Path, seed: int = 0) -> Path:
    """An autoencoder checkpoint in train_autoencoder's format (untrained weights: enough for the LDM plumbing)."""
    import torch

    from monai_diffusion.engine.checkpoint import save_checkpoint
    from monai_diffusion.networks.builders import build_autoencoder

    torch.manual_seed(seed)
    model = build_autoencoder(config.autoencoder, 3)
    save_checkpoint(path, {"kind": "autoencoder", "autoencoder": model.state_dict(),
                           "config": config.model_dump(mode="json"), "step": 0, "epoch": 0})
    return path


def old_layout(state: dict, with_proj_attn: bool = True) -> dict:
    """``state`` as MONAI Generative's AutoencoderKL and DiffusionModelUNet named it (the BraTS bundle's released
    weights): self-attention projections on the block itself (``proj_attn`` for the output projection), a
    transformer block's output projection as ``to_out.0``, the upsampling convolution as ``conv``."""
    old = {}
    for key, value in state.items():
        if ".attn.out_proj." in key:
            if with_proj_attn:
                old[key.replace(".attn.out_proj.", ".proj_attn.")] = value
        elif ".attn." in key:
            old[key.replace(".attn.", ".")] = value
        elif "transformer_blocks" in key and ".out_proj." in key:
            old[key.replace(".out_proj.", ".to_out.0.")] = value
        else:
            old[key.replace("postconv", "conv")] = value
    return old


FAKE_HUBCONF = """
dependencies = ["torch"]
import torch


def medicalnet_resnet10_23datasets(cache_dir=None, **kwargs):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU())
"""


def write_hub(folder: Path) -> Path:
    """A torch hub folder as MONAI leaves it after fetching the perceptual networks (a tiny stand-in network)."""
    repo = folder / "Project-MONAI_perceptual-models_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(FAKE_HUBCONF)
    return folder


def record_compiles(monkeypatch) -> list:
    """Replace ``torch.compile``'s backend by AOT autograd without code generation (``aot_eager``: traced and
    partitioned as inductor sees the graphs, in seconds where inductor's C++ takes minutes on a small CPU), counting
    the graphs; returns the list of ``[mode, graphs traced]`` per call, the count filled in as the compiled module
    runs. Numerics of the real compiler are tested in tests/test_steps.py."""
    import torch
    from torch._dynamo.backends.registry import lookup_backend

    real = torch.compile
    calls = []

    def compile(model=None, *, mode=None, **kwargs):
        call = [mode, 0]
        calls.append(call)

        def backend(graph, example_inputs):
            call[1] += 1
            return lookup_backend("aot_eager")(graph, example_inputs)

        return real(model, backend=backend)

    monkeypatch.setattr(torch, "compile", compile)
    return calls


def write_conditional_data(folder: Path, count: int = 6, shape=(18, 16, 14), validation: int = 0) -> Path:
    """Blob volumes whose size is a covariate (``radius``), with a categorical ``shape`` ('a'/'b'), a label map
    (``seg``: 1 the blob's lower half, 2 its upper half) and a JSON datalist; ``validation`` more entries in its
    'validation' list. Returns the datalist."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-12, -10, -9]
    entries = []
    for index in range(count + validation):
        radius = round(float(rng.uniform(0.3, 0.8)), 3)
        blob = np.sum(grid**2, axis=0) < radius**2
        label = (blob * np.where(grid[2] > 0, 2, 1)).astype(np.uint8)
        volume = 100 * blob + rng.normal(0, 5, size=shape)
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), folder / f"v{index}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"v{index}_seg.nii.gz")
        entries.append({"image": f"v{index}.nii.gz", "seg": f"v{index}_seg.nii.gz", "radius": radius,
                        "shape": "ab"[index % 2]})
    content = {"training": entries[:count]} | ({"validation": entries[count:]} if validation else {})
    (folder / "list.json").write_text(json.dumps(content))
    return folder / "list.json"


def conditional_raw(datalist: Path, output_dir: Path, categorical_via: str = "cross_attention", **ldm_training) -> dict:
    """A tiny conditional pipeline on :func:`write_conditional_data`'s datalist: radius and shape conditions, label
    maps for a ControlNet, 16^3 volumes, 8^3 latents, 1 LDM and 1 ControlNet step."""
    return {
        "data": {"source": "datalist", "datalist": str(datalist), "voxel_size": [16, 16, 16], "cache": "none",
                 "val_fraction": 0.0, "mask_key": "seg",
                 "conditions": [{"name": "radius"}, {"name": "shape", "type": "categorical"}]},
        "autoencoder": {"num_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2, "downsample_factors": [2],
                        "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
        "ldm": {
            "unet": {"num_channels": [8, 16], "attention_levels": [False, True], "norm_num_groups": 8,
                     "num_head_channels": 8},
            "conditioning": {"categorical_via": categorical_via, "dropout": 0.5},
            "scheduler": {"num_train_timesteps": 100},
            "training": {"batch_size": 2, "max_epochs": None, "max_steps": 1, "val_every_n_epochs": 100,
                         "ema_decay": 0.9, "scale_factor_volumes": 2, **ldm_training},
            "sampling": {"num_inference_steps": 2},
        },
        "controlnet": {"num_labels": 3, "conditioning_embedding_num_channels": [8, 16],
                       "training": {"batch_size": 2, "max_epochs": None, "max_steps": 1, "val_every_n_epochs": 100,
                                    "ema_decay": 0.9}},
        "device": {"device": "cpu"},
        "output": {"output_dir": str(output_dir), "log_every_n_steps": 1},
        "seed": 3,
    }


def maisi_unet_raw(folder: Path, **ldm_training) -> dict:
    """:func:`conditional_raw` with MAISI's VAE and MAISI's UNet (its spacing input; the modality from each datalist
    entry's ``modality`` field, ct or mri_t1 in turn), on 4 volumes written under ``folder``; runs go to
    ``folder / "out"``."""
    import json

    datalist = write_conditional_data(folder / "data", count=4)
    content = json.loads(datalist.read_text())
    for index, entry in enumerate(content["training"]):
        entry["modality"] = ["ct", "mri_t1"][index % 2]
    datalist.write_text(json.dumps(content))
    raw = conditional_raw(datalist, folder / "out", **ldm_training)
    raw["autoencoder"] = MAISI_AE | {"num_splits": 1, "dim_split": 0, "training": {"adv_weight": 0.0}}
    raw["ldm"]["unet"] |= {"architecture": "maisi", "modality_key": "modality"}
    return raw


def check_mlflow_run(run_dir: Path, config, command: str | None = None, experiment: str | None = None):
    """The MLflow run of a training run with ``output.loggers: [tensorboard, mlflow]`` (the default file store in
    ``<run>/mlruns``; experiment ``experiment``, by default ``train-<command>``), checked against the run: finished;
    its parameters are the flattened config; every scalar TensorBoard got, at every step, with the same value; the
    final checkpoint's path as a tag; ``config.yaml`` among the artifacts. Returns ``(client, run)``."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from monai_diffusion.engine.logging import flatten_config

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 reads a file store only with it
    try:
        client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    [run] = client.search_runs([client.get_experiment_by_name(experiment or f"train-{command}").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params == flatten_config(config.model_dump(mode="json"))
    assert run.data.tags["checkpoint"] == str((run_dir / "checkpoints" / "last.pt").resolve())

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert tags and sorted(tags) == sorted(run.data.metrics)
    for tag in tags:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        expected = [(e.step, pytest.approx(e.value, rel=1e-6, abs=1e-12)) for e in events.Scalars(tag)]
        assert history == expected, tag
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    return client, run


def save_feature_weights(folder: Path, widen_factor: float = 1 / 16, seed: int = 0) -> dict[str, Path]:
    """FID's feature networks with random weights, saved as their released files are (perceptual-models' torch-hub
    entries read them): MedicalNet ResNet-10 as ``{"state_dict": ...}`` with DataParallel's ``module.`` before every
    key, RadImageNet ResNet-50 as a plain state dict, under the released names. ``widen_factor`` 1/16 keeps the
    layout (every key) and makes them narrow enough for a CPU test (32 and 128 features instead of 512 and 2048).
    Returns protocol -> file."""
    import torch

    from monai_diffusion.networks.feature_networks import medicalnet_resnet, radimagenet_resnet50

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    medicalnet = {f"module.{key}": value for key, value in medicalnet_resnet(10, widen_factor).state_dict().items()}
    files = {"medicalnet": folder / "medicalnet_resnet_10_23dataset.pth",
             "radimagenet-2.5d": folder / "RadImageNet-ResNet50_notop.pth"}
    torch.save({"state_dict": medicalnet}, files["medicalnet"])
    torch.save(radimagenet_resnet50(widen_factor).state_dict(), files["radimagenet-2.5d"])
    return files
