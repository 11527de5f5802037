"""Listing volumes (folder / JSON / CSV datalists), the seeded split, and screening of bad files."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_diffusion.config import config_from_dict
from monai_diffusion.data import list_volumes, screen_volumes, split_train_val

SHAPE = (20, 18, 16)
# Non-identity affine: anisotropic voxels, x flipped, an offset.
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.2, 0, -10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])


def write_volume(path: Path, shape=SHAPE, seed: int = 0, dtype=np.float32, values: np.ndarray | None = None) -> Path:
    """A small NIfTI with smooth-ish random content."""
    if values is None:
        values = (np.random.default_rng(seed).random(shape) * 100).astype(dtype)
    nib.save(nib.Nifti1Image(values, AFFINE), path)
    return path


def data_config(**data):
    return config_from_dict({"data": data}).data


# ------------------------------------------------------------------------ folder


def test_folder_source_lists_sorted_absolute_paths_matching_the_glob(tmp_path):
    for name in ["b.nii.gz", "a.nii.gz", "c.nii"]:
        write_volume(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    data = data_config(source="folder", data_dir=str(tmp_path), val_fraction=0.0)
    train, val = list_volumes(data, seed=0)
    assert [Path(i["image"]).name for i in train] == ["a.nii.gz", "b.nii.gz", "c.nii"]
    assert val == []
    assert all(Path(i["image"]).is_absolute() for i in train)

    only_gz = data_config(source="folder", data_dir=str(tmp_path), glob="*.nii.gz", val_fraction=0.0)
    assert [Path(i["image"]).name for i in list_volumes(only_gz, 0)[0]] == ["a.nii.gz", "b.nii.gz"]


def test_folder_errors_name_the_folder_and_the_glob(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        list_volumes(data_config(source="folder", data_dir=str(missing)), 0)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no file in .* matches data.glob='\*.nii\*'.*readme.txt"):
        list_volumes(data_config(source="folder", data_dir=str(tmp_path)), 0)


# --------------------------------------------------------------------- datalists


def test_json_datalist_with_validation_split_and_relative_paths(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ["t1.nii.gz", "t2.nii.gz", "v1.nii.gz"]:
        write_volume(images / name)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({
        "name": "tiny",
        "training": [{"image": "images/t1.nii.gz"},
                     {"image": str(images / "t2.nii.gz"), "label": "labels/t2.nii.gz", "class": "mri", "site": 3,
                      "regions": [1, 2], "note": None}],
        "validation": [{"image": "images/v1.nii.gz", "class": "ct"}],
    }))
    train, val = list_volumes(data_config(source="datalist", datalist=str(datalist)), seed=0)
    # An entry's other text and number fields stay with it (data.intensity_by_class reads `class`); lists and
    # nulls, which would not collate into a batch, are left out.
    assert train == [{"image": str(images / "t1.nii.gz")},
                     {"image": str(images / "t2.nii.gz"), "label": "labels/t2.nii.gz", "class": "mri", "site": 3}]
    assert val == [{"image": str(images / "v1.nii.gz"), "class": "ct"}]


def test_json_datalist_without_validation_uses_val_fraction(tmp_path):
    for index in range(10):
        write_volume(tmp_path / f"{index}.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": f"{i}.nii.gz"} for i in range(10)]}))
    train, val = list_volumes(data_config(source="datalist", datalist=str(datalist), val_fraction=0.2), seed=3)
    assert len(train) == 8 and len(val) == 2
    assert not {i["image"] for i in train} & {i["image"] for i in val}


def test_csv_datalist_with_split_column(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    for name in ["a", "b", "c", "d"]:
        write_volume(sub / f"{name}.nii.gz")
    datalist = tmp_path / "list.csv"
    datalist.write_text("image,split,class\nsub/a.nii.gz,train,ct\nsub/b.nii.gz,TRAINING,mri\n"
                        "sub/c.nii.gz,validation,ct\nsub/d.nii.gz,test,ct\n")
    train, val = list_volumes(data_config(source="datalist", datalist=str(datalist)), seed=0)
    assert [(Path(i["image"]).name, i["class"]) for i in train] == [("a.nii.gz", "ct"), ("b.nii.gz", "mri")]
    assert val == [{"image": str(sub / "c.nii.gz"), "class": "ct"}]


def test_csv_datalist_without_split_column_is_split_by_fraction(tmp_path):
    for name in ["a", "b", "c"]:
        write_volume(tmp_path / f"{name}.nii.gz")
    datalist = tmp_path / "list.csv"
    datalist.write_text("image\na.nii.gz\nb.nii.gz\nc.nii.gz\n")
    train, val = list_volumes(data_config(source="datalist", datalist=str(datalist), val_fraction=0.1), seed=0)
    assert len(train) == 2 and len(val) == 1  # at least one validation volume


def test_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        list_volumes(data_config(source="datalist", datalist=str(tmp_path / "missing.json")), 0)

    write_volume(tmp_path / "there.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "there.nii.gz"}, {"image": "gone.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match=r"list.json: 1 image file\(s\).*\n.*gone.nii.gz"):
        list_volumes(data_config(source="datalist", datalist=str(datalist)), 0)

    datalist.write_text(json.dumps({"validation": []}))
    with pytest.raises(ValueError, match="'training' list"):
        list_volumes(data_config(source="datalist", datalist=str(datalist)), 0)

    csv_list = tmp_path / "list.csv"
    csv_list.write_text("path\nthere.nii.gz\n")
    with pytest.raises(ValueError, match="'image' column"):
        list_volumes(data_config(source="datalist", datalist=str(csv_list)), 0)
    csv_list.write_text("image,split\nthere.nii.gz,holdout\n")
    with pytest.raises(ValueError, match="line 2: split 'holdout'"):
        list_volumes(data_config(source="datalist", datalist=str(csv_list)), 0)


# ------------------------------------------------------------------------- split


def test_val_fraction_split_is_deterministic_for_a_seed():
    items = [{"image": f"/x/{i}.nii.gz"} for i in range(20)]
    first = split_train_val(items, 0.25, seed=7)
    assert first == split_train_val(items, 0.25, seed=7)
    assert len(first[1]) == 5 and len(first[0]) == 15
    assert sorted(first[0] + first[1], key=items.index) == items
    assert first[0] == sorted(first[0], key=items.index)  # input order kept
    assert split_train_val(items, 0.25, seed=8)[1] != first[1]


def test_split_edge_cases():
    two = [{"image": "/a"}, {"image": "/b"}]
    assert [len(part) for part in split_train_val(two, 0.01, 0)] == [1, 1]
    assert split_train_val(two, 0.0, 0) == (two, [])
    assert split_train_val(two[:1], 0.5, 0) == (two[:1], [])


# --------------------------------------------------------------------- screening


@pytest.fixture()
def mixed_files(tmp_path):
    """Two good volumes and three bad ones: truncated gzip, 4D, NaN."""
    good = [write_volume(tmp_path / "good1.nii.gz", seed=1), write_volume(tmp_path / "good2.nii", seed=2)]
    truncated = write_volume(tmp_path / "truncated.nii.gz", seed=3)
    content = truncated.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    four_d = write_volume(tmp_path / "four_d.nii.gz", shape=(*SHAPE, 3))
    nan_values = np.random.default_rng(4).random(SHAPE).astype(np.float32)
    nan_values[3, 4, 5] = np.nan
    nan_values[0, 0, 0] = np.inf
    with_nan = write_volume(tmp_path / "with_nan.nii.gz", values=nan_values)
    items = [{"image": str(p)} for p in [good[0], truncated, four_d, good[1], with_nan]]
    return items, [str(p) for p in good], {"truncated": truncated, "four_d": four_d, "nan": with_nan}


def test_screening_error_lists_every_bad_file_with_its_reason(mixed_files):
    items, _, bad = mixed_files
    with pytest.raises(ValueError) as raised:
        screen_volumes(items, expected_channels=1, on_bad_file="error")
    message = str(raised.value)
    assert "3 of 5 volume(s) are unusable" in message
    assert f"{bad['truncated']}: cannot be read, the file is truncated or corrupt" in message
    assert f"{bad['four_d']}: has shape (20, 18, 16, 3)" in message and "expected 1" in message
    assert f"{bad['nan']}: contains 2 NaN/Inf value(s)" in message
    assert "good1" not in message and "good2" not in message


def test_screening_skip_keeps_the_good_ones_and_logs_each_skip(mixed_files, caplog):
    items, good, bad = mixed_files
    with caplog.at_level(logging.WARNING, logger="monai_diffusion"):
        kept = screen_volumes(items, expected_channels=1, on_bad_file="skip")
    assert [i["image"] for i in kept] == good
    for path in bad.values():
        assert any(str(path) in record.getMessage() for record in caplog.records)
    assert any("kept 2 of 5 volume(s), skipped 3" in record.getMessage() for record in caplog.records)


def test_screening_channel_count_follows_expected_channels(mixed_files):
    items, _, bad = mixed_files
    four_d = [{"image": str(bad["four_d"])}]
    assert screen_volumes(four_d, expected_channels=3, on_bad_file="error") == four_d
    with pytest.raises(ValueError, match="plain volume.*expected 2"):
        screen_volumes(items[:1], expected_channels=2, on_bad_file="error")


def test_screening_with_a_channel_selection_needs_that_channel_not_a_channel_count(mixed_files):
    """data.channel: 0 takes one channel from each file: a 3-channel and a plain volume both have it, a plain volume
    has no channel 2."""
    items, good, bad = mixed_files
    mixed = [{"image": str(bad["four_d"])}, {"image": good[0]}]
    assert screen_volumes(mixed, expected_channels=1, on_bad_file="error", channels=[0]) == mixed
    with pytest.raises(ValueError) as raised:
        screen_volumes(mixed, expected_channels=1, on_bad_file="error", channels=[2])
    message = str(raised.value)
    assert "1 of 2 volume(s) are unusable" in message
    assert f"{good[0]}: has shape (20, 18, 16) (a plain volume): 1 channel(s), but data.channel selects [2]" in message


def test_screening_rejects_constant_and_oversized_resampling(tmp_path):
    flat = write_volume(tmp_path / "flat.nii.gz", values=np.zeros(SHAPE, np.float32))
    ok = write_volume(tmp_path / "ok.nii.gz")
    with pytest.raises(ValueError, match="flat.nii.gz: is constant"):
        screen_volumes([{"image": str(flat)}], on_bad_file="error")
    with pytest.raises(ValueError, match=r"ok.nii.gz: would be resampled .* is data.spacing in mm"):
        screen_volumes([{"image": str(ok)}], on_bad_file="error", spacing=[0.001, 0.001, 0.001])


def test_screening_cache_skips_unchanged_files_and_rereads_changed_ones(tmp_path, monkeypatch):
    path = write_volume(tmp_path / "v.nii.gz")
    cache_file = tmp_path / "cache" / "screening.json"
    items = [{"image": str(path)}]
    assert screen_volumes(items, cache_file=cache_file) == items
    assert cache_file.is_file()

    import monai_diffusion.data.sources as sources

    calls = []
    original = sources.check_volume
    monkeypatch.setattr(sources, "check_volume", lambda *a, **k: calls.append(a) or original(*a, **k))
    assert screen_volumes(items, cache_file=cache_file) == items
    assert calls == []  # unchanged file: answered from the cache

    with gzip.open(path, "wb") as handle:  # same name, now corrupt: size/mtime change
        handle.write(b"garbage")
    with pytest.raises(ValueError, match="v.nii.gz"):
        screen_volumes(items, cache_file=cache_file)
    assert len(calls) == 1
