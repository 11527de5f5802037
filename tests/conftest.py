"""Shared fixtures (helpers.py holds the plain functions they use)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

import signal_hook
from helpers import tiny_config_dict, write_volumes


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_in_a_terminal():
    """Python's own SIGINT handler for the whole run: a shell starts background jobs (``cmd &``, nohup) with SIGINT
    ignored, and the stop-signal tests (and the commands they start, which inherit an ignored signal) need Ctrl-C
    to behave as in a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True, scope="session")
def stop_signal_hook():
    """Runs in this process honour ``MONAI_DIFFUSION_TEST_SIGNAL`` (signal_hook.py); the commands the tests start
    get it from ``helpers.run_python``."""
    signal_hook.install()


@pytest.fixture
def nifti_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_volumes(folder, 5)
    return folder


@pytest.fixture
def tiny_config_file(tmp_path, nifti_folder) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(nifti_folder, tmp_path / "runs")))
    return path
