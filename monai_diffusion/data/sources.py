"""Where the volumes come from (folder, datalist, demo), the train/validation split, and screening.

Every item is a dict ``{"image": "/absolute/path.nii.gz", ...}``, the form MONAI's dict transforms and
datasets take; a datalist entry's other text and number fields stay with it (e.g. ``class``, the covariates of
``data.conditions``, the label map named by ``data.mask_key``). Problems are reported before any training starts,
naming the folder, file or row and what was expected.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import load_decathlon_datalist
from tqdm.auto import tqdm

from monai_diffusion.config.schema import ConditionConfig, DataConfig
from monai_diffusion.data.demo import build_conditional_demo_dataset, build_demo_dataset
from monai_diffusion.data.transforms import describe_resampling_problem, grid_mismatch

logger = logging.getLogger(__name__)

# The demo set's content does not follow config.seed (which drives the split, weights, sampling):
# every experiment then shares one cached set instead of building a new one per seed.
DEMO_CONTENT_SEED = 0
# CSV ``split`` values (case-insensitive) and the list they go to; "test" rows are left out.
CSV_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": None}
# Show a screening progress bar from this many files.
PROGRESS_MIN_FILES = 16
# Most missing files named in one error message (the count is always given).
MAX_LISTED_MISSING = 20


# ----------------------------------------------------------------------------- listing


def _absolute(path: str | os.PathLike, base: Path | None = None) -> str:
    """Absolute, normalised path; relative ones are taken from ``base`` (symlinks are kept)."""
    expanded = Path(os.path.expanduser(os.fspath(path)))
    if not expanded.is_absolute() and base is not None:
        expanded = base / expanded
    return os.path.normpath(os.path.abspath(expanded))


def _require_existing(items: list[dict], where: str, keys: Sequence[str] = ("image",)) -> None:
    """Raise one FileNotFoundError listing every file an item names (its image, label map) that does not exist."""
    missing = [item[key] for item in items for key in keys if not os.path.isfile(item[key])]
    if missing:
        listed = "\n".join(f"  - {path}" for path in missing[:MAX_LISTED_MISSING])
        more = f"\n  ... and {len(missing) - MAX_LISTED_MISSING} more" if len(missing) > MAX_LISTED_MISSING else ""
        raise FileNotFoundError(f"{where}: {len(missing)} image file(s) listed there do not exist:\n{listed}{more}")


def list_folder(data_dir: Path, pattern: str) -> list[dict]:
    """Items for every file in ``data_dir`` matching the glob ``pattern`` (sorted, so runs agree).

    Raises:
        FileNotFoundError: when ``data_dir`` does not exist or is not a folder.
        ValueError: when no file matches ``pattern``.
    """
    folder = Path(_absolute(data_dir))
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"data.data_dir: {folder} {what} (expected a folder of NIfTI volumes)")
    files = sorted(str(path) for path in folder.glob(pattern) if path.is_file())
    if not files:
        others = sorted(path.name for path in folder.iterdir())
        hint = f"; it holds {len(others)} other entries, e.g. {others[:3]}" if others else "; the folder is empty"
        raise ValueError(f"data.data_dir: no file in {folder} matches data.glob={pattern!r}{hint}")
    return [{"image": _absolute(path)} for path in files]


def _image_path(entry: dict, where: str) -> str:
    """The single image path of a datalist entry ``{"image": path, ...}``."""
    image = entry.get("image")
    if isinstance(image, (list, tuple)):
        raise ValueError(
            f"{where}: an entry lists several files for one image ({image}); expected one NIfTI file per "
            "volume (store several channels as a 4D file instead)"
        )
    if not isinstance(image, (str, os.PathLike)) or not os.fspath(image):
        raise ValueError(f"{where}: expected every entry to have an 'image' path, got {entry!r}")
    return os.fspath(image)


def _item(entry: dict, image: str, path_keys: Sequence[str] = (), base: Path | None = None) -> dict:
    """A volume's item: its absolute image path and the entry's other scalar fields (text, numbers, booleans); the
    fields named in ``path_keys`` (a label map) are made absolute from ``base`` too.

    Lists, mappings and nulls are left out: every item must collate into a batch, and nothing downstream reads them.
    """
    fields = {key: value for key, value in entry.items() if isinstance(value, (str, int, float, bool)) and key != "image"}
    fields |= {key: _absolute(fields[key], base) for key in path_keys if key in fields}
    return {**fields, "image": _absolute(image)}


def condition_value(condition: ConditionConfig, raw) -> float | str:
    """A covariate's value as the LDM reads it: a finite number (continuous) or a label (categorical).

    Raises:
        ValueError: a missing or empty value, or a continuous one that is not a finite number (the message says which;
            the caller names the file, row and key).
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError("is missing")
    if condition.type == "categorical":
        return str(raw).strip() if isinstance(raw, str) else str(raw)
    if isinstance(raw, bool):
        raise ValueError(f"is {raw!r}, not a number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"is {raw!r}, not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"is {raw!r}, not a finite number")
    return value


