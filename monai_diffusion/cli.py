"""``monai-diffusion <command>``: one subcommand per module, each also runnable as ``python -m``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

from monai_diffusion import __version__

# command -> (module, one-line help). Modules are imported only when their command runs: keeps --help fast.
COMMANDS = {
    "validate": ("monai_diffusion.validate", "check a config and print what it builds"),
    "train-autoencoder": ("monai_diffusion.train_autoencoder", "train the 3D AutoencoderKL"),
    "train-ldm": ("monai_diffusion.train_ldm", "train the latent diffusion UNet"),
    "train-controlnet": ("monai_diffusion.train_controlnet", "train a ControlNet that makes the LDM follow label maps"),
    "sample": ("monai_diffusion.sample", "generate volumes (NIfTI + PNG)"),
    "evaluate": ("monai_diffusion.evaluate", "score a trained autoencoder or LDM run against baselines"),
    "export": ("monai_diffusion.export", "write a trained LDM run (and its ControlNet) as a MONAI bundle"),
    "benchmark": ("monai_diffusion.memory.benchmark", "measure peak memory and step time"),
    "plan": ("monai_diffusion.memory.plan", "predict memory for a config and propose a fitting change"),
}

DESCRIPTION = "Train 3D latent diffusion models on medical volumes (NIfTI) from a YAML config."

EPILOG = """\
pipeline:
  validate -> train-autoencoder -> train-ldm -> [train-controlnet] -> sample / evaluate / export
  plan and benchmark answer memory questions at any point.

Run 'monai-diffusion COMMAND --help' for a command's options. 'python -m monai_diffusion' is the same
tool, and each command is also a module: 'python -m monai_diffusion.train_ldm' is 'monai-diffusion train-ldm'."""


def installed_version(module: str) -> str:
    """The version of the distribution that provides ``module`` (read from its metadata: no import of torch)."""
    for distribution in packages_distributions().get(module, []):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "not installed"


def version_text() -> str:
    location = Path(__file__).resolve().parent
    return (f"monai-diffusion {__version__} from {location} (torch {installed_version('torch')}, "
            f"MONAI {installed_version('monai')}, Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monai-diffusion", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30),
    )
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the versions of monai-diffusion, torch, MONAI and Python, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return module.main(argv[1:])
    # No command: --help and --version exit here, an unknown command is a usage error (exit 2), nothing prints help.
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
