"""Checkpoint save/load, crash safety, pruning, finding a run's checkpoint, resume resolution, shape checks, RNG
state."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_diffusion.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    check_shape_keys,
    find_checkpoint,
    load_checkpoint,
    newest_checkpoint,
    prune_checkpoints,
    remove_temp_files,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    weights_digest,
)


def _state(value: float) -> dict:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters())
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "config": {"seed": 1}}


def test_round_trip(tmp_path):
    path = tmp_path / "nested" / "last.pt"
    state = _state(3.0)
    save_checkpoint(path, state)
    assert "format_version" not in state  # the caller's dict is not modified
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == FORMAT_VERSION
    assert loaded["step"] == 7 and loaded["config"] == {"seed": 1}
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))
    original = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2.0))
    monkeypatch.undo()

    assert path.read_bytes() == original
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.full((2, 2), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, "truncated"])
def test_corrupt_file_names_it(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        save_checkpoint(path, _state(1.0))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*(truncated or corrupt)"):
        load_checkpoint(path)


def test_format_version_checked(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.ones(1)}, bare)
    with pytest.raises(CheckpointError, match=r"bare\.pt.*format_version"):
        load_checkpoint(bare)
    future = tmp_path / "future.pt"
    torch.save({"format_version": FORMAT_VERSION + 1}, future)
    with pytest.raises(CheckpointError, match=r"future\.pt.*newer"):
        load_checkpoint(future)
    not_dict = tmp_path / "list.pt"
    torch.save([1, 2], not_dict)
    with pytest.raises(CheckpointError, match=r"list\.pt.*not a dict"):
        load_checkpoint(not_dict)


def test_unsafe_objects_explained(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"format_version": FORMAT_VERSION, "when": np.float64(1.5)}, path)
    with pytest.raises(CheckpointError, match=r"objects\.pt.*safe load refuses.*numpy"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["when"] == 1.5


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_prune_keeps_newest_by_step_number(tmp_path):
    # Step numbers, not names or mtimes, decide (step-10 sorts before step-9 as text).
    now = time.time()
    for i, step in enumerate([9, 10, 100, 2, 55]):
        _touch(tmp_path / f"step-{step}.pt", now - i)  # mtimes in a misleading order
    _touch(tmp_path / "last.pt", now)
    _touch(tmp_path / "step-latest.pt", now)  # no number: never removed
    _touch(tmp_path / ".step-999.pt.abc.tmp", now)  # temp file: not matched
    prune_checkpoints(tmp_path, "step-*.pt", keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".step-999.pt.abc.tmp", "last.pt", "step-100.pt", "step-55.pt", "step-latest.pt"]
    prune_checkpoints(tmp_path, "step-*.pt", keep=5)  # fewer than keep: nothing happens
    assert len(list(tmp_path.iterdir())) == 5


def test_find_checkpoint_takes_a_file_or_a_runs_best_else_last(tmp_path):
    now = time.time()
    run = tmp_path / "autoencoder-1"
    last = _touch(run / "checkpoints" / "last.pt", now)
    assert find_checkpoint(last) == last  # a file as given
    assert find_checkpoint(run) == last  # a run folder without best.pt: its last.pt
    best = _touch(run / "checkpoints" / "best.pt", now - 100)  # older, still preferred
    assert find_checkpoint(run) == best
    assert find_checkpoint(run / "checkpoints") == best  # its checkpoints folder
    assert find_checkpoint(run, names=("last.pt",)) == last

    with pytest.raises(FileNotFoundError) as info:
        find_checkpoint(tmp_path / "nowhere.pt", what="ldm.autoencoder_checkpoint")
    assert str(info.value) == f"ldm.autoencoder_checkpoint: no checkpoint file or run folder at {tmp_path / 'nowhere.pt'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        find_checkpoint(tmp_path / "empty", what="--checkpoint")
    assert str(info.value) == (f"--checkpoint: folder {tmp_path / 'empty'} holds no checkpoint: no checkpoints/best.pt "
                               "or checkpoints/last.pt (nor best.pt or last.pt)")


def test_newest_checkpoint_prefers_the_newest_best_then_the_newest_last(tmp_path):
    now = time.time()
    with pytest.raises(FileNotFoundError) as info:
        newest_checkpoint(tmp_path, "ldm", noun="LDM", remedy="train one (monai-diffusion train-ldm)")
    assert str(info.value) == (f"No LDM checkpoint: there is no {tmp_path}/ldm-*/checkpoints/best.pt or "
                               f"{tmp_path}/ldm-*/checkpoints/last.pt; train one (monai-diffusion train-ldm)")
    old_last = _touch(tmp_path / "ldm-1" / "checkpoints" / "last.pt", now - 100)
    assert newest_checkpoint(tmp_path, "ldm") == old_last
    new_last = _touch(tmp_path / "ldm-2" / "checkpoints" / "last.pt", now)
    _touch(tmp_path / "controlnet-1" / "checkpoints" / "last.pt", now + 100)  # another command's run
    assert newest_checkpoint(tmp_path, "ldm") == new_last
    best = _touch(tmp_path / "ldm-1" / "checkpoints" / "best.pt", now - 50)  # any run's best.pt beats every last.pt
    assert newest_checkpoint(tmp_path, "ldm") == best
    assert newest_checkpoint(tmp_path, "ldm", names=("last.pt",)) == new_last


def test_resolve_resume_table(tmp_path, caplog):
    now = time.time()
    old = _touch(tmp_path / "runs" / "autoencoder-a" / "checkpoints" / "last.pt", now - 100)
    new = _touch(tmp_path / "runs" / "autoencoder-b" / "checkpoints" / "last.pt", now)
    missing = tmp_path / "runs" / "autoencoder-c" / "checkpoints" / "last.pt"
    candidates = [new, missing, old]

    for off in (False, None, "false", "False", "no"):
        assert resolve_resume(off, candidates) is None
    assert resolve_resume(True, candidates) == new
    assert resolve_resume("true", candidates) == new
    assert resolve_resume("auto", candidates) == new
    assert resolve_resume(str(old), candidates) == old  # an explicit file
    assert resolve_resume(str(old.parent.parent), candidates) == old  # a run folder
    assert resolve_resume(str(old.parent), candidates) == old  # its checkpoints folder

    with pytest.raises(ValueError, match=r"--resume true but no checkpoint found in runs/x-\*"):
        resolve_resume(True, [missing], where="runs/x-*")
    with pytest.raises(ValueError, match="no checkpoint found"):
        resolve_resume("true", [])
    with caplog.at_level("INFO", logger="monai_diffusion"):
        assert resolve_resume("auto", [missing]) is None
    assert "no checkpoint found, starting fresh" in caplog.text
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        resolve_resume(str(tmp_path / "does-not-exist.pt"), candidates)
    empty_run = tmp_path / "runs" / "empty"
    empty_run.mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoints/last.pt"):
        resolve_resume(str(empty_run), candidates)


def test_check_shape_keys_lists_every_difference():
    saved = {"autoencoder": {"num_channels": [32, 64], "downsample_factors": [4, 2], "latent_channels": 3}}
    current = {"autoencoder": {"num_channels": [32, 64], "downsample_factors": [2, 2], "latent_channels": 8}}
    keys = ["autoencoder.num_channels", "autoencoder.downsample_factors", "autoencoder.latent_channels", "ldm.x"]
    check_shape_keys(saved, saved, keys)  # identical: fine
    with pytest.raises(ValueError) as info:
        check_shape_keys(saved, current, keys)
    message = str(info.value)
    assert "autoencoder.downsample_factors: checkpoint [4, 2], config [2, 2]" in message
    assert "autoencoder.latent_channels: checkpoint 3, config 8" in message
    assert "num_channels" not in message
    # keys missing on both sides are equal; a key the checkpoint predates reads as its schema default (new keys
    # default to the behaviour before them), a key missing from the run's config is a difference
    check_shape_keys(saved, {"autoencoder": {**saved["autoencoder"], "attention_levels": None}},
                     ["autoencoder.attention_levels"])
    with pytest.raises(ValueError, match=r"autoencoder.attention_levels: checkpoint null, config \[true, true\]"):
        check_shape_keys(saved, {"autoencoder": {**saved["autoencoder"], "attention_levels": [True, True]}},
                         ["autoencoder.attention_levels"])
    with pytest.raises(ValueError, match=r"autoencoder.latent_channels: checkpoint 3, config \(missing\)"):
        check_shape_keys(saved, {"autoencoder": {}}, ["autoencoder.latent_channels"])


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(3), np.random.randn(2), torch.rand(4))

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only load works
    got = (random.random(), np.random.rand(3), np.random.randn(2), torch.rand(4))

    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])


KILLED_WRITER = """
import os, sys, torch
from monai_diffusion.engine.checkpoint import save_checkpoint