def entry_problems(entry: dict, conditions: Sequence[ConditionConfig], path_keys: Sequence[str]) -> list[str]:
    """What is wrong with an entry's covariates and label-map fields, one line per key (empty when nothing is)."""
    problems = []
    for condition in conditions:
        if condition.name not in entry:
            problems.append(f"'{condition.name}' is missing (data.conditions)")
            continue
        try:
            condition_value(condition, entry[condition.name])
        except ValueError as error:
            problems.append(f"'{condition.name}' {error} (data.conditions)")
    for key in path_keys:
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"'{key}' is missing or not a file path (data.mask_key)")
    return problems


def _check_entries(rows: Sequence[tuple[str, dict]], conditions: Sequence[ConditionConfig], path_keys: Sequence[str],
                   path: Path) -> None:
    """Raise one ValueError naming the datalist, each bad row (``where``) and key, or return when all are good."""
    problems = [f"{where}: {problem}" for where, entry in rows for problem in entry_problems(entry, conditions, path_keys)]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_MISSING])
        more = f"\n  ... and {len(problems) - MAX_LISTED_MISSING} more" if len(problems) > MAX_LISTED_MISSING else ""
        raise ValueError(f"data.datalist: {path} has {len(problems)} bad field value(s):\n{listed}{more}")


def read_json_datalist(path: Path, conditions: Sequence[ConditionConfig] = (),
                       path_keys: Sequence[str] = ()) -> tuple[list[dict], list[dict] | None]:
    """Train and validation items from a MONAI decathlon-style JSON datalist (an entry's other scalar fields kept).

    Args:
        path: the JSON file.
        conditions: covariates every entry must hold (``data.conditions``): present, and numbers where continuous.
        path_keys: fields every entry must hold as a file path, made absolute from the file's folder
            (``data.mask_key``).

    Returns:
        (train items, validation items or None when the file has no non-empty 'validation' list).

    Raises:
        ValueError: when the JSON is malformed, has no 'training' list, an entry has no image path, or covariates /
            label-map fields are missing or not numbers (each named by list, index and key).
    """
    try:
        with open(path) as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"data.datalist: {path} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("training"), list):
        raise ValueError(
            f"data.datalist: {path} must be a JSON object with a 'training' list of {{'image': path}} entries "
            "(MONAI decathlon style) and optionally a 'validation' list"
        )
    result: dict[str, list[dict]] = {}
    for key in ("training", "validation"):
        if not content.get(key):
            continue
        where = f"data.datalist {path} ['{key}']"
        for entry in content[key]:
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected every entry to be {{'image': path}}, got {entry!r}")
            _image_path(entry, where)
        _check_entries([(f"['{key}'][{index}]", entry) for index, entry in enumerate(content[key])], conditions,
                       path_keys, path)
        # MONAI's loader resolves relative 'image' paths against the datalist's folder.
        entries = load_decathlon_datalist(path, is_segmentation=False, data_list_key=key)
        result[key] = [_item(entry, entry["image"], path_keys, path.parent) for entry in entries]
    if not result.get("training"):
        raise ValueError(f"data.datalist: the 'training' list in {path} is empty")
    return result["training"], result.get("validation")


