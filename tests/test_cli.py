"""The command line as a user meets it: ``python -m monai_diffusion``, ``--version``, and help in plain text."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from monai_diffusion import __version__, command_description
from monai_diffusion.cli import COMMANDS, main
from monai_diffusion.memory import benchmark, plan

ROOT = Path(__file__).resolve().parents[1]
RST_MARKUP = re.compile(r"``|:[a-z]+:`")  # ``literal`` and :func:`role`


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai_diffusion", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PYTHONUNBUFFERED": "1"})


def help_text(function, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        function(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_python_dash_m_prints_the_versions_of_the_package_torch_and_monai():
    result = run_module("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"monai-diffusion {__version__} from ")
    assert f"torch {importlib.metadata.version('torch')}" in line
    assert f"MONAI {importlib.metadata.version('monai')}" in line


def test_python_dash_m_runs_a_command_and_refuses_an_unknown_one():
    result = run_module("validate", "--config", "config/examples/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert "config is valid" in result.stdout
    unknown = run_module("trian-ldm")
    assert unknown.returncode == 2
    assert "invalid choice: 'trian-ldm'" in unknown.stderr


def test_top_level_help_is_plain_text_with_the_pipeline_order(capsys):
    text = help_text(main, ["--help"], capsys)
    assert not RST_MARKUP.search(text), text
    assert "validate -> train-autoencoder -> train-ldm -> [train-controlnet] -> sample / evaluate" in text
    assert "monai-diffusion COMMAND --help" in text
    assert all(name in text for name in COMMANDS)
    assert main([]) == 0  # no command: the same help
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_a_plain_description_in_its_docstring(name):
    path = ROOT / Path(*COMMANDS[name][0].split(".")).with_suffix(".py")
    description = command_description(ast.get_docstring(ast.parse(path.read_text())))
    assert description[:1].isupper() and not RST_MARKUP.search(description), description
    assert "monai-diffusion" not in description  # the usage line names the command


def test_command_description_drops_the_command_name_and_the_markup():
    doc = "``monai-diffusion plan --config FILE``: measure :func:`~a.b.step` with ``x`` (:mod:`a.memory`).\n\nMore."
    assert command_description(doc) == "Measure step with x (a.memory)."


def test_benchmark_help_is_plain_and_its_default_output_is_no_docs_folder(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: the default is not broken at its hyphen
    text = help_text(benchmark.parse_args, ["--help"], capsys)
    assert not RST_MARKUP.search(text), text
    default = benchmark.parse_args([]).output
    assert default == benchmark.DEFAULT_OUTPUT == "benchmark-results/benchmarks.md"
    assert f"default: {default} in the current folder" in text


def test_plan_help_states_its_exit_statuses(capsys):
    text = help_text(plan.main, ["--help"], capsys)
    assert not RST_MARKUP.search(text), text
    statuses = text.split("exit status:", 1)[1]
    assert [line.split()[0] for line in statuses.strip().splitlines()] == ["0", "1", "2", "3"]


def test_plan_refuses_an_unreadable_budget_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--gpu-memory", "12XB"])
    assert exit_info.value.code == 2
    assert "cannot read a memory size from '12XB'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_commands_help_is_plain_text(name, capsys):
    text = help_text(main, [name, "--help"], capsys)
    assert not RST_MARKUP.search(text), text
    assert text.startswith(f"usage: monai-diffusion {name}")
