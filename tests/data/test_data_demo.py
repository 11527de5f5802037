"""The built-in demo set: real MNI152 anatomy, written once into the cache and reused."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from monai_diffusion.config import config_from_dict
from monai_diffusion.data import build_demo_dataset, list_volumes


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """Two demo volumes in a temporary cache (built once for the module: the template load takes ~3 s)."""
    cache_dir = tmp_path_factory.mktemp("demo_cache")
    return cache_dir, build_demo_dataset(cache_dir, num_volumes=2, seed=0)


def test_demo_volumes_hold_real_brain_anatomy(demo_files):
    cache_dir, paths = demo_files
    assert len(paths) == 2
    assert all(path.is_file() and path.is_absolute() and cache_dir in path.parents for path in paths)
    assert [path.name for path in paths] == ["demo_000.nii.gz", "demo_001.nii.gz"]
    volumes = []
    for path in paths:
        image = nib.load(path)
        assert image.shape == (99, 117, 95)
        assert image.get_data_dtype() == np.uint8
        assert np.allclose(image.header.get_zooms(), (2.0, 2.0, 2.0))
        assert np.allclose(np.diag(image.affine), [2, 2, 2, 1])  # RAS, 2 mm, MNI origin
        assert np.allclose(image.affine[:3, 3], [-98, -134, -72])
        assert path.stat().st_size < 600_000  # compact: uint8 + gzip
        values = np.asarray(image.dataobj)
        head = values > 0
        assert 0.1 < head.mean() < 0.4  # a brain, not an empty or full box
        assert values.max() > 100
        # clean background at the borders (the template's brainstem itself reaches the bottom slice)
        assert not (head[0].any() or head[-1].any() or head[:, 0].any() or head[:, -1].any() or head[:, :, -1].any())
        volumes.append(values)
    assert not np.array_equal(volumes[0], volumes[1])  # random variations differ per volume


def test_second_call_reuses_the_files(demo_files):
    cache_dir, paths = demo_files
    before = [path.stat().st_mtime_ns for path in paths]
    again = build_demo_dataset(cache_dir, num_volumes=2, seed=0)
    assert again == paths
    assert [path.stat().st_mtime_ns for path in again] == before
    assert not [p for p in cache_dir.rglob("*") if p.name.startswith(".tmp")]  # no temporary leftovers
    # fewer volumes: a prefix of the same files, nothing written
    assert build_demo_dataset(cache_dir, num_volumes=1, seed=0) == paths[:1]


def test_demo_source_lists_and_splits_the_demo_set(demo_files):
    cache_dir, paths = demo_files
    config = config_from_dict({"data": {"source": "demo", "demo": {"cache_dir": str(cache_dir), "num_volumes": 2}}})
    train, val = list_volumes(config.data, seed=config.seed)
    assert len(train) == 1 and len(val) == 1
    assert sorted(i["image"] for i in train + val) == [str(p) for p in paths]


def test_invalid_count_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_volumes must be >= 1"):
        build_demo_dataset(tmp_path, num_volumes=0)
