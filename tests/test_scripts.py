"""The two commands of a fresh machine: the quickstart and the test command share one environment, and CI runs
exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(script: Path) -> list[str]:
    """The command lines of a shell script (comments, blank lines and `set`/`cd` housekeeping left out)."""
    lines = [line.strip() for line in script.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def readme_block(heading: str) -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split(f"## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_ci_runs_exactly_the_readme_test_command():
    (test_command,) = readme_block("Tests")
    assert test_command == "bash scripts/test.sh"
    assert commands(ROOT / ".ci" / "run") == [test_command]


def test_quickstart_and_test_command_share_one_environment():
    (quickstart,) = readme_block("Quickstart (CPU, no data needed)")
    assert quickstart == "bash scripts/quickstart.sh"
    for script, setup in (("quickstart.sh", "bash scripts/setup_venv.sh"), ("test.sh", "bash scripts/setup_venv.sh test")):
        lines = commands(ROOT / "scripts" / script)
        assert lines[0].split("#")[0].strip() == setup and lines[1] == ". .venv/bin/activate", script
    assert commands(ROOT / "scripts" / "test.sh")[-1] == 'python -m pytest -q "$@"'


def test_setup_installs_the_cpu_torch_wheel_before_the_project():
    lines = commands(ROOT / "scripts" / "setup_venv.sh")
    torch_line = next(i for i, line in enumerate(lines) if "torch==" in line)
    project_line = next(i for i, line in enumerate(lines) if "install --quiet -e" in line)
    assert lines[torch_line].startswith('python -c "import torch"') and torch_line < project_line