def read_csv_datalist(path: Path, conditions: Sequence[ConditionConfig] = (),
                      path_keys: Sequence[str] = ()) -> tuple[list[dict], list[dict] | None]:
    """Train and validation items from a CSV with an ``image`` column and an optional ``split`` column.

    ``split`` values: train/training, val/validation (case-insensitive); ``test`` rows are left out. Other columns
    stay with each item (e.g. ``class``, covariates as text). ``conditions`` and ``path_keys`` as in
    :func:`read_json_datalist`.

    Returns:
        (train items, validation items or None when no row is marked val/validation).

    Raises:
        ValueError: when there is no ``image`` column, a row has no image or an unknown split value, or a row's
            covariates / label-map fields are missing or not numbers (each named by line and key).
    """
    # utf-8-sig: spreadsheet programs often start the file with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = [name.strip() for name in (reader.fieldnames or [])]
    if "image" not in columns:
        raise ValueError(f"data.datalist: {path} needs a header row with an 'image' column, got columns {columns}")
    base = path.parent
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    problems = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        row = {str(key).strip(): (value or "").strip() for key, value in row.items() if key is not None}
        if not row["image"]:
            problems.append(f"line {line}: empty 'image'")
            continue
        split = row.get("split", "") or "train"
        if split.lower() not in CSV_SPLITS:
            problems.append(f"line {line}: split {split!r} (expected one of {sorted(CSV_SPLITS)})")
            continue
        target = CSV_SPLITS[split.lower()]
        if target is not None:
            problems += [f"line {line}: {problem}" for problem in entry_problems(row, conditions, path_keys)]
            fields = {key: value for key, value in row.items() if key not in ("image", "split")}
            fields |= {key: _absolute(fields[key], base) for key in path_keys if fields.get(key)}
            splits[target].append({**fields, "image": _absolute(row["image"], base)})
    if problems:
        raise ValueError(f"data.datalist: {path} has invalid rows:\n" + "\n".join(f"  - {p}" for p in problems))
    if not splits["train"]:
        raise ValueError(f"data.datalist: {path} has no training rows")
    return splits["train"], splits["val"] or None


