"""requirements.txt (what ``pip install -r requirements.txt`` installs) agrees with pyproject.toml's dependencies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def normalised(requirement: str) -> str:
    """``Huggingface_Hub >= 0.20`` -> ``huggingface-hub>=0.20``: the name as pip compares names, no spaces."""
    requirement = requirement.split("#", 1)[0].replace(" ", "")
    name, rest = re.match(r"([A-Za-z0-9._-]+)(.*)", requirement).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest


def test_requirements_txt_lists_exactly_the_runtime_dependencies_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = [normalised(line) for line in lines if line and not line.startswith("#")]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(normalised(dependency) for dependency in project["dependencies"])
