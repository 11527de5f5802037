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
    parts = steps.build_ldm_training(config(tmp_path, f"ldm.training.loss={loss}"), (2, 8, 8, 8), CPU, FP32, None)
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
                   "autoencoder.training.disc_lr=2e-5", *overrides), CPU, FP32, None, world_size=4)
        return [parts.optimizer_g.param_groups[0]["lr"], parts.optimizer_d.param_groups[0]["lr"]]

    assert lrs() == pytest.approx([1e-5, 2e-5])
    assert lrs("autoencoder.training.scale_lr_by_world_size=true") == pytest.approx([4e-5, 8e-5])
    assert lrs("autoencoder.training.adam_eps=1e-6") == pytest.approx([1e-5, 2e-5])
    parts = steps.build_autoencoder_training(config(tmp_path, "autoencoder.training.adam_eps=1e-6"), CPU, FP32, None)
    assert parts.optimizer_g.defaults["eps"] == 1e-6
