"""Shared fixtures (helpers.py holds the plain functions they use)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import tiny_config_dict, write_volumes


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