def split_train_val(items: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded random train/validation split, each part keeping the input order.

    At least one validation item when ``val_fraction`` > 0 and there are >= 2 items; never all of them.
    """
    count = len(items)
    if val_fraction <= 0 or count < 2:
        return list(items), []
    num_val = min(max(1, round(count * val_fraction)), count - 1)
    chosen = set(np.random.default_rng(seed).permutation(count)[:num_val].tolist())
    train = [item for index, item in enumerate(items) if index not in chosen]
    val = [item for index, item in enumerate(items) if index in chosen]
    return train, val


def list_volumes(data: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and validation items ``[{"image": "/abs/path.nii.gz"}, ...]`` from ``data.source``.

    - 'folder': every file in ``data.data_dir`` matching ``data.glob``, sorted.
    - 'datalist': JSON (MONAI decathlon style: 'training' and optional 'validation' lists) or CSV
      (``image`` column, optional ``split`` column); relative paths are taken from the datalist's folder.
    - 'demo': :func:`build_demo_dataset` (built once into ``data.demo.cache_dir``), or with ``data.demo.conditional``
      the datalist :func:`build_conditional_demo_dataset` writes (covariate ``brain_scale``, label map ``label``).

    ``data.conditions`` and ``data.mask_key`` name fields every datalist entry must hold (see
    :func:`read_json_datalist`); label maps must exist like images.

    When the source gives no validation split, ``data.val_fraction`` of the items are drawn for
    validation with ``seed`` (at least one when val_fraction > 0 and there are >= 2 items).

    Args:
        data: the ``data`` section of the config.
        seed: seed of the train/validation split.

    Returns:
        (train items, validation items); validation may be empty.

    Raises:
        FileNotFoundError: missing data folder, datalist file, or an image a datalist names.
        ValueError: empty folder (no file matches the glob), malformed datalist, missing or non-numeric covariates,
            unknown source.
    """
    given_val: list[dict] | None = None
    path_keys = [data.mask_key] if data.mask_key is not None else []
    if data.source == "folder":
        if data.data_dir is None:
            raise ValueError("data.data_dir: required when data.source is 'folder'")
        items = list_folder(data.data_dir, data.glob)
    elif data.source == "datalist":
        if data.datalist is None:
            raise ValueError("data.datalist: required when data.source is 'datalist'")
        path = Path(_absolute(data.datalist))
        if not path.is_file():
            raise FileNotFoundError(f"data.datalist: {path} does not exist (expected a .json or .csv datalist)")
        suffix = path.suffix.lower()
        if suffix == ".json":
            items, given_val = read_json_datalist(path, data.conditions, path_keys)
        elif suffix == ".csv":
            items, given_val = read_csv_datalist(path, data.conditions, path_keys)
        else:
            raise ValueError(f"data.datalist: {path} should be a .json or .csv file, got {suffix or 'no extension'}")
        _require_existing(items + (given_val or []), f"data.datalist {path}", ["image", *path_keys])
    elif data.source == "demo" and data.demo.conditional:
        datalist = build_conditional_demo_dataset(data.demo.cache_dir, data.demo.num_volumes, seed=DEMO_CONTENT_SEED)
        items, _ = read_json_datalist(datalist, data.conditions, path_keys)
    elif data.source == "demo":
        paths = build_demo_dataset(data.demo.cache_dir, data.demo.num_volumes, seed=DEMO_CONTENT_SEED)
        items = [{"image": str(path)} for path in paths]
    else:  # the schema only admits the three above; kept for direct callers
        raise ValueError(f"data.source: unknown source {data.source!r} (expected 'demo', 'folder' or 'datalist')")

    if given_val is not None:
        return items, given_val
    return split_train_val(items, data.val_fraction, seed)


# ---------------------------------------------------------------------------- screening


def label_problem(values, num_labels: int) -> str | None:
    """What makes ``values`` (an array or tensor) no label map of labels 0..num_labels-1, or None."""
    values = torch.as_tensor(values)
    if values.is_floating_point() and not torch.equal(values, values.round()):
        return "holds values that are not whole numbers: a label map has integer labels"
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > num_labels - 1:
        return f"holds labels {low:g}..{high:g}, outside 0..{num_labels - 1} (controlnet.num_labels {num_labels})"
    return None


def check_label_maps(items: Sequence[dict], mask_key: str, num_labels: int) -> None:
    """Open every item's label map once: it must lie on its image's voxel grid (shape and affine) and hold whole
    labels 0..num_labels-1.

    Raises:
        ValueError: listing every bad label map with its reason.
    """
    bad = []
    for item in tqdm(items, desc="checking label maps", unit="file", disable=len(items) < PROGRESS_MIN_FILES):
        path = item[mask_key]
        try:
            mask, image = nib.load(path), nib.load(item["image"])
            problem = grid_mismatch(image.shape[:3], image.affine, mask.shape[:3], mask.affine)
            if problem:
                problem = f"{problem} of its image {item['image']}"
            elif len(mask.shape) > 3 and int(np.prod(mask.shape[3:])) > 1:
                problem = f"has shape {tuple(mask.shape)}: a label map has one channel"
            else:
                problem = label_problem(np.asanyarray(mask.dataobj), num_labels)
        except Exception as error:  # nibabel raises many types for foreign/corrupt files
            problem = f"cannot be read as NIfTI ({type(error).__name__}: {error})"
        if problem:
            bad.append(f"  - {path}: {problem}")
    if bad:
        raise ValueError(f"{len(bad)} of {len(items)} label map(s) (data.mask_key '{mask_key}') are unusable:\n"
                         + "\n".join(bad))


def _channel_count(shape: tuple[int, ...], spatial_dims: int) -> int | None:
    """Channels of a NIfTI array of ``shape``: 1 for a plain volume, the last axis for 4D (x,y,z,c),
    the 5th for NIfTI's vector layout (x,y,z,1,c); None when the layout is not one of these."""
    if len(shape) == spatial_dims:
        return 1
    if len(shape) == spatial_dims + 1:
        return shape[-1]
    if len(shape) == spatial_dims + 2 and shape[spatial_dims] == 1:
        return shape[-1]
    return None


def check_volume(
    path: str, expected_channels: int = 1, spatial_dims: int = 3, spacing: Sequence[float] | None = None,
    *, channels: Sequence[int] | None = None,
) -> str | None:
    """Open one NIfTI file fully and say what is wrong with it, or None when it is usable.

    Checks: readable (a truncated gzip fails only when the data is read, so the data is read),
    layout (``spatial_dims`` axes + channels), channel count (or, when ``channels`` are selected
    from the file, that it has them), non-empty axes, resampling to ``spacing`` feasible, finite
    and non-constant values.
    """
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for foreign/corrupt headers
        return f"cannot be opened as NIfTI ({type(error).__name__}: {error})"
    shape = tuple(int(size) for size in image.shape)
    count = _channel_count(shape, spatial_dims)
    if count is None:
        return (
            f"has shape {shape} ({len(shape)}D); expected a {spatial_dims}D volume, or {spatial_dims}D with "
            f"{expected_channels} channel(s) on the last axis"
        )
    layout = "a plain volume" if len(shape) == spatial_dims else f"{len(shape)}D with {count} frames/channels"
    if channels is not None and count <= max(channels):
        return f"has shape {shape} ({layout}): {count} channel(s), but data.channel selects {list(channels)}"
    if channels is None and count != expected_channels:
        return (
            f"has shape {shape} ({layout}): {count} channel(s), expected {expected_channels} "
            f"(autoencoder.in_channels)"
        )
    if min(shape[:spatial_dims]) < 1:
        return f"has shape {shape} with an empty spatial axis; it cannot be cropped/padded to data.voxel_size"
    problem = describe_resampling_problem(shape[:spatial_dims], image.header.get_zooms()[:spatial_dims], spacing)
    if problem:
        return problem
    try:
        values = np.asanyarray(image.dataobj)
    except Exception as error:  # EOFError / zlib.error / OSError for truncated or corrupt files
        return f"cannot be read, the file is truncated or corrupt ({type(error).__name__}: {error})"
    if np.issubdtype(values.dtype, np.inexact):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            return f"contains {bad} NaN/Inf value(s)"
    if values.size and values.min() == values.max():
        return f"is constant (every voxel is {values.flat[0]}): no image content"
    return None


def _file_key(path: str) -> dict | None:
    """What identifies a file's state for the screening cache (None when it cannot be stat'ed)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _load_screen_cache(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        with open(cache_file) as handle:
            content = json.load(handle)
        return content if isinstance(content, dict) else {}
    except (OSError, ValueError):  # a damaged cache is only a lost shortcut
        return {}


def _save_screen_cache(cache_file: Path, cache: dict) -> None:
    """Write the cache atomically (several DDP ranks may screen at once)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".tmp-{os.getpid()}-{cache_file.name}")
        with open(temporary, "w") as handle:
            json.dump(cache, handle)
        os.replace(temporary, cache_file)
    except OSError as error:
        logger.warning("Could not write the screening cache %s: %s", cache_file, error)


