"""The training steps' recipe options: discriminator steps per generator step, the discriminator loss's weight, the
diffusion loss, LR schedules that count epochs, learning rates scaled by the process count."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config_dict

from monai_diffusion import steps
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.engine.precision import Precision

CPU = torch.device("cpu")
FP32 = Precision("fp32", "cpu")


def config(tmp_path, *overrides: str):
    return config_from_dict(apply_overrides(tiny_config_dict(tmp_path / "data", tmp_path / "runs"), list(overrides)))


def autoencoder_step(tmp_path, *overrides: str) -> steps.AutoencoderTraining:
    """One optimizer step of the tiny autoencoder with the adversarial terms on, from fixed weights and data."""
    torch.manual_seed(0)
    parts = steps.build_autoencoder_training(
        config(tmp_path, "autoencoder.training.adv_weight=0.1", "autoencoder.training.max_steps=10", *overrides),
        CPU, FP32, max_steps=10)
    images = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the posterior sample
    steps.autoencoder_micro_step(parts, images, adversarial=True)
    return parts


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    return int(next(iter(optimizer.state.values()))["step"])


def test_the_discriminator_takes_its_steps_per_generator_step(tmp_path):
    once = autoencoder_step(tmp_path)
    steps.autoencoder_update(once, adversarial=True)
    assert (adam_steps(once.optimizer_g), adam_steps(once.optimizer_d)) == (1, 1)

    five = autoencoder_step(tmp_path, "autoencoder.training.disc_steps_per_generator_step=5")
    steps.autoencoder_update(five, adversarial=True)
    assert (adam_steps(five.optimizer_g), adam_steps(five.optimizer_d)) == (1, 5)
    assert five.discriminator_batch is None  # the kept batch does not outlive the step
    # The generator's step is the same; the discriminator moved further.
    for (name, a), b in zip(once.autoencoder.state_dict().items(), five.autoencoder.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    moved = [name for (name, a), b in zip(once.discriminator.state_dict().items(),
                                          five.discriminator.state_dict().values()) if not torch.equal(a, b)]
    assert moved
    # Its LR schedule advances once per generator step, like the generator's.
    assert five.lr_scheduler_d.last_epoch == five.lr_scheduler_g.last_epoch == 1


def test_the_discriminator_loss_weight_defaults_to_adv_weight_and_can_be_one(tmp_path):
    scaled = autoencoder_step(tmp_path)  # adv_weight 0.1 scales the discriminator's loss (MONAI's tutorial, bundle)
    unscaled = autoencoder_step(tmp_path, "autoencoder.training.disc_loss_weight=1.0")  # MAISI
    for (name, a), b in zip(scaled.discriminator.named_parameters(), unscaled.discriminator.parameters()):
        torch.testing.assert_close(b.grad, a.grad * 10, msg=name)
    for (name, a), b in zip(scaled.autoencoder.named_parameters(), unscaled.autoencoder.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)  # the generator's loss is untouched


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_the_diffusion_loss_is_the_configured_regression(tmp_path, loss):
    parts = steps.build_ldm_training(config(tmp_path, f"ldm.training.loss={loss}"), (2, 8, 8, 8), CPU, FP32, max_steps=None)
    torch.nn.init.zeros_(parts.unet.out[-1].conv.weight)  # a zero prediction: the loss is the target's own size
    torch.nn.init.zeros_(parts.unet.out[-1].conv.bias)
    z = torch.randn(2, 2, 8, 8, 8)
    torch.manual_seed(0)
    value = steps.ldm_micro_step(parts, z)
    torch.manual_seed(0)
    noise = torch.randn_like(z)  # epsilon prediction: the target is the noise drawn first
    expected = noise.abs().mean() if loss == "l1" else noise.pow(2).mean()
    torch.testing.assert_close(value, expected)


def test_a_schedule_in_epochs_advances_at_the_end_of_each_epoch_only(tmp_path):
    per_epoch = ["ldm.training.lr_schedule=multistep", "ldm.training.lr_milestones=[1]",
                 "ldm.training.lr_schedule_interval=epoch", "ldm.training.lr=0.01"]
    parts = steps.build_ldm_training(config(tmp_path, *per_epoch), (2, 8, 8, 8), CPU, FP32, max_steps=100,
                                     max_epochs=3)
    for _ in range(3):
        steps.ldm_micro_step(parts, torch.randn(1, 2, 8, 8, 8))
        steps.ldm_update(parts)
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    steps.ldm_epoch_end(parts)
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)

    per_step = steps.build_ldm_training(config(tmp_path, *per_epoch[:2], "ldm.training.lr=0.01"), (2, 8, 8, 8), CPU,
                                        FP32, max_steps=100)
    steps.ldm_micro_step(per_step, torch.randn(1, 2, 8, 8, 8))
    steps.ldm_update(per_step)
    steps.ldm_epoch_end(per_step)  # nothing to do for a schedule in steps
    assert per_step.optimizer.param_groups[0]["lr"] == pytest.approx(0.001) and per_step.lr_scheduler.last_epoch == 1


def test_learning_rates_scale_with_the_process_count_when_asked(tmp_path):
    def lrs(*overrides: str) -> list[float]:
        parts = steps.build_autoencoder_training(
            config(tmp_path, "autoencoder.training.adv_weight=0.1", "autoencoder.training.lr=1e-5",
                   "autoencoder.training.disc_lr=2e-5", *overrides), CPU, FP32, max_steps=None, world_size=4)
        return [parts.optimizer_g.param_groups[0]["lr"], parts.optimizer_d.param_groups[0]["lr"]]

    assert lrs() == pytest.approx([1e-5, 2e-5])
    assert lrs("autoencoder.training.scale_lr_by_world_size=true") == pytest.approx([4e-5, 8e-5])
    assert lrs("autoencoder.training.adam_eps=1e-6") == pytest.approx([1e-5, 2e-5])
    parts = steps.build_autoencoder_training(config(tmp_path, "autoencoder.training.adam_eps=1e-6"), CPU, FP32,
                                             max_steps=None)
    assert parts.optimizer_g.defaults["eps"] == 1e-6



@pytest.fixture
def inductor_draws_like_eager():
    """Compiled code draws random numbers with inductor's own generator; fall back to eager's, so a compiled and an
    eager step draw the same posterior noise and timesteps. Compiled graphs are dropped afterwards."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def compiled_and_eager(tmp_path, build, run, *overrides: str) -> list:
    """What ``run`` returns for the same step eager and compiled (``device.compile``), from the same seeds."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        parts = build(config(tmp_path, f"device.compile={str(compiled).lower()}", *overrides))
        torch.manual_seed(1)
        results.append(run(parts))
    return results


def gradients(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{index}.{name}": p.grad.clone() for index, module in enumerate(modules)
            for name, p in module.named_parameters() if p.grad is not None}


def assert_close_all(actual: dict, expected: dict, **tolerance) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=name, **tolerance)


def test_a_compiled_autoencoder_step_equals_the_eager_step(tmp_path, inductor_draws_like_eager):
    """torch.compile around the memory-saving path (its encoder and decoder stay eager inside) and the discriminator,
    two micro-batches accumulated: the same losses and gradients within float tolerance, and the bare networks'
    state dicts (what a checkpoint saves) keep their keys."""

    def build(c):
        build.device = c.device
        return steps.build_autoencoder_training(c, CPU, FP32, max_steps=10)

    def run(parts):
        model = steps.training_model(parts.autoencoder, build.device)
        disc_model = steps.training_model(parts.discriminator, build.device)
        assert (model is not parts.autoencoder) == build.device.compile
        losses = {}
        for index in range(2):
            images = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(index))
            terms = steps.autoencoder_micro_step(parts, images, True, index == 1, model=model, disc_model=disc_model)[1]
            losses |= {f"{index}.{name}": value.detach() for name, value in terms.items()}
        grads = gradients(parts.autoencoder, parts.discriminator)
        steps.autoencoder_update(parts, adversarial=True)
        return losses, grads, list(parts.autoencoder.state_dict()) + list(parts.discriminator.state_dict())

    (eager_losses, eager_grads, eager_keys), (losses, grads, keys) = compiled_and_eager(
        tmp_path, build, run, "autoencoder.training.use_gradient_checkpointing=true",
        "autoencoder.training.adv_weight=0.1", "autoencoder.training.gradient_accumulation_steps=2")
    assert list(eager_losses) == [f"{i}.{term}" for i in range(2) for term in ("recon_l1", "kl", "gen_adv", "disc")]
    assert_close_all(losses, eager_losses, rtol=1e-4, atol=1e-6)
    assert_close_all(grads, eager_grads, rtol=1e-3, atol=1e-6)
    assert keys == eager_keys and not any("_orig_mod" in key for key in keys)


@pytest.mark.slow  # compiling the UNet's forward and backward: minutes on 2 CPU cores
def test_a_compiled_ldm_step_under_bf16_equals_the_eager_step(tmp_path, inductor_draws_like_eager):
    def build(c):
        build.device = c.device
        return steps.build_ldm_training(c, (2, 8, 8, 8), CPU, Precision("bf16", "cpu"), max_steps=10)

    def run(parts):
        model = steps.training_model(parts.unet, build.device)
        losses = [steps.ldm_micro_step(parts, torch.randn(1, 2, 8, 8, 8), model=model).detach() for _ in range(2)]
        grads = gradients(parts.unet)
        steps.ldm_update(parts)
        return losses, grads, parts.ema

    (eager_losses, eager_grads, eager_ema), (losses, grads, ema) = compiled_and_eager(
        tmp_path, build, run, "ldm.training.ema_decay=0.5")
    # bf16 autocast: compiled kernels round differently from eager ones.
    torch.testing.assert_close(losses, eager_losses, rtol=2e-2, atol=2e-3)
    assert_close_all(grads, eager_grads, rtol=5e-2, atol=5e-3)
    # The EMA averages the bare UNet, whatever the forward ran through.
    assert ema.n_averaged.item() == eager_ema.n_averaged.item() == 1
    assert list(ema.state_dict()) == list(eager_ema.state_dict())


@pytest.mark.parametrize("offload", [False, True])
def test_offload_activations_keeps_the_fused_units_inputs_in_host_memory(tmp_path, monkeypatch, offload):
    """On a GPU the fused units keep host copies of their inputs; here they are made to offload on the CPU too."""
    from monai_diffusion.networks import fused_units, memory_saving

    copies = []
    original = fused_units._Map.offloaded
    monkeypatch.setattr(fused_units._Map, "offloaded",
                        staticmethod(lambda x, depth: copies.append(x.shape) or original(x, depth)))
    monkeypatch.setattr(memory_saving, "_offloads", lambda x: memory_saving._OFFLOAD.get())
    parts = steps.build_autoencoder_training(
        config(tmp_path, "autoencoder.training.use_gradient_checkpointing=true",
               f"autoencoder.training.offload_activations={str(offload).lower()}"), CPU, FP32, max_steps=1)
    loss, _ = steps.autoencoder_micro_step(parts, torch.rand(1, 1, 16, 16, 16), adversarial=False)
    assert torch.isfinite(loss) and all(p.grad is not None for p in parts.autoencoder.parameters())
    # The decoder's full-resolution units among them (8 channels at 16^3).
    assert bool(copies) == offload and (not offload or torch.Size([1, 8, 16, 16, 16]) in copies)
