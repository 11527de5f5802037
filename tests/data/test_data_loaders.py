"""build_dataloaders end to end on real NIfTI files: batches, caches, DDP split, fast_dev_run, bad files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from torch.utils.data import DistributedSampler

from monai_diffusion.config import config_from_dict
from monai_diffusion.data import build_dataloaders, build_transforms
from monai_diffusion.data import preprocessed
from monai_diffusion.data.preprocessed import PreprocessedDataset

SHAPE = (20, 18, 16)
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, 1.2, 0, -10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
VOXEL_SIZE = [16, 16, 16]


def write_volumes(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        values = (np.random.default_rng(index).random(SHAPE) * 100).astype(np.float32)
        path = folder / f"vol{index:02d}.nii.gz"
        nib.save(nib.Nifti1Image(values, AFFINE), path)
        paths.append(str(path))
    return paths


def make_config(tmp_path: Path, **data):
    data = {"source": "folder", "data_dir": str(tmp_path / "images"), "voxel_size": VOXEL_SIZE, **data}
    return config_from_dict({"data": data, "output": {"output_dir": str(tmp_path / "runs")}, "seed": 5})


def filenames(batch) -> list[str]:
    return [str(name) for name in batch["image"].meta["filename_or_obj"]]


@pytest.mark.parametrize(
    ("cache", "dataset_class"),
    [("memory", CacheDataset), ("disk", PersistentDataset), ("preprocessed", PreprocessedDataset), ("none", Dataset)],
)
def test_batches_have_the_configured_shape(tmp_path, cache, dataset_class):
    write_volumes(tmp_path / "images", 6)
    config = make_config(tmp_path, cache=cache, val_fraction=0.34, augment={"flip_prob": 0.5, "affine_prob": 0.5})
    train_loader, val_loader, sampler = build_dataloaders(config, batch_size=2)
    assert sampler.num_replicas == 1 and sampler.shuffle  # order fixed by (seed, epoch): exact resume
    assert type(train_loader.dataset) is dataset_class
    assert len(train_loader.dataset) == 4 and len(val_loader.dataset) == 2
    batches = list(train_loader)
    assert [tuple(b["image"].shape) for b in batches] == [(2, 1, *VOXEL_SIZE)] * 2
    image = batches[0]["image"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert image.affine.shape == (2, 4, 4)  # kept for writing NIfTI outputs, also through the disk cache
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    val_batch = next(iter(val_loader))
    assert tuple(val_batch["image"].shape) == (2, 1, *VOXEL_SIZE)
    if cache in ("disk", "preprocessed"):
        pattern = "persistent/*.pt" if cache == "disk" else "preprocessed/*/*.npy"
        assert len(list((tmp_path / "runs" / "cache").glob(pattern))) == 6
        # a second build reads the cache and gives the same validation volumes
        _, again, _ = build_dataloaders(config, batch_size=2)
        assert torch.equal(next(iter(again))["image"], val_batch["image"])


def test_default_batch_size_and_seeded_shuffle(tmp_path):
    write_volumes(tmp_path / "images", 6)
    config = make_config(tmp_path, cache="none", val_fraction=0.0)
    assert config.autoencoder.training.batch_size == 1
    orders = []
    for _ in range(2):
        train_loader, val_loader, _ = build_dataloaders(config)
        orders.append([filenames(batch)[0] for batch in train_loader])
        assert len(val_loader) == 0
    assert orders[0] == orders[1]  # the same seed gives the same order
    assert sorted(orders[0]) == sorted(str(p) for p in sorted((tmp_path / "images").iterdir()))


def test_two_ranks_get_disjoint_training_items(tmp_path):
    write_volumes(tmp_path / "images", 9)
    config = make_config(tmp_path, cache="none", val_fraction=0.34)  # 6 train, 3 val
    seen_train, seen_val = [], []
    for rank in range(2):
        train_loader, val_loader, sampler = build_dataloaders(config, rank=rank, world_size=2, batch_size=1)
        assert isinstance(sampler, DistributedSampler) and sampler.shuffle and sampler.seed == config.seed
        sampler.set_epoch(0)
        seen_train.append({name for batch in train_loader for name in filenames(batch)})
        seen_val.append([name for batch in val_loader for name in filenames(batch)])
    assert len(seen_train[0]) == len(seen_train[1]) == 3
    assert not seen_train[0] & seen_train[1]
    # validation: every volume exactly once across ranks (no padding duplicates)
    assert sorted(seen_val[0] + seen_val[1]) == sorted(set(seen_val[0] + seen_val[1]))
    assert len(seen_val[0]) + len(seen_val[1]) == 3


def test_fast_dev_run_uses_a_few_items(tmp_path):
    write_volumes(tmp_path / "images", 12)
    raw = {"data": {"source": "folder", "data_dir": str(tmp_path / "images"), "voxel_size": VOXEL_SIZE,
                    "cache": "none", "val_fraction": 0.5}, "fast_dev_run": True,
           "output": {"output_dir": str(tmp_path / "runs")}}
    train_loader, val_loader, _ = build_dataloaders(config_from_dict(raw))
    assert len(train_loader.dataset) == 4 and len(val_loader.dataset) == 2
    assert not (tmp_path / "runs" / "cache" / "screening.json").exists()  # no state kept


def test_bad_files_stop_or_are_skipped_before_training(tmp_path):
    paths = write_volumes(tmp_path / "images", 3)
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=r"vol01.nii.gz: cannot be (read|opened)"):
        build_dataloaders(make_config(tmp_path, cache="none", val_fraction=0.0))
    train_loader, _, _ = build_dataloaders(make_config(tmp_path, cache="none", val_fraction=0.0, on_bad_file="skip"))
    assert [item["image"] for item in train_loader.dataset.data] == [paths[0], paths[2]]


def test_no_training_volume_left_is_an_error(tmp_path):
    paths = write_volumes(tmp_path / "images", 2)
    for path in paths:
        Path(path).write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="No training volume left"):
        build_dataloaders(make_config(tmp_path, cache="none", on_bad_file="skip"))


def test_global_random_state_is_left_alone(tmp_path):
    write_volumes(tmp_path / "images", 4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_dataloaders(make_config(tmp_path, cache="none"))
    assert torch.equal(torch.rand(3), expected)


def test_loader_workers_leave_sigint_and_sigterm_to_the_training_process(tmp_path):
    """Ctrl-C, torchrun's agent and schedulers signal the whole process group: a worker that died of it would
    break the step the training process is finishing before it stops."""
    import os
    import signal

    write_volumes(tmp_path / "images", 4)
    train_loader, _, _ = build_dataloaders(make_config(tmp_path, num_workers=1, val_fraction=0.25), batch_size=1)
    batches = iter(train_loader)
    next(batches)
    (worker,) = batches._workers
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(worker.pid, signum)
    worker.join(timeout=2)  # a worker killed by the signal would be gone by now
    assert worker.is_alive()
    assert len([next(batches) for _ in range(2)]) == 2


def test_the_preprocessed_cache_gives_the_plain_chains_volumes_and_is_built_once(tmp_path, monkeypatch):
    """Every volume equals the plain chain's, augmentation included (same random state); the entries are written
    once, by two worker processes; an edited file is preprocessed again, other preprocessing goes to another folder."""
    paths = write_volumes(tmp_path / "images", 4)
    config = make_config(tmp_path, cache="preprocessed", val_fraction=0.25, num_workers=2, spacing=[1.7, 1.7, 2.1],
                         augment={"flip_prob": 0.5, "affine_prob": 0.5})
    train_loader, val_loader, _ = build_dataloaders(config)
    dataset = train_loader.dataset
    assert isinstance(dataset, PreprocessedDataset) and all(path.is_file() for path in dataset.files)
    plain = build_transforms(config.data, train=True)
    for index, item in enumerate(dataset.items):
        dataset.transform.set_random_state(seed=index)
        plain.set_random_state(seed=index)
        cached, expected = dataset[index]["image"], plain(dict(item))["image"]
        torch.testing.assert_close(cached.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
        torch.testing.assert_close(cached.affine, expected.affine)
    val_item = val_loader.dataset.items[0]
    expected = build_transforms(config.data, train=False)(dict(val_item))["image"]
    torch.testing.assert_close(val_loader.dataset[0]["image"].as_tensor(), expected.as_tensor(), rtol=0, atol=0)

    written = []
    original = preprocessed._write_entry
    monkeypatch.setattr(preprocessed, "_write_entry", lambda *args: written.append(args[2]) or original(*args))
    in_process = make_config(tmp_path, cache="preprocessed", val_fraction=0.25, spacing=[1.7, 1.7, 2.1])
    build_dataloaders(in_process)  # (no workers: a worker's writes would not be seen here)
    assert written == []  # nothing left to preprocess
    nib.save(nib.load(paths[0]), paths[0])  # rewritten: another modification time
    build_dataloaders(in_process)
    assert written == [paths[0]]
    build_dataloaders(make_config(tmp_path, cache="preprocessed", val_fraction=0.25, spacing=[1.5, 1.5, 2.0]))
    assert len(written) == 5 and len(list((tmp_path / "runs" / "cache" / "preprocessed").iterdir())) == 2
