"""Covariates and label maps in the data: datalist fields checked row by row, label maps that move with their image
through every spatial transform, and the conditional demo set whose covariate changes the anatomy measurably."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.config import config_from_dict
from monai_diffusion.data import build_demo_dataset, build_transforms, list_volumes
from monai_diffusion.data.demo import (
    DEMO_BRAIN_SCALE_RANGE,
    _load_template,
    _load_tissue_labels,
    _make_volume,
    build_conditional_demo_dataset,
)
from monai_diffusion.data.sources import check_label_maps
from monai_diffusion.data.transforms import build_mask_transforms

AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, 2.0, 0, -20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def write_pair(folder, name: str, shape=(20, 18, 16), seed: int = 0, affine=AFFINE):
    """An image with a bright off-centre box and its label map (1 inside the box, 2 in its upper half)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[3:12, 4:15, 2:9] = 1
    label[3:12, 4:15, 6:9] = 2
    image = (label > 0) * 100.0 + rng.normal(0, 1, shape)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_seg.nii.gz")


def data_config(datalist, **data):
    return config_from_dict({"data": {"source": "datalist", "datalist": str(datalist), "voxel_size": [16, 16, 16],
                                      **data}}).data


CONDITIONS = [{"name": "age"}, {"name": "sex", "type": "categorical"}]


def test_json_entries_keep_covariates_and_label_maps_with_absolute_paths(tmp_path):
    write_pair(tmp_path / "imgs", "a")
    write_pair(tmp_path / "imgs", "b")
    (tmp_path / "list.json").write_text(json.dumps({"training": [
        {"image": "imgs/a.nii.gz", "seg": "imgs/a_seg.nii.gz", "age": 70, "sex": "F"},
        {"image": "imgs/b.nii.gz", "seg": "imgs/b_seg.nii.gz", "age": 81.5, "sex": "M"},
    ]}))
    train, val = list_volumes(data_config(tmp_path / "list.json", conditions=CONDITIONS, mask_key="seg",
                                          val_fraction=0.0), seed=0)
    assert val == [] and [item["age"] for item in train] == [70, 81.5]
    assert train[0]["seg"] == str(tmp_path / "imgs" / "a_seg.nii.gz")


def test_missing_and_non_numeric_values_are_named_by_row_and_key(tmp_path):
    write_pair(tmp_path, "a")
    (tmp_path / "list.json").write_text(json.dumps({"training": [
        {"image": "a.nii.gz", "age": 70, "sex": "F"},
        {"image": "a.nii.gz", "age": "seventy", "sex": "F"},
        {"image": "a.nii.gz", "sex": "M"},
    ]}))
    with pytest.raises(ValueError) as info:
        list_volumes(data_config(tmp_path / "list.json", conditions=CONDITIONS), seed=0)
    message = str(info.value)
    assert f"data.datalist: {tmp_path / 'list.json'} has 2 bad field value(s)" in message
    assert "['training'][1]: 'age' is 'seventy', not a number (data.conditions)" in message
    assert "['training'][2]: 'age' is missing (data.conditions)" in message

    (tmp_path / "list.csv").write_text("image,age,sex,seg\na.nii.gz,70,F,a_seg.nii.gz\na.nii.gz,,M,\n"
                                       "a.nii.gz,12x,F,a_seg.nii.gz\n")
    with pytest.raises(ValueError) as info:
        list_volumes(data_config(tmp_path / "list.csv", conditions=CONDITIONS, mask_key="seg"), seed=0)
    message = str(info.value)
    assert "line 3: 'age' is missing (data.conditions)" in message
    assert "line 3: 'seg' is missing or not a file path (data.mask_key)" in message
    assert "line 4: 'age' is '12x', not a number (data.conditions)" in message

    (tmp_path / "ok.csv").write_text("image,age,sex,seg\na.nii.gz,70,F,gone.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="gone.nii.gz"):
        list_volumes(data_config(tmp_path / "ok.csv", conditions=CONDITIONS, mask_key="seg"), seed=0)


def test_label_maps_follow_every_spatial_transform_of_their_image(tmp_path):
    write_pair(tmp_path, "a")
    item = {"image": str(tmp_path / "a.nii.gz"), "seg": str(tmp_path / "a_seg.nii.gz")}
    data = config_from_dict({"data": {
        "voxel_size": [16, 16, 16], "spacing": [2.0, 2.0, 2.0], "intensity": {"mode": "range", "lower": 0,
                                                                            "upper": 100},
        "augment": {"flip_prob": 0.5, "affine_prob": 1.0, "rotate_range": 0.3, "scale_range": 0.2}}}).data
    chain = build_transforms(data, train=True, mask_key="seg")
    for seed in range(4):
        chain.set_random_state(seed)
        out = chain(dict(item))
        image, mask = out["image"], out["seg"]
        assert mask.shape == image.shape == (1, 16, 16, 16) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0, 2.0}
        inside = image > 0.5
        agreement = (inside == (mask > 0)).float().mean()
        assert agreement > 0.97, f"seed {seed}: the label map moved apart from its image ({agreement:.3f})"
        torch.testing.assert_close(torch.as_tensor(mask.affine), torch.as_tensor(image.affine))
    # Without random transforms, the label map alone goes where the image goes (the cached latents' grid).
    deterministic = build_transforms(data, train=False, mask_key="seg")(dict(item))
    alone = build_mask_transforms(data, "seg")({"seg": item["seg"]})["seg"]
    assert torch.equal(torch.as_tensor(alone), torch.as_tensor(deterministic["seg"]))
    torch.testing.assert_close(torch.as_tensor(alone.affine), torch.as_tensor(deterministic["image"].affine))
    # The image-only chain is what it always was: the same transforms, one key.
    assert [type(t).__name__ for t in build_transforms(data, train=True).transforms] == [
        "LoadImaged", "EnsureChannelFirstd", "ValidateVolumed", "Orientationd", "Spacingd", "ScaleIntensityRanged",
        "ResizeWithPadOrCropd", "RandFlipd", "RandFlipd", "RandFlipd", "RandAffined", "EnsureTyped"]


