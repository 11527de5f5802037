"""The harness measures the step that trains.

train-autoencoder / train-ldm / train-controlnet and the probe behind ``plan`` and ``benchmark`` run the same step
functions; here both run one optimizer step of the same config and the test compares what reached those functions:
the loss terms, the adversarial switch, the networks, optimizers, scalers, LR schedules, EMA, scheduler and
prediction type, the precision and the batch shapes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import record_compiles, save_autoencoder, tiny_config_dict, write_hub

from monai_diffusion import steps, train_autoencoder, train_ldm
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.memory import probe
from monai_diffusion.memory.probe import Options


def spy(monkeypatch, name: str) -> list[tuple[tuple, dict, object]]:
    """Record every call of ``steps.<name>`` (arguments and result): the stages' ``micro_step`` and ``update`` call
    them, whether the training loop or the probe drives the stage."""
    calls = []
    original = getattr(steps, name)

    def recorder(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(steps, name, recorder)
    return calls


def networks(*modules) -> list[tuple[str, int]]:
    return [(type(m).__name__, sum(p.numel() for p in m.parameters())) if m is not None else None for m in modules]


def optimizers(*pairs) -> list:
    """Each optimizer with its hyperparameters, scaler and LR schedule (its kind, state and, for a LambdaLR, its
    factor at the first steps)."""
    described = []
    for optimizer, scaler, schedule in pairs:
        if optimizer is None:
            described.append(None)
            continue
        state = {key: value for key, value in schedule.state_dict().items() if key not in ("lr_lambdas", "_last_lr")}
        factors = [schedule.lr_lambdas[0](s) for s in range(3)] if hasattr(schedule, "lr_lambdas") else None
        described.append((type(optimizer).__name__, optimizer.defaults, scaler.is_enabled(), type(schedule).__name__,
                          state, factors))
    return described


def describe_autoencoder(parts: steps.AutoencoderTraining) -> dict:
    return {
        # The probe measures at the patch size directly (its config says so through data.voxel_size); the batch
        # shapes are compared on their own.
        "training": parts.training.model_dump(exclude={"patch_size"}),
        "precision": parts.precision,
        "networks": networks(parts.autoencoder, parts.discriminator, parts.perceptual),
        "structural": parts.structural.kind if parts.structural is not None else None,
        "optimizers": optimizers((parts.optimizer_g, parts.scaler_g, parts.lr_scheduler_g),
                                 (parts.optimizer_d, parts.scaler_d, parts.lr_scheduler_d)),
    }


def test_autoencoder_step_measured_is_the_step_trained(tmp_path, nifti_folder, monkeypatch):
    hub = write_hub(tmp_path / "hub")
    raw = apply_overrides(tiny_config_dict(nifti_folder, tmp_path / "runs"), [
        "autoencoder.training.max_steps=1", "autoencoder.training.gradient_accumulation_steps=2",
        "autoencoder.training.kl_weight=0.01", "autoencoder.training.ssim_weight=0.5",
        "autoencoder.training.adv_weight=0.1", "autoencoder.training.adv_start_step=0",
        "autoencoder.training.use_perceptual_loss=true", f"autoencoder.training.perceptual_weights={hub}",
        "autoencoder.training.perceptual_network=medicalnet_resnet10_23datasets",
        "autoencoder.training.warmup_steps=2", "autoencoder.training.use_gradient_checkpointing=true",
    ])
    config = config_from_dict(raw)
    micro = spy(monkeypatch, "autoencoder_micro_step")
    updates = spy(monkeypatch, "autoencoder_update")

    train_autoencoder.train(config)
    trained_micro, trained_updates = list(micro), list(updates)
    record = probe.measure(config, Options(stage="autoencoder", device="cpu", steps=1, warmup=0))
    measured_micro, measured_updates = micro[len(trained_micro):], updates[len(trained_updates):]

    # One optimizer step of two micro-batches each, the adversarial terms on, then one update of both optimizers.
    assert len(trained_micro) == len(measured_micro) == 2
    assert [c[0][1] for c in trained_updates] == [c[0][1] for c in measured_updates] == [True]
    for (trained_args, _, (_, trained_terms)), (measured_args, _, (_, measured_terms)) in zip(trained_micro,
                                                                                            measured_micro):
        assert list(trained_terms) == list(measured_terms) == ["recon_l1", "kl", "ssim", "perceptual", "gen_adv",
                                                                "disc"]
        assert trained_args[2] is measured_args[2] is True  # adversarial
        assert trained_args[1].shape == measured_args[1].shape == (1, 1, 16, 16, 16)
    trained_parts, measured_parts = trained_micro[0][0][0], measured_micro[0][0][0]
    assert describe_autoencoder(measured_parts) == describe_autoencoder(trained_parts)
    assert measured_parts.autoencoder.use_checkpoint and measured_parts.perceptual is not None
    assert record["params"] == sum(p.numel() for m in (trained_parts.autoencoder, trained_parts.discriminator)
                                   for p in m.parameters())


def test_autoencoder_recipe_options_measured_are_trained(tmp_path, nifti_folder, monkeypatch):
    """Patches, the stage's own volume and precision, several discriminator steps with an unscaled loss and a schedule
    in epochs: the probe builds and runs the step training runs."""
    raw = apply_overrides(tiny_config_dict(nifti_folder, tmp_path / "runs"), [
        "autoencoder.training.max_steps=1", "autoencoder.training.adv_weight=0.1",
        "autoencoder.training.disc_steps_per_generator_step=3", "autoencoder.training.disc_loss_weight=1.0",
        "autoencoder.training.voxel_size=[20,20,20]", "autoencoder.training.patch_size=[12,12,12]",
        "autoencoder.training.mixed_precision=bf16", "autoencoder.training.lr_schedule=multistep",
        "autoencoder.training.lr_milestones=[1]", "autoencoder.training.lr_schedule_interval=epoch",
        "autoencoder.training.adam_eps=1e-6", "autoencoder.training.disc_num_layers=1",
    ])
    config = config_from_dict(raw)
    micro = spy(monkeypatch, "autoencoder_micro_step")
    updates = spy(monkeypatch, "autoencoder_update")

    train_autoencoder.train(config)
    record = probe.measure(config, Options(stage="autoencoder", device="cpu", steps=1, warmup=0))
    (trained_micro, measured_micro), (trained_update, measured_update) = micro, updates
    assert trained_update[0][1] is measured_update[0][1] is True  # adversarial from the first step

    assert trained_micro[0][1].shape == measured_micro[0][1].shape == (1, 1, 12, 12, 12)  # the patches
    assert list(trained_micro[2][1]) == list(measured_micro[2][1]) == ["recon_l1", "kl", "gen_adv", "disc"]
    trained_parts, measured_parts = trained_micro[0][0], measured_micro[0][0]
    assert describe_autoencoder(measured_parts) == describe_autoencoder(trained_parts)
    assert measured_parts.precision.name == "bf16" and measured_parts.optimizer_d.defaults["eps"] == 1e-6
    for parts in (trained_parts, measured_parts):  # three discriminator steps per generator step in both
        assert [int(next(iter(o.state.values()))["step"]) for o in (parts.optimizer_g, parts.optimizer_d)] == [1, 3]
    assert record["params"] == sum(p.numel() for m in (trained_parts.autoencoder, trained_parts.discriminator)
                                   for p in m.parameters())


def test_compiled_and_offloading_steps_are_measured_as_trained(tmp_path, nifti_folder, monkeypatch):
    """device.compile and autoencoder.training.offload_activations: the probe runs its forward through the compiled
    network (and discriminator) and under the offloading context, as train-autoencoder does."""
    compiles = record_compiles(monkeypatch)
    offloading = []
    original = steps.offload_saved_maps

    def recording(enabled=True):
        offloading.append(enabled)
        return original(enabled)

    monkeypatch.setattr(steps, "offload_saved_maps", recording)
    raw = apply_overrides(tiny_config_dict(nifti_folder, tmp_path / "runs"), [
        "autoencoder.training.max_steps=1", "autoencoder.training.adv_weight=0.1", "device.compile=true",
        "device.compile_mode=max-autotune-no-cudagraphs", "autoencoder.training.use_gradient_checkpointing=true",
        "autoencoder.training.offload_activations=true",
    ])
    config = config_from_dict(raw)
    micro = spy(monkeypatch, "autoencoder_micro_step")

    train_autoencoder.train(config)
    probe.measure(config, Options(stage="autoencoder", device="cpu", steps=1, warmup=0))
    assert len(micro) == 2 and offloading == [True, True]
    assert [mode for mode, _ in compiles] == ["max-autotune-no-cudagraphs"] * 4 and all(n for _, n in compiles)
    for args, kwargs, _ in micro:
        named = dict(zip(["parts", "images", "adversarial", "sync", "model", "disc_model"], args)) | kwargs
        assert named["model"]._orig_mod is named["parts"].autoencoder
        assert named["disc_model"]._orig_mod is named["parts"].discriminator

def describe_ldm(parts: steps.LDMTraining) -> dict:
    scheduler = parts.scheduler
    return {
        "training": parts.training.model_dump(),
        "precision": parts.precision,
        "kind": parts.kind,
        "scheduler": (type(scheduler).__name__, scheduler.num_train_timesteps,
                      getattr(scheduler, "prediction_type", "velocity"),
                      {key: getattr(scheduler, key, None) for key in ("use_discrete_timesteps", "sample_method",
                                                                       "base_img_size_numel", "transform_scale",
                                                                       "clip_sample")}),
        "networks": networks(parts.unet, parts.ema.module if parts.ema is not None else None),
        "optimizers": optimizers((parts.optimizer, parts.scaler, parts.lr_scheduler)),
    }


# MAISI's rectified-flow settings: continuous uniform timesteps, L1 loss, a polynomial LR, the stage's own precision.
MAISI_LDM = ["ldm.scheduler.use_discrete_timesteps=false", "ldm.scheduler.sample_method=uniform",
             "ldm.scheduler.base_img_size_numel=4096", "ldm.training.loss=l1", "ldm.training.lr_schedule=polynomial",
             "ldm.training.lr_power=2.0", "ldm.training.mixed_precision=bf16"]


@pytest.mark.parametrize("kind, prediction, cache, options", [
    ("ddpm", "epsilon", True, []), ("ddpm", "v_prediction", True, []), ("ddim", "sample", True, []),
    ("rflow", "epsilon", True, []), ("ddpm", "epsilon", False, []), ("rflow", "epsilon", True, MAISI_LDM),
])
def test_ldm_step_measured_is_the_step_trained(tmp_path, nifti_folder, monkeypatch, kind, prediction, cache, options):
    raw = apply_overrides(tiny_config_dict(nifti_folder, tmp_path / "runs"), [
        f"ldm.scheduler.type={kind}", f"ldm.scheduler.prediction_type={prediction}",
        f"ldm.training.cache_latents={str(cache).lower()}", "ldm.training.max_steps=1", "ldm.training.max_epochs=null",
        "ldm.training.batch_size=1", "ldm.training.gradient_accumulation_steps=2", "ldm.training.ema_decay=0.9",
        "ldm.training.scale_factor_volumes=2", "ldm.sampling.num_inference_steps=2", "data.val_fraction=0",
        "data.cache=none", *options,
    ])
    config = config_from_dict(raw)
    save_autoencoder(config, tmp_path / "runs" / "autoencoder-1" / "checkpoints" / "best.pt")
    latents = spy(monkeypatch, "ldm_latents")
    micro = spy(monkeypatch, "ldm_micro_step")
    updates = spy(monkeypatch, "ldm_update")

    train_ldm.train(config)
    trained = len(latents), len(micro), len(updates)
    record = probe.measure(config, Options(stage="ldm", device="cpu", steps=1, warmup=0))

    assert trained == (2, 2, 1) and (len(latents), len(micro), len(updates)) == (4, 4, 2)
    for trained_call, measured_call in zip(latents[:2], latents[2:]):
        assert set(trained_call[0][0]) == set(measured_call[0][0]) == ({"mu", "sigma"} if cache else {"image"})
        assert trained_call[2].shape == measured_call[2].shape == (1, 2, 8, 8, 8)  # z: batch, latent channels, 8^3
    for trained_call, measured_call in zip(micro[:2], micro[2:]):
        assert trained_call[0][1].shape == measured_call[0][1].shape
        assert trained_call[2].shape == measured_call[2].shape == torch.Size([])
    trained_parts, measured_parts = micro[0][0][0], micro[2][0][0]
    assert describe_ldm(measured_parts) == describe_ldm(trained_parts)
    assert measured_parts.kind == kind and (kind == "rflow" or measured_parts.scheduler.prediction_type == prediction)
    assert record["params"] == sum(p.numel() for p in trained_parts.unet.parameters())
    if options:
        assert measured_parts.precision.name == "bf16" and measured_parts.training.loss == "l1"
        assert measured_parts.scheduler.sample_method == "uniform"


# ------------------------------------------------------------------ conditioning and ControlNet


def conditional_config(tmp_path, categorical_via: str, *overrides: str):
    from helpers import conditional_raw, write_conditional_data

    datalist = write_conditional_data(tmp_path / "data", count=4)
    raw = apply_overrides(conditional_raw(datalist, tmp_path / "runs", categorical_via), [
        # The probe has no data: the vocabulary it measures with is the configured one.
        "data.conditions=[{name: radius}, {name: shape, type: categorical, categories: [a, b]}]",
        "ldm.training.gradient_accumulation_steps=2", "controlnet.training.gradient_accumulation_steps=2",
        *overrides,
    ])
    config = config_from_dict(raw)
    save_autoencoder(config, tmp_path / "runs" / "autoencoder-1" / "checkpoints" / "best.pt")
    return config


def condition_of(call) -> tuple:
    args, kwargs, _ = call  # the recipes pass it last by position, the probe by name
    condition = kwargs["condition"] if "condition" in kwargs else args[-1]
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in (condition.context, condition.class_labels))


@pytest.mark.parametrize("categorical_via", ["cross_attention", "class_embedding"])
def test_conditional_ldm_step_measured_is_the_step_trained(tmp_path, monkeypatch, categorical_via):
    config = conditional_config(tmp_path, categorical_via)
    micro = spy(monkeypatch, "ldm_micro_step")
    train_ldm.train(config)
    record = probe.measure(config, Options(stage="ldm", device="cpu", steps=1, warmup=0))
    trained, measured = micro[:2], micro[2:]
    assert len(trained) == len(measured) == 2
    assert [condition_of(c) for c in trained] == [condition_of(c) for c in measured]
    assert condition_of(trained[0]) == ({"cross_attention": ((2, 1, 4), torch.float32),
                                         "class_embedding": ((2, 1, 2), torch.float32)}[categorical_via],
                                        None if categorical_via == "cross_attention" else ((2,), torch.int64))
    trained_parts, measured_parts = trained[0][0][0], measured[0][0][0]
    assert describe_ldm(measured_parts) == describe_ldm(trained_parts)
    assert measured_parts.condition_dropout == trained_parts.condition_dropout == 0.5
    assert record["params"] == sum(p.numel() for p in trained_parts.unet.parameters())


@pytest.mark.parametrize("cache", [True, False])
def test_controlnet_step_measured_is_the_step_trained(tmp_path, monkeypatch, cache):
    from monai_diffusion import train_controlnet

    config = conditional_config(tmp_path, "cross_attention", f"controlnet.training.cache_latents={str(cache).lower()}")
    train_ldm.train(config)
    micro = spy(monkeypatch, "controlnet_micro_step")
    updates = spy(monkeypatch, "controlnet_update")
    train_controlnet.train(config)
    record = probe.measure(config, Options(stage="controlnet", device="cpu", steps=1, warmup=0))
    trained, measured = micro[:2], micro[2:]
    assert len(trained) == len(measured) == 2 and len(updates) == 2
    for trained_call, measured_call in zip(trained, measured):
        assert trained_call[0][1].shape == measured_call[0][1].shape == (2, 2, 8, 8, 8)  # z
        assert trained_call[0][2].shape == measured_call[0][2].shape == (2, 2, 16, 16, 16)  # control: 2 labels at 16^3
        assert condition_of(trained_call) == condition_of(measured_call)

    def describe(parts) -> dict:
        return {"training": parts.training.model_dump(), "precision": parts.precision, "kind": parts.kind,
                "networks": networks(parts.controlnet, parts.unet, parts.ema.module if parts.ema else None),
                "optimizers": optimizers((parts.optimizer, parts.scaler, parts.lr_scheduler)),
                "frozen": [p.requires_grad for p in parts.unet.parameters()][:1], "labels": parts.num_labels,
                "control_size": parts.control_size, "dropout": parts.condition_dropout}

    trained_parts, measured_parts = trained[0][0][0], measured[0][0][0]
    assert describe(measured_parts) == describe(trained_parts)
    assert record["params"] == sum(p.numel() for p in trained_parts.controlnet.parameters())
