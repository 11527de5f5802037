"""The preprocessed cache (``data.cache: preprocessed``): the deterministic part of the transform chain, run once per
volume and stored uncompressed, read memory-mapped.

Decoding a NIfTI.gz volume, resampling it and scaling its intensities takes seconds per volume at 512x512x128 on one
CPU core, far from what a GPU step consumes; the memory cache cannot hold a large data set, and the disk cache
(MONAI's PersistentDataset) unpickles whole volumes. Here every volume's deterministic result (everything before the
first random transform: load, channel selection, orientation, resampling, intensity, pad/crop) is written once as a
``.npy`` array beside a small ``.json`` with its affine, in ``<cache_dir>/preprocessed/<settings key>/``:

- the folder's key hashes the deterministic settings (:func:`~monai_diffusion.data.transforms.deterministic_settings`)
  like the disk cache's, so other preprocessing gives another folder;
- an entry's name hashes the file's absolute path, size and modification time and the item's class
  (:func:`~monai_diffusion.data.datasets.file_state_hash`): an edited file is preprocessed again.

Entries are built before training, the missing ones only, each rank its share with ``data.num_workers`` worker
processes, written atomically (temp file, then rename; the array last, so its presence means the entry is whole).
Training reads an entry with ``numpy.load(mmap_mode="c")``: a random crop touches only the pages it needs, and a
whole volume is one sequential read of the page cache or the disk.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from monai.data import MetaTensor
from monai.transforms import Compose
from tqdm import tqdm

from monai_diffusion.data.transforms import IMAGE_KEY
from monai_diffusion.data.workers import loader_worker_init

__all__ = ["PREPROCESSED_VERSION", "PreprocessedDataset", "build_preprocessed", "load_entry", "split_chain"]

logger = logging.getLogger(__name__)

# Bump when what an entry holds changes: old folders are then not read.
PREPROCESSED_VERSION = 1


def split_chain(transform: Compose) -> tuple[Compose, Compose]:
    """(deterministic part, random part) of a chain: split before the first random transform, where MONAI's
    CacheDataset and PersistentDataset split it."""
    from monai.transforms import RandomizableTrait, Transform

    first = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    first = len(transform.transforms) if first is None else first
    return Compose(transform.transforms[:first]), Compose(transform.transforms[first:])


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_entry(path: Path, image: torch.Tensor, source: str) -> None:
    """The entry at ``path`` (``.npy``) and its ``.json`` (affine, source file); the array is renamed into place
    last."""
    affine = getattr(image, "affine", None)
    meta = {"version": PREPROCESSED_VERSION, "image": source,
            "affine": torch.as_tensor(affine).tolist() if affine is not None else None}
    _write_atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta)))
    array = np.ascontiguousarray(torch.as_tensor(image).as_subclass(torch.Tensor).detach().cpu().numpy())
    _write_atomic(path, lambda tmp: np.save(tmp, array, allow_pickle=False))


def load_entry(path: Path) -> MetaTensor:
    """An entry as a MetaTensor over the memory-mapped array (copy on write: transforms may change it in place
    without touching the file), with its affine."""
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    array = np.load(path, mmap_mode="c", allow_pickle=False)
    affine = torch.as_tensor(meta["affine"], dtype=torch.float64) if meta["affine"] is not None else None
    return MetaTensor(torch.from_numpy(array), affine=affine, meta={"filename_or_obj": meta["image"]})


class _Writer(torch.utils.data.Dataset):
    """Runs the deterministic chain on one item and writes its entry (a DataLoader's workers share the items)."""

    def __init__(self, todo: Sequence[tuple[dict, Path]], deterministic: Compose) -> None:
        self.todo, self.deterministic = list(todo), deterministic

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, index: int) -> str:
        item, path = self.todo[index]
        _write_entry(path, self.deterministic(dict(item))[IMAGE_KEY], str(item[IMAGE_KEY]))
        return str(path)


def build_preprocessed(items: Sequence[dict], deterministic: Compose, folder: Path, entry_name: Callable[[dict], str],
                       *, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                       progress: bool = True) -> list[Path]:
    """Write the entries missing from ``folder`` (each rank its share ``[rank::world_size]``, with ``num_workers``
    worker processes), wait for every rank, and return every item's entry file.

    Args:
        items: ``[{"image": path, ...}, ...]``.
        deterministic: the chain's deterministic part (:func:`split_chain`).
        folder: ``<cache_dir>/preprocessed/<settings key>``.
        entry_name: an item's entry file name (without folder).
        num_workers: DataLoader worker processes that preprocess in parallel (0: this process).
        rank, world_size: this process's place in the run.
        progress: show a progress bar.

    Raises:
        RuntimeError: an entry is missing after every rank has written its share (an output folder not shared by
            all ranks).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / entry_name(item) for item in items]
    todo = [(item, path) for item, path in list(zip(items, files))[rank::world_size] if not path.is_file()]
    if todo:
        logger.info("preprocessed cache %s: preprocessing %d of %d volume(s)%s", folder, len(todo), len(items),
                    f" on rank {rank}" if world_size > 1 else "")
        loader = torch.utils.data.DataLoader(_Writer(todo, deterministic), batch_size=None, num_workers=num_workers,
                                             worker_init_fn=loader_worker_init if num_workers else None)
        for _ in tqdm(loader, total=len(todo), desc="preprocessing", unit="volume", disable=not progress,
                      dynamic_ncols=True):
            pass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's share is on disk before anyone reads the whole cache
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise RuntimeError(f"preprocessed cache {folder}: {len(missing)} entry file(s) missing after preprocessing "
                           f"(is the cache folder shared by all ranks?), e.g. {missing[0]}")
    return files


class PreprocessedDataset(torch.utils.data.Dataset):
    """Items from the preprocessed cache: each entry memory-mapped, then the chain's random part applied.

    Args:
        items: the items, in the order their entries are given.
        files: each item's entry (:func:`build_preprocessed`).
        random: the chain's random part (:func:`split_chain`).
    """

    def __init__(self, items: Sequence[dict], files: Sequence[Path], random: Compose) -> None:
        self.items, self.files = list(items), [Path(f) for f in files]
        self.transform = random  # the name MONAI's DataLoader looks for when it seeds a dataset's random transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = dict(self.items[index])
        item[IMAGE_KEY] = load_entry(self.files[index])
        return self.transform(item)
