"""The MONAI transform chain on real NIfTI files: size, intensity, orientation, spacing, augmentation, checks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data import build_transforms

SHAPE = (20, 18, 16)
# x runs right-to-left (LAS-like), anisotropic voxels, an offset: Orientationd(RAS) must flip x.
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.2, 0, -10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
MARKER = (2, 5, 7)


def write_volume(path: Path, values: np.ndarray, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(values, affine), path)
    return str(path)


@pytest.fixture()
def volume(tmp_path) -> str:
    """Values 10..110 with one bright marker voxel (300) and one low outlier (-50)."""
    values = (np.random.default_rng(0).random(SHAPE) * 100 + 10).astype(np.float32)
    values[MARKER] = 300.0
    values[10, 10, 10] = -50.0
    return write_volume(tmp_path / "vol.nii.gz", values)


def data_config(**data) -> DataConfig:
    """Only the data section: the whole config's cross-field rules would tie voxel_size to the networks."""
    return DataConfig.model_validate(data)


def test_output_shape_type_and_percentile_range(volume):
    # x and z are cropped/kept, y padded: every axis reaches voxel_size
    data = data_config(voxel_size=[16, 24, 16])
    image = build_transforms(data, train=False)({"image": volume})["image"]
    assert isinstance(image, MetaTensor)
    assert image.shape == (1, 16, 24, 16)
    assert image.dtype == torch.float32
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0  # percentile scaling clips to [0, 1]
    assert image.affine.shape == (4, 4)
    assert torch.allclose(image.pixdim.float(), torch.tensor([1.5, 1.2, 2.0]))
    assert image.meta["filename_or_obj"] == volume


def test_orientation_is_applied_and_world_position_kept(volume):
    data = data_config(voxel_size=list(SHAPE), intensity={"mode": "none"})
    image = build_transforms(data, train=False)({"image": volume})["image"]
    marker = np.unravel_index(int(torch.argmax(image[0])), SHAPE)
    assert tuple(int(i) for i in marker) == (SHAPE[0] - 1 - MARKER[0], MARKER[1], MARKER[2])  # x flipped
    assert float(image.max()) == 300.0 and float(image.min()) == -50.0  # mode none: values untouched
    affine = image.affine.numpy()
    assert np.all(np.diag(affine)[:3] > 0)  # RAS
    world_before = AFFINE @ np.array([*MARKER, 1.0])
    world_after = affine @ np.array([*marker, 1.0])
    assert np.allclose(world_before, world_after)


def test_spacing_resamples_and_range_mode_pads_with_b_min(volume):
    data = data_config(
        voxel_size=[24, 24, 24],
        spacing=[3.0, 3.0, 3.0],
        intensity={"mode": "range", "lower": 0, "upper": 100, "b_min": -1, "b_max": 1},
    )
    image = build_transforms(data, train=False)({"image": volume})["image"]
    assert image.shape == (1, 24, 24, 24)
    assert torch.allclose(image.pixdim.float(), torch.tensor([3.0, 3.0, 3.0]))
    assert float(image.min()) >= -1 and float(image.max()) <= 1
    assert float(image[0, 0, 0, 0]) == -1.0  # padding is the scaled background, not 0