def test_label_maps_on_another_grid_or_with_other_labels_are_refused_naming_the_file(tmp_path):
    write_pair(tmp_path, "a")
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    write_pair(tmp_path, "shifted", affine=shifted)
    write_pair(tmp_path, "small", shape=(20, 18, 15))
    items = [{"image": str(tmp_path / "a.nii.gz"), "seg": str(tmp_path / name)}
             for name in ("a_seg.nii.gz", "shifted_seg.nii.gz", "small_seg.nii.gz")]
    with pytest.raises(ValueError) as info:
        check_label_maps(items, "seg", num_labels=3)
    message = str(info.value)
    assert "2 of 3 label map(s) (data.mask_key 'seg') are unusable" in message
    assert f"{tmp_path / 'shifted_seg.nii.gz'}: has another affine" in message
    assert f"{tmp_path / 'small_seg.nii.gz'}: has shape (20, 18, 15), not the shape (20, 18, 16)" in message
    with pytest.raises(ValueError, match=r"a_seg.nii.gz: holds labels 0\.\.2, outside 0\.\.1"):
        check_label_maps(items[:1], "seg", num_labels=2)
    with pytest.raises(RuntimeError) as raised:  # the chain on its own refuses it too (MONAI wraps the error)
        build_transforms(config_from_dict({"data": {"voxel_size": [16, 16, 16]}}).data, train=False,
                         mask_key="seg")(dict(items[1]))
    assert "shifted_seg.nii.gz: label map (seg) has another affine" in str(raised.value.__cause__)


@pytest.fixture(scope="module")
def conditional_demo(tmp_path_factory):
    """Four conditional demo volumes in a temporary cache, beside the plain set's first two."""
    cache_dir = tmp_path_factory.mktemp("demo_cache")
    return cache_dir, build_conditional_demo_dataset(cache_dir, num_volumes=4, seed=0)


def test_the_conditional_demo_covariate_changes_the_brain_volume_and_the_labels_follow(conditional_demo):
    cache_dir, datalist = conditional_demo
    entries = json.loads(datalist.read_text())["training"]
    scales, volumes = [], []
    for entry in entries:
        assert DEMO_BRAIN_SCALE_RANGE[0] <= entry["brain_scale"] <= DEMO_BRAIN_SCALE_RANGE[1]
        image = np.asarray(nib.load(datalist.parent / entry["image"]).dataobj)
        label = np.asarray(nib.load(datalist.parent / entry["label"]).dataobj)
        assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2, 3}
        brain = image > 0.2 * image.max()
        assert 2 * (brain & (label > 0)).sum() / (brain.sum() + (label > 0).sum()) > 0.95  # labels lie on the brain
        assert image[label == 3].mean() > image[label == 2].mean() > image[label == 1].mean()  # T1: WM > GM > CSF
        scales.append(entry["brain_scale"])
        volumes.append(int(brain.sum()))
    # The volume grows with the scale, close to its cube (the demo's own small random scaling aside).
    order = np.argsort(scales)
    assert list(np.argsort(volumes)) == list(order)
    ratio = volumes[order[-1]] / volumes[order[0]]
    assert ratio == pytest.approx((scales[order[-1]] / scales[order[0]]) ** 3, rel=0.2)


def test_the_conditional_demo_is_its_own_option_and_leaves_the_plain_set_alone(conditional_demo, tmp_path):
    cache_dir, datalist = conditional_demo
    plain = build_demo_dataset(cache_dir, num_volumes=2, seed=0)
    assert plain[0].parent != datalist.parent  # separate files under their own settings hash
    # A conditional volume is the plain one, scaled: at brain scale 1 it is the plain file, bit for bit.
    template, _ = _load_template()
    image, label = _make_volume(template, 1, 0, _load_tissue_labels(), brain_scale=1.0)
    assert np.array_equal(np.asarray(nib.load(plain[1]).dataobj), image) and label is not None
    config = config_from_dict({"data": {"source": "demo", "val_fraction": 0.25, "mask_key": "label",
                                        "conditions": [{"name": "brain_scale"}],
                                        "demo": {"cache_dir": str(cache_dir), "num_volumes": 4, "conditional": True}}})
    train, val = list_volumes(config.data, seed=0)
    assert len(train) == 3 and len(val) == 1
    assert all(item["label"].endswith("_label.nii.gz") and isinstance(item["brain_scale"], float)
               for item in train + val)
    plain_items, _ = list_volumes(config_from_dict({"data": {"source": "demo", "demo": {
        "cache_dir": str(cache_dir), "num_volumes": 2}}}).data, seed=0)
    assert {item["image"] for item in plain_items} <= {str(p) for p in plain}
    assert all(set(item) == {"image"} for item in plain_items)  # the plain demo's items: images only, as before
