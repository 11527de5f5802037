"""The perceptual loss's settings reach MONAI's PerceptualLoss: the slice ratio of 2D networks, the BraTS bundle's
torchvision ResNet50 with its own weights file."""

from __future__ import annotations

import pytest
import torch

from monai_diffusion import losses
from monai_diffusion.config.schema import AutoencoderTrainingConfig


@pytest.fixture
def constructed(monkeypatch) -> list[dict]:
    """The keyword arguments of every PerceptualLoss built (a stand-in network: 2D networks need lpips/torchvision,
    which the tests do not install)."""
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return torch.nn.Identity()

    monkeypatch.setattr(losses, "PerceptualLoss", record)
    return calls


def test_fake_3d_ratio_is_the_configured_share_of_slices(constructed):
    losses.build_perceptual_loss(AutoencoderTrainingConfig(perceptual_network="squeeze", perceptual_fake_3d_ratio=0.2))
    (kwargs,) = constructed
    assert kwargs["network_type"] == "squeeze" and kwargs["is_fake_3d"] is True and kwargs["fake_3d_ratio"] == 0.2
    assert kwargs["pretrained_path"] is None
    losses.build_perceptual_loss(AutoencoderTrainingConfig())
    assert constructed[-1]["fake_3d_ratio"] == 0.25  # the default, as before the setting existed


def test_resnet50_reads_its_weights_file_under_the_given_key(constructed, tmp_path):
    weights = tmp_path / "resnet50_radimagenet.pth"
    weights.write_bytes(b"weights")
    training = AutoencoderTrainingConfig(perceptual_network="resnet50", perceptual_pretrained_path=weights,
                                         perceptual_state_dict_key="state_dict", perceptual_fake_3d_ratio=0.2)
    losses.build_perceptual_loss(training)
    (kwargs,) = constructed
    assert kwargs["network_type"] == "resnet50" and kwargs["is_fake_3d"] is True
    assert kwargs["pretrained_path"] == str(weights) and kwargs["pretrained_state_dict_key"] == "state_dict"

    missing = training.model_copy(update={"perceptual_pretrained_path": tmp_path / "nope.pth"})
    with pytest.raises(FileNotFoundError, match=r"perceptual_pretrained_path: no such file: .*nope.pth"):
        losses.build_perceptual_loss(missing)