def test_train_augmentation_keeps_shape_and_is_seedable(volume):
    data = data_config(voxel_size=[16, 16, 16], augment={"flip_prob": 0.5, "affine_prob": 1.0})
    val_image = build_transforms(data, train=False)({"image": volume})["image"]
    chain = build_transforms(data, train=True)
    chain.set_random_state(seed=1)
    first = chain({"image": volume})["image"]
    chain.set_random_state(seed=1)
    again = chain({"image": volume})["image"]
    assert first.shape == (1, 16, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.allclose(first, val_image)
    assert float(first.min()) >= 0 and float(first.max()) <= 1


def test_multichannel_4d_volume(tmp_path):
    values = np.random.default_rng(1).random((*SHAPE, 2)).astype(np.float32)
    path = write_volume(tmp_path / "two.nii.gz", values)
    data = data_config(voxel_size=[16, 16, 16])
    image = build_transforms(data, train=False, expected_channels=2)({"image": path})["image"]
    assert image.shape == (2, 16, 16, 16)
    # NIfTI's vector layout (x, y, z, 1, c) gives the same channels
    vector_path = write_volume(tmp_path / "vector.nii.gz", values[:, :, :, None, :])
    vector = build_transforms(data, train=False, expected_channels=2)({"image": vector_path})["image"]
    assert torch.equal(vector.as_tensor(), image.as_tensor())
    with pytest.raises(RuntimeError) as raised:
        build_transforms(data, train=False, expected_channels=1)({"image": path})
    assert "two.nii.gz: has 2 channel(s)" in _chain(raised.value)


def test_channel_selection_keeps_the_chosen_channel_of_a_4d_file(tmp_path):
    """data.channel: 0 keeps FLAIR of a BraTS-like (x, y, z, 4) file; a list keeps several, in its order."""
    rng = np.random.default_rng(2)
    values = np.stack([rng.random(SHAPE) * 100 * (c + 1) for c in range(4)], axis=-1).astype(np.float32)
    path = write_volume(tmp_path / "brats.nii.gz", values)
    full = build_transforms(data_config(voxel_size=[16, 16, 16]), train=False, expected_channels=4)({"image": path})
    flair = build_transforms(data_config(voxel_size=[16, 16, 16], channel=0), train=False)({"image": path})
    assert flair["image"].shape == (1, 16, 16, 16)
    torch.testing.assert_close(flair["image"].as_tensor(), full["image"][:1].as_tensor())
    torch.testing.assert_close(flair["image"].affine, full["image"].affine)
    pair = build_transforms(data_config(voxel_size=[16, 16, 16], channel=[3, 1]), train=False, expected_channels=2)
    torch.testing.assert_close(pair({"image": path})["image"].as_tensor(), full["image"][[3, 1]].as_tensor())
    with pytest.raises(RuntimeError) as raised:
        build_transforms(data_config(voxel_size=[16, 16, 16], channel=4), train=False)({"image": path})
    assert "brats.nii.gz: has 4 channel(s) (shape (4, 20, 18, 16), channel first), but data.channel selects [4]" in \
        _chain(raised.value)


def test_intensity_follows_each_items_class(tmp_path):
    """MAISI's data: CT in Hounsfield units through a fixed window, MRI by percentiles, picked by the item's class;
    items of no listed class get data.intensity."""
    ct_values = np.full(SHAPE, -1000.0, np.float32)
    ct_values[5:15, 5:13, 4:12] = 500.0
    ct = write_volume(tmp_path / "ct.nii.gz", ct_values)
    mri = write_volume(tmp_path / "mri.nii.gz", (np.random.default_rng(3).random(SHAPE) * 700).astype(np.float32))
    data = data_config(
        voxel_size=[16, 16, 16], intensity={"mode": "range", "lower": -1000, "upper": 1000},
        intensity_by_class={"mri": {"mode": "percentile", "lower": 0, "upper": 50, "clip": False}},
    )
    chain = build_transforms(data, train=False)
    scaled_ct = chain({"image": ct, "class": "ct"})["image"]
    assert sorted(torch.unique(scaled_ct).tolist()) == pytest.approx([0.0, 0.75])  # (500 + 1000) / 2000
    scaled_mri = chain({"image": mri, "class": "mri"})["image"]
    assert float(scaled_mri.max()) > 1.5  # the median maps to 1, unclipped: percentiles, not the CT window
    torch.testing.assert_close(chain({"image": ct})["image"], scaled_ct)  # no class: data.intensity


def test_patches_are_random_crops_for_training_only(volume):
    data = data_config(voxel_size=[16, 16, 16])
    train = build_transforms(data, train=True, patch_size=[8, 8, 4])
    whole = build_transforms(data, train=False, patch_size=[8, 8, 4])({"image": volume})["image"]
    assert whole.shape == (1, 16, 16, 16)
    train.set_random_state(seed=0)
    crops = [train({"image": volume})["image"] for _ in range(4)]
    assert all(crop.shape == (1, 8, 8, 4) for crop in crops)
    assert len({tuple(crop.affine[:3, 3].tolist()) for crop in crops}) > 1  # different places in the volume
    for crop in crops:  # each is a piece of the whole volume
        start = torch.linalg.solve(whole.affine, crop.affine)[:3, 3].round().int().tolist()
        window = whole[(slice(None), *(slice(s, s + n) for s, n in zip(start, (8, 8, 4))))]
        torch.testing.assert_close(crop.as_tensor(), window.as_tensor())


def test_patches_can_be_weighted_to_the_foreground(tmp_path):
    """A small bright object in a dark 32^3 volume: uniform 8^3 crops mostly miss it; with a foreground ratio of 1
    every crop is centred on it, with 0 every crop is centred on background; the foreground map is not kept."""
    values = np.zeros((32, 32, 32), np.float32)
    values[2:6, 3:7, 24:28] = 100.0
    path = write_volume(tmp_path / "object.nii.gz", values, np.eye(4))
    data = data_config(voxel_size=[32, 32, 32], intensity={"mode": "range", "lower": 0, "upper": 100})

    def crops(ratio):
        chain = build_transforms(data, train=True, patch_size=[8, 8, 8], foreground_ratio=ratio)
        chain.set_random_state(seed=0)
        out = []
        for _ in range(12):
            item = chain({"image": path})
            item = item[0] if isinstance(item, list) else item  # RandCropByPosNegLabeld's list of one
            assert set(item) == {"image"} and item["image"].shape == (1, 8, 8, 8)
            out.append(item["image"])
        return out

    centre = (slice(None), 4, 4, 4)
    assert all(float(crop[centre]) == 1.0 for crop in crops(1.0))
    assert all(float(crop[centre]) == 0.0 for crop in crops(0.0))
    assert sum(bool((crop > 0).any()) for crop in crops(None)) < 12  # uniform crops: some miss the object


def test_the_foreground_threshold_defaults_to_five_percent_of_the_output_range():
    from monai_diffusion.data.transforms import foreground_threshold

    data = data_config(intensity={"b_min": -1.0, "b_max": 1.0})
    assert foreground_threshold(data, None) == pytest.approx(-0.9)
    assert foreground_threshold(data, 0.3) == 0.3

def test_the_chain_rejects_non_finite_volumes_naming_the_file(tmp_path):
    values = np.ones(SHAPE, np.float32)
    values[1, 2, 3] = np.nan
    path = write_volume(tmp_path / "nan.nii.gz", values)
    with pytest.raises(RuntimeError) as raised:
        build_transforms(data_config(voxel_size=[16, 16, 16]), train=False)({"image": path})
    assert "nan.nii.gz: contains 1 NaN/Inf value(s)" in _chain(raised.value)


def _chain(error: BaseException) -> str:
    """Every message in an exception chain (MONAI's Compose wraps errors in RuntimeError)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)
