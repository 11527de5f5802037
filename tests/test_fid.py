"""FID protocols: the feature networks in the released layout, MAISI's 2.5D preprocessing by hand, where weights come
from (and what an offline machine is told), and the options. Runs through ``evaluate`` are in test_evaluate.py."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch
from torch import nn

from monai_diffusion import fid
from monai_diffusion.config.schema import IntensityConfig
from monai_diffusion.networks.feature_networks import medicalnet_resnet, radimagenet_resnet50

from helpers import save_feature_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    return save_feature_weights(tmp_path_factory.mktemp("weights"))


def test_medicalnet_dilates_its_last_two_stages_and_gives_512_features():
    network = medicalnet_resnet(10)
    keys = network.state_dict()
    # The hub's layout: no classifier, no bias in a downsampling shortcut, a 7^3 stem on one channel.
    assert keys["conv1.weight"].shape == (64, 1, 7, 7, 7) and "layer3.0.downsample.0.bias" not in keys
    assert not any(key.startswith("fc.") for key in keys)
    for stage, dilation in (("layer2", 1), ("layer3", 2), ("layer4", 4)):
        conv = getattr(network, stage)[0].conv1
        assert conv.dilation == (dilation,) * 3 and conv.padding == (dilation,) * 3
        assert conv.stride == ((2,) * 3 if stage == "layer2" else (1,) * 3)
    with torch.no_grad():
        assert network(torch.rand(1, 1, 16, 16, 16)).shape == (1, 512)


def test_radimagenet_strides_in_the_first_convolution_with_biases_and_gives_2048_features():
    network = radimagenet_resnet50()
    keys = network.state_dict()
    assert {"conv1.bias", "layer1.0.conv1.bias", "layer1.0.downsample.0.bias"} <= set(keys)
    assert keys["conv1.weight"].shape == (64, 3, 7, 7) and keys["layer4.2.bn3.running_var"].shape == (2048,)
    assert network.layer2[0].conv1.stride == (2, 2) and network.layer2[0].conv2.stride == (1, 1)
    assert {m.eps for m in network.modules() if isinstance(m, nn.BatchNorm2d)} == {1.001e-5}
    with torch.no_grad():
        assert network(torch.rand(2, 3, 32, 32)).shape == (2, 2048)


def test_a_narrow_file_keeps_every_released_key():
    assert medicalnet_resnet(10, 1 / 16).state_dict().keys() == medicalnet_resnet(10).state_dict().keys()
    assert radimagenet_resnet50(1 / 16).state_dict().keys() == radimagenet_resnet50().state_dict().keys()
    with pytest.raises(ValueError, match="widen_factor 0.001: leaves a stage"):
        medicalnet_resnet(10, 0.001)
    with pytest.raises(ValueError, match="MedicalNet depth 18: expected one of \\[10, 50\\]"):
        medicalnet_resnet(18)


def test_maisi_planes_by_hand():
    volume = torch.arange(4 * 5 * 10, dtype=torch.float32).reshape(1, 4, 5, 10)  # value = 50 x + 10 y + z
    planes = fid.maisi_planes(volume)
    # The central 0.4 of each axis as MAISI's script picks it: z 3-6 of 10, x 1 of 4, y 1-2 of 5.
    assert {plane: tuple(stack.shape) for plane, stack in planes.items()} == {
        "xy": (4, 3, 4, 5), "yz": (1, 3, 5, 10), "zx": (2, 3, 4, 10)}
    means = torch.tensor([0.406, 0.456, 0.485]).view(3, 1, 1)
    # One min-max over the plane's whole stack (not per slice), then the channel means (BGR order) subtracted.
    for plane, slices, low, high in (("xy", [volume[0, :, :, z] for z in range(3, 7)], 3, 196),
                                     ("yz", [volume[0, 1]], 50, 99),
                                     ("zx", [volume[0, :, 1], volume[0, :, 2]], 10, 179)):
        for stack, expected in zip(planes[plane], slices):
            torch.testing.assert_close(stack, ((expected - low) / (high - low)).expand(3, -1, -1) - means)
    with pytest.raises(ValueError, match="expected a \\(1, X, Y, Z\\) volume"):
        fid.maisi_planes(torch.zeros(2, 4, 4, 4))


def test_maisi_intensity_goes_back_to_hounsfield_units_and_clips_as_maisi():
    volumes = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.2])
    ct = IntensityConfig(mode="range", lower=-1000, upper=3000, b_min=0, b_max=1)
    hu, how = fid.maisi_intensity(volumes, ct)
    torch.testing.assert_close(hu, torch.tensor([-1000.0, 0.0, 1000.0, 1000.0, 1000.0]))
    assert "clipped to [-1000, 1000] HU" in how
    raw, _ = fid.maisi_intensity(torch.tensor([-2000.0, 5.0, 3000.0]), IntensityConfig(mode="none"))
    torch.testing.assert_close(raw, torch.tensor([-1000.0, 5.0, 1000.0]))
    same, how = fid.maisi_intensity(volumes, IntensityConfig())
    assert torch.equal(same, volumes) and "not clipped" in how


def test_medicalnet_input_is_the_volume_z_scored():
    volume = torch.rand(1, 6, 6, 6) * 7 + 3
    z = fid.medicalnet_input(volume)
    assert z.shape == (1, 1, 6, 6, 6) and type(z) is torch.Tensor
    assert float(z.mean()) == pytest.approx(0, abs=1e-5) and float(z.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    assert torch.equal(fid.medicalnet_input(torch.full((1, 4, 4, 4), 5.0)), torch.zeros(1, 1, 4, 4, 4))


def test_released_files_load_with_their_hash_and_features_have_the_protocols_shape(weight_files):
    medicalnet = fid.load_feature_network("medicalnet", weight_files["medicalnet"], CPU)
    assert medicalnet.source == "--fid-weights" and medicalnet.weights == weight_files["medicalnet"]
    assert medicalnet.sha256 == hashlib.sha256(weight_files["medicalnet"].read_bytes()).hexdigest()
    volumes = torch.rand(3, 1, 16, 16, 16)
    assert fid.features(medicalnet, volumes, CPU, intensity=IntensityConfig())["3d"].shape == (3, 32)
    radimagenet = fid.load_feature_network("radimagenet-2.5d", weight_files["radimagenet-2.5d"], CPU)
    sets = fid.features(radimagenet, volumes, CPU, intensity=IntensityConfig())
    # 7 central slices of 16 per plane and volume, 128 features each (the narrow file; 2048 released).
    assert {plane: tuple(rows.shape) for plane, rows in sets.items()} == {p: (21, 128) for p in fid.PLANES}
    assert all(value == pytest.approx(0, abs=1e-4) for value in fid.frechet(sets, sets).values())


def test_weights_come_from_torch_hubs_folder_else_the_error_says_where_to_put_them(weight_files, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load", offline)
    place = tmp_path / "hub" / "monai_checkpoints" / "medicalnet_resnet_10_23dataset.pth"
    with pytest.raises(FileNotFoundError) as error:
        fid.load_feature_network("medicalnet", None, CPU)
    message = str(error.value)
    assert "--fid medicalnet" in message and str(place) in message and "URLError" in message
    assert "--fid-weights medicalnet=FILE" in message and "medicalnet_resnet_10_23dataset.pth" in message

    place.parent.mkdir(parents=True)
    place.write_bytes(weight_files["medicalnet"].read_bytes())
    found = fid.load_feature_network("medicalnet", None, CPU)
    assert found.weights == place and found.source == "torch hub's folder"
    # RadImageNet's entry looks in the hub folder itself first, as perceptual-models' radimagenet_resnet50 does.
    (tmp_path / "hub" / "RadImageNet-ResNet50_notop.pth").write_bytes(weight_files["radimagenet-2.5d"].read_bytes())
    assert fid.load_feature_network("radimagenet-2.5d", None, CPU).weights.parent == tmp_path / "hub"


def test_a_file_of_another_network_is_refused_naming_the_keys(weight_files):
    with pytest.raises(ValueError, match="--fid-weights medicalnet: .* does not fit the FID feature network") as error:
        fid.load_feature_network("medicalnet", weight_files["radimagenet-2.5d"], CPU)
    assert "conv1.bias" in str(error.value) and "RadImageNet-ResNet50_notop.pth" in str(error.value)


def test_the_options_are_checked(weight_files, tmp_path):
    assert fid.protocol_names(["none"]) == []
    assert fid.protocol_names(["medicalnet", "radimagenet-2.5d"]) == ["medicalnet", "radimagenet-2.5d"]
    with pytest.raises(ValueError, match="--fid inception: expected one of medicalnet, medicalnet-resnet50, "
                                         "radimagenet-2.5d, a torch.export file"):
        fid.protocol_names(["inception"])
    with pytest.raises(ValueError, match="'none' turns FID off"):
        fid.protocol_names(["none", "medicalnet"])
    with pytest.raises(ValueError, match="named twice"):
        fid.protocol_names(["medicalnet", "medicalnet"])
    with pytest.raises(FileNotFoundError, match="--fid missing.pt2: no such torch.export file"):
        fid.protocol_names(["missing.pt2"])

    medicalnet = str(weight_files["medicalnet"])
    assert fid.fid_weights_option([medicalnet], ["medicalnet"]) == {"medicalnet": weight_files["medicalnet"]}
    both = ["medicalnet", "radimagenet-2.5d"]
    assert fid.fid_weights_option([f"medicalnet={medicalnet}"], both) == {"medicalnet": weight_files["medicalnet"]}
    with pytest.raises(ValueError, match="name the protocol \\(PROTOCOL=FILE\\), as --fid lists 2 protocols"):
        fid.fid_weights_option([medicalnet], both)
    with pytest.raises(ValueError, match="radimagenet-2.5d is not among --fid's protocols \\(medicalnet\\)"):
        fid.fid_weights_option([f"radimagenet-2.5d={medicalnet}"], ["medicalnet"])
    with pytest.raises(FileNotFoundError, match="--fid-weights medicalnet=nothing.pth: no such file"):
        fid.fid_weights_option(["medicalnet=nothing.pth"], both)
