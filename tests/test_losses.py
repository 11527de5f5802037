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


def test_random_weights_fetch_nothing(constructed, monkeypatch):
    """A memory estimate needs the architecture only: ResNet50 takes MONAI's pretrained=False; an LPIPS network is
    built with a random backbone too (MONAI's pretrained=False alone still downloads LPIPS's ImageNet backbone)."""
    lpips_calls = []
    monkeypatch.setattr(losses, "LPIPS", lambda **kwargs: lpips_calls.append(kwargs) or torch.nn.Identity())
    monkeypatch.setattr(losses, "has_lpips", True)
    training = AutoencoderTrainingConfig(perceptual_network="resnet50", perceptual_fake_3d_ratio=0.2,
                                         perceptual_pretrained_path="/nowhere/weights.pth")
    losses.build_perceptual_loss(training, random_weights=True)  # the missing weights file is not read
    assert constructed[-1]["network_type"] == "resnet50" and constructed[-1]["pretrained"] is False
    assert constructed[-1]["fake_3d_ratio"] == 0.2 and constructed[-1]["is_fake_3d"] is True
    assert "pretrained_path" not in constructed[-1] and lpips_calls == []

    loss = losses.build_perceptual_loss(AutoencoderTrainingConfig(perceptual_network="vgg"), random_weights=True)
    assert lpips_calls == [{"pretrained": False, "net": "vgg", "pnet_rand": True, "verbose": False}]
    assert isinstance(loss.perceptual_function, torch.nn.Identity)  # the LPIPS network, in MONAI's loss

    monkeypatch.setattr(losses, "has_lpips", False)
    with pytest.raises(ImportError, match="pip install lpips torchvision"):
        losses.build_perceptual_loss(AutoencoderTrainingConfig(perceptual_network="squeeze"), random_weights=True)
    with pytest.raises(FileNotFoundError, match="cannot be built with random weights: torch hub brings its "
                                                "architecture together with its weights"):
        losses.build_perceptual_loss(AutoencoderTrainingConfig(perceptual_network="medicalnet_resnet10_23datasets"),
                                     random_weights=True)


def test_weights_at_hand_asks_no_network(tmp_path):
    hub = tmp_path / "hub"
    training = AutoencoderTrainingConfig(perceptual_network="squeeze", perceptual_weights=hub)
    assert not losses.perceptual_weights_at_hand(training)
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "squeezenet1_1-b8a52dc0.pth").write_bytes(b"weights")
    assert losses.perceptual_weights_at_hand(training)
    assert not losses.perceptual_weights_at_hand(training.model_copy(update={"perceptual_network": "vgg"}))
    weights = tmp_path / "resnet50.pth"
    resnet = AutoencoderTrainingConfig(perceptual_network="resnet50", perceptual_pretrained_path=weights)
    assert not losses.perceptual_weights_at_hand(resnet)
    weights.write_bytes(b"weights")
    assert losses.perceptual_weights_at_hand(resnet)


def test_a_real_2d_network_with_random_weights():
    """Where lpips and torchvision are installed: the real squeeze network, random, in MONAI's loss."""
    pytest.importorskip("lpips")
    pytest.importorskip("torchvision")
    loss = losses.build_perceptual_loss(AutoencoderTrainingConfig(perceptual_network="squeeze"), random_weights=True)
    x = torch.rand(1, 1, 48, 48, 48)
    assert torch.isfinite(loss(x, torch.rand_like(x)))