def killed(obj, f, *args, **kwargs):
    f.write(b"PK partial bytes")
    f.flush()
    os._exit(9)  # like SIGKILL: no exception handler, no cleanup

torch.save = killed
save_checkpoint(sys.argv[1], {"step": 1})
"""


def test_temp_file_of_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    """A save killed mid-write leaves a temp file naming its (now gone) writer; one of a live writer stays."""
    folder = tmp_path / "checkpoints"
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(folder / "last.pt")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]
    (left,) = folder.glob(".*.tmp")
    assert left.name.startswith(".last.pt.") and f"@{socket.gethostname()}." in left.name
    live = folder / f".step-00000002.pt.{os.getpid()}@{socket.gethostname()}.{'0' * 32}.tmp"
    other_host = folder / f".last.pt.1@elsewhere.{'1' * 32}.tmp"
    live.write_bytes(b"being written")
    other_host.write_bytes(b"cannot tell")

    assert remove_temp_files(folder, only_gone_writers=True) == [left]
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, other_host.name])
    # A resumed run owns its folder: every temp file there is a leftover.
    assert sorted(remove_temp_files(folder, only_gone_writers=False)) == sorted([live, other_host])
    assert remove_temp_files(tmp_path / "missing", only_gone_writers=True) == []


def test_check_shape_keys_names_the_checkpoint_and_the_remedy():
    with pytest.raises(ValueError, match=r"(?s)The checkpoint /x/last.pt was trained.*a: checkpoint 1, config 2\nDo this"):
        check_shape_keys({"a": 1}, {"a": 2}, ["a"], Path("/x/last.pt"), remedy="Do this")


def test_weights_digest_is_bit_exact():
    model = torch.nn.Linear(3, 2)
    same = weights_digest(model.state_dict(), None)
    assert same == weights_digest({k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(10.0))  # one ulp
    assert weights_digest(model.state_dict()) != same