def screen_volumes(
    items: Sequence[dict],
    expected_channels: int = 1,
    on_bad_file: str = "error",
    spatial_dims: int = 3,
    *, spacing: Sequence[float] | None = None,
    cache_file: Path | None = None,
    channels: Sequence[int] | None = None,
) -> list[dict]:
    """Open every volume once and keep the usable ones, before any dataset is built.

    Args:
        items: ``[{"image": path}, ...]``.
        expected_channels: channels each volume must have (``autoencoder.in_channels``; 1 for plain 3D files).
        on_bad_file: 'error' raises listing every bad file; 'skip' logs each and leaves it out.
        spatial_dims: spatial axes of a volume (``len(data.voxel_size)``).
        spacing: ``data.spacing``; volumes whose resampling to it would be absurdly large are bad.
        cache_file: optional JSON where results are kept per path + size + mtime, so files that did not
            change are not read again on the next run.
        channels: the channels ``data.channel`` selects (then the file needs them, not ``expected_channels``).

    Returns:
        The usable items, in input order.

    Raises:
        ValueError: with on_bad_file='error', when any volume is bad (each one named with its reason);
            or an unknown ``on_bad_file``.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"data.on_bad_file: expected 'error' or 'skip', got {on_bad_file!r}")
    cache = _load_screen_cache(cache_file)
    settings = {
        "expected_channels": expected_channels,
        "spatial_dims": spatial_dims,
        "spacing": list(spacing) if spacing is not None else None,
    }
    if channels is not None:  # only when set: screening caches written before it stay valid
        settings["channels"] = list(channels)
    kept: list[dict] = []
    bad: list[tuple[str, str]] = []
    changed = False
    for item in tqdm(items, desc="screening volumes", unit="file", disable=len(items) < PROGRESS_MIN_FILES):
        path = item["image"]
        key = _file_key(path)
        cached = cache.get(path)
        if key is not None and cached is not None and cached.get("file") == key and cached.get("settings") == settings:
            reason = cached["reason"]
        else:
            reason = check_volume(path, expected_channels, spatial_dims, spacing,
                                  channels=channels) if key is not None \
                else "does not exist"
            if key is not None:
                cache[path] = {"file": key, "settings": settings, "reason": reason}
                changed = True
        if reason is None:
            kept.append(item)
        else:
            bad.append((path, reason))
    if cache_file is not None and changed:
        _save_screen_cache(cache_file, cache)

    if bad and on_bad_file == "error":
        listing = "\n".join(f"  - {path}: {reason}" for path, reason in bad)
        raise ValueError(
            f"{len(bad)} of {len(items)} volume(s) are unusable (data.on_bad_file='error'; set it to 'skip' to "
            f"leave them out):\n{listing}"
        )
    for path, reason in bad:
        logger.warning("Skipping %s: %s", path, reason)
    if bad:
        logger.warning("Screening kept %d of %d volume(s), skipped %d", len(kept), len(items), len(bad))
    else:
        logger.info("Screening: all %d volume(s) usable", len(items))
    return kept
