"""Checkpoints: atomic save, checked load, RNG state, pruning, finding a run's checkpoint, resume resolution,
shape-key checks.

A checkpoint is one ``torch.save``'d dict with a ``"format_version"``; what else it holds
(model/optimizer/scaler/scheduler state dicts, step, config, RNG state) is the recipe's choice.
Keep it to tensors, numbers, strings, lists/tuples/dicts and None: :func:`load_checkpoint`
loads with ``weights_only=True``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_diffusion.config.schema import Config

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_torch_file",
    "as_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "prune_checkpoints",
    "remove_temp_files",
    "BEST_THEN_LAST",
    "find_checkpoint",
    "newest_checkpoint",
    "resolve_resume",
    "check_shape_keys",
    "weights_digest",
]

FORMAT_VERSION = 1
logger = logging.getLogger("monai_diffusion")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, foreign, or a different format version)."""


# --------------------------------------------------------------- save / load


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: the directory entry must reach the disk too (POSIX only)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: the file is either the old or the new checkpoint.

    The state goes to a hidden temp file in the same folder (same file system, so the rename is
    atomic), is flushed and fsynced, replaces ``path`` with ``os.replace``, and the folder is
    fsynced. On an error the temp file is removed; after a hard kill a ``.<name>.<pid>@<host>.*.tmp``
    file may remain, which no pattern like ``step-*.pt`` matches and :func:`remove_temp_files`
    removes when the next run starts. Call on rank 0 only.

    Args:
        path: destination, e.g. ``<run>/checkpoints/last.pt``; parent folders are created.
        state: the dict to save; a copy gets ``"format_version"`` (``state`` itself is unchanged).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**state, "format_version": FORMAT_VERSION}
    # The writer's pid and host in the name: a later run can tell a dead writer's leftover from a live write.
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_torch_file(path: Path, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """What ``torch.load`` reads from ``path`` (any content: a checkpoint, a bare state dict, a released file), with
    errors that name the file.

    Args:
        path: the file.
        map_location: where tensors go (``torch.load``'s argument); CPU by default so a GPU file loads anywhere.
        weights_only: refuse arbitrary pickled objects (safe for files from elsewhere).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: unreadable/corrupt file, or objects a safe load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(_load_failure(path, err, weights_only)) from err


def as_checkpoint(content: Any, path: Path) -> dict:
    """``content`` (what :func:`read_torch_file` read from ``path``) when it is a checkpoint this version reads.

    Raises:
        CheckpointError: not a dict, or a missing/different ``format_version``.
    """
    if not isinstance(content, dict):
        raise CheckpointError(
            f"{path}: not a monai-diffusion checkpoint (holds a {type(content).__name__}, not a dict)"
        )
    version = content.get("format_version")
    if version is None:
        raise CheckpointError(
            f"{path}: not a monai-diffusion checkpoint (no 'format_version'; a bare state dict?)"
        )
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r}, this monai-diffusion reads version "
            f"{FORMAT_VERSION}" + (" (written by a newer monai-diffusion; upgrade it)" if newer else "")
        )
    return content


def load_checkpoint(path: Path, map_location: Any = "cpu", weights_only: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, with errors that name the file.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (``torch.load``'s argument); CPU by default so a GPU
            checkpoint loads anywhere and each rank moves what it needs.
        weights_only: refuse arbitrary pickled objects (safe for files from elsewhere).

    Returns:
        The saved dict, ``"format_version"`` included.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: unreadable/corrupt file, not a dict, objects a safe load refuses, or a
            missing/different ``format_version``.
    """
    path = Path(path)
    return as_checkpoint(read_torch_file(path, map_location, weights_only), path)


def _load_failure(path: Path, err: Exception, weights_only: bool) -> str:
    """Explain a failed ``torch.load``: corrupt file, or a valid file a safe load refuses."""
    if weights_only:
        try:  # only answers for a readable torch file
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        if unsafe:
            return (
                f"{path}: holds Python objects a safe load refuses ({', '.join(unsafe)}). Save only "
                "tensors, numbers, strings and containers, or load with weights_only=False if you "
                "trust the file."
            )
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip; torch's own message for a non-zip is misleading under weights_only.
        detail = f"not a complete PyTorch zip archive, {path.stat().st_size} bytes"
    else:
        text = str(err).strip()
        detail = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
    return (
        f"{path}: cannot read checkpoint, the file is truncated or corrupt ({detail}). "
        "Delete it or resume from another checkpoint."
    )


# ----------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Snapshot every random generator a run uses, in a form ``weights_only`` loading accepts.

    Each process has its own generators; under DDP save rank 0's (ranks are seeded
    differently anyway).

    Returns:
        ``{"python": ..., "numpy": ..., "torch": ByteTensor, "cuda": [ByteTensor per GPU]}``
        (``"cuda"`` only when CUDA is available).
    """
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        # numpy's key is a uint32 array, which a weights_only load refuses: store it as a tensor.
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore generators captured by :func:`capture_rng_state`; absent entries are left alone.

    CUDA states are restored for as many GPUs as both the checkpoint and this machine have.

    Args:
        state: the captured dict.
    """
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": s["bit_generator"],
                "state": {"key": np.asarray(torch.as_tensor(s["key"]).cpu().numpy(), dtype=np.uint32), "pos": s["pos"]},
                "has_gauss": s["has_gauss"],
                "gauss": s["gauss"],
            }
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state).cpu(), index)


