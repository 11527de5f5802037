"""The shared loop pieces: seeding, run folders that never collide, stop signals, exit statuses."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_diffusion.config import config_from_dict
from monai_diffusion.engine import loop
from monai_diffusion.engine.checkpoint import save_checkpoint
from monai_diffusion.engine.distributed import DistInfo
from monai_diffusion.engine.loop import StopSignals, TrainingStopped, find_resume, new_run_dir, run_training, start_run

SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def make_config(output_dir: Path, **output) -> object:
    return config_from_dict({"device": {"device": "cpu"}, "seed": 7,
                             "output": {"output_dir": str(output_dir), **output}})


def test_start_run_seeds_python_numpy_and_torch_with_seed_plus_rank(tmp_path):
    random.random(), np.random.random(), torch.rand(1)  # whatever state they had before
    start_run(make_config(tmp_path))
    assert random.random() == random.Random(7).random()
    assert np.random.random() == np.random.RandomState(7).random_sample()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))


def test_run_folders_are_created_exclusively(tmp_path):
    """Eight runs starting at once with one name get eight folders: the name, then -2 ... -8."""
    folders: list[Path] = []
    threads = [threading.Thread(target=lambda: folders.append(loop._create_run_folder(tmp_path / "run")))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in folders) == sorted(["run", *(f"run-{n}" for n in range(2, 9))])


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    class FrozenClock:
        @staticmethod
        def now():
            from datetime import datetime

            return datetime(2025, 1, 2, 3, 4, 5)

    monkeypatch.setattr(loop, "datetime", FrozenClock)
    config = make_config(tmp_path)
    first, second = new_run_dir(config, "ldm", SINGLE), new_run_dir(config, "ldm", SINGLE)
    assert (first.name, second.name) == ("ldm-20250102-030405", "ldm-20250102-030405-2")
    assert (second / "checkpoints").is_dir()


def test_resume_auto_finds_a_run_name_that_got_a_suffix(tmp_path):
    config = make_config(tmp_path, run_name="exp")
    first, second = new_run_dir(config, "autoencoder", SINGLE), new_run_dir(config, "autoencoder", SINGLE)
    assert second == tmp_path / "exp-2"
    (tmp_path / "exp-other" / "checkpoints").mkdir(parents=True)  # another name, not this run's
    save_checkpoint(tmp_path / "exp-other" / "checkpoints" / "last.pt", {"step": 9})
    save_checkpoint(first / "checkpoints" / "last.pt", {"step": 1})
    assert find_resume(config, "autoencoder", "auto") == first / "checkpoints" / "last.pt"
    os.utime(first / "checkpoints" / "last.pt", (1, 1))
    save_checkpoint(second / "checkpoints" / "last.pt", {"step": 2})
    assert find_resume(config, "autoencoder", "auto") == second / "checkpoints" / "last.pt"


def test_stop_signals_note_the_signal_and_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install()
    try:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # after SIGTERM: still just a request, the first signal counts
        assert stop.agreed() == signal.SIGTERM
    finally:
        stop.release()
    assert signal.getsignal(signal.SIGTERM) is before

    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("outcome, status, line", [
    (TrainingStopped(signal.SIGTERM, 12, Path("/runs/ldm-1/checkpoints/last.pt")), 143,
     "stopped by SIGTERM after optimizer step 12: /runs/ldm-1/checkpoints/last.pt holds that step; continue with "
     "--resume auto (or --resume /runs/ldm-1)"),
    (TrainingStopped(signal.SIGINT, 3, Path("/r/checkpoints/last.pt")), 130, "stopped by SIGINT after optimizer step 3"),
    (KeyboardInterrupt(), 130, "interrupted: stopped at once; nothing saved since the last checkpoint"),
    (FileNotFoundError("data.data_dir: /x does not exist"), 1, "data.data_dir: /x does not exist"),
    (None, 0, None),
])
def test_run_training_turns_the_outcome_into_one_line_and_an_exit_status(tmp_path, caplog, outcome, status, line):
    def train(config, resume=None):
        if outcome is not None:
            raise outcome
        return tmp_path

    assert run_training(train, make_config(tmp_path), None) == status
    if line is not None:
        (record,) = caplog.records
        assert line in record.getMessage() and "\n" not in record.getMessage()