# -------------------------------------------------------------- housekeeping


def _step_number(path: Path) -> int | None:
    """The last number in a file name: ``step-000120.pt`` -> 120."""
    numbers = re.findall(r"\d+", path.name)
    return int(numbers[-1]) if numbers else None


def prune_checkpoints(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints, newest by the step number in the name.

    Files matching ``pattern`` without a number (and temp files, which start with a dot) are
    never touched. Call on rank 0 only.

    Args:
        folder: the checkpoint folder.
        pattern: glob of step checkpoints, e.g. ``"step-*.pt"``.
        keep: how many to keep (0 deletes them all).

    Raises:
        ValueError: ``keep < 0``.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    numbered = [
        (step, p)
        for p in Path(folder).glob(pattern)
        if p.is_file() and not p.name.startswith(".") and (step := _step_number(p)) is not None
    ]
    numbered.sort(key=lambda item: (item[0], item[1].name))
    for _, p in numbered[: max(0, len(numbered) - keep)]:
        p.unlink(missing_ok=True)
        logger.debug("Removed old checkpoint %s", p)


_TEMP_NAME = re.compile(r"\.(?P<pid>\d+)@(?P<host>.+)\.[0-9a-f]{32}\.tmp")


def _writer_gone(path: Path) -> bool:
    """Whether the process that wrote temp file ``path`` has ended: it ran on this host and its pid is free.
    A file from another host (or of an older naming) cannot be judged and counts as live."""
    match = _TEMP_NAME.search(path.name)
    if match is None or match["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(match["pid"]), 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # a live process of another user
        return False
    return False


def remove_temp_files(folder: Path, only_gone_writers: bool) -> list[Path]:
    """Remove the hidden ``.*.tmp`` files a killed :func:`save_checkpoint` left in a checkpoint folder.

    Args:
        folder: a run's ``checkpoints`` folder (missing: nothing to do).
        only_gone_writers: remove only files whose writer ran on this host and has ended (safe next to a live
            run); False removes every temp file (the run is being resumed: no one else writes there).

    Returns:
        The removed files.
    """
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        if path.is_file() and (not only_gone_writers or _writer_gone(path)):
            path.unlink(missing_ok=True)
            removed.append(path)
            logger.info("removed %s, left by a run that was killed while saving", path)
    return removed


# ------------------------------------------------------------------- finding

# Which checkpoint of a run to use: the one its validation judged best, else the last one written.
BEST_THEN_LAST = ("best.pt", "last.pt")


def _newest(paths: Sequence[Path]) -> Path:
    """The most recently written of ``paths`` (ties: the greatest path, so the choice is repeatable)."""
    return max(paths, key=lambda p: (p.stat().st_mtime, str(p)))


def _either(names: Sequence[str]) -> str:
    return " or ".join(names)


def find_checkpoint(path: Path | str, *, names: Sequence[str] = BEST_THEN_LAST, what: str | None = None) -> Path:
    """A checkpoint file as given, or the checkpoint a run folder holds: its ``checkpoints/<name>`` for the first of
    ``names`` it has (by default ``best.pt``, else ``last.pt``), or a checkpoints folder's ``<name>``.

    Args:
        path: a checkpoint file, a run folder or a run's ``checkpoints`` folder (``~`` is expanded).
        names: file names to look for in a folder, in order of preference.
        what: the config key or command-line argument ``path`` came from (e.g. ``"ldm.autoencoder_checkpoint"``),
            named first in the errors.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder that holds none of ``names``; the message names ``what``,
            the path and every name looked for.
    """
    prefix = f"{what}: " if what else ""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{prefix}no checkpoint file or run folder at {path}")
    inside = [path / "checkpoints" / name for name in names] + [path / name for name in names]
    for candidate in inside:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{prefix}folder {path} holds no checkpoint: no {_either([f'checkpoints/{n}' for n in names])} "
        f"(nor {_either(names)})"
    )


def newest_checkpoint(output_dir: Path | str, command: str, *, names: Sequence[str] = BEST_THEN_LAST,
                      noun: str | None = None, remedy: str | None = None) -> Path:
    """The checkpoint of the newest run of ``command``: the most recently written
    ``<output_dir>/<command>-*/checkpoints/<name>`` for the first of ``names`` any run has (by default the newest
    ``best.pt``; when no run has one, the newest ``last.pt``).

    Args:
        output_dir: the folder the runs were written to (``output.output_dir``).
        command: the runs' prefix: ``autoencoder``, ``ldm`` or ``controlnet``.
        names: checkpoint file names, in order of preference.
        noun: what the checkpoint is, for the error (default ``command``), e.g. ``"LDM"``.
        remedy: what to do when there is none, the error's last part, e.g. ``"train one (monai-diffusion
            train-ldm) or pass --checkpoint"``.

    Raises:
        FileNotFoundError: no run has any of ``names``; the message lists every pattern searched.
    """
    output_dir = Path(output_dir)
    for name in names:
        found = [p for p in output_dir.glob(f"{command}-*/checkpoints/{name}") if p.is_file()]
        if found:
            return _newest(found)
    searched = _either([f"{output_dir}/{command}-*/checkpoints/{name}" for name in names])
    raise FileNotFoundError(f"No {noun or command} checkpoint: there is no {searched}" + (f"; {remedy}" if remedy else ""))


def resolve_resume(
    resume: str | bool | None, candidates: Sequence[Path], where: str | None = None
) -> Path | None:
    """Turn the ``--resume`` value into the checkpoint file to load, or None to start fresh.

    =====================  ==========================================================
    resume                 result
    =====================  ==========================================================
    False, None, "false"   None (also "no", "none")
    True, "true"           newest existing candidate by mtime; ValueError if none
    "auto"                 newest existing candidate, or None (logged: starting fresh)
    other string / Path    that file, or a run folder's ``checkpoints/last.pt`` (or a
                           checkpoint folder's ``last.pt``); FileNotFoundError if missing
    =====================  ==========================================================

    Args:
        resume: the ``--resume`` value.
        candidates: checkpoint files the recipe proposes, e.g. every
            ``<output_dir>/autoencoder-*/checkpoints/last.pt``; missing ones are ignored.
        where: how to describe the searched places in messages (default: the candidates).

    Returns:
        The checkpoint path, or None.

    Raises:
        ValueError: ``true`` and no candidate exists.
        FileNotFoundError: an explicit path that is neither a file nor a folder with ``last.pt``.
    """
    if resume is None or resume is False:
        return None
    text = "true" if resume is True else str(resume)
    if text.strip().lower() in ("false", "no", "none", ""):
        return None
    if text.strip().lower() in ("true", "auto"):
        existing = [Path(p) for p in candidates if Path(p).is_file()]
        if existing:
            newest = _newest(existing)
            logger.info("Resuming from %s", newest)
            return newest
        searched = where or (", ".join(str(p) for p in candidates) or "(no candidate checkpoints)")
        if text.strip().lower() == "true":
            raise ValueError(f"--resume true but no checkpoint found in {searched}")
        logger.info("--resume auto: no checkpoint found, starting fresh (looked in %s)", searched)
        return None
    # A run resumes from where it stopped: its last checkpoint, never its best.
    return find_checkpoint(text, names=("last.pt",), what="--resume")


# ------------------------------------------------------------- config check

_MISSING = object()


def _get_dotted(tree: dict, key: str, fallback: dict | None = None) -> Any:
    """``tree``'s value at the dotted ``key``; where it has none, ``fallback``'s (or ``_MISSING``)."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING if fallback is None else _get_dotted(fallback, key)
        node = node[part]
    return node


def _show(value: Any) -> str:
    # JSON spelling (null, true, [4, 2]) is what the user writes in the YAML config.
    return "(missing)" if value is _MISSING else json.dumps(value, default=str)


RESUME_REMEDY = "Set these back in the config (or --set) to match the checkpoint, or start fresh."


def check_shape_keys(saved: dict, current: dict, keys: Sequence[str], checkpoint: Path | None = None,
                     *, remedy: str = RESUME_REMEDY) -> None:
    """Refuse to load weights into a model built from a config whose shapes differ.

    Args:
        saved: the config stored in the checkpoint (``model_dump(mode="json")``).
        current: the config of this run, same form.
        keys: dotted keys that determine tensor shapes, e.g. ``"autoencoder.num_channels"``.
        checkpoint: the checkpoint file, named in the message.
        remedy: the message's last line: what to do about it.

    Raises:
        ValueError: listing every differing key with both values, one per line, e.g.
            ``autoencoder.downsample_factors: checkpoint [4, 2], config [2, 2]``.
    """
    # A key the checkpoint predates meant then what its default means now (new keys default to the old behaviour).
    defaults = Config().model_dump(mode="json")
    differences = [
        f"{key}: checkpoint {_show(old)}, config {_show(new)}"
        for key in keys
        if (old := _get_dotted(saved, key, fallback=defaults)) != (new := _get_dotted(current, key))
    ]
    if differences:
        listing = "\n".join(f"  - {d}" for d in differences)
        which = f"The checkpoint {checkpoint}" if checkpoint is not None else "The checkpoint"
        raise ValueError(
            f"{which} was trained with a different model shape ({len(differences)} key(s)):\n"
            f"{listing}\n{remedy}"
        )


# ------------------------------------------------------------------ replicas


def weights_digest(*state_dicts: Mapping[str, torch.Tensor] | None) -> str:
    """SHA-256 of the names and exact bytes of the tensors in ``state_dicts`` (None entries are skipped): equal
    digests mean bit-identical weights, e.g. on every rank of a DDP run."""
    digest = hashlib.sha256()
    for state_dict in state_dicts:
        for name, tensor in (state_dict or {}).items():
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
